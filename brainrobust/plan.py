"""Cost model of a sweep, before anything runs: `python -m brainrobust.plan sensitivity [overrides]`.

Composes the experiment's grid (its `hydra.sweeper.params`, with command-line overrides taking
precedence as in a real --multirun), finds which jobs the results store already holds, and
estimates the GPU time of the rest from measured per-unit costs:

- ResNet-50 PGD, bf16 + channels_last, eager, one H200: 3,673 image-steps/s; forward 14,999
  images/s (`../shared/reference/anchors.md`, same machine class as our target). Other backbones
  are scaled by their forward GFLOPs at 224 x 224 (timm's model cards), a first-order model:
  memory-bound small nets (MobileNet, EfficientNet) run slower than their FLOPs suggest.
- An image-step is one forward + input-gradient pass; a probe's cost is its image-steps.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from brainrobust.errors import BrainRobustError, ConfigError
from brainrobust.pipeline import key_columns, run_identity
from brainrobust.results.store import ResultsStore

CONF = Path(__file__).resolve().parents[1] / "conf"
RESNET50_GFLOPS = 4.1
PGD_IMAGE_STEPS_PER_S = 3673.0
FORWARD_IMAGES_PER_S = 14999.0
GFLOPS = {  # forward pass at 224 x 224
    "resnet18": 1.8, "resnet50": 4.1, "resnet101": 7.8, "vgg16": 15.5, "densenet121": 2.9,
    "efficientnet_b0": 0.4, "mobilenetv3_large_100": 0.22, "convnext_tiny": 4.5,
    "vit_base_patch16_224": 17.6, "vit_base_patch16_clip_224": 17.6, "tiny_cnn": 0.05,
}
# Images per subject in the real NSD: the shared test split and the subject's other images.
NSD_TEST_IMAGES = 515
NSD_TRAIN_IMAGES = 9000


def probe_image_steps(name: str, probe: DictConfig, n_images: int) -> float:
    """Forward + gradient passes a probe costs on n test images (first-order)."""
    n = min(n_images, probe.get("max_images") or n_images)
    if name == "sensitivity":
        ladder = len(probe.eps)
        attack = probe.attack
        return n * ladder * (attack.steps * attack.restarts + probe.random_draws / 2)
    if name == "subspace":
        # Each subspace iteration is one JVP and one VJP per probe column.
        return n * 2 * (probe.k + probe.get("oversample", 10)) * (probe.get("iters", 3) + 1)
    if name == "effect_matched":
        return n * probe.attack.steps * probe.get("max_evals", 12)
    if name == "transfer":
        return n * 8  # forwards only: a handful of sources x eps, no attack
    if name in ("targeted", "mei"):
        return probe.get("n_images", 4) * probe.get("steps", 200)
    raise ConfigError(f"no cost model for probe {name!r}; add one in brainrobust/plan.py")


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """Plain overrides, and sweep overrides (key=a,b or key=range(...)) keyed by their key."""
    parser = OverridesParser.create()
    plain, sweeps = [], {}
    for item, parsed in zip(overrides, parser.parse_overrides(overrides)):
        if parsed.is_sweep_override():
            sweeps[parsed.key_or_group] = item.partition("=")[2]
        else:
            plain.append(item)
    return plain, sweeps


def grid(cfg: DictConfig, plain: list[str], sweeps: dict[str, str]) -> list[list[str]]:
    """The jobs of the sweep: the experiment's sweeper params, overridden from the command line."""
    params: dict[str, str] = dict(cfg.hydra.sweeper.get("params") or {})
    for item in plain:
        params.pop(item.partition("=")[0], None)
    params.update(sweeps)
    parser = OverridesParser.create()
    axes = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()]
            for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()])]
    return [plain + list(combo) for combo in itertools.product(*axes)]


def plan(experiment: str, overrides: list[str]) -> dict[str, Any]:
    plain, sweeps = split_overrides(overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = compose("config", overrides=[f"experiment={experiment}", *plain], return_hydra_config=True)
        jobs = [compose("config", overrides=[f"experiment={experiment}", *job])
                for job in grid(base, plain, sweeps)]
    real = base.data.get("synthetic") is None
    n_test, n_train = (NSD_TEST_IMAGES, NSD_TRAIN_IMAGES) if real else (80, 650)
    done, fresh, passes, seconds = 0, 0, set(), 0.0
    for cfg in jobs:
        store = ResultsStore(cfg.paths.results_dir).run(run_identity(cfg), key_columns(cfg))
        if store.is_complete():
            done += 1
            continue
        fresh += 1
        scale = GFLOPS.get(cfg.model.arch, RESNET50_GFLOPS) / RESNET50_GFLOPS
        if (cfg.model.name, cfg.subject) not in passes:  # ROIs share one feature pass per subject
            passes.add((cfg.model.name, cfg.subject))
            seconds += scale * (n_train + n_test) / FORWARD_IMAGES_PER_S
        steps = sum(probe_image_steps(name, p, n_test) for name, p in (cfg.get("probe") or {}).items())
        seconds += scale * steps / PGD_IMAGE_STEPS_PER_S
    return {"jobs": len(jobs), "done": done, "to_run": fresh, "backbone_passes": len(passes),
            "gpu_hours": seconds / 3600}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m brainrobust.plan")
    parser.add_argument("experiment", help="a conf/experiment name, e.g. sensitivity")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. data=nsd subject=1,2")
    args = parser.parse_args(argv)
    try:
        out = plan(args.experiment, args.overrides)
    except BrainRobustError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.experiment}: {out['jobs']} jobs, {out['done']} already in the results store, "
          f"{out['to_run']} to run; {out['backbone_passes']} backbone feature passes "
          f"(ROIs share them); estimated {out['gpu_hours']:.2f} GPU-hours on one H200 "
          "(bf16 eager; torch.compile is about 2.5x faster)")


if __name__ == "__main__":
    main()
