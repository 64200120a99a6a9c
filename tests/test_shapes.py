"""The procedural shapes dataset: prompts, the scene stream, the held-out set and the renderer."""

import hashlib
import math

import numpy as np
import pytest

from s2flash_jax.data import shapes
from s2flash_jax.data.shapes import (BACKGROUND, COLOURS, EXTENTS, MAX_JITTER, POSITIONS, SHAPES, SIZES, VOCABULARY,
                                     Scene, ShapeObject, cell_centre, heldout_scenes, parse_prompt, place_unsaid, prompt,
                                     render, render_batch, scene_at, scenes, shape_coverage)

# sha256 of the held-out prompts, one a line: the evaluation set must never change silently.
HELDOUT_DIGEST = "0a4960b46cbfcb98df4db617a6b12e339faa62a074e39fbf92188e536869c31c"


def obj(colour="red", shape="circle", size="big", position="center"):
    return ShapeObject(colour=colour, shape=shape, size=size, position=position)


@pytest.fixture(scope="module")
def stream():
    return scenes(3, 0, 20_000)


# ---------------------------------------------------------------------------------------------
# Prompts


def test_prompt_grammar():
    scene = Scene((obj("red", "circle", "small", "top left"), obj("blue", "square", "big", "bottom right")))
    assert prompt(scene) == "a small red circle at the top left and a big blue square at the bottom right"
    assert prompt(Scene((obj("cyan", "triangle", "big", "center"),))) == "a big cyan triangle at the center"


def test_constants():
    assert COLOURS == {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0),
                       "purple": (1, 0, 1), "cyan": (0, 1, 1)}
    assert BACKGROUND == (0.5, 0.5, 0.5)
    assert list(VOCABULARY) == sorted(set(VOCABULARY))


def test_prompt_round_trip(stream):
    words = set()
    for scene in stream[:3000] + heldout_scenes():
        text = prompt(scene)
        assert parse_prompt(text) == scene
        words.update(text.split())
    assert words == set(VOCABULARY)  # every word is used, and none outside the vocabulary


def test_a_prompt_may_leave_a_cell_unsaid():
    scene = Scene((obj("red", "circle", "small", "top left"),
                   ShapeObject("blue", "square", "big", "center", position_said=False)))
    text = "a small red circle at the top left and a big blue square"
    assert prompt(scene) == text
    parsed = parse_prompt(text)
    assert parsed.objects[1] == ShapeObject("blue", "square", "big", None, position_said=False)
    assert prompt(parsed) == text
    with pytest.raises(ValueError, match="no cell"):  # the parsed scene says nothing of where to draw it
        render(parsed)
    with pytest.raises(ValueError, match="unknown position None"):
        ShapeObject("blue", "square", "big", None)


def test_unsaid_positions_hide_cells_of_the_same_stream():
    hidden = scenes(3, 0, 4000, unsaid_position_rate=0.25)
    assert [tuple(o.said() for o in s.objects) for s in hidden] == [s.objects for s in scenes(3, 0, 4000)]
    unsaid = [not o.position_said for s in hidden for o in s.objects]
    assert abs(np.mean(unsaid) - 0.25) < 0.03
    assert hidden == scenes(3, 0, 4000, unsaid_position_rate=0.25)  # deterministic
    assert all("at the" not in prompt(Scene((o,))) for s in hidden for o in s.objects if not o.position_said)


def test_heldout_prompts_with_unsaid_cells_and_their_placement():
    said, unsaid = heldout_scenes(), heldout_scenes(unsaid_positions=True)
    assert [tuple(o.said() for o in s.objects) for s in unsaid] == [s.objects for s in said]
    assert [all(o.position_said for o in s.objects) for s in unsaid] == [False] * 32 + [True] * 32
    # Placement keeps said cells, puts unsaid objects in free cells, and varies with the seed.
    two = Scene((ShapeObject("red", "circle", "big", "center", position_said=False), obj("blue", "square", "big", "top")))
    placed = place_unsaid([two] * 900, seed=7)
    assert {s.objects[1].position for s in placed} == {"top"}
    cells = [s.objects[0].position for s in placed]
    assert set(cells) == set(POSITIONS) - {"top"}
    assert max(cells.count(c) for c in set(cells)) < 1.5 * 900 / 8
    assert place_unsaid(said, seed=7) == said


@pytest.mark.parametrize("text, named", [
    ("a big violet circle at the center", "'violet'"),
    ("a red big circle at the center", "'red'"),
    ("big red circle at the center", "'big'"),
    ("a big red circle at center", "'center'"),
    ("a big red circle at the", "(nothing)"),
    ("a big red circle at the top top", "'top top'"),
    ("a big red circle at", "the end of the object"),
    ("a big red circle at the top and", "(nothing)"),
])
def test_parse_errors_name_the_bad_part(text, named):
    with pytest.raises(ValueError, match="expected") as error:
        parse_prompt(text)
    assert named in str(error.value)


def test_parse_rejects_impossible_scenes():
    one = "a big red circle at the top"
    with pytest.raises(ValueError, match="3 objects"):
        parse_prompt(" and ".join([one, "a big blue circle at the left", "a big green circle at the right"]))
    with pytest.raises(ValueError, match="colour 'red'"):
        parse_prompt(f"{one} and a small red square at the left")
    with pytest.raises(ValueError, match="cell 'top'"):
        parse_prompt(f"{one} and a small blue square at the top")


def test_scene_checks_its_objects():
    with pytest.raises(ValueError, match="unknown colour 'orange'"):
        obj(colour="orange")
    with pytest.raises(ValueError, match="1 or 2 objects"):
        Scene(())


# ---------------------------------------------------------------------------------------------
# The scene stream and the held-out set


def test_scene_stream_is_deterministic_random_access(stream):
    assert scenes(3, 0, 50) == stream[:50]
    assert scenes(3, 1234, 10) == [scene_at(3, i) for i in range(1234, 1244)]
    assert scenes(4, 0, 50) != stream[:50]


def test_scene_stream_statistics(stream):
    counts = np.array([len(s.objects) for s in stream])
    assert abs((counts == 2).mean() - 0.5) < 0.02
    for s in stream:
        if len(s.objects) == 2:
            a, b = s.objects
            assert a.colour != b.colour and a.position != b.position
    for attribute, values in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
        seen = {getattr(o, attribute) for s in stream for o in s.objects}
        assert seen == set(values)


def test_heldout_set_is_fixed():
    held = heldout_scenes()
    assert [len(s.objects) for s in held] == [1] * 32 + [2] * 32
    assert len({frozenset(s.objects) for s in held}) == 64
    assert hashlib.sha256("\n".join(prompt(s) for s in held).encode()).hexdigest() == HELDOUT_DIGEST
    assert heldout_scenes() == held


def test_stream_never_shows_a_heldout_scene(stream):
    # ~5% of draws would be held-out one-object scenes without the exclusion, so 20k draws would show hundreds.
    held = {frozenset(s.objects) for s in heldout_scenes()}
    assert not [prompt(s) for s in stream if frozenset(s.objects) in held]
    # Two-object scenes are excluded in either order.
    two = next(s for s in heldout_scenes() if len(s.objects) == 2)
    assert frozenset(Scene(two.objects[::-1]).objects) in held


# ---------------------------------------------------------------------------------------------
# Rendering


def colour_mass(image, colour):
    """[H, W] how much of `colour` each pixel shows: its coverage where the pixel mixes only that colour
    and the background, else 0."""
    direction = np.subtract(COLOURS[colour], BACKGROUND)
    offset = image - BACKGROUND
    along = np.clip(offset @ direction / (direction @ direction), 0, 1)
    pure = np.linalg.norm(offset - along[..., None] * direction, axis=-1) < 1e-3
    return np.where(pure, along, 0.0)


def mixes_two_colours(image):
    """[H, W] True where a pixel is no mixture of the background with a single palette colour."""
    return ~np.any([colour_mass(image, c) > 0 for c in COLOURS] + [np.all(image == 0.5, axis=-1)], axis=0)


def centroid(mass):
    rows, columns = np.indices(mass.shape) + 0.5
    return (mass * columns).sum() / mass.sum(), (mass * rows).sum() / mass.sum()


@pytest.mark.parametrize("size", [32, 64])
def test_render_puts_each_object_in_its_cell(stream, size):
    batch = stream[:200]
    images = render_batch(batch, size, seed=5)
    assert images.shape == (200, size, size, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    cell = size / 3
    for image, scene in zip(images, batch):
        for o in scene.objects:
            x, y = centroid(colour_mass(image, o.colour))
            column, row = divmod(POSITIONS.index(o.position), 3)[::-1]
            assert int(x // cell) == column and int(y // cell) == row, (prompt(scene), x, y)


@pytest.mark.parametrize("shape, size_name", [(s, z) for s in SHAPES for z in SIZES])
def test_render_draws_the_asked_shape(shape, size_name):
    size = 64
    image = render(Scene((obj("green", shape, size_name, "center"),)), size)
    mass = colour_mass(image, "green")
    extent = EXTENTS[size_name] * size
    area = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[shape] * extent ** 2
    assert mass.sum() == pytest.approx(area, rel=0.01)  # anti-aliasing keeps the area exact
    touched_rows, touched_columns = np.nonzero(mass)
    assert extent <= np.ptp(touched_rows) + 1 <= extent + 2
    assert extent <= np.ptp(touched_columns) + 1 <= extent + 2
    covered_rows = np.nonzero(mass > 0.5)[0]
    widths = (mass > 0.5).sum(1)[covered_rows.min():covered_rows.max() + 1]  # of each covered row, top to bottom
    top, middle, bottom = widths[0], widths[len(widths) // 2], widths[-1]
    if shape == "triangle":  # points up
        assert top <= 2 and bottom >= extent - 2
    elif shape == "circle":
        assert max(top, bottom) < middle - 2
    else:
        assert top == middle == bottom
    assert np.unique(image[mass == 0]).tolist() == [0.5]  # everything else is the background


def test_render_without_jitter_centres_objects():
    size = 32
    for position in POSITIONS:
        image = render(Scene((obj("yellow", "square", "small", position),)), size)
        # Within the supersampling grid's resolution (1/8 px).
        assert centroid(colour_mass(image, "yellow")) == pytest.approx(cell_centre(position, size), abs=0.05)


def test_jitter_is_small_and_deterministic():
    size = 64
    scene = Scene((obj("purple", "circle", "big", "top left"), obj("cyan", "square", "small", "bottom")))
    assert np.array_equal(render(scene, size, jitter_key=7), render(scene, size, jitter_key=7))
    assert np.array_equal(render(scene, size, jitter_key=7), render_batch([scene], size, seed=7)[0])
    shifts = []
    for key in range(20):
        image = render(scene, size, jitter_key=key)
        for o in scene.objects:
            shifts.append(np.subtract(centroid(colour_mass(image, o.colour)), cell_centre(o.position, size)))
    shifts = np.abs(shifts)
    assert shifts.max() <= MAX_JITTER * size + 1e-3
    assert shifts.max() > 0.5 * MAX_JITTER * size  # the jitter does move objects


def test_neighbours_never_overlap_even_when_jittered_towards_each_other():
    size = 512  # fine pixels, so that a shared pixel means a shared point
    big = np.float32(EXTENTS["big"] * size)
    jitter = MAX_JITTER * size
    for first, second in (("top left", "top"), ("left", "bottom left"), ("center", "right")):
        (x1, y1), (x2, y2) = cell_centre(first, size), cell_centre(second, size)
        # Each shifted the most it can towards the other.
        dx, dy = np.sign(x2 - x1) * jitter, np.sign(y2 - y1) * jitter
        pixels = np.arange(size)[None]
        a = shape_coverage("square", np.array([x1 + dx]), np.array([y1 + dy]), np.array([big]), pixels, pixels)
        b = shape_coverage("square", np.array([x2 - dx]), np.array([y2 - dy]), np.array([big]), pixels, pixels)
        assert not (a * b).any()
        assert (a > 0).sum() > 0.9 * big ** 2


def test_neighbouring_objects_keep_their_colours_apart(stream):
    def adjacent(scene):
        (row_a, column_a), (row_b, column_b) = (divmod(POSITIONS.index(o.position), 3) for o in scene.objects)
        return max(abs(row_a - row_b), abs(column_a - column_b)) == 1

    neighbours = [s for s in stream[:600] if len(s.objects) == 2 and adjacent(s)][:60]
    images = render_batch(neighbours, 128, seed=1)  # at 128 px the narrowest gap is over a pixel wide
    assert not any(mixes_two_colours(image).any() for image in images)
    mixed = render(neighbours[0], 128)
    mixed[0, 0] = (np.add(COLOURS[neighbours[0].objects[0].colour], COLOURS[neighbours[0].objects[1].colour])) / 2
    assert mixes_two_colours(mixed)[0, 0]  # the check does see a shared pixel


def test_render_rejects_tiny_images():
    with pytest.raises(ValueError, match="too small"):
        render(Scene((obj(),)), 4)
