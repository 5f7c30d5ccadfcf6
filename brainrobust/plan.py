"""A sweep's cost, before anything runs: `python -m brainrobust.plan sensitivity [overrides]`.

Composes the experiment's grid (its `hydra.sweeper.params`, with command-line overrides taking
precedence as in a real --multirun), finds which jobs the results store already holds (under the
keys the jobs get on a GPU node) and estimates the GPU time of the rest. Nothing is built: no
torch, no model; only a transfer plan imports the transfer probe, to find its sources as it does.

Per-unit costs, measured on one NVIDIA H200 (torch 2.11, timm 1.0.29) with ResNet-50 and a
1,000-voxel readout, batch 256, 224 x 224, bf16 autocast + channels_last, eager: 20-step L2 PGD
runs 3,673 image-steps/s (an image-step is one forward + input-gradient pass; each PGD call's
evaluation of its final iterate is inside that rate) and a forward pass 14,999 images/s.

Other backbones scale by their forward GMACs at 224 x 224 (timm's model cards) times
(model.input_size / 224)^2: the encoder resizes every stimulus to the backbone's input size, so
data.image_size leaves the backbone's work unchanged. This is first order: memory-bound small nets
(MobileNet, EfficientNet, the tiny CNN) run slower than their MACs suggest, and a ViT's attention
grows faster than its pixel count. Each probe's image-steps and forwards follow its own settings
(the `*_work` functions below); what is only bounded is printed as a note.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
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
from brainrobust.errors import BrainRobustError, ConfigError
from brainrobust.identity import config_identity, key_columns
from brainrobust.preflight import check_overrides
from brainrobust.results.store import ResultsStore

PGD_IMAGE_STEPS_PER_S = 3673.0
FORWARD_IMAGES_PER_S = 14999.0
REFERENCE_SIZE = 224
# Forward GMACs at 224 x 224 per architecture, without timm's pretrained tag (".openai").
GMACS = {
    "resnet18": 1.8, "resnet50": 4.1, "resnet101": 7.8, "vgg16": 15.5, "densenet121": 2.9,
    "efficientnet_b0": 0.4, "mobilenetv3_large_100": 0.22, "convnext_tiny": 4.5,
    "vit_base_patch16_224": 17.6, "vit_base_patch16_clip_224": 17.6,
    "tiny_cnn": 0.53,  # four 3x3 conv blocks (brainrobust.models.backbones), counted by hand
}
REFERENCE_ARCH = "resnet50"
# The default synthetic twin (brainrobust.data.synthetic): test images, and training images of a
# subject with 3 sessions; used until the twin is written by the first run.
SYNTHETIC_IMAGES = {"test": 80, "train": 670}


@dataclass
class Work:
    """Backbone passes of one job's part: image-steps (forward + input gradient) and forwards."""

    steps: float = 0.0
    forwards: float = 0.0

    def seconds(self, scale: float) -> float:
        return scale * (self.steps / PGD_IMAGE_STEPS_PER_S + self.forwards / FORWARD_IMAGES_PER_S)


@dataclass
class Job:
    """One job of the sweep as its probes see it: resolved config, results key, dataset sizes.

    `notes` and `memo` are shared by all jobs of a plan: what the estimate only bounds, and
    lookups that jobs have in common.
    """

    plain: dict[str, Any]
    identity: dict[str, Any]
    n_train: int
    n_test: int
    notes: set[str]
    memo: dict[Any, Any]

    @property
    def rois(self) -> list[str]:
        return list(self.plain["roi"])

    def images(self, probe: dict[str, Any]) -> int:
        """Test images a probe works on: its max_images of the test split."""
        cap = probe.get("max_images")
        return self.n_test if cap is None else min(int(cap), self.n_test)

    def roi_count(self, probe: dict[str, Any]) -> int:
        return len(probe.get("rois") or self.rois)


# ---- the probes' work ----------------------------------------------------------------------

def pgd_steps(attack: dict[str, Any]) -> int:
    return int(attack["steps"]) * int(attack["restarts"])


def sensitivity_work(p: dict[str, Any], job: Job) -> Work:
    # Every ROI, image and eps of the ladder is one PGD row; each row's responses are read clean,
    # attacked and under each random draw.
    rows = job.roi_count(p) * job.images(p) * len(p["eps"])
    return Work(rows * pgd_steps(p["attack"]), rows * (2 + int(p["random_draws"])))


def search_rounds(eps_min: float, eps_max: float, growth: float, rel_tol: float) -> int:
    """PGD runs of effect_matched's longest search: bracketing eps_min * growth**i up to eps_max,
    bisection until the bracket (lo, hi] is within rel_tol * hi, then one interpolated attempt."""
    # The tolerance keeps an eps_max that is an exact power of growth from rounding up.
    bracket = math.ceil(math.log(eps_max / eps_min) / math.log(growth) - 1e-9) + 1
    bisect = math.ceil(math.log2((growth - 1) * (1 - rel_tol) / rel_tol))
    return bracket + max(bisect, 0) + 1


def effect_matched_work(p: dict[str, Any], job: Job) -> Work:
    rounds = search_rounds(p["eps_min"], p["eps_max"], p["growth"], p["rel_tol"])
    job.notes.add(f"effect_matched counted at its longest search ({rounds} PGD runs per image and "
                  "ROI); images that reach the effect at a small eps take fewer")
    rows = job.roi_count(p) * job.images(p)
    return Work(rows * rounds * pgd_steps(p["attack"]), rows * (rounds + 1))


def subspace_work(p: dict[str, Any], job: Job) -> Work:
    if p["method"] == "exact":
        raise ConfigError("probe.subspace.method=exact costs one product per ROI voxel, which the "
                          "plan does not know; plan with method=auto (an upper bound)")
    job.notes.add(f"subspace counted at max_iters={p['max_iters']} per image; images whose "
                  "residuals reach tol sooner (5 on a gapped benchmark spectrum, 2-3 on the twin) take fewer, and "
                  "method=auto takes the exact Jacobian where that is cheaper")
    # k + 1 directions (one for the gap ratio) plus oversampling; each iteration applies J^T J to
    # a block (2 products per column) after the start block's J^T G and J Q; the products reuse
    # one forward.
    products = (int(p["k"]) + int(p["oversample"])) * (2 * int(p["max_iters"]) + 1)
    rows = (1 if p["voxels"] == "all" else job.roi_count(p)) * job.images(p)
    return Work(rows * products, rows)


def start_images(selection: Any, pool: int) -> tuple[int, int]:
    """Start images of a selection (the first images.n of the ranked pool, or the listed files)
    and the forwards that ranking them by predicted response costs."""
    if isinstance(selection, (str, list)):
        return len([selection] if isinstance(selection, str) else selection), 0
    if selection.get("files"):
        return len(selection["files"]), 0
    ranked = selection["select"] != "first" and selection["by"] == "predicted"
    return min(int(selection["n"]), pool), pool if ranked else 0


def targeted_work(p: dict[str, Any], job: Job) -> Work:
    starts, ranking = start_images(p["images"], job.images(p))
    n_eps = len(p["eps_schedule"])
    # Warm starts check every eps's start point once more; the trajectory's frames are read after.
    checks = starts * n_eps if p["warm_start"] else 0
    return Work(starts * n_eps * pgd_steps(p["attack"]), ranking + checks + starts * (n_eps + 1))


def mei_work(p: dict[str, Any], job: Job) -> Work:
    pool, rois = job.images(p), len(job.rois)
    if p["start"] == "noise":
        per_roi, ranking = int(p["seeds"]), 0
    else:
        per_roi, ranking = start_images(p["start"], pool)
    targets = job.roi_count(p)
    meis = targets * per_roi
    # Each ROI's test-set calibration and each MEI's and start's responses are full forwards.
    forwards = rois * pool + targets * ranking + 2 * rois * meis
    return Work(meis * int(p["steps"]), forwards)


def transfer_work(p: dict[str, Any], job: Job) -> Work:
    # The probe's own source lookup, so selectors and refusals match the run exactly; it imports
    # torch, which only a transfer plan pays for.
    from brainrobust.probes.transfer import KINDS, TransferProbe, _stimulus_signature

    probe = TransferProbe(**{k: v for k, v in p.items() if k != "_target_"})
    root = Path(p["results_dir"] or job.plain["paths"]["results_dir"])
    stimuli = _stimulus_signature(job.identity)
    n = job.images(p)
    pairs = 0
    for roi in p.get("rois") or job.rois:
        for source_roi in p["source_rois"] or [roi]:
            lookup = ("transfer", repr(p), root, source_roi, repr(stimuli))
            if lookup not in job.memo:
                job.memo[lookup] = probe.find_sources(root, source_roi, stimuli)
            for source in job.memo[lookup]:
                settings = source.identity["probe"][KINDS[probe.kind].probe]
                slots = len(settings["eps"]) if probe.kind == "fixed_eps" else 1
                shared = n if settings.get("max_images") is None else min(n, settings["max_images"])
                pairs += shared * slots
    return Work(0, pairs * (2 + int(p["random_draws"])))


def insilico_work(p: dict[str, Any], job: Job) -> Work:
    pool = job.images(p)
    starts, ranking = start_images(p["images"], pool)
    budgets = sum(len(ladder) for ladder in p["budgets"].values())
    mei_steps = int((p.get("mei") or {}).get("steps", 256))
    # Per start: increase and decrease at every budget, noise at every budget, one MEI, and a
    # top and a bottom natural image.
    stimuli = starts * (3 * budgets + 3)
    scorers = p.get("scorers") or {}
    models = 1 + len(scorers.get("models") or [])
    subjects = 1 + len(set(scorers.get("subjects") or []) - {job.plain["subject"]})
    held_out = models * subjects - 1
    job.notes.add("probe.insilico: held-out encoders' feature passes are counted at the source "
                  "backbone's cost; the synthetic brain's scoring is not counted (it is no backbone)")
    # Each held-out encoder extracts its training features once (cached), as a run does.
    forwards = (pool + ranking + 2 * starts * budgets + 2 * stimuli * (1 + held_out)
                + held_out * (job.n_train + job.n_test))
    return Work(starts * (2 * budgets * pgd_steps(p["attack"]) + mei_steps), forwards)


SENSITIVITY = "brainrobust.probes.sensitivity.SensitivityProbe"
PROBES: dict[str, Callable[[dict[str, Any], Job], Work]] = {
    SENSITIVITY: sensitivity_work,
    "brainrobust.probes.effect_matched.EffectMatchedProbe": effect_matched_work,
    "brainrobust.probes.subspace.SubspaceProbe": subspace_work,
    "brainrobust.probes.targeted.TargetedProbe": targeted_work,
    "brainrobust.probes.mei.MEIProbe": mei_work,
    "brainrobust.probes.transfer.TransferProbe": transfer_work,
    "brainrobust.probes.insilico.InSilicoProbe": insilico_work,
}


def probe_work(name: str, p: dict[str, Any], job: Job) -> Work:
    target = p.get("_target_")
    if target not in PROBES:
        raise ConfigError(f"no cost model for probe.{name} ({target}); add one to PROBES in "
                          "brainrobust/plan.py")
    try:
        work = PROBES[target](p, job)
        if not (target == SENSITIVITY and p["amp"]):
            job.notes.add(f"probe.{name} runs in fp32: counted at the measured bf16 rates, so it "
                          "will take longer")
    except KeyError as err:
        raise ConfigError(f"probe.{name} lacks {err.args[0]!r}, which its cost depends on; "
                          "set it in the config") from None
    except (TypeError, ValueError, ZeroDivisionError) as err:
        # The probe itself would refuse such settings; the plan does not build it.
        raise ConfigError(f"probe.{name}: its settings give no cost ({err}); check them "
                          "(python run.py --cfg job shows them)") from None
    return work


def backbone_scale(model: dict[str, Any]) -> float:
    """Cost of the model's passes relative to ResNet-50's at 224 x 224."""
    arch = str(model["arch"]).split(".")[0]
    if arch not in GMACS:
        raise ConfigError(f"no cost for model.arch {model['arch']!r} (model {model['name']}); add "
                          "its forward GMACs at 224 x 224 to GMACS in brainrobust/plan.py")
    return GMACS[arch] / GMACS[REFERENCE_ARCH] * (int(model["input_size"]) / REFERENCE_SIZE) ** 2


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
