"""The Fréchet distance and the feature net it is measured in."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from s2flash_jax.data.shapes import Scene, heldout_scenes, render_batch, scenes
from s2flash_jax.eval.frechet import (LABELS, FeatureNet, feature_net_accuracy, frechet_distance, image_features,
                                      load_feature_net, patch_crops, save_feature_net, scene_labels,
                                      train_feature_net)


def with_moments(rng, mean, covariance, n=500):
    """n samples whose sample mean and covariance are exactly `mean` and `covariance`."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # exactly white
    return z @ np.linalg.cholesky(covariance).T + mean


def test_frechet_distance_of_commuting_gaussians():
    rng = np.random.default_rng(0)
    mean_a, mean_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    a, b = with_moments(rng, mean_a, np.diag(var_a)), with_moments(rng, mean_b, np.diag(var_b))
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_non_commuting_gaussians():
    # In 2-D, Tr((S_a S_b)^(1/2)) = sqrt(Tr(S_a S_b) + 2 sqrt(det(S_a S_b))): S_a S_b's eigenvalues are >= 0.
    rng = np.random.default_rng(1)
    cov_a, cov_b = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[1.0, -0.3], [-0.3, 0.5]])
    a, b = with_moments(rng, np.zeros(2), cov_a), with_moments(rng, np.array([0.5, 0.0]), cov_b)
    product = cov_a @ cov_b
    expected = 0.25 + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(
        np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_identical_and_degenerate_sets():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 16))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    dead = a.copy()
    dead[:, :4] = 0.0  # units that never fire make the covariances singular
    assert frechet_distance(dead, dead) == pytest.approx(0.0, abs=1e-8)
    few = rng.normal(size=(10, 16))  # fewer samples than features
    assert np.isfinite(frechet_distance(few, a))
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        frechet_distance(a, a[:, :8])


def test_scene_labels():
    scene = heldout_scenes()[40]
    labels = scene_labels([scene])[0]
    expected = {f"{o.colour} {value}" for o in scene.objects for value in (o.shape, o.size, o.position)}
    assert {LABELS[i] for i in np.flatnonzero(labels)} == expected
    assert len(LABELS) == 6 * (3 + 2 + 9)


@pytest.fixture(scope="module")
def trained():
    messages = []
    net = train_feature_net(seed=0, steps=150, batch_size=32, log=messages.append)
    return net, messages


def test_feature_net_learns(trained):
    net, messages = trained
    accuracy = feature_net_accuracy(net, heldout_scenes())
    assert accuracy["attribute_accuracy"] > 0.55  # chance is ~0.31; ~0.72 after these 150 steps
    assert any("held out" in m and "attribute accuracy" in m for m in messages)
    untrained = FeatureNet(net.config, rngs=nnx.Rngs(1))
    assert feature_net_accuracy(untrained, heldout_scenes())["attribute_accuracy"] < 0.45


def test_features_separate_shifted_distributions(trained):
    net, _ = trained
    batch = scenes(5, 0, 400)
    reference = image_features(net, render_batch(batch, 32, seed=1))
    assert reference.shape == (400, net.config.features) and reference.dtype == np.float64
    fresh = image_features(net, render_batch(scenes(6, 0, 400), 32, seed=2))
    # A generator that only draws big objects (the briefly trained net reads sizes; shapes come later).
    big_only = [Scene(tuple(dataclasses.replace(o, size="big") for o in s.objects)) for s in scenes(6, 0, 400)]
    collapsed = image_features(net, render_batch(big_only, 32, seed=2))
    noisy_images = render_batch(scenes(6, 0, 400), 32, seed=2)
    noisy_images = np.clip(noisy_images + np.random.default_rng(0).normal(0, 0.1, noisy_images.shape), 0, 1)
    noisy = image_features(net, noisy_images)
    same = frechet_distance(reference, fresh)
    assert frechet_distance(reference, collapsed) > 1.5 * same
    assert frechet_distance(reference, noisy) > 1.5 * same
    # The patch-level distance (16 px crops) also tells the noisy renders from clean ones of other seeds.
    patches = {name: image_features(net, patch_crops(images)) for name, images in (
        ("reference", render_batch(batch, 32, seed=1)), ("fresh", render_batch(scenes(6, 0, 400), 32, seed=2)),
        ("noisy", noisy_images))}
    assert frechet_distance(patches["reference"], patches["noisy"]) > 1.5 * frechet_distance(
        patches["reference"], patches["fresh"])


def test_patch_crops_are_the_stride_grid_windows_magnified_by_repetition():
    images = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    crops = patch_crops(images, crop=16, stride=8)
    assert crops.shape == (2 * 9, 32, 32, 3)
    for n in range(2):
        for k, (y, x) in enumerate((y, x) for y in (0, 8, 16) for x in (0, 8, 16)):
            window = images[n, y:y + 16, x:x + 16]
            for a in (0, 1):
                for b in (0, 1):
                    np.testing.assert_array_equal(crops[n * 9 + k, a::2, b::2], window)
    assert patch_crops(images, crop=32, stride=8).shape == images.shape
    with pytest.raises(ValueError, match="crop=12"):
        patch_crops(images, crop=12)


def test_save_and_load(trained, tmp_path):
    net, _ = trained
    path = tmp_path / "feature_net.msgpack"
    images = render_batch(heldout_scenes()[:8], 32)
    save_feature_net(FeatureNet(net.config, rngs=nnx.Rngs(3)), path)
    save_feature_net(net, path)  # a cache: overwriting is fine
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    loaded = load_feature_net(path)
    assert loaded.config == net.config
    np.testing.assert_array_equal(image_features(loaded, images), image_features(net, images))


def test_load_refuses_other_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"not msgpack at all \xff")
    with pytest.raises(ValueError, match="feature net"):
        load_feature_net(tmp_path / "junk")
    with pytest.raises(ValueError, match="feature net"):
        load_feature_net(tmp_path / "missing")


def test_image_features_checks_the_image_size(trained):
    net, _ = trained
    with pytest.raises(ValueError, match="expects"):
        image_features(net, np.zeros((2, 64, 64, 3)))
