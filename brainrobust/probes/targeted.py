"""Targeted perturbations: drive one ROI up or down within a growing budget (method.md section 5).

For each start image and every eps of a strictly increasing schedule, PGD finds

    delta_k = argmax_{||delta|| <= eps_k, x + delta in [0, 1]}  +-(r_roi(x + delta) - r_roi(x))
              - sum_h w_h (r_h(x + delta) - r_h(x))^2          (optional held ROIs h)

and the probe records the image x + delta_k, the perturbation, every ROI's predicted response and
the perceptual distance from the start (L2, L-inf, PSNR, SSIM). On a robust model the trajectory
shows a semantic change (a face fades, a body appears); on a standard model, noise.

warm_start (default): eps_k continues from delta_{k-1}: PGD starts at x + delta_{k-1} and searches
the ball of radius eps_k - ||delta_{k-1}|| around it, which lies inside the eps_k ball (triangle
inequality), so every budget holds. The objective then never falls along the schedule (PGD
keeps its best iterate, and the previous delta is kept where a random start did worse), and
consecutive frames form one continuous path, which is what the videos show. The price: only a
sub-ball of the eps_k ball is searched. warm_start=false solves every eps from scratch, all
budgets in one batched PGD call (`expand_ladder`); frames are then independent optima.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from brainrobust.checks import is_number
from brainrobust.errors import ConfigError
from brainrobust.probes.attack import (
    AttackRuntime,
    PGDConfig,
    clamp_to_box,
    expand_ladder,
    norm_of,
    pgd,
    pgd_config,
    project,
    validate_eps,
)
from brainrobust.probes.base import Probe, ProbeContext
from brainrobust.probes.chunks import in_batches
from brainrobust.probes.image_selection import ImageSelection
from brainrobust.probes.objectives import make_objective
from brainrobust.probes.perceptual import perceptual_measures

DIRECTIONS = ("increase", "decrease")
PERCEPTUAL = ("l2", "linf", "psnr", "ssim")


def validate_schedule(eps_schedule: Sequence[float]) -> torch.Tensor:
    """A strictly increasing list of finite budgets > 0, as float64; ConfigError otherwise."""
    key = "probe.targeted.eps_schedule"
    if isinstance(eps_schedule, (int, float, str)) or eps_schedule is None:
        raise ConfigError(f"{key} must be a list of budgets, got {eps_schedule!r}")
    try:
        values = validate_eps(list(eps_schedule))  # strictly increasing below: no repeats either
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None
    if len(values) > 1 and not bool((values[1:] > values[:-1]).all()):
        raise ConfigError(f"{key} must be strictly increasing, got {values.tolist()}")
    return values


class TargetedProbe(Probe):
    """Drive `roi` in `direction` along `eps_schedule`; record images, perturbations, responses."""

    name = "targeted"
    settings: ClassVar[tuple[str, ...]] = ("direction", "driven_roi", "norm_type", "eps")

    def __init__(
        self,
        roi: str,
        direction: str = "increase",
        eps_schedule: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
        norm: str = "l2",
        attack: PGDConfig | Mapping[str, Any] | None = None,
        hold: Mapping[str, float] | None = None,
        images: Mapping[str, Any] | Sequence[str] | None = None,
        warm_start: bool = True,
        save_media: bool = True,
        fps: float = 4.0,
        batch_size: int = 16,
        amp: bool = True,
        compile: bool = False,
        max_images: int | None = None,
        force: bool = False,
    ):
        hold = dict(hold or {})
        super().__init__(rois=[roi, *hold], max_images=max_images, force=force)
        self.check(integers={"batch_size": (batch_size, 1)}, above={"fps": (fps, 0)},
                   choices={"direction": (direction, DIRECTIONS)})
        if roi in hold:
            raise ConfigError(f"probe.targeted.hold names the driven ROI {roi!r}; hold only other ROIs")
        bad = {
            k: w
            for k, w in hold.items()
            if not is_number(w) or w < 0
        }
        if bad:
            raise ConfigError(f"probe.targeted.hold weights must be numbers >= 0, got {bad}")
        self.roi = roi
        self.direction = direction
        self.eps = validate_schedule(eps_schedule)
        self.attack = pgd_config(attack, norm)
        self.hold = {k: float(w) for k, w in hold.items()}
        self.images = ImageSelection.parse(images or {"select": "top", "n": 4}, "probe.targeted.images")
        self.warm_start = warm_start
        self.save_media = save_media
        self.fps = fps
        self.batch_size = batch_size
        self.amp, self.compile = amp, compile

    @property
    def array_name(self) -> str:
        return f"targeted_{self.roi}_{self.direction}"

    def trajectory(
        self, encoder: torch.nn.Module, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Perturbations (E, B, 3, S, S) of images x (B, 3, S, S), one per eps of the schedule,
        and the attack's convergence flag (E, B) for each (`AttackResult.converged`)."""
        runtime = AttackRuntime.auto(x.device, compile=self.compile, amp=self.amp)
        if not self.warm_start:
            xe, eps_e, _ = expand_ladder(x, self.eps.tolist())
            ladder_objective = make_objective(encoder, self.roi, self.direction, xe, self.hold)
            result = pgd(ladder_objective, xe, eps_e, self.attack, generator=generator,
                         runtime=runtime)
            return (result.delta.view(len(self.eps), *x.shape),
                    result.converged.view(len(self.eps), len(x)))
        objective = make_objective(encoder, self.roi, self.direction, x, self.hold)
        deltas, converged = [], []
        prev = torch.zeros_like(x)
        for eps in self.eps.tolist():
            # x + prev can overshoot 1 by a rounding ulp, which pgd would refuse.
            start = (x + prev).clamp(0.0, 1.0)
            # The rest of the budget around the previous delta; > 0 since the schedule increases.
            room = (eps - norm_of(prev, self.attack.norm)).clamp_min(1e-12 * eps)
            result = pgd(objective, start, room, self.attack, generator=generator, runtime=runtime)
            with torch.no_grad():
                stayed = objective(start)
            better = (result.objective >= stayed).view(-1, 1, 1, 1)
            step = torch.where(better, result.delta, torch.zeros_like(prev))
            # Exact budget and box despite rounding in start + step.
            budget = torch.full_like(x[:, :1, :1, :1], eps)
            prev = clamp_to_box(x, project(start + step - x, budget, self.attack.norm))
            deltas.append(prev)
            converged.append(result.converged)
        return torch.stack(deltas), torch.stack(converged)

    def run(self, encoder: torch.nn.Module, ctx: ProbeContext) -> pd.DataFrame:
        test_images, test_ids = self.selected_images(ctx)
        x0, ids, files = self.images.resolve(
            encoder,
            test_images,
            test_ids,
            self.roi,
            ctx.responses[: len(test_ids)],
            self.batch_size,
        )
        rois = list(ctx.rois)
        generator = ctx.generator()
        frames, deltas, responses, flags = [], [], [], []

        def drive(start: int, stop: int) -> None:
            x = x0[start:stop]
            delta, converged = self.trajectory(encoder, x, generator)
            delta = delta.detach()
            flags.append(converged.transpose(0, 1).cpu())
            traj = torch.cat([x[None], x[None] + delta])  # (E + 1, B, 3, S, S), frame 0 the start
            with torch.no_grad():
                pred = encoder(traj.flatten(0, 1))
            resp = torch.stack([pred[:, encoder.rois[r].to(pred.device)].mean(1) for r in rois], -1)
            frames.append(traj.transpose(0, 1).cpu())
            deltas.append(delta.transpose(0, 1).cpu())
            responses.append(resp.view(len(self.eps) + 1, len(x), len(rois)).transpose(0, 1).cpu())

        with self.progress(len(x0), "img", f"{self.direction} {self.roi}") as bar:
            in_batches(len(x0), self.batch_size, drive, advance=bar.update)
        images = torch.cat(frames)  # (n, E + 1, 3, S, S)
        arrays = {
            "images": images.numpy(),
            "delta": torch.cat(deltas).numpy(),
            "eps": np.concatenate([[0.0], self.eps.numpy()]),
            "image_id": np.asarray(ids, dtype=np.int64),
            "responses": torch.cat(responses).double().numpy(),
            # The attack's convergence report per image and eps of the schedule (1.0 / 0.0).
            "converged": torch.cat(flags).float().numpy(),
            "rois": np.array(rois),
            # Measured test-set SD per ROI: figures can show changes in SD units.
            "test_sd": np.array([ctx.roi_stats.get(r, {}).get("test_sd", np.nan) for r in rois]),
            "driven_roi": np.array(self.roi),
            "direction": np.array(self.direction),
            "norm": np.array(self.attack.norm),
            "hold": np.array(list(self.hold), dtype=str),
            "hold_weight": np.array(list(self.hold.values()), dtype=np.float64),
            "files": np.array(files, dtype=str),
            "model": np.array(str(encoder.meta.get("model", ""))),
            "robust": np.array(bool(encoder.meta.get("robust", False))),
        }
        ctx.store.save_array(self.array_name, arrays)
        return self._records(arrays, images, ctx)

    def media(self) -> dict[str, dict[str, Any]]:
        return {self.array_name: {"fps": self.fps}} if self.save_media else {}

    def _records(
        self, arrays: Mapping[str, np.ndarray], images: torch.Tensor, ctx: ProbeContext
    ) -> pd.DataFrame:
        eps, ids, rois = arrays["eps"], arrays["image_id"], list(arrays["rois"])
        resp = arrays["responses"]  # (n, E + 1, R)
        change = resp - resp[:, :1]
        sd = np.array([ctx.roi_stats.get(r, {}).get("test_sd", np.nan) for r in rois])
        sd = np.where(sd > 0, sd, np.nan)
        n, t = resp.shape[:2]
        grid = np.meshgrid(np.arange(n), np.arange(t), np.arange(len(rois)), indexing="ij")
        image_idx, eps_idx, roi_idx = (g.ravel() for g in grid)
        frames = []
        for metric, values in (
            ("response", resp),
            ("response_change", change),
            ("response_change_sd", change / sd),
        ):
            frames.append(
                pd.DataFrame(
                    {
                        "image_id": ids[image_idx],
                        "roi": np.array(rois)[roi_idx],
                        "eps": eps[eps_idx],
                        "metric": metric,
                        "value": values.ravel(),
                    }
                )
            )
        # Image-level measures against the start (eps > 0 only; at the start they are trivial).
        start = images[:, :1].expand_as(images[:, 1:]).flatten(0, 1)
        measures = perceptual_measures(images[:, 1:].flatten(0, 1), start)
        image_idx, eps_idx = (
            g.ravel() for g in np.meshgrid(np.arange(n), np.arange(1, t), indexing="ij")
        )
        measures["converged"] = torch.as_tensor(arrays["converged"]).flatten()
        for metric in (*PERCEPTUAL, "converged"):
            frames.append(
                pd.DataFrame(
                    {
                        "image_id": ids[image_idx],
                        "roi": None,
                        "eps": eps[eps_idx],
                        "metric": metric,
                        "value": measures[metric].numpy(),
                    }
                )
            )
        records = pd.concat(frames, ignore_index=True)
        records["driven_roi"] = self.roi
        records["direction"] = self.direction
        records["norm_type"] = self.attack.norm
        records["hold"] = ",".join(f"{k}:{w:g}" for k, w in self.hold.items())
        records["warm_start"] = self.warm_start
        records["attack_steps"] = self.attack.steps
        return records
