"""Attack objectives on the encoder interface: what PGD maximises, per image.

Every objective compares the encoder's prediction for the perturbed image with its prediction
for the clean image (computed once, without gradients) and returns one value per image:

    abs       |m(x + d) - m(x)|               m = mean over the ROI's voxels (the seed's objective)
    increase  m(x + d) - m(x)
    decrease  m(x) - m(x + d)
    pattern   ||r_roi(x + d) - r_roi(x)||_2   the ROI's voxel pattern
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from brainrobust.checks import is_number
from brainrobust.errors import ConfigError


def _abs(now: Tensor, clean: Tensor) -> Tensor:
    change = now.mean(1) - clean.mean(1)
    # |.| with sign(0) taken as +1: at d = 0 the gradient is that of m, not 0, so PGD without a
    # random start still leaves the kink (torch's abs has gradient 0 there).
    return change * torch.where(change >= 0, 1.0, -1.0)


def _increase(now: Tensor, clean: Tensor) -> Tensor:
    return now.mean(1) - clean.mean(1)


def _decrease(now: Tensor, clean: Tensor) -> Tensor:
    return clean.mean(1) - now.mean(1)


def _pattern(now: Tensor, clean: Tensor) -> Tensor:
    return torch.linalg.vector_norm(now - clean, dim=1)


# (ROI voxels of x + d, ROI voxels of x), both (N, k) -> (N,)
OBJECTIVES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "abs": _abs,
    "increase": _increase,
    "decrease": _decrease,
    "pattern": _pattern,
}


def make_objective(
    encoder: torch.nn.Module,
    roi: str,
    kind: str,
    clean_x: Tensor,
    hold: Mapping[str, float] | None = None,
) -> Callable[[Tensor], Tensor]:
    """Build objective(x_adv) -> (N,) for `pgd`, with x_adv in the same image order as clean_x.

    Parameters
    ----------
    encoder : encoder(x) -> (N, V) with `rois` {name: voxel columns}; must be in eval mode, so
        that every image's prediction depends on that image only.
    roi : the ROI the objective reads.
    kind : one of OBJECTIVES.
    clean_x : (N, 3, S, S) the unperturbed images.
    hold : optional {other_roi: weight >= 0}: subtract weight * (m_other(x + d) - m_other(x))^2,
        so a targeted probe can drive `roi` while keeping the others where they were.
    """
    if kind not in OBJECTIVES:
        raise ConfigError(f"unknown objective {kind!r}; valid: {sorted(OBJECTIVES)}")
    rois = encoder.rois
    hold = dict(hold or {})
    for name in (roi, *hold):
        if name not in rois:
            raise ConfigError(f"unknown ROI {name!r} for this encoder; valid: {sorted(rois)}")
    if roi in hold:
        raise ConfigError(f"hold names the attacked ROI {roi!r}; hold only other ROIs")
    for name, weight in hold.items():
        if not is_number(weight) or weight < 0:
            raise ConfigError(f"hold weight for {name!r} must be a finite number >= 0, "
                              f"got {weight!r}")
    _require_eval(encoder)

    device = clean_x.device
    index = rois[roi].to(device)
    held = [(rois[name].to(device), float(weight)) for name, weight in hold.items()]
    with torch.no_grad():
        clean = encoder(clean_x)
    clean_held = [clean[:, cols].mean(1) for cols, _ in held]
    return _bind(encoder, OBJECTIVES[kind], index, clean[:, index], held, clean_held)


def _bind(encoder: torch.nn.Module, score: Callable[[Tensor, Tensor], Tensor], index: Tensor,
          clean_roi: Tensor, held: list[tuple[Tensor, float]],
          clean_held: list[Tensor]) -> Callable[[Tensor], Tensor]:
    """The objective for the images whose clean responses are given. Its `rows(picked)` is the
    same objective for a subset of those images (`pgd` restarts only the images that need it)."""
    n = clean_roi.shape[0]

    def objective(x_adv: Tensor) -> Tensor:
        if x_adv.shape[0] != n:
            raise ConfigError(f"objective built for {n} images was given {x_adv.shape[0]}")
        # Checked at every call, not only when built: something may switch the mode in between.
        _require_eval(encoder)
        response = encoder(x_adv)
        value = score(response[:, index], clean_roi)
        for (cols, weight), m0 in zip(held, clean_held):
            value = value - weight * (response[:, cols].mean(1) - m0).square()
        return value

    objective.rows = lambda picked: _bind(encoder, score, index, clean_roi[picked], held,
                                          [m[picked] for m in clean_held])
    # `pgd` uses `rows` only where it belongs to this very function: a wrapper that copied the
    # attributes (functools.wraps) computes something else.
    objective.rows_of = objective
    return objective


def _require_eval(encoder: torch.nn.Module) -> None:
    """Train mode (BatchNorm, dropout) couples the images of a batch: refuse it."""
    if encoder.training or any(m.training for m in encoder.modules()):
        raise ConfigError("the encoder must be in eval mode for an attack (call encoder.eval()); "
                          "in train mode batch statistics couple the images")
