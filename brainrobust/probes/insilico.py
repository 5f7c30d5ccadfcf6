"""Closed-loop in-silico validation: judge each stimulus method by brains it never saw (docs/insilico.md).

For one source encoder (this run: model, subject) and one target ROI, every method the project
has makes stimuli from the same start images, at the same budgets:

    targeted_increase / targeted_decrease   PGD on +-(r_roi(x + d) - r_roi(x)), ||d|| <= eps
    noise                                   random d of the norm targeted_increase achieved
    mei                                     unconstrained ascent from the start (norm measured)
    natural_top / natural_bottom            the test images the source ranks highest / lowest,
                                            measured against the start they replace

and every stimulus is scored, as the change of every ROI from its source image, by encoders
that did not make it (the same model fit to other subjects; other models fit to this subject;
other models fit to other subjects) and, on the synthetic brain, by the true response of every
subject. The source's own prediction is kept as scorer kind `source`, a reference only. Changes
are in test-set SD units of the scorer's subject's measured ROI mean. Figures and the bootstrap
intervals are `brainrobust.analysis.insilico`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from brainrobust.data.synthetic_brain import SyntheticBrain
from brainrobust.errors import ConfigError
from brainrobust.models.build import build, build_encoder
from brainrobust.models.zoo import model_config
from brainrobust.probes.attack import (
    NORMS,
    AttackRuntime,
    check_budget,
    expand_ladder,
    norm_of,
    pgd,
    pgd_config,
    random_perturbation,
)
from brainrobust.probes.base import Probe, ProbeContext
from brainrobust.probes.image_selection import ImageSelection, predicted_responses
from brainrobust.probes.mei import optimise_mei
from brainrobust.probes.objectives import make_objective

log = logging.getLogger(__name__)

# The sign of the change each method aims at (noise aims at nothing: judged as "increase", so
# its intended fraction is the chance level 0.5).
INTENDED = {"targeted_increase": 1, "targeted_decrease": -1, "noise": 1, "mei": 1,
            "natural_top": 1, "natural_bottom": -1}
SCORER_KINDS = ("source", "other_subject", "other_model", "other_both", "brain")
MEI_KEYS = ("steps", "lr", "decay_power", "decorrelate", "transforms")
RUN_KEYS = ("data", "model", "readout", "paths", "seed")


@dataclasses.dataclass
class Scorer:
    """One scorer: an encoder (or the brain's truth) and its subject's measured test-set SDs."""

    kind: str
    model: str
    subject: int
    module: torch.nn.Module
    test_sd: dict[str, float]

    @property
    def label(self) -> str:
        return f"{self.model} s{self.subject}"


@dataclasses.dataclass
class Stimuli:
    """The stimuli of one run, in the array contract of `insilico_stimuli` (docs/insilico.md)."""

    parts: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def add(self, method: str, norm: str, images: torch.Tensor, source: torch.Tensor,
            image_id: np.ndarray, budget: float | np.ndarray,
            converged: np.ndarray | None = None) -> None:
        n = len(images)
        images = images.detach().float().clamp(0.0, 1.0).cpu()
        source = source.detach().float().cpu()
        self.parts.append({
            "images": images.numpy(), "source_images": source.numpy(),
            # Starts from image files carry ids -1, -2, ...: none is an NSD image.
            "image_id": np.maximum(np.asarray(image_id, np.int64).reshape(n), -1),
            "method": np.full(n, method), "norm": np.full(n, norm),
            "budget": np.broadcast_to(np.asarray(budget, np.float32), (n,)).copy(),
            "achieved_norm": norm_of(images - source, norm).numpy().astype(np.float32),
            "converged": np.ones(n, bool) if converged is None else np.asarray(converged, bool),
        })

    def arrays(self, roi: str) -> dict[str, np.ndarray]:
        out = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        out["roi"] = np.full(len(out["images"]), roi)
        return out


class InSilicoProbe(Probe):
    """Stimuli of every method at matched budgets, scored by held-out encoders and the brain."""

    name = "insilico"
    settings: ClassVar[tuple[str, ...]] = ("method", "norm_type", "eps", "scorer_kind")

    def __init__(
        self,
        roi: str,
        budgets: Mapping[str, Sequence[float]],
        run: Mapping[str, Any],
        attack: Mapping[str, Any] | None = None,
        images: Mapping[str, Any] | None = None,
        mei: Mapping[str, Any] | None = None,
        scorers: Mapping[str, Any] | None = None,
        batch_size: int = 32,
        amp: bool = True,
        compile: bool = False,
        max_images: int | None = None,
        force: bool = False,
    ):
        super().__init__(rois=[roi], max_images=max_images, force=force)
        self.roi = roi
        self.amp, self.compile = amp, compile
        budgets = _plain(budgets)
        if not isinstance(budgets, Mapping) or not budgets or set(budgets) - set(NORMS):
            raise ConfigError(f"insilico.budgets must map norms {list(NORMS)} to lists of eps, "
                              f"got {budgets!r}")
        self.budgets = {norm: [float(e) for e in eps] for norm, eps in budgets.items()}
        self.attack = {norm: pgd_config(_plain(attack), norm) for norm in self.budgets}
        self.images = ImageSelection.parse(_plain(images) or {"select": "first", "n": 8},
                                           "probe.insilico.images")
        self.mei = dict(_plain(mei) or {})
        unknown = sorted(set(self.mei) - set(MEI_KEYS))
        if unknown:
            raise ConfigError(f"insilico.mei: unknown key(s) {unknown}; use {list(MEI_KEYS)}")
        scorers = dict(_plain(scorers) or {})
        unknown = sorted(set(scorers) - {"subjects", "models", "brain"})
        if unknown:
            raise ConfigError(f"insilico.scorers: unknown key(s) {unknown}; use subjects, models, "
                              "brain")
        self.scorer_subjects = [int(s) for s in scorers.get("subjects") or []]
        if any(not 1 <= s <= 8 for s in self.scorer_subjects):
            raise ConfigError(f"insilico.scorers.subjects must be NSD subjects 1-8, got "
                              f"{self.scorer_subjects}")
        self.scorer_models = [m if isinstance(m, Mapping) else {"name": m}
                              for m in scorers.get("models") or []]
        self.use_brain = bool(scorers.get("brain", True))
        self.run_cfg = _plain(run)
        missing = [k for k in RUN_KEYS if k not in (self.run_cfg or {})]
        if missing:
            raise ConfigError(f"insilico.run lacks {missing}; conf/probe/insilico.yaml sets them "
                              "to this run's ${data}, ${model}, ${readout}, ${paths}, ${seed}")
        self.check(integers={"batch_size": (batch_size, 1)})
        self.batch_size = batch_size

    # ---- stimuli ---------------------------------------------------------------------------

    def make_stimuli(self, encoder: torch.nn.Module, images: torch.Tensor, ids: np.ndarray,
                     starts: torch.Tensor, start_ids: np.ndarray,
                     generator: torch.Generator) -> Stimuli:
        """Every method's stimuli from `starts` (targeted, noise, MEI) and the pool (natural)."""
        out = Stimuli()
        bar = self.progress(len(starts) * (2 * sum(map(len, self.budgets.values())) + 1), "img",
                            f"stimuli for {self.roi}")
        for norm, ladder in self.budgets.items():
            check_budget(ladder, norm, int(encoder.input_size))
            xe, eps_e, _ = expand_ladder(starts, ladder)
            ids_e = np.tile(start_ids, len(ladder))
            achieved = None
            for method in ("targeted_increase", "targeted_decrease"):
                objective = make_objective(encoder, self.roi, method.split("_")[1], xe)
                result = pgd(objective, xe, eps_e, self.attack[norm], generator=generator,
                             runtime=AttackRuntime.auto(xe.device, compile=self.compile, amp=self.amp))
                out.add(method, norm, xe + result.delta, xe, ids_e, eps_e.cpu().numpy(),
                        result.converged.cpu().numpy() > 0)
                achieved = result.norm if achieved is None else achieved
                bar.update(len(xe))
            # Noise of the norm the increase reached (after clamping), so only direction differs.
            noise = random_perturbation(xe, eps_e, norm, generator, match_norm=achieved)
            out.add("noise", norm, xe + noise, xe, ids_e, eps_e.cpu().numpy())
        settings = {k: v for k, v in self.mei.items() if k != "transforms"}
        transforms = dict(self.mei.get("transforms") or {})
        mei, _ = optimise_mei(
            encoder, [self.roi] * len(starts), int(encoder.input_size), init=starts,
            jitter=float(transforms.get("jitter", 0.0)),
            scale=tuple(float(s) for s in transforms.get("scale", (1.0, 1.0))),
            rotate=float(transforms.get("rotate", 0.0)), generator=generator,
            device=starts.device, **settings)
        bar.update(len(starts))
        bar.close()
        out.add("mei", "l2", mei, starts, start_ids, np.nan)
        ranked = np.argsort(-predicted_responses(encoder, images, self.roi, self.batch_size).cpu()
                            .numpy(), kind="stable")
        n = len(starts)
        for method, pick in (("natural_top", ranked[:n]), ("natural_bottom", ranked[::-1][:n])):
            chosen = images[torch.as_tensor(pick.copy(), device=images.device)]
            # Each natural image replaces one start: its change is measured against that start.
            out.add(method, "l2", chosen, starts, ids[pick], np.nan)
        return out

    # ---- scorers ---------------------------------------------------------------------------

    def scorers(self, encoder: torch.nn.Module, ctx: ProbeContext) -> Iterator[Scorer]:
        """The source, then every held-out encoder, then the brain's subjects (built lazily:
        one held-out encoder in memory at a time)."""
        source_model, source_subject = str(encoder.meta.get("model")), int(ctx.meta["subject"])
        yield Scorer("source", source_model, source_subject, encoder,
                     {r: ctx.roi_stats[r]["test_sd"] for r in ctx.rois})
        own = self.run_cfg["model"]
        # A listed model whose settings are the source's is the source model, however named.
        others = [(_model_label(m), node) for m in self.scorer_models
                  if (node := _model_node(m)) != own]
        subjects = [source_subject] + [s for s in self.scorer_subjects if s != source_subject]
        for label, node in [(source_model, own), *others]:
            for subject in subjects:
                same_model, same_subject = node == own, subject == source_subject
                if same_model and same_subject:
                    continue  # the source itself: held-out scoring never uses it
                kind = ("other_subject" if same_model else
                        "other_model" if same_subject else "other_both")
                module, dm = self._held_out(node, subject)
                log.info("insilico: held-out encoder %s, subject %d (%s)", label, subject, kind)
                yield Scorer(kind, label, subject, module.to(ctx.device).eval(), _test_sd(dm))
        if self.use_brain:
            yield from self._brain_scorers(encoder, ctx)

    def _data(self, subject: int) -> Any:
        node = OmegaConf.create({**self.run_cfg["data"], "subject": subject})
        dm = build(node, _convert_="all")
        dm.prepare_data()
        dm.setup()
        return dm

    def _held_out(self, node: Mapping[str, Any], subject: int) -> tuple[torch.nn.Module, Any]:
        cfg = OmegaConf.create({"model": node, **{k: self.run_cfg[k] for k in
                                                  ("readout", "paths", "seed")}})
        dm = self._data(subject)
        return build_encoder(cfg, build(cfg.model), dm), dm

    def _brain_scorers(self, encoder: torch.nn.Module, ctx: ProbeContext) -> Iterator[Scorer]:
        synthetic = self.run_cfg["data"].get("synthetic") or {}
        if synthetic.get("world") != "brain":
            log.info("insilico: data is not a synthetic brain (data=synthetic_brain): no "
                     "ground-truth scorers")
            return
        brain = SyntheticBrain.load(self.run_cfg["data"]["root"]).to(ctx.device)
        for subject in brain.subjects:
            dm = self._data(subject)
            module = brain.scorer(subject, dm.test.voxel_xyz, dm.rois, int(encoder.input_size))
            yield Scorer("brain", "synthetic_brain", subject, module, _test_sd(dm))

    # ---- the run ---------------------------------------------------------------------------

    def run(self, encoder: torch.nn.Module, ctx: ProbeContext) -> pd.DataFrame:
        images, ids = self.selected_images(ctx)
        starts, start_ids, _ = self.images.resolve(encoder, images, ids, self.roi,
                                                   ctx.responses[: len(ids)], self.batch_size)
        stimuli = self.make_stimuli(encoder, images, ids, starts, start_ids, ctx.generator())
        arrays = stimuli.arrays(self.roi)
        ctx.store.save_array("insilico_stimuli", arrays, exact=("images", "source_images"))
        frames = [self.score(scorer, arrays, ctx.rois, ctx.device)
                  for scorer in self.scorers(encoder, ctx)]
        records = pd.concat(frames, ignore_index=True)
        records["source_model"] = str(encoder.meta.get("model"))
        records["source_subject"] = int(ctx.meta["subject"])
        return records

    def score(self, scorer: Scorer, arrays: Mapping[str, np.ndarray], rois: Sequence[str],
              device: torch.device) -> pd.DataFrame:
        """One row per stimulus: the target ROI's change (SD units) and its selectivity."""
        changes = []
        with torch.no_grad():
            for start in range(0, len(arrays["images"]), self.batch_size):
                rows = slice(start, start + self.batch_size)
                pair = [torch.from_numpy(np.asarray(arrays[k][rows], np.float32)).to(device)
                        for k in ("images", "source_images")]
                after, before = (scorer.module(x) for x in pair)
                changes.append(torch.stack([
                    (after[:, c] - before[:, c]).mean(1)
                    for c in (scorer.module.rois[r].to(device) for r in rois)], 1).double().cpu())
        change = torch.cat(changes).numpy()
        sd = np.array([scorer.test_sd.get(r, np.nan) for r in rois])
        change_sd = change / np.where(sd > 0, sd, np.nan)
        target = list(rois).index(self.roi)
        others = np.delete(change_sd, target, axis=1)
        other_mean = others.mean(1) if others.shape[1] else np.full(len(change_sd), np.nan)
        intended = np.array([INTENDED[m] for m in arrays["method"]])
        return pd.DataFrame({
            "stimulus": np.arange(len(change_sd)), "image_id": arrays["image_id"],
            "method": arrays["method"], "norm_type": arrays["norm"],
            "eps": arrays["budget"].astype(np.float64),
            "achieved_norm": arrays["achieved_norm"].astype(np.float64),
            "converged": arrays["converged"], "roi": self.roi, "scorer_kind": scorer.kind,
            "scorer": scorer.label, "scorer_model": scorer.model,
            "scorer_subject": scorer.subject, "metric": "roi_change_sd",
            "value": change_sd[:, target], "roi_change": change[:, target],
            "others_change_sd": other_mean, "selectivity_sd": change_sd[:, target] - other_mean,
            "intended": np.sign(change_sd[:, target]) == intended,
        })


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _model_node(model: Mapping[str, Any]) -> dict[str, Any]:
    """A scorer model's config: its zoo entry with the listed settings over it, as a run's
    `model=NAME model.KEY=VALUE` composes it."""
    # An unknown name gets the zoo's one line with suggestions.
    entry = OmegaConf.merge(model_config(model["name"]), dict(model))
    return OmegaConf.to_container(entry, resolve=True)


def _model_label(model: Mapping[str, Any]) -> str:
    extra = ",".join(f"{k}={v}" for k, v in model.items() if k != "name")
    return f"{model['name']}[{extra}]" if extra else str(model["name"])


def _test_sd(dm: Any) -> dict[str, float]:
    return {roi: float(np.std(values)) for roi, values in dm.test.roi_mean.items()}
