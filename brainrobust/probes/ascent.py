"""The step loop of one attack run, shared by PGD, Auto-PGD and cosine; they differ only in the
step rule.

Every step, per sample (u = unit ascent direction, P = ball then box):

    z           = P(delta_t + h_t u(grad_t))
    delta_{t+1} = P(delta_t + (1 - m_t) (z - delta_t) + m_t (delta_t - delta_{t-1}))

PGD: h_t = step_size * eps and m_t = 0 throughout. Auto-PGD (Croce & Hein, ICML 2020, sec. 3.2):
h_0 = step_size * eps (2 eps), m_0 = 0 and m_t = 0.25 after (their alpha = 0.75); at checkpoints
(22%, then ever shorter intervals down to 6% of the steps) a sample halves its step where the
objective rose in at most 75% of the steps since the previous checkpoint (oscillation), or where
its best value has not grown since a checkpoint that did not halve (stall); such a sample
restarts from its best iterate and gradient, with its momentum reset. Cosine: h_t = step_size *
eps * (1 + cos(pi t / steps)) / 2 and m_t = 0; its long first steps (4 eps in L2: a jump across the
ball) cross the small linear pieces of a ReLU network and find its high region, the shrinking
ones climb it. After the final iterate, a run with `average_last` > 1 (Auto-PGD's default) also
evaluates the mean of its last iterates (Polyak averaging), scaled out to the boundary. Every
decision is a per-sample `torch.where`: the loop never waits for the device.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from brainrobust.errors import ConfigError
from brainrobust.probes.attack_config import AttackRuntime, Objective, PGDConfig
from brainrobust.probes.geometry import (
    TINY,
    constrain,
    norm_of,
    random_direction,
    random_start,
    unit_direction,
)

# Croce & Hein's published constants: weight of the previous displacement (1 - alpha), the
# fraction of rising steps below which a checkpoint halves, and the checkpoint spacing.
APGD_MOMENTUM = 0.25
APGD_RHO = 0.75
APGD_FIRST, APGD_SHRINK, APGD_MIN = 0.22, 0.03, 0.06


@dataclass
class Ascent:
    """One run's best iterate per sample and how much the last steps still added."""

    delta: Tensor
    objective: Tensor
    steps_used: Tensor
    gain: Tensor  # relative gain of the best objective over the last `window` of the steps run


def ascend(
    fn: Objective,
    x: Tensor,
    eps_b: Tensor,
    cfg: PGDConfig,
    generator: torch.Generator | None,
    runtime: AttackRuntime,
    start: Tensor | None = None,
) -> Ascent:
    """One run of the attack `cfg.method` from `start`, else from a fresh (random) start."""
    if start is None:
        start = random_start(x, eps_b, cfg.norm, generator) if cfg.random_start else torch.zeros_like(x)
    delta = constrain(x, start, eps_b, cfg.norm, cfg.clamp)
    fallback = random_direction(x, cfg.norm, generator)
    rule = STEP_RULES[cfg.method](cfg, eps_b)
    best = _Best(delta, keep_grad=rule.restarts_from_best)
    history, previous, recent = [], delta, deque(maxlen=cfg.average_last)
    for t in range(cfg.steps + 1):
        last = t == cfg.steps  # the final iterate is only evaluated, not stepped from
        objective, grad = _evaluate(fn, x, delta, runtime, need_grad=not last)
        best.update(t, objective, delta, grad)
        if last and 1 < cfg.average_last <= cfg.steps:
            mean = _extended_mean(x, recent, eps_b, cfg)
            best.update(t, _evaluate(fn, x, mean, runtime, need_grad=False)[0], mean, None)
        history.append(best.objective)
        if last:
            break
        restart = rule.update(t, objective, best.objective)
        if restart is not None:
            delta, grad = best.restore(restart, delta, grad)
            previous = torch.where(restart.view_as(eps_b), delta, previous)
        move = delta + rule.length * unit_direction(grad, cfg.norm, fallback)
        delta, previous = (
            _with_momentum(x, delta, previous, move, rule.momentum(t), eps_b, cfg),
            delta,
        )
        recent.append(delta)
    return Ascent(best.delta, best.objective, best.step, relative_gain(history, cfg.conv_window))


def relative_gain(history: list[Tensor], window: float) -> Tensor:
    """(best at the end - best `window` of the steps earlier) / |best at the end|, per sample."""
    steps = len(history) - 1
    end, before = history[-1], history[math.floor((1 - window) * steps)]
    return (end - before) / end.abs().clamp_min(TINY)


def _extended_mean(x: Tensor, recent: deque[Tensor], eps_b: Tensor, cfg: PGDConfig) -> Tensor:
    """The mean of the latest iterates, scaled out to the budget's boundary (a mean of points in
    the ball lies in it), then constrained. The iterates scatter around the optimum (the gradient
    of a ReLU network changes direction within a small fraction of eps), and their mean cancels
    much of that scatter."""
    mean = torch.stack(tuple(recent)).mean(0)
    length = norm_of(mean, cfg.norm).view_as(eps_b).clamp_min(TINY)
    return constrain(x, mean * (eps_b / length), eps_b, cfg.norm, cfg.clamp)


def _evaluate(
    fn: Objective, x: Tensor, delta: Tensor, runtime: AttackRuntime, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    delta = delta.detach().requires_grad_(need_grad)
    with runtime.autocast(x.device), torch.set_grad_enabled(need_grad):
        objective = fn(x + delta)
    check_objective(objective, x.shape[0])
    grad = torch.autograd.grad(objective.sum(), delta)[0] if need_grad else None
    return objective.detach().to(x.dtype), grad


def _with_momentum(
    x: Tensor,
    delta: Tensor,
    previous: Tensor,
    move: Tensor,
    momentum: float,
    eps_b: Tensor,
    cfg: PGDConfig,
) -> Tensor:
    z = constrain(x, move, eps_b, cfg.norm, cfg.clamp)
    if momentum == 0:  # plain PGD: z itself, bit for bit
        return z
    blend = delta + (1 - momentum) * (z - delta) + momentum * (delta - previous)
    return constrain(x, blend, eps_b, cfg.norm, cfg.clamp)


class _Best:
    """The best iterate so far per sample (NaN never improves), with its gradient if needed."""

    def __init__(self, delta: Tensor, keep_grad: bool):
        n = delta.shape[0]
        self.objective = torch.full((n,), -math.inf, device=delta.device, dtype=delta.dtype)
        self.delta = delta
        self.step = torch.zeros(n, dtype=torch.long, device=delta.device)
        self.grad = torch.zeros_like(delta) if keep_grad else None

    def update(self, t: int, objective: Tensor, delta: Tensor, grad: Tensor | None) -> None:
        improved = objective > self.objective
        mask = improved.view(-1, *([1] * (delta.dim() - 1)))
        self.objective = torch.where(improved, objective, self.objective)
        self.delta = torch.where(mask, delta, self.delta)
        self.step = torch.where(improved, t, self.step)
        if self.grad is not None and grad is not None:
            self.grad = torch.where(mask, grad, self.grad)

    def restore(self, where: Tensor, delta: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        mask = where.view(-1, *([1] * (delta.dim() - 1)))
        return torch.where(mask, self.delta, delta), torch.where(mask, self.grad, grad)


class _ConstantStep:
    """PGD: a fixed step, no momentum, never restarts."""

    restarts_from_best = False

    def __init__(self, cfg: PGDConfig, eps_b: Tensor):
        self.length = cfg.step_size * eps_b

    def momentum(self, t: int) -> float:
        return 0.0

    def update(self, t: int, objective: Tensor, best: Tensor) -> Tensor | None:
        return None


class _AutoStep:
    """Auto-PGD's per-sample step size: halved at checkpoints where progress stalls."""

    restarts_from_best = True

    def __init__(self, cfg: PGDConfig, eps_b: Tensor):
        n, device = eps_b.shape[0], eps_b.device
        self.length = cfg.step_size * eps_b
        self.checkpoints = frozenset(apgd_checkpoints(cfg.steps))
        self.rises = torch.zeros(n, device=device)
        self.previous: Tensor | None = None
        self.since = 0
        self.best_then = torch.full((n,), -math.inf, device=device, dtype=eps_b.dtype)
        # As if the step had just been halved: the first checkpoint judges oscillation only.
        self.halved = torch.ones(n, dtype=torch.bool, device=device)

    def momentum(self, t: int) -> float:
        return 0.0 if t == 0 else APGD_MOMENTUM

    def update(self, t: int, objective: Tensor, best: Tensor) -> Tensor | None:
        if self.previous is not None:
            self.rises = self.rises + (objective > self.previous)
        self.previous = objective
        if t not in self.checkpoints:
            return None
        oscillating = self.rises <= APGD_RHO * (t - self.since)
        stalled = ~self.halved & (best <= self.best_then)
        halve = oscillating | stalled
        self.length = torch.where(halve.view_as(self.length), self.length / 2, self.length)
        self.rises = torch.zeros_like(self.rises)
        self.halved, self.best_then, self.since = halve, best, t
        return halve


class _CosineStep:
    """A step annealed from step_size * eps to 0 along half a cosine; no momentum, no restarts
    from the best point (the best iterate is kept all the same)."""

    restarts_from_best = False

    def __init__(self, cfg: PGDConfig, eps_b: Tensor):
        self.first, self.steps = cfg.step_size * eps_b, cfg.steps
        self.length = self.first

    def momentum(self, t: int) -> float:
        return 0.0

    def update(self, t: int, objective: Tensor, best: Tensor) -> Tensor | None:
        self.length = self.first * 0.5 * (1 + math.cos(math.pi * t / self.steps))
        return None


def apgd_checkpoints(steps: int) -> list[int]:
    """Steps after which Auto-PGD checks progress: 22% of the steps, then intervals shrinking by
    3% of the steps per checkpoint down to 6% (each at least one step)."""
    interval = max(int(APGD_FIRST * steps), 1)
    shrink, floor = max(int(APGD_SHRINK * steps), 1), max(int(APGD_MIN * steps), 1)
    out, t = [], interval
    while t < steps:
        out.append(t)
        interval = max(interval - shrink, floor)
        t += interval
    return out


STEP_RULES = {"pgd": _ConstantStep, "apgd": _AutoStep, "cosine": _CosineStep}


def check_objective(objective: Tensor, n: int) -> None:
    # Shapes are host metadata: this check costs no device sync.
    if not isinstance(objective, Tensor) or objective.shape != (n,):
        shape = (
            tuple(objective.shape) if isinstance(objective, Tensor) else type(objective).__name__
        )
        raise ConfigError(
            f"the objective must return one value per image, shape ({n},), got {shape}"
        )
