"""FID from streaming feature statistics: mean and covariance accumulated batch by batch, saved and reused.

Every batch's moments (the sum of its features and of their outer products) are computed where the
features are, on the devices, in float32 and around a fixed shift (the first batch's mean), so
that the float32 sums stay small; the host adds them up in float64. The result is the same mean
and (N − 1)-normalised covariance as pytorch-fid's `np.mean` / `np.cov` of all the features, without
ever holding them (30,000 x 2048 floats for MJHQ). `frechet.frechet_distance_from_statistics` turns
two of them into the FID (scipy's sqrtm in float64, as pytorch-fid and clean-fid do).

A statistics file (`save_statistics` / `load_statistics`) is a .npz with pytorch-fid's keys `mu`
and `sigma` (so pytorch-fid's and clean-fid's own reference statistics load too), plus optional
`patch_mu` / `patch_sigma` for patch FID, the counts, and a JSON `meta` string saying how the
features were made (resize mode, patch layout): comparing statistics made under different
conventions is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from s2flash_jax.eval.frechet import frechet_distance_from_statistics
from s2flash_jax.outputs import fresh_output_file


class StatisticsError(ValueError):
    """A statistics file that cannot be read or does not fit; the message says which and why."""


@jax.jit
def _moments(features: jax.Array, count: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Σ x − shift [F], Σ (x − shift)(x − shift)ᵀ [F, F]) over the first `count` rows of features [B, F].

    HIGHEST precision: the outer products are what the covariance is made of.
    """
    valid = (jnp.arange(features.shape[0]) < count)[:, None]
    x = jnp.where(valid, features.astype(jnp.float32) - shift, 0.0)
    return x.sum(0), jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass
class FeatureStatistics:
    """Running mean and covariance of feature vectors, fed batch by batch (`add`)."""

    dim: int
    count: int = 0
    shift: np.ndarray | None = None  # float32 [F]: the first batch's mean
    total: np.ndarray | None = None  # float64 [F]: Σ (x − shift)
    outer: np.ndarray | None = None  # float64 [F, F]: Σ (x − shift)(x − shift)ᵀ

    def add(self, features: jax.Array | np.ndarray, count: int | None = None) -> None:
        """Add the first `count` rows (default: all) of features [B, F], on a device or the host."""
        count = len(features) if count is None else count
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features have shape {features.shape}; expected [B, {self.dim}]")
        if count == 0:
            return
        if self.shift is None:
            total, _ = _moments(features, count, jnp.zeros(self.dim, jnp.float32))
            self.shift = (np.asarray(total, np.float64) / count).astype(np.float32)
            self.total, self.outer = np.zeros(self.dim), np.zeros((self.dim, self.dim))
        total, outer = _moments(features, count, jnp.asarray(self.shift))
        self.total += np.asarray(total, np.float64)
        self.outer += np.asarray(outer, np.float64)
        self.count += count

    @property
    def mean(self) -> np.ndarray:
        """float64 [F]."""
        self._check_count(1)
        return self.shift + self.total / self.count

    @property
    def cov(self) -> np.ndarray:
        """float64 [F, F], normalised by N − 1 as np.cov."""
        self._check_count(2)
        centred = self.total / self.count
        return (self.outer - self.count * np.outer(centred, centred)) / (self.count - 1)

    def _check_count(self, needed: int) -> None:
        if self.count < needed:
            raise ValueError(f"statistics of {self.count} feature vectors; at least {needed} are needed")


@dataclasses.dataclass
class Statistics:
    """mean [F] and cov [F, F] of a set of images' features (count of them), for whole images and,
    if computed, for their patches; meta: how the features were made."""

    mean: np.ndarray
    cov: np.ndarray
    count: int
    patch_mean: np.ndarray | None = None
    patch_cov: np.ndarray | None = None
    patch_count: int = 0
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_running(cls, whole: FeatureStatistics, patches: FeatureStatistics | None = None,
                     meta: dict[str, Any] | None = None) -> Statistics:
        has_patches = patches is not None and patches.count >= 2
        return cls(whole.mean, whole.cov, whole.count, patches.mean if has_patches else None,
                   patches.cov if has_patches else None, patches.count if has_patches else 0, dict(meta or {}))


def convention_mismatch(reference_meta: dict[str, Any], meta: dict[str, Any], *,
                        patches: bool) -> tuple[str, Any, Any] | None:
    """(key, the reference's value, the other's) of the first convention (the resize mode; the patch
    layout too when patches) on which two statistics' meta disagree where both say; None if none."""
    for key in ("resize", "patch_layout") if patches else ("resize",):
        theirs, mine = reference_meta.get(key), meta.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            return key, theirs, mine
    return None


def fid(generated: Statistics, reference: Statistics, *, patches: bool = False) -> float:
    """FID of the generated set against the reference one (patch FID with patches=True); a
    StatisticsError if the two were made under different conventions or a side lacks patches."""
    mismatch = convention_mismatch(reference.meta, generated.meta, patches=patches)
    if mismatch:
        key, theirs, mine = mismatch
        raise StatisticsError(f"the reference statistics were made with {key}={theirs!r}, these with {mine!r}; "
                              "FIDs are only comparable under one convention")
    if patches:
        if reference.patch_mean is None or generated.patch_mean is None:
            raise StatisticsError("patch FID needs patch statistics on both sides; the reference statistics have "
                                  "none (make them from images of at least 299x299 with patches on)")
        return frechet_distance_from_statistics(generated.patch_mean, generated.patch_cov, reference.patch_mean,
                                                reference.patch_cov)
    return frechet_distance_from_statistics(generated.mean, generated.cov, reference.mean, reference.cov)


def save_statistics(stats: Statistics, path: str | Path, *, force: bool = False) -> Path:
    """Write `stats` to a .npz (pytorch-fid's `mu` / `sigma` plus ours); it appears only when complete."""
    path = Path(path)
    if path.suffix != ".npz":
        raise StatisticsError(f"{path}: statistics are written as .npz")
    arrays = {"mu": stats.mean, "sigma": stats.cov, "count": np.int64(stats.count),
              "meta": np.array(json.dumps(stats.meta))}
    if stats.patch_mean is not None:
        arrays.update(patch_mu=stats.patch_mean, patch_sigma=stats.patch_cov, patch_count=np.int64(stats.patch_count))
    with fresh_output_file(path, force=force) as staging:
        with staging.open("wb") as f:
            np.savez(f, **arrays)
    return path


def load_statistics(path: str | Path) -> Statistics:
    """Statistics from a .npz written by `save_statistics`, pytorch-fid (`--save-stats`) or clean-fid."""
    path = Path(path)
    expected = ("expected a .npz with 'mu' [F] and 'sigma' [F, F] (s2flash eval --save-ref-stats, or pytorch-fid's "
                "--save-stats)")
    if not path.is_file():
        raise StatisticsError(f"reference statistics {str(path)!r} do not exist; {expected}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
    except (OSError, ValueError) as e:
        raise StatisticsError(f"{path} cannot be read as a .npz file ({e}); {expected}") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise StatisticsError(f"{path} holds {sorted(arrays)}; {expected}")
    mean, cov = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
    if mean.ndim != 1 or cov.shape != (len(mean), len(mean)):
        raise StatisticsError(f"{path}: mu has shape {mean.shape} and sigma {cov.shape}; {expected}")
    try:
        meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    except json.JSONDecodeError as e:
        raise StatisticsError(f"{path}: its 'meta' entry is not JSON ({e})") from None
    stats = Statistics(mean, cov, int(arrays.get("count", 0)), meta=meta)
    if "patch_mu" in arrays:
        stats.patch_mean = np.asarray(arrays["patch_mu"], np.float64)
        stats.patch_cov = np.asarray(arrays["patch_sigma"], np.float64)
        stats.patch_count = int(arrays.get("patch_count", 0))
    return stats
