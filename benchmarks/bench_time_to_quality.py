"""Time to quality: image-steps and seconds until an attack reaches 99% of a long reference.

At equal settings one step of brainrobust costs what one step of torchattacks costs (both are a
forward and a backward pass of the same network; bench_attack.py), so speed comes from needing
fewer steps. For each encoder and objective this measures a long reference (the best per image of
three attacks of many steps and restarts: Auto-PGD from plain random starts and with the
default's screened, mirrored starts, and the default itself: `long_reference`), then runs every
attack at a growing step budget N and reports the first N whose result reaches `--quality` (0.99) of the reference, as the
mean over images of objective / reference, with the image-steps (gradient steps per image at budget
N, each restart's screened candidates included, x images; the forward pass in which an Auto-PGD run
tries the mean of its last iterates is not a step and is not counted) and CPU seconds of that run.
It does so once per seed of the random starts (`--seeds`) and reports each seed's figures and the
median image-steps (the lower middle value for an even number of seeds: give an odd number): one
seed's N can differ from another's by several grid steps.

Encoders: the zoo's random-init CNNs (tiny_cnn_random, resnet18_random) at `--size` px with a
random linear readout of `--voxels` voxels; objectives "abs" (ROI mean of the first half of the
voxels) and "pattern" (the whole voxel pattern), L2 budget `--eps`.

Peers, on the SAME objective: torchattacks maximises cross-entropy, so it gets a wrapper whose
logits are [objective(x), 0] with label 1. Its loss is then softplus(objective), increasing in
the objective, and L2 PGD steps along the normalised gradient (and Auto-PGD compares losses), so
the peer ascends exactly our objective; it is scored by our objective at what it returns.
torchattacks PGDL2 runs with its documented defaults (alpha = 0.2 at eps = 1.0, i.e. alpha =
0.2 eps; random start) and, second, the Madry step 2.5 eps / N; torchattacks APGD with its
defaults (rho 0.75, 1 restart, cross-entropy), returning its best-loss point (`best_loss=True`).

`--trajectory` measures each attack in ONE run at its usual settings instead of a sweep of
budgets: a recorder around the objective sees every iterate the attack evaluates, and the image-
steps and CPU seconds are counted up to the first evaluation at which the mean over images of the
best value seen so far reaches the quality (the point the attack would return, best-iterate
kept, had it stopped there; counted for the peers too, which is generous to PGD, which returns its
last iterate). brainrobust: the default schedule (100 steps x 2 restarts, each after its 4
screened candidates, all one after the other);
PGDL2: alpha 0.2 eps, 400 steps (a fixed step makes N steps the first N of a longer run, so this
is the sweep's answer read in one run); torchattacks APGD: 100 steps.

`--schedules 100x2,apgd:200x1,...` instead reports, per seed, for an attack of conf/attack/
(NAME:, the default cosine without one) at each fixed schedule (steps x restarts, optionally cK:
K screened candidates per restart, and mM: up to M restarts while some image's best is
unconfirmed, e.g. 100x2c4m4, the default), the restarts run (mean per image), the quality
reached (mean and worst image) and the share of images the convergence report calls converged.

The RESULTS.md tables of the annealed default (2-core CPU, `--threads 1`; the eps 0.1 sweep of
three attacks over 3 seeds about 20 min for the TinyCNN and 45 min for the ResNet-18; each
`--schedules` row set 10-20 min, most of it the reference):

    python benchmarks/bench_time_to_quality.py --models tiny_cnn_random --eps 0.1 --threads 1 \
        --seeds 3,4,5 --attacks default,apgd,pgdl2 \
        --grid 3,4,5,6,8,10,15,20,30,40,50,70,100,140,200,280,400
    python benchmarks/bench_time_to_quality.py --models resnet18_random --eps 0.1 --ref-restarts 2 \
        --threads 1 --seeds 3,4,5 --attacks default,apgd,pgdl2 \
        --grid 3,4,5,6,8,10,15,20,30,40,50,70,100,140,200,280,400
    python benchmarks/bench_time_to_quality.py --models tiny_cnn_random --eps 0.3 --threads 1 \
        --seeds 3,4,5 --schedules 100x2c4m4,apgd:100x2c4m4
    python benchmarks/bench_time_to_quality.py --models tiny_cnn_random --eps 1.0 --threads 1 \
        --seeds 3,4,5 --schedules 100x2c4m4,apgd:100x2c4m4
    python benchmarks/bench_time_to_quality.py --models tiny_cnn_random --eps 1.0 --threads 1 \
        --seeds 3,4,5 --schedules 100x2c4m4,apgd:100x2c4m4 --ref-restarts 10 --ref-auto-pgd-only

The older tables ran `--attacks default,pgdl2` (or all six attacks on one seed) when the default
was Auto-PGD, now `apgd`, against the Auto-PGD-only reference: `--ref-auto-pgd-only`.
`python benchmarks/bench_time_to_quality.py --eps 0.1 --ref-restarts 2 --threads 1 --trajectory`
reads each attack's trajectory in one run.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from brainrobust.costs import pgd_steps
from brainrobust.models.build import random_readout_encoder
from brainrobust.probes.attack import PGDConfig, pgd
from brainrobust.probes.objectives import make_objective

CONF = Path(__file__).resolve().parents[1] / "conf" / "attack"
# (encoder, objective, images, eps, steps, seed) -> adversarial images
Attack = Callable[[nn.Module, Callable[[Tensor], Tensor], Tensor, float, int, int], Tensor]
# budget N -> gradient steps per image (a mean over images where restarts vary)
Cost = Callable[[int], float]


def smooth_images(n: int, size: int, seed: int = 1) -> Tensor:
    """Natural-image-like inputs: random 8 x 8 colour fields upsampled (no pixel at 0 or 1)."""
    low = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1
    return nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


class Recorder:
    """Wraps an objective: the values and cumulative CPU seconds of every batch it evaluates."""

    def __init__(self, objective: Callable[[Tensor], Tensor]):
        self.objective = objective
        self.values: list[Tensor] = []
        self.seconds: list[float] = []
        self.start = time.process_time()

    def __call__(self, x: Tensor) -> Tensor:
        value = self.objective(x)
        self.values.append(value.detach().clone())
        self.seconds.append(time.process_time() - self.start)
        return value

    def first_reaching(self, reference: Tensor, quality: float) -> tuple[int, float, float]:
        """(evaluations, CPU s, quality) at the first evaluation where the mean over images of
        best-so-far / reference reaches `quality`; (all, all, final quality) if none does."""
        best = torch.cummax(torch.stack(self.values), dim=0).values / reference
        reached = (best.mean(1) >= quality).nonzero()
        i = int(reached[0]) if len(reached) else len(best) - 1
        return i + 1, self.seconds[i], float(best[i].mean())


class ObjectiveAsLogits(nn.Module):
    """logits [objective(x), 0]: with label 1, cross-entropy = softplus(objective).

    Holds the encoder too: torchattacks takes its device from the model's parameters.
    """

    def __init__(self, objective: Callable[[Tensor], Tensor], encoder: nn.Module):
        super().__init__()
        self.objective = objective
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        value = self.objective(x)
        return torch.stack([value, torch.zeros_like(value)], dim=1)


def settings_of(attack_config: str, **changes) -> dict:
    """The search settings of conf/attack/<attack_config>.yaml (not its norm or steps), over
    those of the configs its defaults list extends, with `changes`."""
    node = OmegaConf.to_container(OmegaConf.load(CONF / f"{attack_config}.yaml"))
    bases = [settings_of(base) for base in node.pop("defaults", []) if base != "_self_"]
    settings = {k: v for k, v in node.items() if k not in ("_target_", "norm", "steps")}
    return {k: v for layer in (*bases, settings, changes) for k, v in layer.items()}


def ours(attack_config: str, **changes) -> tuple[Attack, Cost]:
    """An attack of conf/attack/ at budget N, with `changes`. Its cost counts the restarts the
    last run made per image (max_restarts lets the attack add some where they disagree)."""
    settings = settings_of(attack_config, **changes)
    last = {}

    def run(encoder, objective, x, eps, steps, seed):
        cfg = PGDConfig(norm="l2", steps=steps, **settings)
        result = pgd(objective, x, eps, cfg, generator=torch.Generator().manual_seed(seed))
        last["restarts"] = float(result.restarts.double().mean())
        return x + result.delta
    return run, lambda steps: last["restarts"] * pgd_steps({**settings, "steps": steps,
                                                            "restarts": 1, "max_restarts": None})


def torchattacks_pgdl2(alpha: Callable[[float, int], float]) -> tuple[Attack, Cost]:
    import torchattacks

    def run(encoder, objective, x, eps, steps, seed):
        torch.manual_seed(seed)
        attack = torchattacks.PGDL2(ObjectiveAsLogits(objective, encoder).eval(), eps=eps,
                                    alpha=alpha(eps, steps), steps=steps, random_start=True)
        return attack(x, torch.ones(len(x), dtype=torch.long))
    return run, lambda steps: steps


def torchattacks_apgd() -> tuple[Attack, Cost]:
    import torchattacks

    def run(encoder, objective, x, eps, steps, seed):
        attack = torchattacks.APGD(ObjectiveAsLogits(objective, encoder).eval(), norm="L2", eps=eps,
                                   steps=steps, n_restarts=1, seed=seed, loss="ce")
        return attack.perturb(x, torch.ones(len(x), dtype=torch.long), best_loss=True)[1]
    return run, lambda steps: steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny_cnn_random,resnet18_random")
    parser.add_argument("--objectives", default="abs,pattern")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--voxels", type=int, default=500)
    parser.add_argument("--eps", type=float, default=0.3, help="L2 budget (the l2_small ladder's middle)")
    parser.add_argument("--grid", default="10,15,20,30,40,50,70,100,140,200,280,400",
                        help="step budgets N tried, in order; the first that reaches the quality counts")
    parser.add_argument("--quality", type=float, default=0.99)
    parser.add_argument("--attacks", default="default,one-restart,pgdl2,pgdl2-madry,ta-apgd",
                        help="which attacks the sweep runs")
    parser.add_argument("--seeds", default="3",
                        help="random starts' seeds: each attack's sweep runs once per seed")
    parser.add_argument("--ref-steps", type=int, default=1000)
    parser.add_argument("--ref-restarts", type=int, default=4)
    parser.add_argument("--ref-auto-pgd-only", action="store_true",
                        help="the reference from Auto-PGD alone, without the default's long runs")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--trajectory", action="store_true",
                        help="one run per attack at its usual settings; count until the quality")
    parser.add_argument("--schedules", default="",
                        help="e.g. 100x2c4m4,apgd:100x2c4m4: quality of these attacks at fixed steps x restarts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = [int(n) for n in args.grid.split(",")]
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    attacks = {
        "default": ("brainrobust default (conf/attack/cosine.yaml)", ours("cosine")),
        "apgd": ("brainrobust Auto-PGD (conf/attack/apgd.yaml)", ours("apgd")),
        "one-restart": ("brainrobust default, 1 restart (4 candidates)",
                        ours("cosine", restarts=1, max_restarts=None)),
        "pgdl2": ("torchattacks PGDL2 (alpha 0.2 eps, its default)",
                  torchattacks_pgdl2(lambda e, n: 0.2 * e)),
        "pgdl2-madry": ("torchattacks PGDL2 (alpha 2.5 eps / N)",
                        torchattacks_pgdl2(lambda e, n: 2.5 * e / n)),
        "ta-apgd": ("torchattacks APGD (L2, best loss)", torchattacks_apgd()),
    }
    unknown = set(args.attacks.split(",")) - set(attacks)
    if unknown:
        parser.error(f"unknown --attacks {sorted(unknown)}; choose from {list(attacks)}")
    attacks = {key: attacks[key] for key in args.attacks.split(",")}
    print(f"L2 eps {args.eps}, {args.size} px, {args.batch} images, {args.voxels} voxels, "
          f"{torch.get_num_threads()} threads; reference: the best of Auto-PGD (plain and with "
          f"screened, mirrored starts){'' if args.ref_auto_pgd_only else ' and the default'}, "
          f"each {args.ref_steps} steps x "
          f"{args.ref_restarts} restarts; quality: mean objective / reference >= {args.quality}")
    if args.trajectory:
        print("\n| encoder | objective | attack (one run) | image-steps to quality | CPU s | "
              "quality at the end |\n|---|---|---|--:|--:|--:|")
    elif args.schedules:
        print("\n| encoder | objective | schedule | restarts run (mean), per seed | quality (mean), per "
              "seed | quality (min), per seed | converged, per seed |\n|---|---|---|--:|--:|--:|--:|")
    else:
        print("\n| encoder | objective | attack | N per seed | image-steps per seed | median image-steps | "
              "CPU s per seed |\n|---|---|---|--:|--:|--:|--:|")
    for model in args.models.split(","):
        encoder = random_readout_encoder(model, args.size, args.voxels)
        x = smooth_images(args.batch, args.size)
        for kind in args.objectives.split(","):
            objective = make_objective(encoder, "half" if kind == "abs" else "all", kind, x)
            reference = long_reference(objective, x, args.eps, args.ref_steps, args.ref_restarts,
                                       args.ref_auto_pgd_only)
            if args.trajectory:
                print(_trajectories(model, kind, encoder, objective, x, args, reference), flush=True)
                continue
            if args.schedules:
                print(_schedules(model, kind, args.schedules, objective, x, args.eps, reference,
                                 args.seeds),
                      flush=True)
                continue
            for label, (attack, cost) in attacks.values():
                print(_time_to_quality(model, kind, label, attack, cost, encoder, objective, x,
                                       args, grid, reference), flush=True)


def long_reference(objective, x: Tensor, eps: float, steps: int, restarts: int,
                   auto_pgd_only: bool = False) -> Tensor:
    """The best per image of three long attacks, `steps` x `restarts`: Auto-PGD from plain
    random starts, Auto-PGD with the default's screened and mirrored starts (attack=apgd) and
    the default itself (attack=cosine; left out with `auto_pgd_only`). Each finds optima the
    others miss (by up to a few percent per image on the zoo's random CNNs)."""
    names = ("apgd",) if auto_pgd_only else ("apgd", "cosine")
    configs = (PGDConfig(method="apgd", norm="l2", steps=steps, restarts=restarts),
               *(PGDConfig(norm="l2", **settings_of(name, steps=steps, restarts=restarts,
                                                    max_restarts=None))
                 for name in names))
    values = [pgd(objective, x, eps, cfg, generator=torch.Generator().manual_seed(9)).objective
              for cfg in configs]
    return torch.stack(values).amax(0)


def _trajectories(model, kind, encoder, objective, x, args, reference) -> str:
    runs = {
        "brainrobust default (100 x 2, 4 candidates)": (ours("cosine")[0], 100),
        "torchattacks PGDL2 (alpha 0.2 eps)": (torchattacks_pgdl2(lambda e, n: 0.2 * e)[0], 400),
        "torchattacks APGD (100 steps)": (torchattacks_apgd()[0], 100),
    }
    rows = []
    for label, (attack, steps) in runs.items():
        recorder = Recorder(objective)
        adv = attack(encoder, recorder, x, args.eps, steps, args.seeds[0])
        with torch.no_grad():
            recorder(adv)  # the returned point counts too (PGD's last iterate is never evaluated)
        evaluations, cpu, quality = recorder.first_reaching(reference, args.quality)
        final = float((recorder.values[-1] / reference).mean())
        reached = "" if quality >= args.quality else f" (never: {quality:.4f})"
        rows.append(f"| {model} | {kind} | {label} | {evaluations * len(x)}{reached} | {cpu:.1f} | "
                    f"{final:.4f} |")
    return "\n".join(rows)


def _schedules(model, kind, schedules, objective, x, eps, reference, seeds) -> str:
    rows = []
    for schedule in schedules.split(","):
        name, steps, restarts, candidates, most = re.fullmatch(
            r"(?:(\w+):)?(\d+)x(\d+)(?:c(\d+))?(?:m(\d+))?", schedule).groups()
        cfg = PGDConfig(norm="l2", **settings_of(
            name or "cosine", steps=int(steps), restarts=int(restarts),
            candidates=int(candidates or 1), max_restarts=int(most or restarts)))
        results = [pgd(objective, x, eps, cfg, generator=torch.Generator().manual_seed(seed))
                   for seed in seeds]
        ratios = [result.objective / reference for result in results]

        def per_seed(values, digits):
            return ", ".join(f"{float(value):.{digits}f}" for value in values)

        rows.append(f"| {model} | {kind} | {schedule} | "
                    f"{per_seed((r.restarts.double().mean() for r in results), 2)} | "
                    f"{per_seed((r.mean() for r in ratios), 4)} | "
                    f"{per_seed((r.min() for r in ratios), 4)} | "
                    f"{per_seed((r.converged.mean() for r in results), 2)} |")
    return "\n".join(rows)


def _time_to_quality(model, kind, label, attack, cost, encoder, objective, x, args, grid,
                     reference) -> str:
    """Per seed, the first N whose result reaches the quality; a single seed's N can be off by
    a grid step or several (a lucky or unlucky random start), so the row reports the median."""
    budgets, image_steps, seconds = [], [], []
    for seed in args.seeds:
        for steps in grid:
            cpu = time.process_time()
            adv = attack(encoder, objective, x, args.eps, steps, seed)
            cpu = time.process_time() - cpu
            with torch.no_grad():
                quality = float((objective(adv) / reference).mean())
            if quality >= args.quality:
                break
        budgets.append(str(steps) if quality >= args.quality else f"> {steps} ({quality:.4f})")
        image_steps.append(round(cost(steps) * len(x)) if quality >= args.quality else math.inf)
        seconds.append(f"{cpu:.1f}")
    median = statistics.median_low(image_steps)
    shown = [str(n) if n < math.inf else "never" for n in image_steps]
    return (f"| {model} | {kind} | {label} | {', '.join(budgets)} | {', '.join(shown)} | "
            f"{median if median < math.inf else 'never'} | {', '.join(seconds)} |")


if __name__ == "__main__":
    main()
