"""The Flax FID InceptionV3 against a PyTorch reference with random weights, its input conventions,
the weights importer, and FID from streaming statistics against pytorch-fid's formula.

pytorch-fid cannot be installed beside the CPU torch wheel CI pins: it needs torchvision, PyPI's
torchvision is built against the CUDA torch (its compiled ops fail to register, so `import
torchvision` raises), and a torchvision that fails to import also breaks transformers, which probes
for it. So the reference here is `TorchFIDInception`, written from pytorch-fid's `InceptionV3`
(use_fid_inception=True, output block 3) and torchvision's Inception3 blocks: same modules, names
and state-dict keys. It was checked once against pytorch-fid 0.3.0 itself (torchvision 0.28 with
its op registrations skipped) to 1e-7 relative; `test_reference_is_pytorch_fid` repeats that check
wherever pytorch_fid imports.
"""

import numpy as np
import pytest

from conversion.errors import ConversionError
from conversion.inception import inception_from_source, load_inception, main as convert_main
from conversion.sources import TorchStateDict
from s2flash_jax.eval import inception as inc
from s2flash_jax.eval.fid import FeatureStatistics, Statistics, StatisticsError, fid, load_statistics, save_statistics
from s2flash_jax.eval.frechet import frechet_distance_from_statistics

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class TorchBasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def torch_avg_pool(x, count_include_pad=False):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=count_include_pad)


class TorchA(nn.Module):
    """FIDInceptionA; fid=False gives torchvision's InceptionA (padding counted in the average)."""

    def __init__(self, cin, pool_features, fid=True):
        super().__init__()
        self.fid = fid
        self.branch1x1 = TorchBasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = TorchBasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = TorchBasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = TorchBasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(torch_avg_pool(x, count_include_pad=not self.fid))
        return torch.cat([self.branch1x1(x), b5, b3, pool], 1)


class TorchB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = TorchBasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TorchC(nn.Module):
    def __init__(self, cin, c7, fid=True):
        super().__init__()
        self.fid = fid
        self.branch1x1 = TorchBasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = TorchBasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = TorchBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = TorchBasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = TorchBasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = TorchBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = TorchBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = TorchBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = TorchBasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = TorchBasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        pool = self.branch_pool(torch_avg_pool(x, count_include_pad=not self.fid))
        return torch.cat([self.branch1x1(x), b7, d, pool], 1)


class TorchD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = TorchBasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = TorchBasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = TorchBasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = TorchBasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TorchBasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TorchBasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TorchE(nn.Module):
    """pool: "avg" (FIDInceptionE_1), "max" (FIDInceptionE_2) or "avg_with_padding" (torchvision's InceptionE)."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = TorchBasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = TorchBasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = TorchBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = TorchBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = TorchBasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = TorchBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = TorchBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = TorchBasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = torch_avg_pool(x, count_include_pad=self.pool == "avg_with_padding")
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
    """pytorch-fid's InceptionV3(output_blocks=[3], resize_input=False): NCHW in [0, 1] -> [B, 2048]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TorchBasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = TorchBasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = TorchBasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = TorchBasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = TorchBasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = TorchA(192, 32), TorchA(256, 64), TorchA(288, 64)
        self.Mixed_6a = TorchB(288)
        self.Mixed_6b, self.Mixed_6c = TorchC(768, 128), TorchC(768, 160)
        self.Mixed_6d, self.Mixed_6e = TorchC(768, 160), TorchC(768, 192)
        self.Mixed_7a = TorchD(768)
        self.Mixed_7b, self.Mixed_7c = TorchE(1280, "avg"), TorchE(2048, "max")
        self.fc = nn.Linear(2048, 1008)  # in pytorch-fid's state dict, unused by the features

    def forward(self, x):
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def randomize(module, seed=0):
    """Every weight and batch-norm statistic random (positive variances), so no block is an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith(("bn.weight", "running_mean", "bn.bias")):
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator) + (name.endswith("weight")))
            else:  # He-scaled, so activations neither vanish nor explode through 94 layers
                fan_in = tensor[0].numel() if tensor.ndim > 1 else 1
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
    return module.eval()


@pytest.fixture(scope="module")
def reference():
    return randomize(TorchFIDInception())


@pytest.fixture(scope="module")
def model(reference):
    return inception_from_source(TorchStateDict(reference.state_dict()))


def relative_error(got, expected):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def torch_features(reference, images_nhwc):
    with torch.no_grad():
        return reference(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))).numpy()


def test_features_match_the_reference(model, reference):
    """139x160 input: the smallest at which the Mixed_7 blocks see a 3x3 grid (below 139 they run
    at 1x1, where the FID variants' pooling cannot differ from torchvision's), and non-square."""
    images = np.random.default_rng(0).uniform(0, 1, (2, 139, 160, 3)).astype(np.float32)
    expected = torch_features(reference, images)
    got = np.asarray(model(images))
    assert got.shape == (2, inc.FEATURES)
    assert relative_error(got, expected) <= 1e-4


@pytest.mark.parametrize("block", ["A", "C", "E_1", "E_2"])
def test_fid_blocks_are_exact_and_differ_from_torchvision(reference, model, block):
    """Each FID block against the reference block, on a grid where padding matters; and the
    torchvision variant of the same block (padding counted / average pool) is measurably different,
    so this test can tell the two apart."""
    name, channels = {"A": ("Mixed_5c", 256), "C": ("Mixed_6b", 768), "E_1": ("Mixed_7b", 1280),
                      "E_2": ("Mixed_7c", 2048)}[block]
    x = np.random.default_rng(1).normal(size=(2, 5, 6, channels)).astype(np.float32)
    torch_block = getattr(reference, name)
    with torch.no_grad():
        expected = torch_block(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        if block == "E_2":
            torch_block.pool = "avg"
        elif block == "E_1":
            torch_block.pool = "avg_with_padding"
        else:
            torch_block.fid = False
        torchvision_variant = torch_block(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        torch_block.pool, torch_block.fid = {"E_1": "avg", "E_2": "max"}.get(block), True
    got = np.asarray(getattr(model, name)(x))
    assert relative_error(got, expected) <= 1e-5
    assert relative_error(torchvision_variant, expected) > 1e-3


def test_reference_is_pytorch_fid(reference, monkeypatch):
    """Where pytorch_fid imports: its InceptionV3, built from the reference's state dict in place of
    the downloaded weights (so the key names are pytorch-fid's own, loaded strictly), gives the
    reference's features, with and without its resize."""
    try:
        import pytorch_fid.inception as pytorch_fid
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError beside a CPU torch
        pytest.skip(f"pytorch_fid does not import here ({type(e).__name__}); see the module docstring")
    monkeypatch.setattr(pytorch_fid, "load_state_dict_from_url", lambda *args, **kwargs: reference.state_dict())
    real = pytorch_fid.InceptionV3([3], resize_input=False).eval()
    resizing = pytorch_fid.InceptionV3([3]).eval()
    images = torch.rand(2, 3, 139, 160, generator=torch.Generator().manual_seed(0))
    small = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(real(images)[0].flatten(1).numpy(), reference(images).numpy()) <= 1e-6
        resized = F.interpolate(small, size=(299, 299), mode="bilinear", align_corners=False)
        assert relative_error(resizing(small)[0].flatten(1).numpy(), reference(resized).numpy()) <= 1e-6


@pytest.mark.parametrize("shape", [(2, 37, 53, 3), (1, 640, 480, 3)], ids=["upsample", "downsample"])
def test_bilinear_resize_is_torch_interpolate(shape):
    images = np.random.default_rng(2).uniform(0, 1, shape).astype(np.float32)
    with torch.no_grad():
        expected = F.interpolate(torch.from_numpy(images.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear",
                                 align_corners=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(inc.bilinear_resize(images)), expected, atol=2e-6)


@pytest.mark.parametrize("mode", inc.RESIZE_MODES)
def test_feature_extraction_follows_each_convention(model, reference, mode):
    """InceptionFeatures (batched and padded) against the reference fed exactly what pytorch-fid or
    clean-fid would feed it for the same float images: uint8 values, resized their way to 299."""
    images = np.random.default_rng(3).uniform(0, 1, (3, 64, 48, 3)).astype(np.float32)
    u8 = (images * 255).round().astype(np.uint8)  # what a PNG of them holds
    if mode == inc.CLEAN:  # clean-fid: per channel, PIL bicubic in float mode, then clip
        resized = np.stack([np.stack([np.clip(np.asarray(inc.Image.fromarray(im[..., c].astype(np.float32), mode="F")
                                                         .resize((299, 299), inc.Image.Resampling.BICUBIC)), 0, 255)
                                      for c in range(3)], -1) for im in u8]) / 255
    else:  # pytorch-fid: ToTensor ([0, 1]) then F.interpolate inside the model
        with torch.no_grad():
            resized = F.interpolate(torch.from_numpy(u8.transpose(0, 3, 1, 2) / 255.0).float(), size=(299, 299),
                                    mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
    expected = torch_features(reference, resized.astype(np.float32))
    extractor = inc.InceptionFeatures(model, resize=mode, batch_size=2)
    got = inc.features_to_host(extractor(images))
    assert relative_error(got, expected) <= 1e-4
    np.testing.assert_array_equal(inc.features_to_host(extractor(u8)), got)  # uint8 in: the same


def test_patch_origins():
    assert inc.patch_origins(1024, 1024, "center") == [(362, 362)]
    assert inc.patch_origins(512, 768, "five") == [(0, 0), (0, 469), (213, 0), (213, 469), (106, 234)]
    with pytest.raises(ValueError, match="at least 299x299; these are 256x256"):
        inc.patch_origins(256, 256, "center")
    images = np.arange(2 * 300 * 301 * 3).reshape(2, 300, 301, 3)
    patches = inc.crop_patches(images, inc.patch_origins(300, 301, "five"))
    assert patches.shape == (10, 299, 299, 3)
    np.testing.assert_array_equal(patches[9], images[1, 0:299, 1:300])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_weights_files_load_to_the_same_model(model, reference, tmp_path, suffix):
    from s2flash_jax.models.params import flat_params

    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        assert convert_main([_saved_pth(reference, tmp_path), str(path)]) == 0
    loaded = flat_params(load_inception(path))
    for key, value in flat_params(model).items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(value), err_msg=key)


def _saved_pth(reference, tmp_path):
    path = tmp_path / "pt_inception.pth"
    if not path.exists():
        torch.save(reference.state_dict(), path)
    return str(path)


def test_bad_weights_are_one_error_naming_them(reference, tmp_path):
    with pytest.raises(ConversionError, match=r"'.*missing.pth' do not exist; expected pytorch-fid's "
                                              r"pt_inception-2015-12-05-6726825d.pth"):
        load_inception(tmp_path / "missing.pth")
    state = reference.state_dict()
    del state["Mixed_6c.branch7x7dbl_4.bn.running_var"]
    state["Mixed_5b.branch1x1.conv.weight"] = state["Mixed_5b.branch1x1.conv.weight"][:5]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ConversionError, match=r"is not the FID Inception: 1 missing keys \(Mixed_6c\.branch7x7dbl_4\.bn"
                                              r"\.running_var.*wrong shapes \(Mixed_5b\.branch1x1\.conv\.weight: "
                                              r"expected \(64, 192, 1, 1\), found \(5, 192, 1, 1\)"):
        load_inception(tmp_path / "broken.pth")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConversionError, match=r"unknown kind \(\.txt\)"):
        load_inception(tmp_path / "notes.txt")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="cannot be read as a PyTorch checkpoint"):
        load_inception(tmp_path / "garbage.pth")


def pytorch_fid_distance(mu1, sigma1, mu2, sigma2):
    """pytorch-fid's calculate_frechet_distance (fid_score.py, 0.3.0), as documented there."""
    import scipy.linalg

    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def streamed(features, batch):
    """FeatureStatistics fed padded device batches, as the eval loop feeds it."""
    import jax.numpy as jnp

    stats = FeatureStatistics(features.shape[1])
    for start in range(0, len(features), batch):
        chunk = features[start:start + batch]
        padded = np.concatenate([chunk, np.full((batch - len(chunk), features.shape[1]), 1e3, np.float32)])
        stats.add(jnp.asarray(padded), len(chunk))
    return stats


def test_fid_from_streamed_statistics_is_pytorch_fids():
    rng = np.random.default_rng(4)
    mixing = rng.normal(size=(64, 64)) / 8
    a = (rng.normal(size=(300, 64)) @ mixing + 5.0).astype(np.float32)  # offset: the shift has work to do
    b = (rng.normal(size=(203, 64)) @ (mixing * 1.3) + 5.2).astype(np.float32)
    sa, sb = streamed(a, 64), streamed(b, 64)
    assert sa.count == 300 and sb.count == 203
    for stats, x in ((sa, a), (sb, b)):  # pytorch-fid: np.mean and np.cov of the float32 features
        np.testing.assert_allclose(stats.mean, np.mean(x, axis=0), rtol=1e-6)
        np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), atol=1e-6 * np.abs(np.cov(x, rowvar=False)).max())
    expected = pytorch_fid_distance(np.mean(a, 0), np.cov(a, rowvar=False), np.mean(b, 0), np.cov(b, rowvar=False))
    got = fid(Statistics.from_running(sa), Statistics.from_running(sb))
    assert expected > 1.0
    assert abs(got - expected) <= 1e-6 * expected


def test_frechet_distance_of_known_gaussians():
    """N(m_a, diag(a)) vs N(m_b, diag(b)): |m_a − m_b|² + Σ (a + b − 2√(ab))."""
    va, vb = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    ma, mb = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 5.0 + (1 + 4 - 4) + (4 + 1 - 4) + 0.0
    assert frechet_distance_from_statistics(ma, np.diag(va), mb, np.diag(vb)) == pytest.approx(expected, rel=1e-12)


def test_statistics_files(tmp_path):
    rng = np.random.default_rng(5)
    whole, patches = streamed(rng.normal(size=(40, 8)).astype(np.float32), 16), \
        streamed(rng.normal(size=(80, 8)).astype(np.float32), 16)
    stats = Statistics.from_running(whole, patches, {"resize": "clean", "patch_layout": "center"})
    path = save_statistics(stats, tmp_path / "ref.npz")
    loaded = load_statistics(path)
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.patch_cov, stats.patch_cov)
    assert (loaded.count, loaded.patch_count, loaded.meta) == (40, 80, stats.meta)
    assert fid(loaded, stats) == pytest.approx(0, abs=1e-9) and fid(loaded, stats, patches=True) == pytest.approx(0, abs=1e-9)
    with pytest.raises(Exception, match="already exists"):
        save_statistics(stats, path)

    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mean, sigma=stats.cov)  # pytorch-fid --save-stats
    plain = load_statistics(tmp_path / "pytorch_fid.npz")
    assert plain.meta == {} and fid(stats, plain) == pytest.approx(0, abs=1e-9)
    with pytest.raises(StatisticsError, match="patch FID needs patch statistics on both sides"):
        fid(stats, plain, patches=True)
    other = Statistics(stats.mean, stats.cov, 40, meta={"resize": "pytorch-fid"})
    with pytest.raises(StatisticsError, match="made with resize='pytorch-fid', these with 'clean'"):
        fid(stats, other)
    np.savez(tmp_path / "wrong.npz", mean=stats.mean)
    with pytest.raises(StatisticsError, match=r"holds \['mean'\]; expected a .npz with 'mu'"):
        load_statistics(tmp_path / "wrong.npz")
    with pytest.raises(StatisticsError, match="do not exist"):
        load_statistics(tmp_path / "none.npz")
