"""Benchmark: matrix-free randomized top-k Jacobian subspace vs the exact Jacobian + SVD.

Encoder: the offline tiny CNN (random init, `block4`, 2 x 2 average grid = 512 features, as
`tiny_cnn_random`) and a random linear readout to V voxels, on one batch of 64 x 64 images
(the probe's batch_size, 8, by default: the randomized method's products are small calls, which
a batch fills). Readouts:
  correlated  every voxel mixes 64 shared latent features (power law 1/i) plus 10 % private
              noise: an ROI's voxels are strongly correlated, as real ones are (the default);
              the Jacobian spectrum decays smoothly, sigma_11 / sigma_10 about 0.93-0.97
  iid         independent Gaussian weights: a flat Jacobian spectrum with no gap after the top k,
              where the top-k subspace itself is ill-conditioned (the hard case)
  flat        no CNN: a planted linear map from pixels to voxels with 64 singular values evenly
              spaced from 10 down to 5 (sigma_11 / sigma_10 = 0.991), then V - 64 weaker ones
              down to 0.1 (so that the Krylov basis cannot just fill a 64-dimensional row
              space): the known-answer case of tests/test_subspace_convergence.py at benchmark size
Methods, each in a fresh process (after the same small warm-up call):
  exact          V vector-Jacobian products -> J (V x D) -> QR + SVD
  randomized     block Krylov, k + oversample probe columns, until the Ritz residuals or the
                 error bound they give are <= tol (at most max_iters iterations), forward-mode
                 JVPs
  randomized/2v  the same with JVPs by the double-VJP trick
Reported: wall and CPU seconds (CPU time is less disturbed by other jobs on a shared machine),
peak RSS growth of the process over its warmed-up size, overlap with the exact subspace
(||P^T P_exact||_F^2 / k, mean over the images, and 1 - its minimum), iterations used (max over
the images), the largest recorded relative residual and error bound on 1 - overlap, and
speed-up vs exact.

    python benchmarks/bench_subspace.py [--voxels 1000,3000] [--readouts correlated,iid,flat]
                                        [--threads 1] [--n-images 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]

METHODS = {
    "exact": {"method": "exact"},
    "randomized": {"method": "randomized", "jvp_mode": "forward"},
    "randomized/2v": {"method": "randomized", "jvp_mode": "double_vjp"},
}


def build_encoder(n_voxels: int, readout: str, n_images: int, seed: int = 0):
    import torch
    from torch import nn

    from brainrobust.models.backbones import TinyCNN
    from brainrobust.probes.jacobian import orthonormalize

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images = torch.rand(n_images, 3, 64, 64, generator=g)
    if readout == "flat":
        sigma = torch.cat([torch.linspace(10, 5, 64), torch.linspace(4.9, 0.1, n_voxels - 64)])
        left = orthonormalize(torch.randn(n_voxels, n_voxels, generator=g))
        right = orthonormalize(torch.randn(images[0].numel(), n_voxels, generator=g))
        w = (left * sigma) @ right.T
        return (lambda x: x.flatten(1) @ w.T), images
    features = nn.Sequential(TinyCNN(), nn.AdaptiveAvgPool2d(2), nn.Flatten()).eval()
    n_feat, n_latent = 512, 64
    if readout == "iid":
        w = torch.randn(n_feat, n_voxels, generator=g) / n_feat**0.5
    else:
        strength = torch.arange(1, n_latent + 1.0) ** -1.0
        mixing = (
            torch.randn(n_feat, n_latent, generator=g)
            * strength
            @ torch.randn(n_latent, n_voxels, generator=g)
        )
        w = (
            mixing / (n_feat * n_latent) ** 0.5
            + 0.1 * torch.randn(n_feat, n_voxels, generator=g) / n_feat**0.5
        )
    return (lambda x: features(x) @ w), images


def worker(
    name: str,
    n_voxels: int,
    readout: str,
    k: int,
    oversample: int,
    max_iters: int,
    tol: float,
    chunk: int,
    threads: int,
    n_images: int,
    out: Path,
) -> None:
    import resource
    import time

    import torch

    from brainrobust.probes.jacobian import top_k_right_singular

    torch.set_num_threads(threads)
    fn, images = build_encoder(n_voxels, readout, n_images)
    # Same warm-up for every method: torch.func builds its decompositions on first use.
    for mode in ("forward", "double_vjp"):
        top_k_right_singular(fn, images[:1], 1, oversample=1, max_iters=1, jvp_mode=mode)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    sub = top_k_right_singular(
        fn,
        images,
        k,
        oversample=oversample,
        max_iters=max_iters,
        tol=tol,
        chunk=chunk,
        generator=torch.Generator().manual_seed(1),
        **METHODS[name],
    )
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    np.save(out, sub.p.numpy())
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    peak_mb = (after.ru_maxrss - before.ru_maxrss) / 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_mb": peak_mb,
                "iterations": int(sub.iterations.max()),
                "residual": float(sub.residual.max()),
                "bound": float(sub.error_bound.max()),
            }
        )
    )


def measure(name: str, n_voxels: int, readout: str, settings: dict, tmp: str) -> dict:
    """Run one method in a fresh process; its timings, memory and subspaces."""
    out = Path(tmp) / f"{readout}-{n_voxels}-{name.replace('/', '_')}.npy"
    cmd = [sys.executable, __file__, "--worker", name, str(n_voxels), readout, "--out", str(out)]
    cmd += [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"p": np.load(out)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--voxels", default="1000,3000")
    parser.add_argument("--readouts", default="correlated")
    parser.add_argument("--k", type=int, default=10)
    # The probe's defaults, so the rows measure what a run does.
    defaults = OmegaConf.load(REPO / "conf" / "probe" / "subspace.yaml").subspace
    parser.add_argument("--n-images", type=int, default=defaults.batch_size)
    parser.add_argument("--oversample", type=int, default=defaults.oversample)
    parser.add_argument("--max-iters", type=int, default=defaults.max_iters)
    parser.add_argument("--tol", type=float, default=defaults.tol)
    parser.add_argument("--chunk", type=int, default=64, help="probe columns per vectorised call")
    # Small products suffer more from a second thread on a loaded machine than J's big ones.
    parser.add_argument("--threads", type=int, default=2, help="torch threads per method")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = {
        "k": args.k,
        "oversample": args.oversample,
        "max_iters": args.max_iters,
        "tol": args.tol,
        "chunk": args.chunk,
        "threads": args.threads,
        "n_images": args.n_images,
    }
    if args.worker:
        name, n_voxels, readout = args.worker
        worker(name, int(n_voxels), readout, out=args.out, **settings)
        return

    from brainrobust.probes.jacobian import subspace_similarity

    print(
        f"top-{args.k} Jacobian subspace of {args.n_images} images, 64 x 64 (D = 12,288), tiny CNN "
        f"+ linear "
        f"readout; randomized: oversample {args.oversample}, tol {args.tol:g}, at most "
        f"{args.max_iters} iterations; "
        f"chunk {args.chunk}; {args.threads} threads; load average at start "
        f"{os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'readout':<11} {'voxels':>6} {'method':<14} {'wall s':>7} {'cpu s':>7} "
        f"{'peak MB':>8} {'overlap':>9} {'1-min':>7} {'iters':>5} {'residual':>8} {'bound':>8} "
        f"{'speed-up wall/cpu':>18}"
    )
    print(header + "\n" + "-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for readout in args.readouts.split(","):
            for n_voxels in (int(v) for v in args.voxels.split(",")):
                results = {
                    name: measure(name, n_voxels, readout, settings, tmp) for name in METHODS
                }
                exact = results["exact"]
                for name, r in results.items():
                    overlap = subspace_similarity(r["p"], exact["p"])
                    speedup = (
                        f"{exact['seconds'] / r['seconds']:.1f}x / "
                        f"{exact['cpu_seconds'] / r['cpu_seconds']:.1f}x"
                    )
                    print(
                        f"{readout:<11} {n_voxels:>6} {name:<14} {r['seconds']:>7.2f} "
                        f"{r['cpu_seconds']:>7.2f} {r['peak_mb']:>8.0f} {overlap.mean():>9.6f} "
                        f"{1 - overlap.min():>7.0e} {r['iterations']:>5} {r['residual']:>8.1e} "
                        f"{r['bound']:>8.1e} "
                        f"{speedup:>18}",
                        flush=True,
                    )
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
