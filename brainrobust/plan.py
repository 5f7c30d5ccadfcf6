"""A sweep's cost, before anything runs: `python -m brainrobust.plan sensitivity [overrides]`.

Composes the experiment's grid (its `hydra.sweeper.params`, with command-line overrides taking
precedence as in a real --multirun), finds which jobs the results store already holds (under the
keys the jobs get on a GPU node) and estimates the GPU time of the rest from the per-unit costs
of `brainrobust.costs`. Nothing is built: no torch, no model; only a transfer plan imports the
transfer probe, to find its sources as it does.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from brainrobust import CONF_DIR
from brainrobust.costs import Job, Work, backbone_scale, probe_work
from brainrobust.errors import BrainRobustError, ConfigError
from brainrobust.identity import config_identity, key_columns
from brainrobust.preflight import check_overrides
from brainrobust.results.store import ResultsStore

# The default synthetic twin (brainrobust.data.synthetic): test images, and training images of a
# subject with 3 sessions; used until the twin is written by the first run.
SYNTHETIC_IMAGES = {"test": 80, "train": 670}


# ---- the dataset ---------------------------------------------------------------------------

def job_fingerprint(data: dict[str, Any], subject: int) -> str | None:
    """The data fingerprint a run of this job would key on (as pipeline.run does), or None while
    the synthetic twin is not written: then no run of it can be complete yet."""
    from brainrobust.data.layouts import data_fingerprint

    if data.get("synthetic") is not None:
        from brainrobust.data.synthetic import MARKER

        if not (Path(data["root"]).expanduser() / MARKER).is_file():
            return None
    return data_fingerprint(data["layout"], data["root"], subject, data["rois"],
                            data.get("synthetic"), data.get("loader_kwargs"))


def image_counts(data: dict[str, Any], subject: int, notes: set[str]) -> tuple[int, int]:
    """(train, test) images of one subject, counted from the dataset's design and file listing."""
    root = Path(data["root"]).expanduser()
    kwargs = dict(data.get("loader_kwargs") or {})
    # The loaders' file readers (h5py, nibabel, scipy) are imported only for the layout in use.
    if data.get("synthetic") is not None:
        from brainrobust.data.synthetic import MARKER

        if not (root / MARKER).is_file():
            notes.add(f"the synthetic twin is not written yet under {root}: counted with its "
                      f"default sizes ({SYNTHETIC_IMAGES['test']} test images)")
            return SYNTHETIC_IMAGES["train"], SYNTHETIC_IMAGES["test"]
    if data["layout"] == "algonauts":
        from brainrobust.data.algonauts import AlgonautsLoader

        loader = AlgonautsLoader(root, **kwargs)
        shown = len(loader.train_image_ids(subject))
    elif data["layout"] == "nsd":
        from brainrobust.data.nsd import NSDLoader

        loader = NSDLoader(root, **kwargs)
        shown = len(np.unique(loader.design.trial_ids(subject, loader.n_sessions(subject))))
    else:
        raise ConfigError(f"unknown data.layout {data['layout']!r}; valid: algonauts, nsd")
    # Every subject saw the test images; the rest of its images are its training split.
    n_test = len(loader.test_ids())
    return shown - n_test, n_test


# ---- the grid ------------------------------------------------------------------------------

def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """Plain overrides, and sweep overrides (key=a,b or key=range(...)) keyed by their key."""
    parser = OverridesParser.create()
    plain, sweeps = [], {}
    for item, parsed in zip(overrides, parser.parse_overrides(overrides)):
        if parsed.is_sweep_override():
            sweeps[parsed.get_key_element()] = item.partition("=")[2]
        else:
            plain.append(item)
    return plain, sweeps


def sweep_axes(cfg: DictConfig, plain: list[str], sweeps: dict[str, str]) -> list[list[Override]]:
    """The experiment's sweeper params, overridden from the command line: one list per axis."""
    params: dict[str, str] = dict(cfg.hydra.sweeper.get("params") or {})
    for item in plain:
        params.pop(item.partition("=")[0], None)
    params.update(sweeps)
    parser = OverridesParser.create()
    return [[parser.parse_override(f"{o.get_key_element()}={v}") for v in o.sweep_string_iterator()]
            for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()])]


def is_value(override: Override) -> bool:
    """A plain key=value, which Hydra sets after composing; anything else changes composition."""
    return (override.package is None and not (CONF_DIR / override.key_or_group).is_dir()
            and not (override.is_add() or override.is_force_add() or override.is_delete()))


def job_configs(experiment: str, overrides: list[str]) -> list[dict[str, Any]]:
    """Every job's resolved config, as --multirun composes it.

    Hydra takes 0.1-0.2 s per composition, so each swept config group option is composed once and
    the top-level nodes it changes are spliced into one working config; plain values are then set
    as Hydra sets them. Jobs whose swept groups change the same node are composed whole.
    """
    plain, sweeps = split_overrides(overrides)
    head = [f"experiment={experiment}", *plain]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        work = compose("config", overrides=head, return_hydra_config=True)
        axes = sweep_axes(work, plain, sweeps)
        with open_dict(work):
            del work["hydra"]
        base = OmegaConf.to_container(work, resolve=False)
        changes: dict[str, dict[str, Any]] = {}
        for option in (o for axis in axes for o in axis if not is_value(o)):
            after = OmegaConf.to_container(compose("config", overrides=[*head, option.input_line]),
                                           resolve=False)
            changes[option.input_line] = {k: after.get(k, KeyError) for k in {*base, *after}
                                          if base.get(k, KeyError) != after.get(k, KeyError)}
        sources = {"base": base, **changes}
        jobs, current = [], {}
        for combo in itertools.product(*axes):
            groups = [o.input_line for o in combo if not is_value(o)]
            values = [o for o in combo if is_value(o)]
            if sum(len(changes[g]) for g in groups) != len(set().union(*map(changes.get, groups))):
                whole = compose("config", overrides=[*head, *(o.input_line for o in combo)])
                jobs.append(OmegaConf.to_container(whole, resolve=True))
                continue
            # Where each top-level node of this job comes from: the base or a group option, then
            # the values set in it. Only nodes that differ from the previous job's are rebuilt.
            wanted = {key: ("base",) for key in current}
            for group in groups:
                wanted.update({key: (group,) for key in changes[group]})
            for o in values:
                top = o.key_or_group.split(".")[0]
                wanted[top] = (*wanted.get(top, ("base",)), o.input_line)
            stale = {key for key, source in wanted.items() if current.get(key) != source}
            splice(work, {key: sources[wanted[key][0]].get(key, KeyError) for key in stale})
            for o in values:
                if o.key_or_group.split(".")[0] in stale:
                    # Outside open_dict: a key the config lacks is refused, as Hydra refuses it.
                    OmegaConf.update(work, o.key_or_group, o.value(), merge=True)
            current = wanted
            jobs.append(OmegaConf.to_container(work, resolve=True))
    return jobs


def splice(cfg: DictConfig, nodes: dict[str, Any]) -> None:
    with open_dict(cfg):
        for key, value in nodes.items():
            if value is KeyError:
                cfg.pop(key, None)
            else:
                cfg[key] = value




# ---- the plan ------------------------------------------------------------------------------

def plan(experiment: str, overrides: list[str]) -> dict[str, Any]:
    """Jobs, jobs already complete, backbone passes, and the GPU-hours, image-steps and forwards
    of the jobs to run, in total and per part (the backbone passes, the test split, each probe)."""
    # run.py's own check: a mistake on the command line is the same one line here.
    check_overrides([f"experiment={experiment}", *overrides], CONF_DIR)
    try:
        jobs = job_configs(experiment, overrides)
    except (HydraException, OmegaConfBaseException) as err:  # in the experiment's own sweep
        raise ConfigError(str(err).strip().splitlines()[0]) from None
    notes: set[str] = set()
    memo: dict[Any, Any] = {}
    passes: set[str] = set()
    parts: dict[str, dict[str, float]] = {}
    done = 0
    for plain in jobs:
        identity = config_identity(plain, cuda_available=True)
        data, subject = plain["data"], int(plain["subject"])
        stimuli = repr([data.get(k) for k in ("layout", "root", "synthetic", "loader_kwargs")])
        content = (stimuli, subject, repr(data["rois"]))
        if content not in memo:
            memo[content] = job_fingerprint(data, subject)
        if memo[content] is not None:
            identity["data_fingerprint"] = memo[content]
            store = ResultsStore(plain["paths"]["results_dir"]).run(identity, key_columns(plain))
            if store.is_complete():
                done += 1
                continue
        if (stimuli, subject) not in memo:
            memo[stimuli, subject] = image_counts(data, subject, notes)
        job = Job(plain, identity, *memo[stimuli, subject], notes, memo)
        add = {"test-split forwards": Work(forwards=job.n_test)}
        # Features are cached per backbone and training set: the ROIs of a subject share one pass.
        features = repr([plain["model"], stimuli, data.get("image_size"), subject])
        if features not in passes:
            passes.add(features)
            add["backbone feature passes"] = Work(forwards=job.n_train)
        for name, p in (plain.get("probe") or {}).items():
            add[name] = probe_work(name, p, job)
        scale = backbone_scale(plain["model"])
        for name, work in add.items():
            part = parts.setdefault(name, {"hours": 0.0, "image_steps": 0.0, "forwards": 0.0})
            part["hours"] += work.seconds(scale) / 3600
            part["image_steps"] += work.steps
            part["forwards"] += work.forwards
    return {"jobs": len(jobs), "done": done, "to_run": len(jobs) - done,
            "backbone_passes": len(passes), "parts": parts, "notes": sorted(notes),
            "gpu_hours": sum(part["hours"] for part in parts.values())}


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
          f"(ROIs share them); estimated {out['gpu_hours']:.3g} GPU-hours on one H200 "
          "(bf16 eager; torch.compile is about 2.5x faster)")
    for name, part in out["parts"].items():
        print(f"  {name}: {part['hours']:.3g} h ({part['image_steps']:.3g} image-steps, "
              f"{part['forwards']:.3g} forwards)")
    for note in out["notes"]:
        print(f"  note: {note}")


if __name__ == "__main__":
    main()
