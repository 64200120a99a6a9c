"""The FID's matrix square root: our two symmetric eigendecompositions vs pytorch-fid's scipy sqrtm.

Builds two sets of ReLU'd, correlated 2048-d features (like Inception pool3), fits mean and
covariance, and times the Fréchet distance both ways on the same statistics, after checking they
agree. Prints one line per set size: `n sqrtm_s eigh_s ratio relative_difference` (ratio =
sqrtm / eigh; above 1 means ours is faster). n below 2048 gives singular covariances, where
pytorch-fid falls back to a 1e-6 ridge.

  python benchmarks/frechet.py [--sizes 300,6000] [--dim 2048]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

from s2flash_jax.eval.frechet import frechet_distance_from_statistics  # noqa: E402


def pytorch_fid_distance(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid 0.3.0's calculate_frechet_distance, as its fid_score.py documents it."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def timed(function, *args) -> tuple[float, float]:
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="300,6000", help="feature vectors per set, comma-separated")
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("n sqrtm_s eigh_s ratio relative_difference")
    for n in (int(s) for s in args.sizes.split(",")):
        mixing = rng.normal(size=(args.dim, args.dim)) / np.sqrt(args.dim)
        a = np.maximum(rng.normal(size=(n, args.dim)) @ mixing, 0)
        b = np.maximum(rng.normal(size=(n, args.dim)) @ (mixing * 1.05) + 0.01, 0)
        stats = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
        reference, reference_s = timed(pytorch_fid_distance, *stats)
        ours, ours_s = timed(frechet_distance_from_statistics, *stats)
        print(f"{n} {reference_s:.2f} {ours_s:.2f} {reference_s / ours_s:.2f} {abs(ours - reference) / reference:.1e}",
              flush=True)


if __name__ == "__main__":
    main()
