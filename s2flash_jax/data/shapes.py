"""A procedural text-to-image dataset: one or two coloured shapes on a gray background.

A scene holds one or two objects, each a colour, a shape, a size and a cell of a 3x3 grid; two
objects never share a colour or a cell. Its prompt follows a fixed grammar,

    "a small red circle at the top left and a big blue square at the bottom right",

and `parse_prompt` reads it back. A prompt may leave an object's cell unsaid ("a small red circle");
the scene still has one, which the renderer draws and the checker does not score. Such prompts make
the caption-to-image map one-to-many, as real captions are: the posterior mean a one-step
prediction starts from is then a faint haze over the cells, not a sample (`scene_at`'s
`unsaid_position_rate`, `heldout_scenes(unsaid_positions=True)`). `scene_at(seed, i)` is scene i of an unbounded random stream,
computed on its own (random access, no state), and never one of the 64 `heldout_scenes()` kept
for evaluation. `render` draws a scene anti-aliased (supersampled, box filtered) at any size;
`render_batch` draws many at once, vectorised over objects.

Geometry, in units of the image side S: objects are centred in their grid cell, optionally moved
by a jitter of at most S/64 per axis (half a pixel at 32 px); "big" objects are 0.29 S across
(9.3 px at 32 px) and "small" ones 0.18 S (5.8 px). A cell is S/3 wide, so two big objects in
adjacent cells, jittered towards each other, are still apart. Triangles point up and fill half
of their bounding box.

Randomness comes from a 64-bit integer hash of (seed, index), not from numpy's generators, so
the stream and the held-out set are the same on every machine and numpy version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections.abc import Sequence
from functools import cache

import numpy as np

BACKGROUND: tuple[float, float, float] = (0.5, 0.5, 0.5)  # mid-gray, so autoencoded latents (2x-1) are zero on the background
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "big")
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right")  # a 3x3 grid, row-major
_GRAMMAR_WORDS = ("a", "at", "the", "and")
VOCABULARY: tuple[str, ...] = tuple(sorted(set(
    _GRAMMAR_WORDS + SIZES + tuple(COLOURS) + SHAPES + tuple(w for p in POSITIONS for w in p.split()))))

EXTENTS: dict[str, float] = {"small": 0.18, "big": 0.29}  # width and height of an object, as a fraction of the image side
FILL_RATIOS: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box area
MAX_JITTER = 1 / 64  # largest shift of an object from its cell centre, per axis, as a fraction of the image side
SUPERSAMPLING = 4  # samples per pixel along each axis
GRAMMAR = "'a {size} {colour} {shape} [at the {position}]', joined by ' and ' for a second object"

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array(list(COLOURS.values()), np.float32)  # [6, 3]
_SUBPIXEL_OFFSETS = (np.arange(SUPERSAMPLING, dtype=np.float32) + 0.5) / SUPERSAMPLING
_RENDER_CHUNK = 1024  # images per vectorised step: bounds the memory of the supersampled windows
_HELDOUT_PER_COUNT = 32
_MASK64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """position: the object's grid cell; None only for an object parsed from a prompt that leaves it
    unsaid. position_said: whether the prompt names the cell."""

    colour: str
    shape: str
    size: str
    position: str | None
    position_said: bool = True

    def __post_init__(self):
        for attribute, allowed in (("colour", tuple(COLOURS)), ("shape", SHAPES), ("size", SIZES),
                                   ("position", POSITIONS + (() if self.position_said else (None,)))):
            if getattr(self, attribute) not in allowed:
                raise ValueError(f"unknown {attribute} {getattr(self, attribute)!r}; expected one of {list(allowed)}")

    def said(self) -> ShapeObject:
        """The same object with its cell named (what the renderer draws, whatever the prompt says)."""
        return dataclasses.replace(self, position_said=True)


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]  # 1 or 2 objects; two objects never share a colour or a grid cell

    def __post_init__(self):
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene holds 1 or 2 objects, not {len(self.objects)}")
        if len({o.colour for o in self.objects}) != len(self.objects):
            raise ValueError(f"two objects share the colour {self.objects[0].colour!r}; a scene's colours differ")
        cells = [o.position for o in self.objects if o.position is not None]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share the cell {self.objects[0].position!r}; a scene's cells differ")


# --- prompts ---------------------------------------------------------------------------------

def prompt(scene: Scene) -> str:
    """The scene's caption, e.g. "a small red circle at the top left and a big blue square", where the
    second object's cell is unsaid."""
    return " and ".join(f"a {o.size} {o.colour} {o.shape}" + (f" at the {o.position}" if o.position_said else "")
                        for o in scene.objects)


def parse_prompt(text: str) -> Scene:
    """The scene a prompt describes (the inverse of `prompt`); a ValueError names what does not fit the grammar."""
    words = text.split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise ValueError(f"unknown word {unknown[0]!r} in prompt {text!r}; expected only the words "
                         f"{list(VOCABULARY)}, as in {GRAMMAR}")
    parts, current = [], []
    for word in words:
        if word == "and":
            parts.append(current)
            current = []
        else:
            current.append(word)
    parts.append(current)
    if len(parts) > 2:
        raise ValueError(f"prompt {text!r} describes {len(parts)} objects; expected 1 or 2: {GRAMMAR}")
    objects = tuple(_parse_object(part, text) for part in parts)
    try:
        return Scene(objects)
    except ValueError as e:
        raise ValueError(f"prompt {text!r}: {e}") from None


def _parse_object(words: list[str], text: str) -> ShapeObject:
    """One object from the words of 'a {size} {colour} {shape} [at the {position}]'."""
    part = " ".join(words) or "(nothing)"
    said = len(words) != 4  # 'a {size} {colour} {shape}' alone names no cell: any will do
    expected = [("'a'", ("a",)), ("a size", SIZES), ("a colour", tuple(COLOURS)), ("a shape", SHAPES)]
    expected += [("'at'", ("at",)), ("'the'", ("the",))] if said else []
    for i, (what, allowed) in enumerate(expected):
        if i >= len(words) or words[i] not in allowed:
            found = repr(words[i]) if i < len(words) else "the end of the object"
            raise ValueError(f"in {part!r} of prompt {text!r}: found {found} where {what} ({'/'.join(allowed)}) "
                             f"belongs; expected {GRAMMAR}")
    position = " ".join(words[len(expected):]) if said else None
    if said and position not in POSITIONS:
        raise ValueError(f"in {part!r} of prompt {text!r}: {position or '(nothing)'!r} is not a position; "
                         f"expected one of {list(POSITIONS)}")
    return ShapeObject(colour=words[2], shape=words[3], size=words[1], position=position, position_said=said)


# --- scenes ----------------------------------------------------------------------------------

def scene_at(seed: int, index: int, unsaid_position_rate: float = 0.0) -> Scene:
    """Scene `index` of the unbounded random stream for `seed`: one or two objects (probability 1/2
    each), attributes uniform. Held-out scenes are redrawn, so the stream never shows one. Each
    object's prompt leaves its cell unsaid with probability `unsaid_position_rate`; the objects and
    cells are those of the rate-0 stream."""
    heldout = _heldout_keys()
    count = 1 + (_hash64(seed, index) & 1)  # drawn once, so redrawing held-out scenes keeps the 1/2 split
    for attempt in itertools.count(1):
        scene = _decode_scene(count, _hash64(seed, index, attempt))
        if frozenset(scene.objects) not in heldout:
            break
    if not unsaid_position_rate:
        return scene
    unsaid = [_hash64(seed, index, -1 - k) / 2**64 < unsaid_position_rate for k in range(count)]
    return Scene(tuple(dataclasses.replace(o, position_said=not u) for o, u in zip(scene.objects, unsaid)))


def scenes(seed: int, start: int, count: int, unsaid_position_rate: float = 0.0) -> list[Scene]:
    """Scenes start, ..., start + count - 1 of the stream for `seed`."""
    return [scene_at(seed, i, unsaid_position_rate) for i in range(start, start + count)]


def heldout_scenes(unsaid_positions: bool = False) -> list[Scene]:
    """The fixed evaluation set: 32 one-object then 32 two-object scenes, none of which `scene_at` produces
    (in either object order). unsaid_positions: the one-object prompts leave their cell unsaid."""
    if not unsaid_positions:
        return list(_heldout())
    return [Scene((dataclasses.replace(s.objects[0], position_said=False),)) if len(s.objects) == 1 else s
            for s in _heldout()]


def place_unsaid(scene_list: Sequence[Scene], seed: int) -> list[Scene]:
    """The scenes with every unsaid cell redrawn uniformly among those the scene leaves free: renders of
    these are samples of what the prompts ask for (a held-out scene fixes one cell the prompt does not)."""
    placed = []
    for i, scene in enumerate(scene_list):
        taken = {o.position for o in scene.objects if o.position_said}
        objects = []
        for k, o in enumerate(scene.objects):
            if not o.position_said:
                free = [p for p in POSITIONS if p not in taken]
                o = dataclasses.replace(o, position=free[_hash64(seed, i, k) % len(free)])
                taken.add(o.position)
            objects.append(o)
        placed.append(Scene(tuple(objects)))
    return placed


@cache
def _heldout() -> tuple[Scene, ...]:
    chosen: dict[int, list[Scene]] = {1: [], 2: []}
    seen = set()
    # A counter hashed with sha256: fixed forever, independent of numpy.
    for k in itertools.count():
        digest = hashlib.sha256(f"s2flash shapes heldout {k}".encode()).digest()
        scene = _decode_scene(1 + k % 2, int.from_bytes(digest[:8], "little"))
        key = frozenset(scene.objects)
        group = chosen[len(scene.objects)]
        if key not in seen and len(group) < _HELDOUT_PER_COUNT:
            seen.add(key)
            group.append(scene)
        if all(len(g) == _HELDOUT_PER_COUNT for g in chosen.values()):
            return tuple(chosen[1] + chosen[2])


@cache
def _heldout_keys() -> frozenset[frozenset[ShapeObject]]:
    return frozenset(frozenset(s.objects) for s in _heldout())


def _hash64(*values: int) -> int:
    """A well-mixed 64-bit hash of integers (splitmix64's finaliser, chained)."""
    h = 0x9E3779B97F4A7C15
    for value in values:
        h = _splitmix64((h ^ (value & _MASK64)) & _MASK64)
    return h


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _decode_scene(count: int, bits: int) -> Scene:
    """A scene of `count` objects from 64 random bits, read as mixed-radix digits (the bias of 64 bits
    over < 2^17 choices is negligible)."""
    colours, positions = list(_COLOUR_NAMES), list(POSITIONS)
    objects = []
    for _ in range(count):
        bits, colour = divmod(bits, len(colours))
        bits, shape = divmod(bits, len(SHAPES))
        bits, size = divmod(bits, len(SIZES))
        bits, position = divmod(bits, len(positions))
        objects.append(ShapeObject(colours.pop(colour), SHAPES[shape], SIZES[size], positions.pop(position)))
    return Scene(tuple(objects))


# --- rendering -------------------------------------------------------------------------------

def cell_centre(position: str, size: int) -> tuple[float, float]:
    """(x, y) in pixels of the centre of a grid cell in a size x size image (pixel (r, c) spans [c, c+1) x [r, r+1))."""
    row, column = divmod(POSITIONS.index(position), 3)
    return (column + 0.5) * size / 3, (row + 0.5) * size / 3


def shape_coverage(shape: str, centre_x: np.ndarray, centre_y: np.ndarray, extent: np.ndarray,
                   rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Fraction of each pixel a shape covers, by supersampling, for N shapes of one kind at once.

    centre_x, centre_y, extent: [N] in pixels (the centre of the bounding box, its width = height);
    rows: [N, h] and columns: [N, w] integer pixel indices of each shape's window. Returns [N, h, w] float32.
    """
    n, h, w = len(rows), rows.shape[1], columns.shape[1]
    # Sample coordinates relative to each shape's centre: [N, h*s] and [N, w*s].
    dy = ((rows[:, :, None] + _SUBPIXEL_OFFSETS).reshape(n, -1) - centre_y[:, None])[:, :, None]
    dx = ((columns[:, :, None] + _SUBPIXEL_OFFSETS).reshape(n, -1) - centre_x[:, None])[:, None, :]
    half = (np.asarray(extent, np.float32) / 2)[:, None, None]
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":  # apex at the top middle, base along the bottom: half-width grows from 0 to `half`
        inside = (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    return inside.reshape(n, h, SUPERSAMPLING, w, SUPERSAMPLING).mean(axis=(2, 4), dtype=np.float32)


def render(scene: Scene, size: int = 32, jitter_key: int | None = None) -> np.ndarray:
    """The scene drawn anti-aliased: [size, size, 3] float32 in [0, 1]. jitter_key: None for objects
    exactly at their cell centres, else the seed of their small random shifts (as render_batch's seed)."""
    return render_batch([scene], size, seed=jitter_key)[0]


def render_batch(scenes: Sequence[Scene], size: int = 32, seed: int | None = None) -> np.ndarray:
    """Many scenes drawn at once: [N, size, size, 3] float32 in [0, 1]. seed: None for no jitter, else
    the seed of every object's shift (uniform, at most MAX_JITTER * size per axis)."""
    if size < 8:
        raise ValueError(f"image size {size} is too small to draw shapes; expected at least 8 pixels")
    if any(o.position is None for scene in scenes for o in scene.objects):
        raise ValueError("a scene to render has an object with no cell (parsed from a prompt that leaves it "
                         "unsaid); expected every cell, as place_unsaid gives")
    images = np.empty((len(scenes), size, size, 3), np.float32)
    jitter = (np.zeros((len(scenes), 2, 2), np.float32) if seed is None else
              np.random.default_rng(seed).uniform(-1, 1, (len(scenes), 2, 2)).astype(np.float32) * MAX_JITTER * size)
    for start in range(0, len(scenes), _RENDER_CHUNK):
        stop = min(start + _RENDER_CHUNK, len(scenes))
        images[start:stop] = _render_chunk(scenes[start:stop], size, jitter[start:stop])
    return images


def _render_chunk(scenes: Sequence[Scene], size: int, jitter: np.ndarray) -> np.ndarray:
    """[n, size, size, 3] for n scenes; jitter: [n, 2 objects, (x, y)] in pixels."""
    window = math.ceil(EXTENTS["big"] * size + 2 * MAX_JITTER * size) + 2  # pixels around any object
    # A margin as wide as the farthest a window reaches past the image, so that none needs clipping.
    margin = math.ceil(window / 2 - (1 / 6 - MAX_JITTER) * size) + 1
    canvas = np.zeros((len(scenes), size + 2 * margin, size + 2 * margin, 3), np.float32)
    for shape, slot in itertools.product(SHAPES, range(2)):
        # One object per image at most in each group, so plain indexed addition never sees an index twice.
        group = [(i, scene.objects[slot]) for i, scene in enumerate(scenes)
                 if slot < len(scene.objects) and scene.objects[slot].shape == shape]
        if not group:
            continue
        image_index = np.array([i for i, _ in group])
        centres = np.array([cell_centre(o.position, size) for _, o in group], np.float32) + jitter[image_index, slot]
        extent = np.array([EXTENTS[o.size] * size for _, o in group], np.float32)
        top_left = np.floor(centres - window / 2).astype(np.int64) + margin  # (x, y) of each window's first pixel
        offsets = np.arange(window)
        columns, rows = top_left[:, 0, None] + offsets, top_left[:, 1, None] + offsets
        coverage = shape_coverage(shape, centres[:, 0] + margin, centres[:, 1] + margin, extent, rows, columns)
        tint = _PALETTE[[_COLOUR_NAMES.index(o.colour) for _, o in group]] - np.float32(BACKGROUND)
        # Objects never overlap, so adding each one's coverage-weighted colour change is exact.
        canvas[image_index[:, None, None], rows[:, :, None], columns[:, None, :]] += (
            coverage[..., None] * tint[:, None, None, :])
    images = canvas[:, margin:margin + size, margin:margin + size] + np.float32(BACKGROUND)
    return np.clip(images, 0.0, 1.0, out=images)
