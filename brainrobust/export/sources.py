"""What an export reads: the runs named on the command line, and the stimuli each run holds.

`find_runs` turns RUN_OR_SWEEP into runs: a run key (or a unique prefix) in the store, a run
folder (`results/runs/<key>`), a store root (`results`) or its `runs/` folder, or a Hydra
`--multirun` folder whose jobs left `outcome.json` (see `brainrobust.sweep`).

Each kind of stored array set has one adapter (`ADAPTERS`) that turns it into `Stimuli`: float
images at the model's input size, the images they were made from, and what made them. A new
probe whose stimuli should be exported adds one adapter here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainrobust.errors import BrainRobustError, DataError
from brainrobust.probes.perceptual import l2, linf
from brainrobust.results.store import ResultsStore, RunStore, read_meta
from brainrobust.sweep import read_outcomes

# The array set the in-silico probe saves (one entry per stimulus; see `insilico_stimuli`).
INSILICO_ARRAY = "insilico_stimuli"
INSILICO_KEYS = ("images", "source_images", "image_id", "method", "norm", "budget",
                 "achieved_norm", "converged", "roi")


@dataclass
class Stimuli:
    """n stimuli of one run, at the model's input size S."""

    images: np.ndarray  # (n, 3, S, S) float32 in [0, 1]
    sources: np.ndarray  # (n, 3, S, S) the images they were made from
    image_id: np.ndarray  # (n,) int64 0-based NSD id of the source, -1 where there is none
    method: list[str]
    norm: list[str]
    budget: np.ndarray  # (n,) float64 nominal eps; NaN for unconstrained methods (MEI)
    achieved_norm: np.ndarray  # (n,) float64 norm of images - sources, in `norm`
    converged: list[bool | None]  # None where the probe records no convergence
    roi: list[str]  # the target ROI


def achieved_norms(images: np.ndarray, sources: np.ndarray, norms: list[str]) -> np.ndarray:
    """Per image, the norm of (image - source) in its own norm, float64."""
    x, x0 = torch.from_numpy(images), torch.from_numpy(sources)
    by_norm = {"l2": l2(x, x0).numpy(), "linf": linf(x, x0).numpy()}
    return np.array([by_norm[n][i] for i, n in enumerate(norms)], dtype=np.float64)


def _array_names(run: RunStore, pattern: str) -> list[str]:
    return sorted(p.stem for p in (run.dir / "arrays").glob(f"{pattern}.npz"))


def _probe_settings(run: RunStore, target: str, **match: Any) -> dict[str, Any] | None:
    """The run's config of the probe built from `target` whose settings include `match`."""
    for node in ((run.identity or {}).get("probe") or {}).values():
        if str(node.get("_target_", "")).endswith(target) and all(
                node.get(k) == v for k, v in match.items()):
            return node
    return None


def targeted_stimuli(run: RunStore) -> list[Stimuli]:
    """Every eps of every start image of each targeted trajectory (frame 0 is the source)."""
    out = []
    for name in _array_names(run, "targeted_*"):
        a = run.load_array(name)
        frames = a["images"].astype(np.float32)  # (n, T, 3, S, S)
        n, t = frames.shape[:2]
        roi, direction, norm = str(a["driven_roi"]), str(a["direction"]), str(a["norm"])
        # The store keeps eps as fp16 (0.1 -> 0.09998); the run's config has the nominal values.
        settings = _probe_settings(run, "TargetedProbe", roi=roi, direction=direction)
        schedule = list(settings["eps_schedule"]) if settings else []
        eps = np.asarray(schedule if len(schedule) == t - 1 else a["eps"][1:], np.float64)
        images = frames[:, 1:].reshape(n * (t - 1), *frames.shape[2:])
        sources = np.repeat(frames[:, :1], t - 1, axis=1).reshape(images.shape)
        norms = [norm] * len(images)
        out.append(Stimuli(
            images=images, sources=sources, image_id=np.repeat(a["image_id"], t - 1),
            method=[f"targeted_{direction}"] * len(images), norm=norms, budget=np.tile(eps, n),
            achieved_norm=achieved_norms(images, sources, norms),
            converged=[None] * len(images), roi=[roi] * len(images)))
    return out


def mei_stimuli(run: RunStore) -> list[Stimuli]:
    """Every MEI of every ROI; its source is the start image (noise or a test image)."""
    out = []
    for name in _array_names(run, "mei_*"):
        a = run.load_array(name)
        images = a["images"].astype(np.float32)
        sources = a["start_images"].astype(np.float32)
        # Unconstrained: the distance from the start is reported in L2.
        norms = ["l2"] * len(images)
        out.append(Stimuli(
            images=images, sources=sources, image_id=np.asarray(a["image_id"], np.int64),
            method=["mei"] * len(images), norm=norms, budget=np.full(len(images), np.nan),
            achieved_norm=achieved_norms(images, sources, norms),
            converged=[None] * len(images), roi=[str(a["target_roi"])] * len(images)))
    return out


def insilico_stimuli(run: RunStore) -> list[Stimuli]:
    """The in-silico probe's array set, which already lists one entry per stimulus."""
    if not run.has_array(INSILICO_ARRAY):
        return []
    a = run.load_array(INSILICO_ARRAY)
    missing = [k for k in INSILICO_KEYS if k not in a]
    if missing:
        raise DataError(f"{run.array_path(INSILICO_ARRAY)} lacks {missing}; rerun run "
                        f"{run.key} with force=true to rewrite it")
    return [Stimuli(
        images=a["images"].astype(np.float32), sources=a["source_images"].astype(np.float32),
        image_id=np.asarray(a["image_id"], np.int64), method=[str(m) for m in a["method"]],
        norm=[str(n) for n in a["norm"]], budget=np.asarray(a["budget"], np.float64),
        achieved_norm=np.asarray(a["achieved_norm"], np.float64),
        converged=[bool(c) for c in a["converged"]], roi=[str(r) for r in a["roi"]])]


ADAPTERS: dict[str, Callable[[RunStore], list[Stimuli]]] = {
    "targeted": targeted_stimuli,
    "mei": mei_stimuli,
    "insilico": insilico_stimuli,
}


def run_stimuli(run: RunStore) -> Stimuli | None:
    """Everything the adapters find in `run`, as one batch; None when it holds no stimuli."""
    parts = [s for adapter in ADAPTERS.values() for s in adapter(run) if len(s.images)]
    if not parts:
        return None
    sizes = {p.images.shape[-1] for p in parts}
    if len(sizes) > 1:
        raise DataError(f"run {run.key} holds stimuli of several sizes {sorted(sizes)}; "
                        "its arrays are inconsistent, rerun it with force=true")
    return Stimuli(
        images=np.concatenate([p.images for p in parts]),
        sources=np.concatenate([p.sources for p in parts]),
        image_id=np.concatenate([p.image_id for p in parts]),
        method=[m for p in parts for m in p.method], norm=[n for p in parts for n in p.norm],
        budget=np.concatenate([p.budget for p in parts]),
        achieved_norm=np.concatenate([p.achieved_norm for p in parts]),
        converged=[c for p in parts for c in p.converged], roi=[r for p in parts for r in p.roi])


def find_runs(target: str, root: str | Path) -> list[tuple[ResultsStore, RunStore]]:
    """The runs RUN_OR_SWEEP names (see the module docstring), each with its store."""
    path = Path(target)
    if (path / "run.json").is_file():
        store = ResultsStore(path.resolve().parent.parent)
        run = store.open_key(path.resolve().name)
        return [] if run is None else [(store, run)]
    store_root = path if (path / "runs").is_dir() else path.parent if (
        path.name == "runs" and path.is_dir()) else None
    if store_root is not None:
        store = ResultsStore(store_root)
        return [(store, store.open(meta)) for meta in store.runs()]
    outcomes = read_outcomes(path) if path.is_dir() else []
    if outcomes:
        found = []
        for o in (o for o in outcomes if o.get("key")):
            store = ResultsStore(o["results_dir"])
            run = store.open_key(o["key"])
            if run is not None:
                found.append((store, run))
        return found
    store = ResultsStore(root)
    # Keys are hex digests: anything else is a path that does not exist.
    keys = sorted(p.parent.name for p in store.root.glob(f"runs/{target}*/run.json")
                  if read_meta(p) is not None) if re.fullmatch("[0-9a-f]+", target) else []
    if target in keys:
        keys = [target]
    if len(keys) > 1:
        raise BrainRobustError(f"run key prefix {target!r} matches {len(keys)} runs under "
                               f"{store.root}; give more of the key (python -m brainrobust list "
                               f"--root {store.root})")
    if not keys:
        raise BrainRobustError(
            f"no run or sweep {target!r}: not a run key under {store.root} (python -m brainrobust "
            f"list --root {store.root} lists them; --root names another store), a run folder, a "
            "results folder or a --multirun folder")
    return [(store, store.open_key(keys[0]))]
