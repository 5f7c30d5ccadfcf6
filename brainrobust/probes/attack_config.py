"""How an attack searches (`PGDConfig`) and how fast it runs (`AttackRuntime`).

A leaf module: the step loop (`ascent.py`) and the attack (`attack.py`) both read these
settings, and neither has to import the other for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from brainrobust.checks import is_number, require_bool, require_integer
from brainrobust.errors import ConfigError
from brainrobust.probes.geometry import NORMS

AMP_DTYPES = {"bfloat16": torch.bfloat16}
# Each method's step when none is configured, relative to eps: Madry's 2.5 / 20 for PGD, Croce &
# Hein's 2 for Auto-PGD (which halves it where it is too long), and for cosine, which anneals it
# to 0 (conf/attack/cosine.yaml says why), the L2 ball's diameter twice over but the L-inf cube's
# diameter once: a longer sign step pins every pixel to a face of the cube for the first half of
# the run (on the random TinyCNN at 2/255 and 8/255, 4 eps fell 0.5-2% below 2 eps).
DEFAULT_STEP_SIZE = {"pgd": 2.5 / 20, "apgd": 2.0, "cosine": {"l2": 4.0, "linf": 2.0}}
# Each method's `average_last` when none is configured: PGD as published; Auto-PGD also tries the
# mean of its last 3 iterates, which on the zoo's random-init CNNs did as much as doubling a short
# run's steps (their gradient turns within a small fraction of eps, so the iterates scatter);
# cosine's last iterates coincide, its step having annealed to 0.
DEFAULT_AVERAGE_LAST = {"pgd": 1, "apgd": 3, "cosine": 1}
# Each method's `conv_window` when none is configured: the last quarter of the steps, except where
# the step anneals to 0, whose last quarter still takes steps up to 0.6 eps (at step_size 4): its
# last 10%, where the step is below 2.5% of the first.
DEFAULT_CONV_WINDOW = {"pgd": 0.25, "apgd": 0.25, "cosine": 0.1}
# Settings whose None means "the method's default" (per norm where it is a dict), so that
# switching `method` alone switches them.
METHOD_DEFAULTS = {"step_size": DEFAULT_STEP_SIZE, "average_last": DEFAULT_AVERAGE_LAST,
                   "conv_window": DEFAULT_CONV_WINDOW}

METHODS = tuple(DEFAULT_STEP_SIZE)

Objective = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class PGDConfig:
    """How the attack searches; the budget (eps) is passed per call.

    Parameters
    ----------
    method : "pgd" (fixed step), "apgd" (Auto-PGD: momentum, step halving at checkpoints,
        restart from the best point) or "cosine" (the step anneals from step_size * eps to 0
        along half a cosine, no momentum; the configured default, `conf/attack/cosine.yaml`).
    norm : "l2" or "linf".
    steps : gradient steps per restart (>= 1).
    step_size : step length relative to eps (step = step_size * eps); Auto-PGD's and cosine's
        first step, which Auto-PGD halves where progress stalls and cosine anneals to 0. None: the
        method's default (`DEFAULT_STEP_SIZE`: PGD 0.125 = 2.5 / 20, the Madry convention;
        Auto-PGD 2; cosine 4 in L2, 2 in L-inf).
    random_start : start each restart at a random point of the ball (L2: Gaussian direction,
        radius uniform in [0, eps]; L-inf: uniform in the cube) instead of at delta = 0.
    restarts : independent runs; the best per sample is kept. > 1 needs random_start.
    max_restarts : None (= restarts), or more: a sample whose best value is not confirmed (its
        runner-up restart lies more than conv_spread_max below it; with one restart nothing is
        confirmed yet) restarts again, up to max_restarts in all; only those samples run where
        the objective offers `rows` (as `make_objective`'s do), else the whole batch. Images
        whose restarts found different optima get more exploration; the others cost no more.
        These restarts draw from a generator seeded by one draw of the caller's, so the
        caller's stream advances the same however many images restart.
    candidates : starts screened per restart (> 1 needs random_start): each runs
        `candidate_fraction` of `steps` steps of the method (at least one), and the restart
        continues from the best of them per sample. Cheap exploration of a rugged landscape, and
        of both signs of `abs`, which a restart otherwise commits to at its start.
    candidate_fraction : the length of each candidate's short run, as a fraction of `steps`.
    mirror_candidates : with candidates > 1, every second candidate starts at the mirror image
        (-delta, put back in the box) of the previous candidate's best point. The objectives
        that ask for a change of either sign (`abs`, `pattern`) are even to first order, so
        their optima come in near-mirror pairs that only the network's nonlinearity tells
        apart, and a run from a random start settles in one of the pair. Nothing carries over
        between restarts, so they stay independent. For one-signed objectives (`increase`,
        `decrease`) the mirror is a poor start that the screening discards, leaving half as
        many random starts in play.
    average_last : after its final iterate, a run also evaluates the mean of its last
        `average_last` iterates (Polyak averaging), scaled out to the budget's boundary and kept
        if better: one forward pass, no gradient. 1: off (runs shorter than it, and screened
        candidates, skip it). None: the method's default (`DEFAULT_AVERAGE_LAST`: PGD 1,
        Auto-PGD 3, cosine 1).
    clamp : keep x + delta in [0, 1].
    conv_window : the last fraction of the steps over which `conv_gain` is measured. None: the
        method's default (`DEFAULT_CONV_WINDOW`: 0.25; cosine 0.1).
    conv_gain_max, conv_spread_max : a result counts as converged when its best objective grew by
        at most conv_gain_max (relative) over the last conv_window of the steps, and the best
        restart is confirmed: the runner-up lies within conv_spread_max (relative) of it (with
        one restart there is nothing to confirm: NaN, not counted against it). They judge the
        result; only max_restarts acts on them.
    """

    method: str = "pgd"
    norm: str = "l2"
    steps: int = 20
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    max_restarts: int | None = None
    candidates: int = 1
    candidate_fraction: float = 0.1
    mirror_candidates: bool = False
    average_last: int | None = None
    clamp: bool = True
    conv_window: float | None = None
    conv_gain_max: float = 0.003
    conv_spread_max: float = 0.01

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"attack.method must be one of {list(METHODS)}, got {self.method!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"attack.norm must be one of {list(NORMS)}, got {self.norm!r}")
        for name, defaults in METHOD_DEFAULTS.items():
            if getattr(self, name) is None:
                value = defaults[self.method]
                object.__setattr__(self, name, value[self.norm] if isinstance(value, dict) else value)
        for name in ("random_start", "clamp", "mirror_candidates"):
            require_bool(f"attack.{name}", getattr(self, name))
        require_integer("attack.steps", self.steps, 1)
        require_integer("attack.restarts", self.restarts, 1)
        require_integer("attack.candidates", self.candidates, 1)
        require_integer("attack.average_last", self.average_last, 1)
        if self.max_restarts is not None:
            require_integer("attack.max_restarts", self.max_restarts, self.restarts)
        if not is_number(self.step_size) or not self.step_size > 0:
            raise ConfigError(
                f"attack.step_size must be a finite number > 0 (relative to eps), "
                f"got {self.step_size!r}"
            )
        for name in ("conv_gain_max", "conv_spread_max"):
            value = getattr(self, name)
            if not is_number(value) or not value >= 0:
                raise ConfigError(f"attack.{name} must be a finite number >= 0, got {value!r}")
        for name in ("conv_window", "candidate_fraction"):
            value = getattr(self, name)
            if not is_number(value) or not 0 < value <= 1:
                raise ConfigError(f"attack.{name} must be a fraction of the steps in (0, 1], "
                                  f"got {value!r}")
        for name in ("restarts", "max_restarts", "candidates"):
            if (getattr(self, name) or 1) > 1 and not self.random_start:
                raise ConfigError(f"attack.{name}={getattr(self, name)} needs "
                                  f"attack.random_start=true (runs from delta = 0 are all the "
                                  f"same run)")

    @property
    def restart_limit(self) -> int:
        return self.max_restarts or self.restarts

    @property
    def candidate_steps(self) -> int:
        return max(round(self.candidate_fraction * self.steps), 1)


@dataclass(frozen=True)
class AttackRuntime:
    """Speed switches; they change how fast PGD runs, never what it may return.

    They pay on CUDA (see benchmarks/bench_attack.py). On the 2-core CPU sandbox none of them
    did: oneDNN's fp32 convolutions are most of each step, bf16 without AMX is slower, and
    inductor's CPU code for the backward pass was 2x slower than eager.

    Parameters
    ----------
    amp_dtype : None or "bfloat16": autocast the objective (forward and backward).
        Steps, projections and norms stay in the images' dtype (fp32), and the reported objective
        of the returned delta is re-evaluated without autocast, so a half-precision rounding
        never reaches the records or the budget guarantee. It can still steer the search: bf16
        keeps about 3 significant digits of each response, so when the sought change is below
        about 1% of the response (tiny eps) the steps and the best-iterate choice get noisy,
        most of all for "pattern", whose gradient direction is the change itself.
    channels_last : run on channels_last images (convert the encoder too, with
        `encoder.to(memory_format=torch.channels_last)`, for the full gain).
    compile : wrap the objective in `torch.compile`. The first call compiles (tens of seconds);
        later calls with objectives of the same code and shapes reuse the compiled graphs. The
        restarts that max_restarts adds for a subset of the images compile for its sizes too.
    """

    amp_dtype: str | None = None
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.amp_dtype is not None and self.amp_dtype not in AMP_DTYPES:
            raise ConfigError(f"attack runtime amp_dtype must be null or one of "
                              f"{list(AMP_DTYPES)}, got {self.amp_dtype!r}")

    @classmethod
    def auto(cls, device: torch.device | str, compile: bool = False, amp: bool = True) -> AttackRuntime:
        """With `amp`, bf16 autocast + channels_last on a CUDA device with bf16; fp32 elsewhere.
        Every attacking probe takes its runtime from here (its `amp` and `compile` settings)."""
        device = torch.device(device)
        fast = amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
        return cls(amp_dtype="bfloat16" if fast else None, channels_last=fast, compile=compile)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[self.amp_dtype])

    def wrap(self, objective_fn: Objective) -> Objective:
        return torch.compile(objective_fn) if self.compile else objective_fn

