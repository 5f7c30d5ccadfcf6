"""Adversarial sensitivity of an encoder's ROI response (method.md section 2).

    s = r(x) - r(x + delta),   delta = argmax_{||delta|| <= eps} objective

for every test image, ROI and eps of the ladder (one vectorised attack call per image batch), with
a negative control: random perturbations of the same achieved norm. Every record carries the
attack's convergence report: `conv_gain` (relative gain over the last steps), `conv_spread`
(how far the runner-up restart lies below the best, relative; NaN with one restart), `converged`
(1.0 / 0.0) and `restarts` (the restarts it took: more where the first ones disagree).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from brainrobust.errors import ConfigError
from brainrobust.probes.attack import (
    AttackRuntime,
    PGDConfig,
    expand_ladder,
    pgd,
    pgd_config,
    random_perturbation,
    validate_ladder,
)
from brainrobust.probes.base import Probe, ProbeContext
from brainrobust.probes.chunks import in_batches
from brainrobust.probes.objectives import OBJECTIVES, make_objective
from brainrobust.units import format_eps

# Records are long format: these wide columns are melted into (metric, value) rows.
METRICS = ("r_clean", "r_adv", "s", "abs_s", "s_sd", "s_nc", "norm", "steps_used",
           "random_abs_s", "random_abs_s_max", "conv_gain", "conv_spread", "converged", "restarts")


class SensitivityProbe(Probe):
    name = "sensitivity"
    image_axes: ClassVar[dict[str, int]] = {"image_id": 0, "delta": 1}
    settings: ClassVar[tuple[str, ...]] = ("norm_type", "eps")

    def __init__(
        self,
        attack: PGDConfig | Mapping[str, Any],
        eps: Sequence[float],
        objective: str = "abs",
        random_draws: int = 4,
        batch_size: int = 32,
        max_images: int | None = None,
        rois: list[str] | None = None,
        save_perturbations: bool = True,
        compile: bool = False,
        amp: bool = True,
        force: bool = False,
    ):
        super().__init__(rois=rois, max_images=max_images, force=force)
        self.attack = pgd_config(attack)
        self.compile = compile
        self.amp = amp
        try:
            self.eps = validate_ladder(eps)
        except ConfigError as err:
            raise ConfigError(f"probe.{self.name}.eps: {err}") from None
        self.check(integers={"random_draws": (random_draws, 1), "batch_size": (batch_size, 1)},
                   choices={"objective": (objective, OBJECTIVES)})
        self.objective = objective
        self.random_draws = random_draws
        self.batch_size = batch_size
        self.save_perturbations = save_perturbations

    def run_batch(self, encoder: torch.nn.Module, ctx: ProbeContext, images: torch.Tensor,
                  ids: np.ndarray) -> pd.DataFrame:
        generator = ctx.generator()
        frames = []
        for roi in self.selected_rois():
            columns, deltas = self._attack_roi(encoder, roi, images, generator)
            stats = ctx.roi_stats[roi]
            columns["s_sd"] = columns["s"] / stats["test_sd"]
            # Fraction of the ROI's explainable (signal) SD: sqrt(NC/100) of the test-set SD.
            signal_sd = np.sqrt(stats["noise_ceiling"] / 100.0) * stats["test_sd"]
            columns["s_nc"] = columns["abs_s"] / signal_sd if signal_sd > 0 else np.nan
            wide = pd.DataFrame(columns)
            wide["image_id"] = ids[wide.pop("image")]
            wide["roi"] = roi
            frames.append(wide.melt(id_vars=["image_id", "roi", "eps"], value_vars=list(METRICS),
                                    var_name="metric", value_name="value"))
            if self.save_perturbations:
                ctx.store.save_array(f"perturbations_{roi}_{self.attack.norm}", {
                    "delta": deltas, "image_id": ids, "eps": self.eps.numpy(),
                })
        records = pd.concat(frames, ignore_index=True)
        records["norm_type"] = self.attack.norm
        records["objective"] = self.objective
        records["attack_method"] = self.attack.method
        records["attack_steps"] = self.attack.steps
        return records

    def _attack_roi(self, encoder, roi: str, images: torch.Tensor,
                    generator: torch.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
        what = (f"{roi} {self.attack.norm} eps {format_eps(float(self.eps.min()), self.attack.norm)}"
                f"..{format_eps(float(self.eps.max()), self.attack.norm)}")
        with self.progress(len(images), "img", what, leave=False) as bar:
            chunks = in_batches(
                len(images), self.batch_size,
                lambda start, stop: self._attack_chunk(encoder, roi, images[start:stop], start, generator),
                advance=bar.update)
        columns = {k: np.concatenate([c[0][k] for c in chunks]) for k in chunks[0][0]}
        columns["steps_used"] = columns["steps_used"].astype(np.float64)
        return columns, np.concatenate([c[1] for c in chunks], axis=1)

    def _attack_chunk(self, encoder, roi: str, x: torch.Tensor, start: int,
                      generator: torch.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The whole ladder for one batch of images: PGD, responses and the random control."""
        n_eps = len(self.eps)
        xe, eps_e, ladder_idx = expand_ladder(x, self.eps.tolist())
        image_idx = start + torch.arange(len(x)).repeat(n_eps)
        runtime = AttackRuntime.auto(x.device, compile=self.compile, amp=self.amp)
        result = pgd(make_objective(encoder, roi, self.objective, xe), xe, eps_e,
                     self.attack, generator=generator, runtime=runtime)
        with torch.no_grad():
            r_clean = encoder.roi_response(xe, roi)
            r_adv = encoder.roi_response(xe + result.delta, roi)
            random_effects = torch.stack([
                (encoder.roi_response(xe + random_perturbation(
                    xe, eps_e, self.attack.norm, generator, match_norm=result.norm,
                    clamp=self.attack.clamp), roi)
                 - r_clean).abs()
                for _ in range(self.random_draws)
            ])
        s = r_clean - r_adv
        # The configured budgets themselves (float64), not their float32 copies in eps_e.
        values = {"image": image_idx, "eps": self.eps[ladder_idx.cpu()], "r_clean": r_clean,
                  "r_adv": r_adv, "s": s, "abs_s": s.abs(), "norm": result.norm,
                  "steps_used": result.steps_used, "random_abs_s": random_effects.mean(0),
                  "random_abs_s_max": random_effects.amax(0), "conv_gain": result.conv_gain,
                  "conv_spread": result.conv_spread, "converged": result.converged,
                  "restarts": result.restarts}
        delta = result.delta.detach().reshape(n_eps, len(x), *x.shape[1:]).half().cpu().numpy()
        return {k: v.detach().cpu().numpy() for k, v in values.items()}, delta
