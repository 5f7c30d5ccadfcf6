"""Effect-matched budgets: the smallest eps that moves an ROI response by a set effect (method 3).

For every ROI and image, find

    eps* = min { eps : |r(x) - r(x + delta_eps)| >= effect },   delta_eps = the attack at budget eps

by growing eps geometrically from eps_min until the effect is reached (or eps_max is passed),
then bisecting the bracket (lo, hi] until hi - lo <= rel_tol * hi, and finally attacking once
just above the eps where the line through (lo, effect at lo) and (hi, effect at hi) crosses the
effect (exact for an effect linear in eps, as on a linear encoder; a tenth of rel_tol above it, so
that rounding still reaches the effect); where that attempt reaches the effect it becomes the
upper end. Every image of a batch carries its own bracket and all of them advance together: one
attack call per round on the images still searching. eps_found is the upper end of the final
bracket, so the stored perturbation reaches the effect; the records keep both ends (eps_lo,
eps_hi) and the convergence report of the attack at eps_found. Robust and standard models can
then be compared by the budget they need, and the stored perturbations feed the transfer probe
(kind effect_matched).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from brainrobust.checks import is_number
from brainrobust.errors import ConfigError, DataError
from brainrobust.probes.attack import AttackResult, AttackRuntime, PGDConfig, pgd, pgd_config
from brainrobust.probes.base import Probe, ProbeContext
from brainrobust.probes.chunks import in_batches
from brainrobust.probes.objectives import make_objective

EFFECT_KINDS = ("absolute", "test_sd", "noise_ceiling")
METRICS = ("eps_found", "eps_lo", "eps_hi", "reached", "effect", "effect_target", "r_clean", "r_adv",
           "norm", "pgd_runs", "conv_gain", "conv_spread", "converged", "restarts")
# What is kept of the attempt at each image's upper bracket end (while unbracketed: its latest
# attempt), besides the perturbation itself.
KEPT = ("effect", "r_adv", "norm", "conv_gain", "conv_spread", "converged", "restarts")
# A safety stop: bracketing and bisection need far fewer rounds for any continuous encoder.
MAX_ROUNDS = 200
# The final attempt aims this fraction of rel_tol above the interpolated crossing.
INTERPOLATION_MARGIN = 0.1


class EffectMatchedProbe(Probe):
    name = "effect_matched"
    image_axes: ClassVar[dict[str, int]] = {"image_id": 0, "delta": 1, "eps": 0}
    # eps is each image's result here, not a setting.
    settings: ClassVar[tuple[str, ...]] = ("norm_type", "effect_kind")

    def __init__(
        self,
        attack: PGDConfig | Mapping[str, Any],
        effect: Mapping[str, Any],
        eps_min: float = 0.01,
        eps_max: float = 10.0,
        growth: float = 2.0,
        rel_tol: float = 0.01,
        batch_size: int = 32,
        max_images: int | None = None,
        rois: list[str] | None = None,
        save_perturbations: bool = True,
        amp: bool = True,
        compile: bool = False,
        force: bool = False,
    ):
        super().__init__(rois=rois, max_images=max_images, force=force)
        self.attack = pgd_config(attack)
        self.effect_kind, self.effect_value = _parse_effect(effect)
        self.check(integers={"batch_size": (batch_size, 1)},
                   above={"eps_min": (eps_min, 0), "growth": (growth, 1), "rel_tol": (rel_tol, 0)},
                   below={"rel_tol": (rel_tol, 1)})
        self.check(above={"eps_max": (eps_max, eps_min)})
        self.eps_min, self.eps_max = float(eps_min), float(eps_max)
        self.growth, self.rel_tol = float(growth), float(rel_tol)
        self.batch_size = batch_size
        self.amp, self.compile = amp, compile
        self.save_perturbations = save_perturbations

    def effect_target(self, stats: Mapping[str, float], roi: str) -> float:
        """The effect in response units for one ROI."""
        if self.effect_kind == "absolute":
            return self.effect_value
        test_sd = float(stats["test_sd"])
        if self.effect_kind == "test_sd":
            target = self.effect_value * test_sd
        else:
            nc = float(stats["noise_ceiling"])
            if not (math.isfinite(nc) and nc > 0):
                raise DataError(f"ROI {roi} has no positive noise ceiling ({nc}); use "
                                f"probe.effect_matched.effect.kind=test_sd or absolute")
            # The explainable (signal) SD: sqrt(NC/100) of the test-set SD.
            target = self.effect_value * math.sqrt(nc / 100.0) * test_sd
        if not (math.isfinite(target) and target > 0):
            raise DataError(f"ROI {roi}: test-set SD {test_sd} gives effect {target}; "
                            f"use probe.effect_matched.effect.kind=absolute")
        return target

    def run_batch(self, encoder: torch.nn.Module, ctx: ProbeContext, images: torch.Tensor,
                  ids: np.ndarray) -> pd.DataFrame:
        generator = ctx.generator()
        frames = []
        for roi in self.selected_rois():
            target = self.effect_target(ctx.roi_stats[roi], roi)
            parts = in_batches(len(images), self.batch_size,
                               lambda start, stop, roi=roi, target=target: self.search(
                                   encoder, roi, images[start:stop], target, generator))
            found = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            delta = found.pop("delta")
            wide = pd.DataFrame(found)
            wide["effect_target"] = target
            wide["image_id"] = ids
            wide["eps"] = wide["eps_found"]
            wide["roi"] = roi
            frames.append(wide.melt(id_vars=["image_id", "roi", "eps"], value_vars=list(METRICS),
                                    var_name="metric", value_name="value"))
            if self.save_perturbations:
                ctx.store.save_array(f"effect_matched_{roi}_{self.attack.norm}", {
                    "delta": delta[None], "image_id": ids, "eps": found["eps_found"],
                })
        records = pd.concat(frames, ignore_index=True)
        records["norm_type"] = self.attack.norm
        records["effect_kind"] = self.effect_kind
        records["effect_value"] = self.effect_value
        records["attack_method"] = self.attack.method
        records["attack_steps"] = self.attack.steps
        return records

    def search(self, encoder: torch.nn.Module, roi: str, x: torch.Tensor, target: float,
               generator: torch.Generator) -> dict[str, np.ndarray]:
        """Bracket, bisect and interpolate the budget of every image of `x` at once.

        Returns per image: eps_found (NaN if not reached within eps_max), eps_lo and eps_hi (the
        final bracket: the largest eps that missed the effect, 0 if none did, and the upper end,
        NaN if none reached it), reached (0/1), effect (|r(x) - r(x + delta)| at eps_found, or at
        eps_max when not reached), r_clean, r_adv, norm (of the stored delta), pgd_runs, the
        convergence report of the attack that found delta (conv_gain, conv_spread, converged,
        restarts), and delta (fp16, the perturbation at eps_found).
        """
        n = len(x)
        with torch.no_grad():
            r_clean = encoder.roi_response(x, roi).double()
        brackets = _Brackets(x, r_clean)
        eps = torch.full((n,), self.eps_min, dtype=torch.float64, device=x.device)
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        for _ in range(MAX_ROUNDS):
            idx = active.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            self._attack_at(brackets, encoder, roi, x, idx, eps[idx], target, generator)
            lo, hi = brackets.lo[idx], brackets.hi[idx]
            unbracketed = torch.isinf(hi)
            given_up = unbracketed & (lo >= self.eps_max)
            converged = ~unbracketed & (hi - lo <= self.rel_tol * hi)
            eps[idx] = torch.where(unbracketed, (lo * self.growth).clamp(max=self.eps_max),
                                   (lo + hi) / 2)
            active[idx] = ~(given_up | converged)
        else:
            raise RuntimeError(f"effect-matched search did not converge in {MAX_ROUNDS} rounds")
        guess = brackets.crossing(target) * (1 + INTERPOLATION_MARGIN * self.rel_tol)
        idx = (torch.isfinite(brackets.hi) & (guess < brackets.hi)).nonzero().squeeze(1)
        if len(idx):
            self._attack_at(brackets, encoder, roi, x, idx, guess[idx], target, generator)
        return brackets.results()

    def _attack_at(self, brackets: _Brackets, encoder: torch.nn.Module, roi: str, x: torch.Tensor,
                 idx: torch.Tensor, eps: torch.Tensor, target: float,
                 generator: torch.Generator) -> None:
        xi = x[idx]
        result = pgd(make_objective(encoder, roi, "abs", xi), xi, eps.to(x.dtype), self.attack,
                     generator=generator,
                     runtime=AttackRuntime.auto(x.device, compile=self.compile, amp=self.amp))
        with torch.no_grad():
            r_adv = encoder.roi_response(xi + result.delta, roi).double()
        brackets.update(idx, eps, result, r_adv, target)


class _Brackets:
    """Every image's bracket (lo, hi], the effect at lo and the attempt kept at hi."""

    def __init__(self, x: torch.Tensor, r_clean: torch.Tensor):
        n, device = len(x), x.device
        self.r_clean = r_clean
        self.lo = torch.zeros(n, dtype=torch.float64, device=device)
        self.hi = torch.full((n,), math.inf, dtype=torch.float64, device=device)
        self.effect_lo = torch.zeros(n, dtype=torch.float64, device=device)  # 0 at eps = 0
        self.runs = torch.zeros(n, dtype=torch.long, device=device)
        self.delta = torch.zeros_like(x)
        self.kept = {name: torch.zeros(n, dtype=torch.float64, device=device) for name in KEPT}

    def update(self, idx: torch.Tensor, eps: torch.Tensor, result: AttackResult,
               r_adv: torch.Tensor, target: float) -> None:
        """Record one attempt per image of `idx` at budgets `eps`."""
        effect = (self.r_clean[idx] - r_adv).abs()
        reached = effect >= target
        # Keep the attempt at the bracket's upper end; while unbracketed keep the latest
        # (largest) attempt, so an image that never reaches the effect reports eps_max's.
        keep = reached | torch.isinf(self.hi[idx])
        self.delta[idx[keep]] = result.delta.detach()[keep]
        values = {"effect": effect, "r_adv": r_adv, "norm": result.norm,
                  "conv_gain": result.conv_gain, "conv_spread": result.conv_spread,
                  "converged": result.converged, "restarts": result.restarts}
        for name, value in values.items():
            self.kept[name][idx[keep]] = value.detach().double()[keep]
        self.hi[idx[reached]] = eps[reached]
        self.lo[idx[~reached]] = eps[~reached]
        self.effect_lo[idx[~reached]] = effect[~reached]
        self.runs[idx] += 1

    def crossing(self, target: float) -> torch.Tensor:
        """Where the line through (lo, effect at lo) and (hi, effect at hi) reaches `target`,
        inside the bracket (NaN or inf where there is no upper end)."""
        rise = self.kept["effect"] - self.effect_lo
        frac = torch.where(rise > 0, (target - self.effect_lo) / rise, 1.0).clamp(0.0, 1.0)
        return self.lo + frac * (self.hi - self.lo)

    def results(self) -> dict[str, np.ndarray]:
        found = torch.isfinite(self.hi)
        nan = torch.full_like(self.hi, math.nan)
        out = {"eps_found": torch.where(found, self.hi, nan), "eps_lo": self.lo,
               "eps_hi": torch.where(found, self.hi, nan), "reached": found.double(),
               "r_clean": self.r_clean, "pgd_runs": self.runs.double(), **self.kept}
        arrays = {name: value.cpu().numpy() for name, value in out.items()}
        arrays["delta"] = self.delta.half().cpu().numpy()
        return arrays


def _parse_effect(effect: Mapping[str, Any]) -> tuple[str, float]:
    if not isinstance(effect, Mapping) or set(effect) != {"kind", "value"}:
        raise ConfigError(f"effect_matched.effect must be {{kind: absolute|test_sd|noise_ceiling, "
                          f"value: number > 0}}, got {effect!r}")
    kind, value = effect["kind"], effect["value"]
    if kind not in EFFECT_KINDS:
        raise ConfigError(f"effect_matched.effect.kind must be one of {list(EFFECT_KINDS)}, got {kind!r}")
    if not (is_number(value) and value > 0):
        raise ConfigError(f"effect_matched.effect.value must be a number > 0, got {value!r}")
    return kind, float(value)
