"""The analytic prompt-alignment checker: right on renders, robust to blur and noise, strict on mistakes."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from s2flash_jax.data.shapes import (COLOURS, POSITIONS, SHAPES, Scene, ShapeObject, heldout_scenes, render,
                                     render_batch, scenes)
from s2flash_jax.eval.alignment import DetectedObject, detect_objects, score

PERFECT = {"colour": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0, "count": 1.0, "prompt": 1.0}


@pytest.fixture(scope="module")
def ground_truth():
    batch = scenes(21, 0, 300) + heldout_scenes()
    return batch, render_batch(batch, 32, seed=4)


def test_ground_truth_renders_score_perfectly_at_32px(ground_truth):
    batch, images = ground_truth
    result = score(images, batch)
    assert result["prompt"] >= 0.99, result
    assert set(result) == set(PERFECT)


def test_ground_truth_renders_score_perfectly_at_64px():
    batch = scenes(22, 0, 100)
    assert score(render_batch(batch, 64, seed=5), batch)["prompt"] >= 0.99


def test_detect_objects_reads_every_attribute():
    scene = Scene((ShapeObject("purple", "triangle", "small", "top right"),
                   ShapeObject("cyan", "square", "big", "bottom left")))
    found = detect_objects(render(scene, 32, jitter_key=1))
    assert [(d.colour, d.shape, d.size, d.position) for d in found] == [
        ("cyan", "square", "big", "bottom left"), ("purple", "triangle", "small", "top right")]  # largest first
    assert found[0].pixels == pytest.approx((0.29 * 32) ** 2, rel=0.03)


def test_blank_image_has_no_objects():
    assert detect_objects(np.full((32, 32, 3), 0.5, np.float32)) == []
    assert score(np.full((1, 32, 32, 3), 0.5), [heldout_scenes()[0]]) == {name: 0.0 for name in PERFECT}


def changed(scene, index, attribute):
    """The scene with object `index`'s attribute set to another value that keeps the scene valid."""
    values = {"colour": tuple(COLOURS), "shape": SHAPES, "size": ("small", "big"), "position": POSITIONS}[attribute]
    taken = {getattr(o, attribute) for o in scene.objects} if attribute in ("colour", "position") else set()
    current = getattr(scene.objects[index], attribute)
    new = next(v for v in values if v != current and v not in taken)
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], **{attribute: new})
    return Scene(tuple(objects))


@pytest.mark.parametrize("attribute", ["shape", "size", "position", "colour"])
def test_a_wrong_attribute_is_caught(ground_truth, attribute):
    batch, images = ground_truth
    batch, images = batch[:60], images[:60]
    asked = [changed(scene, len(scene.objects) - 1, attribute) for scene in batch]
    result = score(images, asked)
    objects = sum(len(s.objects) for s in batch)
    right = (objects - len(batch)) / objects  # every image has exactly one object asked wrong
    assert result["prompt"] == 0.0
    if attribute == "colour":  # the asked object is missing: all its attributes count wrong, the count stays right
        assert result == pytest.approx({"colour": right, "shape": right, "size": right, "position": right,
                                        "count": 1.0, "prompt": 0.0})
    else:
        assert result == pytest.approx({**PERFECT, attribute: right, "prompt": 0.0})


def test_an_unsaid_position_is_not_scored(ground_truth):
    """A prompt that leaves a cell unsaid accepts the object in any cell; said cells stay checked."""
    batch, images = ground_truth
    batch, images = batch[:60], images[:60]
    moved = [changed(scene, 0, "position") for scene in batch]  # the images show the first object elsewhere
    unsaid = [Scene((dataclasses.replace(s.objects[0], position_said=False),) + s.objects[1:]) for s in moved]
    assert score(images, unsaid) == PERFECT
    assert score(images, moved)["prompt"] == 0.0


def test_an_extra_object_breaks_the_count():
    two = [s for s in scenes(23, 0, 80) if len(s.objects) == 2][:20]
    result = score(render_batch(two, 32, seed=1), [Scene(s.objects[:1]) for s in two])
    assert result == {**PERFECT, "count": 0.0, "prompt": 0.0}


def test_robust_to_blur_and_noise(ground_truth):
    batch, images = ground_truth
    batch, images = batch[:120], images[:120]
    rng = np.random.default_rng(0)
    blurred = ndimage.gaussian_filter(images, (0, 0.8, 0.8, 0))
    noisy = np.clip(blurred + rng.normal(0, 0.05, images.shape), 0, 1)
    assert score(noisy, batch)["prompt"] >= 0.95
    # Stray specks of colour, as a generator might leave, are not objects.
    specks = images.copy()
    for image in specks:
        rows, columns = rng.integers(0, 32, (2, 4))
        image[rows, columns] = list(COLOURS.values())[rng.integers(len(COLOURS))]
    assert score(specks, batch)["count"] >= 0.99


def test_off_palette_colours_are_not_read_as_objects():
    orange = np.full((32, 32, 3), 0.5, np.float32)
    orange[10:20, 10:20] = (1.0, 0.5, 0.0)  # halfway between red and yellow
    assert detect_objects(orange) == []


def test_detected_object_fields():
    assert [f.name for f in dataclasses.fields(DetectedObject)] == ["colour", "shape", "size", "position", "pixels"]


def test_bad_input():
    image = render(heldout_scenes()[0])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        detect_objects(image[..., :2])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        detect_objects(image * 255)
    with pytest.raises(ValueError, match="one image per scene"):
        score(image[None], heldout_scenes()[:2])
