"""Projected gradient ascent on any per-sample objective, under an L2 or L-inf budget.

    delta* = argmax_{||delta_i|| <= eps_i, x_i + delta_i in [0, 1]} objective(x + delta)_i

Three methods share one step loop (`ascent.py`): PGD (fixed step), Auto-PGD (Croce & Hein 2020:
momentum, per-sample step halving at checkpoints, restart from the best point) and the default,
"cosine" (a step annealed from long to 0 along half a cosine; `conf/attack/cosine.yaml`). Every
sample carries its own budget eps_i, so a whole eps ladder runs as ONE batch (repeat the images
with `expand_ladder`). The step loop never synchronises with
the host: the best iterate per sample is kept with `torch.where`, and no Python branch depends
on data. The settings live in `attack_config.py`.
Samples are independent because the encoder is in eval mode, so the gradient of
`objective.sum()` is every sample's own gradient. Each result carries a convergence report per
sample: the gain over the last steps, the spread across restarts and a flag.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from brainrobust.errors import BrainRobustError, ConfigError
from brainrobust.probes.ascent import Ascent, ascend
from brainrobust.probes.attack_config import (
    AMP_DTYPES,
    METHODS,
    AttackRuntime,
    Objective,
    PGDConfig,
)
from brainrobust.probes.geometry import (
    NORMS,
    TINY,
    clamp_to_box,
    norm_of,
    project,
    random_direction,
)

__all__ = [
    "AMP_DTYPES",
    "METHODS",
    "NORMS",
    "AttackResult",
    "AttackRuntime",
    "PGDConfig",
    "clamp_to_box",
    "expand_ladder",
    "norm_of",
    "pgd",
    "pgd_config",
    "project",
    "random_perturbation",
    "validate_eps",
    "validate_ladder",
]

# Bisection steps on log(scale) in random_perturbation: 2**-50 relative width is far below 1e-4.
_BISECT_STEPS = 50
# The smallest budget per pixel `check_budget` accepts: about 16 float32 rounding steps at 0.5.
_SMALLEST_CHANGE = 1e-6


@dataclass
class AttackResult:
    """Per-sample outcome of `pgd`.

    delta : (N, 3, S, S) best perturbation found, dtype of x.
    objective : (N,) objective at x + delta, dtype of x (re-evaluated without autocast).
    norm : (N,) achieved norm of delta in the attack's norm.
    steps_used : (N,) int64, steps of the winning restart's run to the returned delta (0 = its
        start: a random point, or the best candidate's point with `candidates` > 1).
    conv_gain : (N,) relative gain of the best objective over the last `conv_window` of the
        steps, in the restart that won.
    conv_spread : (N,) (best - runner-up) / |best| of the restarts' values; NaN with one restart.
    converged : (N,) 1.0 where conv_gain and conv_spread are within the config's limits, else 0.0.
    restarts : (N,) int64, restarts run for each sample (cfg.restarts up to cfg.max_restarts).
    """

    delta: Tensor
    objective: Tensor
    norm: Tensor
    steps_used: Tensor
    conv_gain: Tensor
    conv_spread: Tensor
    converged: Tensor
    restarts: Tensor


def pgd_config(attack: PGDConfig | Mapping[str, Any] | None, norm: str | None = None) -> PGDConfig:
    """A PGDConfig from a probe's `attack` setting (a config mapping or a PGDConfig).

    With `norm`, the probe fixes the norm itself: an attack.norm that disagrees is an error.
    """
    if isinstance(attack, PGDConfig):
        attack = {name: getattr(attack, name) for name in attack.__dataclass_fields__}
    settings = {k: v for k, v in dict(attack or {}).items() if k != "_target_"}
    if norm is not None:
        if settings.get("norm", norm) != norm:
            raise ConfigError(f"attack.norm={settings['norm']!r} disagrees with the probe's norm "
                              f"{norm!r}; set the probe's norm only")
        settings["norm"] = norm
    return PGDConfig(**settings)


def validate_eps(eps: float | Sequence[float] | Tensor) -> Tensor:
    """Check a budget or a ladder of budgets; return it as a 1-D float64 CPU tensor.

    Raises ConfigError for an empty ladder, a nested one, or any value that is not finite and
    > 0 (booleans included: YAML's `true` is not a budget of 1).
    """
    listed = eps if isinstance(eps, Sequence) and not isinstance(eps, str) else [eps]
    if any(isinstance(v, bool) or (isinstance(v, Sequence) and not isinstance(v, str))
           for v in listed):
        raise ConfigError(f"eps must be a number > 0 or a flat list of them, got {eps!r}")
    try:
        values = torch.as_tensor(eps, dtype=torch.float64).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"eps must be a number > 0 or a list of them, got {eps!r}") from None
    if values.numel() == 0:
        raise ConfigError("eps is empty; give at least one budget > 0")
    bad = ~(torch.isfinite(values) & (values > 0))
    if bad.any():
        raise ConfigError(f"every eps must be finite and > 0, got {values[bad].tolist()}")
    return values


def validate_ladder(eps: float | Sequence[float] | Tensor) -> Tensor:
    """`validate_eps` for a ladder of budgets, each listed once (a repeat would duplicate
    records under one (image, eps) key)."""
    ladder = validate_eps(eps)
    if len(set(ladder.tolist())) < len(ladder):
        raise ConfigError(f"the eps ladder repeats a budget: {ladder.tolist()}; list each once")
    return ladder


def check_budget(eps: Sequence[float], norm: str, size: int) -> None:
    """Refuse budgets that cannot be meant at this stimulus size. At or above the largest
    distance between two images in [0, 1]^(3 x size x size) every perturbation fits and the
    budget says nothing (an L2 eps of 1e9, an L-inf eps of 1). Below `_SMALLEST_CHANGE` per
    pixel (spread evenly, as the random control is) a float32 image cannot hold the change
    (its rounding step in [0.5, 1) is 6e-8), so attack and control would both return 0."""
    scale = 1.0 if norm == "linf" else math.sqrt(3 * size * size)
    values = validate_eps(eps).tolist()
    too_big = [e for e in values if e >= scale]
    if too_big:
        raise ConfigError(f"eps {too_big} reaches the largest {norm} distance between two "
                          f"{size} x {size} images in [0, 1] ({scale:.4g}); a budget must be "
                          "smaller to constrain anything")
    too_small = [e for e in values if e < _SMALLEST_CHANGE * scale]
    if too_small:
        raise ConfigError(f"eps {too_small} is below {_SMALLEST_CHANGE * scale:.2g}, a change of "
                          f"{_SMALLEST_CHANGE:g} per pixel at {size} x {size}: float32 images "
                          "cannot hold it; use a larger budget")


def expand_ladder(x: Tensor, eps_ladder: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Repeat a batch once per budget so the whole ladder is one PGD call.

    Returns
    -------
    x_rep : (E * B, ...) images, ladder-major: row e * B + b is image b at eps_ladder[e].
    eps : (E * B,) the budget of each row, dtype and device of x.
    ladder_index : (E * B,) int64, e for each row.
    """
    ladder = validate_ladder(eps_ladder)
    n_eps, batch = len(ladder), x.shape[0]
    x_rep = x.repeat(n_eps, *([1] * (x.dim() - 1)))
    eps = ladder.to(device=x.device, dtype=x.dtype).repeat_interleave(batch)
    index = torch.arange(n_eps, device=x.device).repeat_interleave(batch)
    return x_rep, eps, index


def pgd(
    objective_fn: Objective,
    x: Tensor,
    eps: float | Tensor,
    cfg: PGDConfig,
    generator: torch.Generator | None = None,
    runtime: AttackRuntime | None = None,
) -> AttackResult:
    """Maximise objective_fn(x + delta) per sample under ||delta_i|| <= eps_i (and the box).

    Parameters
    ----------
    objective_fn : (N, 3, S, S) images -> (N,) values; each sample's value may depend on that
        sample only (an encoder in eval mode).
    x : (N, 3, S, S) float32/float64 images in [0, 1].
    eps : a number or an (N,) tensor of per-sample budgets (see `expand_ladder`).
    cfg : the search settings.
    generator : seeds the random starts (bit-identical results on CPU for a given seed).
    runtime : speed switches (`AttackRuntime`); default plain fp32.
    """
    if not isinstance(cfg, PGDConfig):
        raise ConfigError(f"pgd needs a PGDConfig, got {type(cfg).__name__}")
    runtime = runtime or AttackRuntime()
    _check_images(x, cfg.clamp)
    eps = _per_sample_eps(eps, x)
    if torch.is_inference_mode_enabled():
        raise ConfigError("pgd needs autograd: call it outside torch.inference_mode()")
    x = x.detach()
    if runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fn = runtime.wrap(objective_fn)
    eps_b = eps.view(-1, *([1] * (x.dim() - 1)))

    with torch.enable_grad():
        runs = [_restart(objective_fn, fn, x, eps_b, cfg, generator, runtime)
                for _ in range(cfg.restarts)]
        best, spread = _best_of(runs, eps_b)
        restarts = torch.full_like(best.steps_used, cfg.restarts)
        # Further restarts for the images whose best is unconfirmed: one host sync each, none
        # inside the step loop. An objective without `rows` restarts the whole batch.
        more = _forked(generator) if cfg.restart_limit > cfg.restarts else None
        subsets = getattr(objective_fn, "rows_of", None) is objective_fn
        while True:
            unconfirmed = ~(spread <= cfg.conv_spread_max) & (restarts < cfg.restart_limit)
            if not unconfirmed.any():
                break
            rows = (unconfirmed.nonzero().squeeze(1) if subsets
                    else torch.arange(len(x), device=x.device))
            sub = objective_fn.rows(rows) if subsets else objective_fn
            run = _restart(sub, runtime.wrap(sub), x[rows], eps_b[rows], cfg, more, runtime)
            runs.append(_widen(run, rows, eps_b))
            restarts[rows] += 1
            best, spread = _best_of(runs, eps_b)
    if not torch.isfinite(best.objective).all():
        bad = int((~torch.isfinite(best.objective)).sum())
        raise BrainRobustError(
            f"the objective was NaN or inf at every iterate for {bad} of "
            f"{len(best.objective)} images; check the encoder's outputs on them"
        )
    converged = (best.gain <= cfg.conv_gain_max) & ~(spread > cfg.conv_spread_max)
    return AttackResult(
        delta=best.delta.contiguous(),
        objective=best.objective,
        norm=norm_of(best.delta, cfg.norm),
        steps_used=best.steps_used,
        conv_gain=best.gain,
        conv_spread=spread,
        converged=converged.to(x.dtype),
        restarts=restarts,
    )


def random_perturbation(
    x: Tensor,
    eps: float | Tensor,
    norm: str,
    generator: torch.Generator | None = None,
    match_norm: Tensor | None = None,
    clamp: bool = True,
) -> Tensor:
    """Negative control: a random perturbation of exactly the requested norm.

    L2: a Gaussian direction; L-inf: a uniformly random sign in every pixel. The target norm is
    `match_norm` when given (e.g. the attack's achieved norm; 0 gives a zero perturbation), else
    eps. With `clamp`, x + delta stays in [0, 1]; where that clipping shrinks the perturbation,
    it is scaled up (bisection on the scale, all samples at once) until the clipped perturbation
    has the target norm to 1e-4 (relative), or as close as the box allows. One call is one draw:
    call again with the same generator for further, independent draws.
    """
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    _check_images(x, clamp)
    if match_norm is None:
        target = _per_sample_eps(eps, x)
    else:
        target = torch.as_tensor(match_norm).to(device=x.device, dtype=x.dtype).reshape(-1)
        if target.shape != (x.shape[0],) or not (torch.isfinite(target) & (target >= 0)).all():
            raise ConfigError(f"match_norm must be {x.shape[0]} finite values >= 0")
    target_b = target.view(-1, *([1] * (x.dim() - 1)))
    direction = random_direction(x, norm, generator)
    delta = direction * target_b
    if not clamp:
        return delta
    lo, hi = -x, 1.0 - x
    clipped = torch.maximum(torch.minimum(delta, hi), lo)
    short = norm_of(clipped, norm) < target * (1 - 1e-5)
    if not short.any():
        return clipped
    # Beyond the scale at which every component sits on its bound nothing changes; search
    # log(scale) in [0, log of that scale]: the clipped norm grows monotonically with the scale.
    room = torch.where(delta > 0, hi, lo) / torch.where(delta == 0, 1.0, delta)
    room = torch.where(delta == 0, 1.0, room)
    log_lo = torch.zeros_like(target, dtype=torch.float64)
    log_hi = room.flatten(1).amax(1).clamp_min(1.0).double().log()
    for _ in range(_BISECT_STEPS):
        mid = (log_lo + log_hi) / 2
        scaled = delta * mid.exp().to(x.dtype).view_as(target_b)
        reached = norm_of(torch.maximum(torch.minimum(scaled, hi), lo), norm) >= target
        log_hi = torch.where(reached, mid, log_hi)
        log_lo = torch.where(reached, log_lo, mid)
    scale = torch.where(short, log_hi.exp(), torch.ones_like(log_hi)).to(x.dtype)
    return torch.maximum(torch.minimum(delta * scale.view_as(target_b), hi), lo)


# --- internals ---------------------------------------------------------------------------------


def _restart(objective_fn: Objective, fn: Objective, x: Tensor, eps_b: Tensor, cfg: PGDConfig,
             generator: torch.Generator | None, runtime: AttackRuntime) -> Ascent:
    """One restart: its screened start, its run, and (under autocast) its best value read again
    in the images' dtype by `objective_fn` (`fn` is the runtime's wrap of it)."""
    start = _screened_start(fn, x, eps_b, cfg, generator, runtime)
    run = ascend(fn, x, eps_b, cfg, generator, runtime, start=start)
    if runtime.amp_dtype is not None:
        with torch.no_grad():
            run.objective = objective_fn(x + run.delta).to(x.dtype)
    return run


def _forked(generator: torch.Generator | None) -> torch.Generator | None:
    """A generator seeded by one draw of `generator` (None: the global stream is used)."""
    if generator is None:
        return None
    seed = torch.randint(2**62, (1,), generator=generator, device=generator.device)
    return torch.Generator(device=generator.device).manual_seed(int(seed))


def _widen(run: Ascent, rows: Tensor, eps_b: Tensor) -> Ascent:
    """A run of some rows as a run of the whole batch in which the other rows never win."""
    def full(values: Tensor, fill: float) -> Tensor:
        out = torch.full((len(eps_b), *values.shape[1:]), fill, dtype=values.dtype,
                         device=values.device)
        return out.index_copy(0, rows, values)
    return Ascent(delta=full(run.delta, 0.0), objective=full(run.objective, -math.inf),
                  steps_used=full(run.steps_used, 0), gain=full(run.gain, 0.0))


def _screened_start(fn: Objective, x: Tensor, eps_b: Tensor, cfg: PGDConfig,
                    generator: torch.Generator | None, runtime: AttackRuntime) -> Tensor | None:
    """The best point per sample of `cfg.candidates` short runs (None: a restart takes one
    random start). Their starts are random; with `cfg.mirror_candidates` every second one
    starts at the mirror image (-delta, put back in the box) of the previous one's best point.
    Nothing carries over from an earlier restart, so a restart that agrees with another
    confirms it independently (conv_spread)."""
    if cfg.candidates == 1:
        return None
    # No mean of the last iterates here: a short run still takes long steps, so its last iterates
    # can lie in different basins, and a mean that scores well between them is a poor start (at
    # eps 1.0 on the random TinyCNN it cost the pattern objective 1-1.6%).
    short = replace(cfg, steps=cfg.candidate_steps, average_last=1)
    runs: list[Ascent] = []
    for k in range(cfg.candidates):
        mirrored = cfg.mirror_candidates and k % 2 == 1
        runs.append(ascend(fn, x, eps_b, short, generator, runtime,
                           start=-runs[-1].delta if mirrored else None))
    return _best_of(runs, eps_b)[0].delta


def _best_of(runs: list[Ascent], eps_b: Tensor) -> tuple[Ascent, Tensor]:
    """The best run per sample (the first on ties), and how far the runner-up lies below it
    (relative): a small gap means the best value was found twice."""
    best = runs[0]
    for run in runs[1:]:
        better = run.objective > best.objective
        best = Ascent(
            delta=torch.where(better.view_as(eps_b), run.delta, best.delta),
            objective=torch.where(better, run.objective, best.objective),
            steps_used=torch.where(better, run.steps_used, best.steps_used),
            gain=torch.where(better, run.gain, best.gain),
        )
    if len(runs) == 1:
        return best, torch.full_like(best.objective, math.nan)
    top2 = torch.stack([run.objective for run in runs]).topk(2, dim=0).values
    return best, (top2[0] - top2[1]) / top2[0].abs().clamp_min(TINY)


def _check_images(x: Tensor, clamp: bool) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2 or x.dtype not in (torch.float32, torch.float64):
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"images must be a float32/float64 tensor (N, 3, S, S), got {desc}")
    if clamp and x.numel() and not (x.amin() >= 0 and x.amax() <= 1):  # NaN fails too
        raise ConfigError("images must lie in [0, 1] when attack.clamp is true; rescale them "
                          "(uint8 / 255) or set attack.clamp=false")


def _per_sample_eps(eps: float | Tensor, x: Tensor) -> Tensor:
    values = validate_eps(eps)
    n = x.shape[0]
    if values.numel() == 1:
        values = values.expand(n)
    elif values.shape != (n,):
        raise ConfigError(f"eps must be one number or one per image ({n}), "
                          f"got {values.numel()} values")
    return values.to(device=x.device, dtype=x.dtype)
