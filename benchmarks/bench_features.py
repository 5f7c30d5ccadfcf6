"""Feature extraction: `extract_features` (Trainer.predict, batched) vs a plain per-image loop.

Same model, same uint8 images, same CPU, same run. The loop is what a user writes without the
framework: one image at a time, converted to float, through the same Preprocess+LayerFeatures
module under no_grad. The network runs at the stimulus size (input_size = S), so 64 px and
224 px measure two working points. A third column times the cached second call.

    python benchmarks/bench_features.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time

import numpy as np
import torch

from brainrobust.models.features import build_feature_model, extract_features
from brainrobust.models.zoo import get_spec

# (model, stimulus size, number of images): small counts so the run fits a 2-core sandbox.
CASES = [
    ("tiny_cnn_random", 64, 512),
    ("tiny_cnn_random", 224, 128),
    ("resnet18_random", 64, 256),
    ("resnet18_random", 224, 64),
]


def plain_loop(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = []
    with torch.no_grad():
        for image in images:
            x = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
            out.append(model(x))
    return torch.cat(out).numpy(), time.perf_counter() - start


def framework(
    spec, model, images: np.ndarray, cache_dir: str, batch_size: int
) -> tuple[np.ndarray, float, float]:
    ids = np.arange(len(images))
    kwargs = {
        "cache_dir": cache_dir,
        "batch_size": batch_size,
        "accelerator": "cpu",
        "progress_bar": False,
    }
    start = time.perf_counter()
    features = extract_features(spec, model, images, ids, f"bench-{images.shape[1]}", **kwargs)
    miss = time.perf_counter() - start
    start = time.perf_counter()
    extract_features(spec, model, images, ids, f"bench-{images.shape[1]}", **kwargs)
    return features, miss, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    rng = np.random.default_rng(0)
    rows = []
    for name, size, count in CASES:
        count = max(8, count // 4) if args.quick else count
        spec = dataclasses.replace(get_spec(name), input_size=size)
        model = build_feature_model(spec)
        images = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
        plain_loop(model, images[:2])  # warm-up: first-call allocations, kernel selection
        looped, t_loop = plain_loop(model, images)
        with tempfile.TemporaryDirectory() as cache_dir:
            batched, t_miss, t_hit = framework(spec, model, images, cache_dir, args.batch_size)
        diff = float(np.abs(batched - looped).max())
        rows.append(
            (
                name,
                size,
                count,
                count / t_loop,
                count / t_miss,
                t_loop / t_miss,
                count / t_hit,
                diff,
            )
        )
    print(
        f"threads: {torch.get_num_threads()}, batch size {args.batch_size}, "
        f"torch {torch.__version__}"
    )
    header = (
        "model",
        "S",
        "n",
        "loop img/s",
        "predict img/s",
        "ratio",
        "cached img/s",
        "max|diff|",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, size, count, loop, miss, ratio, hit, diff in rows:
        print(
            f"| {name} | {size} | {count} | {loop:,.0f} | {miss:,.0f} | {ratio:.2f}x "
            f"| {hit:,.0f} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
