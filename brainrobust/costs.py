"""What a job costs: measured per-unit rates, each backbone's scale and each probe's work.

Per-unit costs, measured on one NVIDIA H200 (torch 2.11, timm 1.0.29) with ResNet-50 and a
1,000-voxel readout, batch 256, 224 x 224, bf16 autocast + channels_last, eager: 20-step L2 PGD
runs 3,673 image-steps/s (an image-step is one forward + input-gradient pass; each PGD call's
evaluation of its final iterate is inside that rate) and a forward pass 14,999 images/s.

Other backbones scale by their forward GMACs at 224 x 224 (timm's model cards) times
(model.input_size / 224)^2: the encoder resizes every stimulus to the backbone's input size, so
data.image_size leaves the backbone's work unchanged. This is first order: memory-bound small nets
(MobileNet, EfficientNet, the tiny CNN) run slower than their MACs suggest, and a ViT's attention
grows faster than its pixel count. Each probe's image-steps and forwards follow its own settings
(the `*_work` functions below, one per probe in PROBES); what is only bounded is a note.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brainrobust.errors import ConfigError

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
    """Gradient steps per image, at most: each restart's candidates' short runs, then its own
    steps, for every restart max_restarts allows."""
    steps, candidates = int(attack["steps"]), int(attack.get("candidates", 1))
    short = max(round(float(attack.get("candidate_fraction", 0.1)) * steps), 1)
    restarts = attack.get("max_restarts") or attack["restarts"]
    return (steps + (candidates * short if candidates > 1 else 0)) * int(restarts)


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
                          "brainrobust/costs.py")
    try:
        work = PROBES[target](p, job)
        attack = p.get("attack") or {}
        if (attack.get("max_restarts") or 0) > attack.get("restarts", 1):
            job.notes.add(f"probe.{name}'s attack counted at max_restarts="
                          f"{attack['max_restarts']}; an image stops earlier once a second "
                          "restart confirms its best")
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
                          "its forward GMACs at 224 x 224 to GMACS in brainrobust/costs.py")
    return GMACS[arch] / GMACS[REFERENCE_ARCH] * (int(model["input_size"]) / REFERENCE_SIZE) ** 2
