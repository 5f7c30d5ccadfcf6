"""Ridge readout fit: per-voxel penalty choice, brainrobust vs scikit-learn and himalaya.

Planted problem shaped like CNN features -> voxels: correlated, offset feature columns with a
power-law spectrum; voxels driven by the top latent directions at varied SNR (10% pure noise).
Same 9 penalties (1e-2 .. 1e6) for every method, timed in one run, scored by mean Pearson r on
held-out samples. Ratios are speed-ups against scikit-learn RidgeCV(alpha_per_target=True).

    python benchmarks/bench_ridge.py            # 10,000 x 2,048 features, 3,000 voxels
    python benchmarks/bench_ridge.py --quick    # 2,000 x 512, 500 voxels
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from himalaya.backend import set_backend
from sklearn.linear_model import RidgeCV
from threadpoolctl import threadpool_limits

from brainrobust.models.readout import pearson_r
from brainrobust.models.ridge import DEFAULT_ALPHAS, fit_ridge


def planted(
    n: int, p: int, n_voxels: int, rank: int = 64, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """X (n, p) float32 with correlated columns, Y (n, V) float32 with per-voxel SNR."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, p), dtype=np.float32)
    spectrum = (np.arange(1, p + 1, dtype=np.float32)) ** -0.6
    rotation, _ = np.linalg.qr(rng.standard_normal((p, p)).astype(np.float32))
    X = (latent * spectrum) @ rotation.T + rng.random(p, dtype=np.float32)  # ReLU-like offsets
    loadings = rng.standard_normal((rank, n_voxels), dtype=np.float32)
    signal = latent[:, :rank] @ loadings
    signal /= signal.std(0)
    r2 = rng.uniform(0.0, 0.5, n_voxels).astype(np.float32)
    r2[rng.random(n_voxels) < 0.1] = 0.0
    noise = rng.standard_normal((n, n_voxels), dtype=np.float32)
    Y = (
        np.sqrt(r2) * signal
        + np.sqrt(1 - r2) * noise
        + rng.standard_normal(n_voxels, dtype=np.float32)
    )
    return X.astype(np.float32), Y.astype(np.float32)


def sklearn_fit(X: np.ndarray, Y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    model = RidgeCV(alphas=DEFAULT_ALPHAS, alpha_per_target=True).fit(X, Y)
    return model.predict


def ours(
    method: str, **kwargs
) -> Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    def fit(X: np.ndarray, Y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        result = fit_ridge(X, Y, alphas=DEFAULT_ALPHAS, method=method, **kwargs)
        return lambda x: x @ result.weights + result.intercept

    return fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 x 512 features, 500 voxels")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["loo", "kfold", "himalaya"],
        help="peers to leave out",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="cap BLAS/LAPACK and torch threads (fair on a shared machine)",
    )
    args = parser.parse_args()
    if args.threads:
        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
    n_train, p, n_voxels = (2_000, 512, 500) if args.quick else (10_000, 2_048, 3_000)
    n_test = n_train // 5

    X, Y = planted(n_train + n_test, p, n_voxels)
    x_train, y_train, x_test, y_test = X[:n_train], Y[:n_train], X[n_train:], Y[n_train:]
    set_backend("numpy")
    methods = {
        "sklearn RidgeCV (LOO)": sklearn_fit,
        "ours gcv": ours("gcv"),
        "ours loo": ours("loo"),
        "ours kfold (cv=5)": ours("kfold", cv=5),
        "himalaya RidgeCV (cv=5, numpy)": ours("himalaya", cv=5),
    }
    print(
        f"ridge: {n_train} x {p} train, {n_test} test, {n_voxels} voxels, {len(DEFAULT_ALPHAS)} alphas, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    rows = []
    for label, fit in methods.items():
        if any(skipped in label for skipped in args.skip):
            continue
        start = time.perf_counter()
        predict = fit(x_train, y_train)
        seconds = time.perf_counter() - start
        r = float(pearson_r(y_test, predict(x_test)).mean())
        rows.append((label, seconds, r))
        print(f"  {label}: {seconds:.1f} s, mean test r {r:.4f}", flush=True)

    base_s, base_r = rows[0][1], rows[0][2]
    print()
    print("| method | seconds | speed-up vs sklearn | mean test r | r - sklearn r |")
    print("|---|---|---|---|---|")
    for label, seconds, r in rows:
        print(
            f"| {label} | {seconds:.2f} | {base_s / seconds:.2f}x | {r:.4f} | {r - base_r:+.4f} |"
        )


if __name__ == "__main__":
    main()
