"""End-to-end cost of one sweep unit (model, subject, ROI) and the projection to the full grid.

Runs the sensitivity experiment (L2 ladder, 20-step PGD, random control) unit by unit on the
synthetic twin, in-process through `brainrobust.pipeline.run`, two ways in the same run:

- shared: one feature/readout cache for the sweep, as `run.py --multirun` uses it: the first
  ROI of a (model, subject) pays the backbone pass and the ridge fit, the others load them;
- unshared: a fresh cache per unit, as a sweep that repeats its work would run.

It prints the seconds per unit (cold = first ROI of a model and subject, warm = the others), the
share of the probe in it, and both sweeps' cost for the paper's 14 x 8 x 3 grid (112 cold units,
224 warm) at this unit cost.

    python benchmarks/bench_sweep.py [--model tiny_cnn_random] [--device cpu|cuda] [--images N] [overrides]

On a GPU, ResNet-50 at random init costs what the trained one does and needs no download:
    python benchmarks/bench_sweep.py --device cuda --model resnet18_random model.arch=resnet50
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from brainrobust.data.synthetic import ensure_synthetic_nsd
from brainrobust.pipeline import run
from brainrobust.probes.sensitivity import SensitivityProbe

CONF = Path(__file__).resolve().parents[1] / "conf"
GRID_MODELS, GRID_SUBJECTS, GRID_ROIS = 14, 8, 3


class ProbeClock:
    """Seconds spent inside the sensitivity probe, around the real `run`."""

    def __init__(self):
        self.seconds = 0.0
        self._run = SensitivityProbe.run
        clock = self

        def timed(probe, *args, **kwargs):
            start = time.perf_counter()
            try:
                return clock._run(probe, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - start

        SensitivityProbe.run = timed


def unit(overrides: list[str], clock: ProbeClock) -> tuple[float, float]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    probe_before = clock.seconds
    start = time.perf_counter()
    run(cfg)
    return time.perf_counter() - start, clock.seconds - probe_before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny_cnn_random")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--subjects", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rois", nargs="+", default=["FFA", "EBA", "PPA"])
    parser.add_argument("--images", type=int, default=None, help="test images per unit (default: all)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every unit")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    clock = ProbeClock()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ensure_synthetic_nsd(tmp / "nsd")
        common = [
            "experiment=sensitivity", f"model={args.model}", f"data.root={tmp / 'nsd'}",
            "logger=none", "trainer.enable_progress_bar=false", "print_table=false",
            f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
            f"paths.log_dir={tmp / 'logs'}", *args.overrides,
        ]
        if args.images:
            common.append(f"probe.sensitivity.max_images={args.images}")
        times: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": [], "unshared": []}
        for subject in args.subjects:
            for i, roi in enumerate(args.rois):
                job = [*common, f"subject={subject}", f"roi={roi}"]
                shared = unit(job + [f"paths.cache_dir={tmp / 'shared'}",
                                     f"paths.results_dir={tmp / 'results_shared'}"], clock)
                times["warm" if i else "cold"].append(shared)
                fresh = tmp / f"unshared-{subject}-{roi}"
                times["unshared"].append(unit(job + [f"paths.cache_dir={fresh}",
                                                     f"paths.results_dir={fresh / 'results'}"], clock))

    def mean(kind: str, part: int) -> float:
        return statistics.mean(t[part] for t in times[kind])

    print(f"model {args.model} {' '.join(args.overrides)} on {args.device}, sensitivity experiment, "
          f"synthetic twin, {len(args.subjects)} subjects x {len(args.rois)} ROIs")
    print("| unit | n | seconds per unit | of which probe |")
    print("|---|--:|--:|--:|")
    for kind in ("cold", "warm", "unshared"):
        print(f"| {kind} | {len(times[kind])} | {mean(kind, 0):.2f} | {mean(kind, 1) / mean(kind, 0):.0%} |")
    pairs = GRID_MODELS * GRID_SUBJECTS
    shared_grid = pairs * mean("cold", 0) + pairs * (GRID_ROIS - 1) * mean("warm", 0)
    unshared_grid = pairs * GRID_ROIS * mean("unshared", 0)
    print(f"projection, {GRID_MODELS} x {GRID_SUBJECTS} x {GRID_ROIS} grid at this unit cost: shared "
          f"{shared_grid / 3600:.2f} h, unshared {unshared_grid / 3600:.2f} h "
          f"({unshared_grid / shared_grid:.2f}x)")


if __name__ == "__main__":
    main()
