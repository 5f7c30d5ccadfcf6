"""PGD speed: brainrobust's engine vs torchattacks' PGDL2, same backbone, batch, steps and budget.

Ours attacks the pattern objective ||r(x + d) - r(x)||_2 of a 1,000-voxel linear readout on the
pooled features of a timm backbone with random weights (no download); torchattacks attacks the
cross-entropy of the same backbone with a 1,000-way head. Both run L2 PGD with the same eps, steps,
step size and random start (`--method apgd`: ours steps by Auto-PGD's rule instead, the same
number of steps, to price its momentum and step bookkeeping). This is the cost of a step; how many
steps each attack needs is benchmarks/bench_time_to_quality.py. Variants are timed in interleaved rounds (best of --repeats), so a
shared machine's load hits every variant alike. On a loaded machine pass --threads 1: a second
OpenMP thread that is not scheduled makes the other spin, and one attack then takes 20x longer.

    python benchmarks/bench_attack.py                                  # CPU, ~2 min
    python benchmarks/bench_attack.py --method apgd --variants fp32 --threads 1
    python benchmarks/bench_attack.py --device cuda --model resnet50 --batch 256 --size 224 \
        --variants fp32,bf16_cl,bf16_cl_compile
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import timm
import torch
from torch import nn

from brainrobust.probes.attack import AttackRuntime, PGDConfig, pgd
from brainrobust.probes.objectives import make_objective

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Our engine's variants; a channels_last runtime also gets a channels_last copy of the encoder.
VARIANTS = {
    "fp32": AttackRuntime(),
    "cl": AttackRuntime(channels_last=True),
    "bf16": AttackRuntime(amp_dtype="bfloat16"),
    "bf16_cl": AttackRuntime(amp_dtype="bfloat16", channels_last=True),
    "cl_compile": AttackRuntime(channels_last=True, compile=True),
    "bf16_cl_compile": AttackRuntime(amp_dtype="bfloat16", channels_last=True, compile=True),
}


DEFAULT_VARIANTS = {"cpu": "fp32,cl,bf16_cl", "cuda": "fp32,bf16_cl,bf16_cl_compile"}


class Normalize(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class BenchEncoder(nn.Module):
    """Images in [0, 1] -> normalise -> backbone pooled features -> linear voxel readout."""

    def __init__(self, backbone: nn.Module, voxels: int):
        super().__init__()
        self.normalize = Normalize()
        self.backbone = backbone
        self.readout = nn.Linear(backbone.num_features, voxels)
        self.rois = {"all": torch.arange(voxels)}

    def forward(self, x):
        return self.readout(self.backbone(self.normalize(x)))


def timed(fn, sync) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="timm model name (random weights)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--method", default="pgd", choices=["pgd", "apgd", "cosine"],
                        help="our step rule: pgd (the peer's, equal settings), apgd (momentum "
                             "and step halving) or cosine (the default's annealed step), same "
                             "step count")
    parser.add_argument("--eps", type=float, default=1.0, help="L2 budget")
    parser.add_argument("--voxels", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; best is kept")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: CPU "
                             f"{DEFAULT_VARIANTS['cpu']}, CUDA {DEFAULT_VARIANTS['cuda']})")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    chosen = args.variants or DEFAULT_VARIANTS["cuda" if device.type == "cuda" else "cpu"]
    variants = [v.strip() for v in chosen.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0)
    encoder = BenchEncoder(backbone, args.voxels).to(device).eval()
    classifier = nn.Sequential(encoder.normalize, backbone,
                               nn.Linear(backbone.num_features, 1000)).to(device).eval()
    encoder_cl = copy.deepcopy(encoder).to(memory_format=torch.channels_last)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    x = x.to(device)
    labels = torch.randint(0, 1000, (args.batch,), generator=torch.Generator().manual_seed(2))
    labels = labels.to(device)
    alpha = 2.5 / args.steps  # the peer's step, and ours with --method pgd
    cfg = PGDConfig(method=args.method, norm="l2", steps=args.steps,
                    step_size=alpha if args.method == "pgd" else None)

    runs = {}
    for name in variants:
        runtime = VARIANTS[name]
        model = encoder_cl if runtime.channels_last else encoder

        def ours(model=model, runtime=runtime):
            objective = make_objective(model, "all", "pattern", x)
            pgd(objective, x, args.eps, cfg, torch.Generator(device).manual_seed(3), runtime)

        runs[f"brainrobust {args.method}, {name}"] = ours
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
        print("torchattacks is not installed: no peer to compare with", file=sys.stderr)
    peer = None
    if torchattacks is not None:
        attack = torchattacks.PGDL2(classifier, eps=args.eps, alpha=alpha * args.eps,
                                    steps=args.steps, random_start=True)
        peer = f"torchattacks {torchattacks.__version__} PGDL2, fp32"
        runs[peer] = lambda: attack(x, labels)

    # Warm-up: first calls pay for allocator growth, oneDNN primitive creation, compilation.
    first = {label: timed(fn, sync)[0] for label, fn in runs.items()}
    wall = {label: float("inf") for label in runs}
    cpu = dict(wall)
    for _ in range(args.repeats):
        for label, fn in runs.items():
            w, c = timed(fn, sync)
            wall[label], cpu[label] = min(wall[label], w), min(cpu[label], c)

    image_steps = args.batch * args.steps
    print(f"\nL2 {args.method}, {args.model} (random weights) + {args.voxels}-voxel readout, "
          f"batch {args.batch}, {args.size}x{args.size}, {args.steps} steps, device {device}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, TF32: cudnn "
              f"{torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}")
    # On a shared machine wall time carries the neighbours' load; process CPU time much less.
    on_cpu = device.type == "cpu"
    head = f"| {'variant':<42} | {'s / attack':>10} | {'image-steps/s':>13} | {'vs peer':>7} |"
    rule = f"|{'-' * 44}|{'-' * 11}:|{'-' * 14}:|{'-' * 8}:|"
    if on_cpu:
        head += f" {'CPU s':>7} | {'vs peer, CPU s':>14} |"
        rule += f"{'-' * 8}:|{'-' * 15}:|"
    print(f"\n{head}\n{rule}")
    for label in runs:
        row = (f"| {label:<42} | {wall[label]:>10.3f} | {image_steps / wall[label]:>13.1f} | "
               f"{_ratio(wall, peer, label):>7} |")
        if on_cpu:
            row += f" {cpu[label]:>7.2f} | {_ratio(cpu, peer, label):>14} |"
        print(row)
    if any("compile" in v for v in variants):
        print("\nfirst call (includes compilation):",
              ", ".join(f"{k}: {v:.1f} s" for k, v in first.items() if "compile" in k))
    if torchattacks is not None:
        # The peer's own limit: it flattens gradients with .view, which a channels_last model's
        # input gradient does not allow.
        try:
            classifier_cl = copy.deepcopy(classifier).to(memory_format=torch.channels_last)
            attack_cl = torchattacks.PGDL2(classifier_cl, eps=args.eps,
                                           alpha=alpha * args.eps, steps=1)
            attack_cl(x.contiguous(memory_format=torch.channels_last), labels)
            print("\ntorchattacks PGDL2 on a channels_last model: runs")
        except RuntimeError as err:
            reason = str(err).splitlines()[0][:80]
            print(f"\ntorchattacks PGDL2 on a channels_last model: fails ({reason})")


def _ratio(seconds: dict[str, float], peer: str | None, label: str) -> str:
    return f"{seconds[peer] / seconds[label]:.2f}x" if peer else "n/a"


if __name__ == "__main__":
    main()
