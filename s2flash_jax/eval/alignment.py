"""A GenEval-like prompt-alignment check for the shapes dataset, read analytically off the pixels.

`detect_objects` finds the coloured objects in an image and reads each one's colour, shape, size
and grid cell:

1. Colour: a pixel of an anti-aliased or blurred edge mixes an object colour with the background,
   so it lies on the segment from the background to that colour in RGB space. Each pixel gets
   the palette colour whose segment is nearest, and its position along that segment as a
   strength in [0, 1]; pixels far from every segment (mixtures of two colours, off-palette
   colours) count as background.
2. Objects: per colour, 8-connected groups of pixels of strength >= 1/2, widened by two pixels (at
   32 px) to take in their soft rim. Groups below 40% of the smallest object's area are noise.
3. Shape: the object's soft mask is compared (intersection over union) with a circle, a square and a
   triangle of the same area and centroid, each sharp and blurred a little; the best match wins.
   Matching the area first keeps the shape decision apart from the size one; the blurred shapes
   keep blurry generated images readable.
4. Size: the width of the matched shape against the geometric mean of the small and big widths.
5. Position: the grid cell holding the matched shape's centre.

`score` compares the detections with the prompted scenes, per attribute and per image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from s2flash_jax.data.shapes import (BACKGROUND, COLOURS, EXTENTS, FILL_RATIOS, POSITIONS, SHAPES, Scene,
                                     shape_coverage)

COLOUR_TOLERANCE = 0.25  # RGB distance from a colour's background-to-colour segment still read as that colour
CORE_STRENGTH = 0.5  # colour strength that seeds an object; its weaker rim joins afterwards
RIM_WIDTH = 2  # pixels at 32 px around an object's core that belong to it: anti-aliasing and some blur
TEMPLATE_BLURS = (0.0, 0.5, 1.0, 1.5)  # Gaussian sigmas in pixels at 32 px: shapes are matched as sharp or blurred
MIN_AREA_FRACTION = 0.4 * FILL_RATIOS["triangle"] * EXTENTS["small"] ** 2  # of the image: 40% of the smallest object
SIZE_THRESHOLD = math.sqrt(EXTENTS["small"] * EXTENTS["big"])  # width, as a fraction of the image side
METRICS = ("colour", "shape", "size", "position", "count", "prompt")

_COLOUR_NAMES = tuple(COLOURS)
_DIRECTIONS = np.array(list(COLOURS.values())) - np.array(BACKGROUND)  # [6, 3]: background -> colour
_EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    size: str
    position: str
    pixels: float  # area in pixels, counting partly covered pixels by their colour strength


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """The objects in an image, largest first. image: [H, W, 3] float in [0, 1] (slight overshoot is clipped)."""
    image = np.asarray(image, np.float64)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one RGB image [H, W, 3], got an array of shape {image.shape}")
    if not np.isfinite(image).all() or image.min() < -0.5 or image.max() > 1.5:
        raise ValueError(f"expected finite pixel values in [0, 1], got values in [{image.min()}, {image.max()}]")
    strength, nearest = colour_strengths(np.clip(image, 0.0, 1.0))
    min_area = MIN_AREA_FRACTION * image.shape[0] * image.shape[1]
    rim_width = max(1, round(RIM_WIDTH * image.shape[0] / 32))
    found = []
    for c, colour in enumerate(_COLOUR_NAMES):
        mask = np.where(nearest == c, strength, 0.0)
        groups, count = ndimage.label(mask >= CORE_STRENGTH, structure=_EIGHT_CONNECTED)
        for g in range(1, count + 1):
            rim = ndimage.binary_dilation(groups == g, structure=_EIGHT_CONNECTED, iterations=rim_width)
            soft = np.where(rim, mask, 0.0)
            if soft.sum() >= min_area:
                found.append(_read_object(colour, soft))
    return sorted(found, key=lambda o: -o.pixels)


def colour_strengths(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's nearest palette colour and how strongly it shows it.

    image: [H, W, 3] in [0, 1]. Returns strength [H, W] float64 in [0, 1] (0 where the pixel is
    background or near no colour's segment) and nearest [H, W] int, an index into COLOURS.
    """
    offset = image - np.asarray(BACKGROUND)  # [H, W, 3]
    along = np.clip(offset @ _DIRECTIONS.T / (_DIRECTIONS ** 2).sum(-1), 0.0, 1.0)  # [H, W, 6]
    distance = np.linalg.norm(offset[..., None, :] - along[..., None] * _DIRECTIONS, axis=-1)  # [H, W, 6]
    nearest = distance.argmin(-1)
    strength = np.take_along_axis(along, nearest[..., None], -1)[..., 0]
    on_segment = np.take_along_axis(distance, nearest[..., None], -1)[..., 0] <= COLOUR_TOLERANCE
    return np.where(on_segment, strength, 0.0), nearest


def _read_object(colour: str, soft: np.ndarray) -> DetectedObject:
    """Shape, size and position of one object from its soft mask soft: [H, W] in [0, 1]."""
    height, width = soft.shape
    area = soft.sum()
    rows, columns = np.indices(soft.shape) + 0.5
    centroid_x, centroid_y = (soft * columns).sum() / area, (soft * rows).sum() / area
    extents = np.sqrt(area / np.array([FILL_RATIOS[shape] for shape in SHAPES]))  # [3]: widths at this area
    # A triangle's centroid lies a sixth of its height below the middle of its bounding box.
    centres_y = centroid_y - np.array([extent / 6 if shape == "triangle" else 0.0
                                       for shape, extent in zip(SHAPES, extents)])
    best = _best_shape(soft, centroid_x, centres_y, extents)
    size = "big" if extents[best] >= SIZE_THRESHOLD * math.sqrt(height * width) else "small"
    row = min(max(int(centres_y[best] * 3 / height), 0), 2)
    column = min(max(int(centroid_x * 3 / width), 0), 2)
    return DetectedObject(colour, SHAPES[best], size, POSITIONS[3 * row + column], float(area))


def _best_shape(soft: np.ndarray, centre_x: float, centres_y: np.ndarray, extents: np.ndarray) -> int:
    """Index into SHAPES of the shape (placed at centre_x, centres_y[i], extents[i] wide) that best
    overlaps the mask soft: [H, W], sharp or blurred."""
    height, width = soft.shape
    rows, columns = np.nonzero(soft)
    reach = extents.max() / 2 + 3  # pixels from the centre that any of the shapes, blurred, covers
    top = max(0, min(rows.min(), math.floor(centres_y.min() - reach)))
    bottom = min(height, max(rows.max() + 1, math.ceil(centres_y.max() + reach)))
    left = max(0, min(columns.min(), math.floor(centre_x - reach)))
    right = min(width, max(columns.max() + 1, math.ceil(centre_x + reach)))
    window = soft[top:bottom, left:right]
    sharp = np.stack([shape_coverage(shape, np.array([centre_x]), centres_y[[i]], extents[[i]],
                                     np.arange(top, bottom)[None], np.arange(left, right)[None])[0]
                      for i, shape in enumerate(SHAPES)])  # [3, h, w]
    # The mask was cut to the object's core and rim, so the blurred shapes' far tails are cut alike.
    blurred = [np.where(window > 0, _blur_matrix(window.shape[0], sigma * height / 32) @ sharp
                        @ _blur_matrix(window.shape[1], sigma * height / 32).T, 0.0)
               for sigma in TEMPLATE_BLURS if sigma]
    templates = np.stack([sharp] + blurred)  # [blurs, 3, h, w]
    overlap = (np.minimum(window, templates).sum((-2, -1)) /
               np.maximum(window, templates).sum((-2, -1)))  # [blurs, 3]: soft intersection over union
    return int(overlap.max(0).argmax())


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] matrix of a 1-D Gaussian blur (sigma in pixels) with zeros beyond the ends."""
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    radius = np.arange(-math.ceil(4 * sigma), math.ceil(4 * sigma) + 1)
    return np.exp(-0.5 * (offsets / sigma) ** 2) / np.exp(-0.5 * (radius / sigma) ** 2).sum()


def score(images: np.ndarray, scenes: Sequence[Scene]) -> dict[str, float]:
    """How well images show their prompts' scenes. images: [N, H, W, 3] in [0, 1].

    Per prompted object (over all objects of all images): "colour" (an object of its colour is
    there), "shape", "size", "position" (the largest object of its colour has that attribute; a
    missing object is wrong on all; an object whose prompt leaves its cell unsaid has no position
    to be wrong about). Per image: "count" (as many objects detected as prompted) and
    "prompt" (every object found with every attribute right, and the count right). Each in [0, 1].
    """
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images for {len(scenes)} scenes; expected one image per scene")
    if not scenes:
        raise ValueError("no images to score; expected at least one")
    results = {name: [] for name in METRICS}  # per prompted object for attributes, per image for count and prompt
    for image, scene in zip(images, scenes):
        detected = detect_objects(image)
        all_right = True
        for asked in scene.objects:
            # detect_objects lists largest first, so this is the largest object of the asked colour.
            match = next((d for d in detected if d.colour == asked.colour), None)
            results["colour"].append(match is not None)
            for attribute in ("shape", "size", "position") if asked.position_said else ("shape", "size"):
                right = match is not None and getattr(match, attribute) == getattr(asked, attribute)
                results[attribute].append(right)
                all_right &= right
        count_right = len(detected) == len(scene.objects)
        results["count"].append(count_right)
        results["prompt"].append(all_right and count_right)
    return {name: float(np.mean(values)) for name, values in results.items()}
