"""Projected gradient ascent (PGD) on any per-sample objective, under an L2 or L-inf budget.

    delta* = argmax_{||delta_i|| <= eps_i, x_i + delta_i in [0, 1]} objective(x + delta)_i

Every sample carries its own budget eps_i, so a whole eps ladder runs as ONE batch (repeat the
images with `expand_ladder`). The step loop never synchronises with the host: the best iterate
per sample is kept with `torch.where`, and a Python branch never depends on data (the optional
early stop is the one exception, documented on `PGDConfig`). Samples are independent because
the encoder is in eval mode, so the gradient of `objective.sum()` is every sample's own gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from brainrobust.errors import BrainRobustError, ConfigError

NORMS = ("l2", "linf")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

# Floor for norms that divide, so a zero delta or a zero baseline never divides by 0.
_TINY = 1e-12
# Bisection steps on log(scale) in random_perturbation: 2**-50 relative width is far below 1e-4.
_BISECT_STEPS = 50

Objective = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class PGDConfig:
    """How PGD searches; the budget (eps) is passed per call.

    Parameters
    ----------
    norm : "l2" or "linf".
    steps : gradient steps per restart (>= 1).
    step_size : step length relative to eps (step = step_size * eps); 2.5 / steps is the Madry
        convention.
    random_start : start each restart at a random point of the ball (L2: Gaussian direction,
        radius uniform in [0, eps]; L-inf: uniform in the cube) instead of at delta = 0.
    restarts : independent runs; the best per sample is kept. > 1 needs random_start.
    clamp : keep x + delta in [0, 1].
    early_stop : stop the batch once no sample's best objective has grown by more than
        `min_gain` (relative) for `patience` steps. Checked on the host every `patience` steps,
        the only host sync of the step loop; off by default.
    patience, min_gain : the early-stop window (steps) and relative gain.
    """

    norm: str = "l2"
    steps: int = 20
    step_size: float = 2.5 / 20
    random_start: bool = True
    restarts: int = 1
    clamp: bool = True
    early_stop: bool = False
    patience: int = 5
    min_gain: float = 1e-4

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"attack.norm must be one of {list(NORMS)}, got {self.norm!r}")
        _check_int("attack.steps", self.steps, 1)
        _check_int("attack.restarts", self.restarts, 1)
        _check_int("attack.patience", self.patience, 1)
        if not _is_real(self.step_size) or not self.step_size > 0 or math.isinf(self.step_size):
            raise ConfigError(f"attack.step_size must be a finite number > 0 (relative to eps), "
                              f"got {self.step_size!r}")
        if not _is_real(self.min_gain) or not 0 <= self.min_gain < math.inf:
            raise ConfigError(f"attack.min_gain must be a finite number >= 0, "
                              f"got {self.min_gain!r}")
        if self.restarts > 1 and not self.random_start:
            raise ConfigError(f"attack.restarts={self.restarts} needs attack.random_start=true "
                              f"(restarts from delta = 0 are all the same run)")


@dataclass(frozen=True)
class AttackRuntime:
    """Speed switches; they change how fast PGD runs, never what it may return.

    They pay on CUDA (see benchmarks/bench_attack.py). On the 2-core CPU sandbox none of them
    did: oneDNN's fp32 convolutions are most of each step, bf16 without AMX is slower, and
    inductor's CPU code for the backward pass was 2x slower than eager.

    Parameters
    ----------
    amp_dtype : None, "bfloat16" or "float16": autocast the objective (forward and backward).
        Steps, projections and norms stay in the images' dtype (fp32), and the reported objective
        of the returned delta is re-evaluated without autocast, so a half-precision rounding
        never reaches the records or the budget guarantee. It can still steer the search: bf16
        keeps about 3 significant digits of each response, so when the sought change is below
        about 1% of the response (tiny eps) the steps and the best-iterate choice get noisy,
        most of all for "pattern", whose gradient direction is the change itself.
    channels_last : run on channels_last images (convert the encoder too, with
        `encoder.to(memory_format=torch.channels_last)`, for the full gain).
    compile : wrap the objective in `torch.compile`. The first call compiles (tens of seconds);
        later calls with objectives of the same code and shapes reuse the compiled graphs.
    """

    amp_dtype: str | None = None
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.amp_dtype is not None and self.amp_dtype not in AMP_DTYPES:
            raise ConfigError(f"attack runtime amp_dtype must be null or one of "
                              f"{list(AMP_DTYPES)}, got {self.amp_dtype!r}")

    @classmethod
    def auto(cls, device: torch.device | str, compile: bool = False) -> AttackRuntime:
        """bf16 autocast + channels_last on a CUDA device with bf16, plain fp32 elsewhere."""
        device = torch.device(device)
        fast = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return cls(amp_dtype="bfloat16" if fast else None, channels_last=fast, compile=compile)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[self.amp_dtype])

    def wrap(self, objective_fn: Objective) -> Objective:
        return torch.compile(objective_fn) if self.compile else objective_fn


@dataclass
class AttackResult:
    """Per-sample outcome of `pgd`.

    delta : (N, 3, S, S) best perturbation found, dtype of x.
    objective : (N,) objective at x + delta, dtype of x (re-evaluated without autocast).
    norm : (N,) achieved norm of delta in the attack's norm.
    steps_used : (N,) int64, gradient steps taken to reach the returned delta (0 = the start).
    """

    delta: Tensor
    objective: Tensor
    norm: Tensor
    steps_used: Tensor


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

    Raises ConfigError for an empty ladder or any value that is not finite and > 0.
    """
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


def expand_ladder(x: Tensor, eps_ladder: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Repeat a batch once per budget so the whole ladder is one PGD call.

    Returns
    -------
    x_rep : (E * B, ...) images, ladder-major: row e * B + b is image b at eps_ladder[e].
    eps : (E * B,) the budget of each row, dtype and device of x.
    ladder_index : (E * B,) int64, e for each row.
    """
    ladder = validate_eps(eps_ladder)
    n_eps, batch = len(ladder), x.shape[0]
    x_rep = x.repeat(n_eps, *([1] * (x.dim() - 1)))
    eps = ladder.to(device=x.device, dtype=x.dtype).repeat_interleave(batch)
    index = torch.arange(n_eps, device=x.device).repeat_interleave(batch)
    return x_rep, eps, index


def norm_of(delta: Tensor, norm: str) -> Tensor:
    """(N,) L2 or L-inf norm of each sample of `delta`."""
    dims = tuple(range(1, delta.dim()))
    if norm == "l2":
        return torch.linalg.vector_norm(delta, dim=dims)
    return delta.abs().amax(dim=dims)


def project(delta: Tensor, eps: Tensor, norm: str) -> Tensor:
    """Project each sample onto its ball ||delta_i|| <= eps_i (eps broadcastable to (N, 1, ...))."""
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, eps), -eps)
    length = torch.linalg.vector_norm(delta, dim=tuple(range(1, delta.dim())), keepdim=True)
    return delta * (eps / length.clamp_min(_TINY)).clamp(max=1.0)


def clamp_to_box(x: Tensor, delta: Tensor) -> Tensor:
    """Clip delta so x + delta stays in [0, 1].

    Clipping each component towards 0 (the interval [-x, 1 - x] contains 0) only shrinks it, so
    a delta inside a ball, L2 or L-inf, stays inside it.
    """
    return torch.maximum(torch.minimum(delta, 1.0 - x), -x)


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

    best: tuple[Tensor, Tensor, Tensor] | None = None
    with torch.enable_grad():
        for _ in range(cfg.restarts):
            delta, objective, steps = _ascend(fn, x, eps_b, cfg, generator, runtime)
            if runtime.amp_dtype is not None:
                with torch.no_grad():
                    objective = objective_fn(x + delta).to(x.dtype)
            if best is None:
                best = delta, objective, steps
            else:
                better = objective > best[1]
                best = (torch.where(better.view_as(eps_b), delta, best[0]),
                        torch.where(better, objective, best[1]),
                        torch.where(better, steps, best[2]))
    delta, objective, steps = best
    if not torch.isfinite(objective).all():
        bad = int((~torch.isfinite(objective)).sum())
        raise BrainRobustError(f"the objective was NaN or inf at every iterate for {bad} of "
                               f"{len(objective)} images; check the encoder's outputs on them")
    return AttackResult(delta=delta.contiguous(), objective=objective,
                        norm=norm_of(delta, cfg.norm), steps_used=steps)


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
    direction = _random_direction(x, norm, generator)
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

def _ascend(fn: Objective, x: Tensor, eps_b: Tensor, cfg: PGDConfig,
            generator: torch.Generator | None, runtime: AttackRuntime
            ) -> tuple[Tensor, Tensor, Tensor]:
    """One restart: (best delta, its objective, the step that reached it), per sample."""
    n = x.shape[0]
    if cfg.random_start:
        delta = _random_start(x, eps_b, cfg.norm, generator)
    else:
        delta = torch.zeros_like(x)
    delta = _constrain(x, delta, eps_b, cfg)
    # Where the gradient vanishes (delta = 0 for the pattern objective, a dead ReLU region) a
    # normalised step has no direction; this fixed random one moves the sample off the point.
    fallback = _random_direction(x, cfg.norm, generator)
    step = cfg.step_size * eps_b
    best_obj = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
    best_delta = delta
    best_step = torch.zeros(n, dtype=torch.long, device=x.device)
    for t in range(cfg.steps + 1):
        last = t == cfg.steps  # the final iterate is only evaluated, not stepped from
        delta = delta.detach().requires_grad_(not last)
        with runtime.autocast(x.device), torch.set_grad_enabled(not last):
            obj = fn(x + delta)
        _check_objective(obj, n)
        if not last:
            (grad,) = torch.autograd.grad(obj.sum(), delta)
        obj = obj.detach().to(x.dtype)
        delta = delta.detach()
        improved = obj > best_obj  # NaN never improves
        best_obj = torch.where(improved, obj, best_obj)
        best_delta = torch.where(improved.view_as(eps_b), delta, best_delta)
        best_step = torch.where(improved, t, best_step)
        if last:
            break
        delta = _constrain(x, delta + step * _direction(grad, cfg.norm, fallback), eps_b, cfg)
        if t == 0:
            window_start = best_obj
        elif cfg.early_stop and t % cfg.patience == 0:
            gain = (best_obj - window_start) / window_start.abs().clamp_min(_TINY)
            if bool((gain <= cfg.min_gain).all()):
                break
            window_start = best_obj
    return best_delta, best_obj, best_step


def _direction(grad: Tensor, norm: str, fallback: Tensor) -> Tensor:
    """Unit-norm ascent direction: normalised gradient (L2) or its sign (L-inf)."""
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    dims = tuple(range(1, grad.dim()))
    if norm == "l2":
        length = torch.linalg.vector_norm(grad, dim=dims, keepdim=True)
        direction = grad / length.clamp_min(torch.finfo(grad.dtype).tiny)
    else:
        length = grad.abs().amax(dim=dims, keepdim=True)
        direction = grad.sign()
    return torch.where(length > 0, direction, fallback)


def _constrain(x: Tensor, delta: Tensor, eps_b: Tensor, cfg: PGDConfig) -> Tensor:
    delta = project(delta, eps_b, cfg.norm)
    return clamp_to_box(x, delta) if cfg.clamp else delta


def _random_start(x: Tensor, eps_b: Tensor, norm: str, generator: torch.Generator | None) -> Tensor:
    if norm == "linf":
        return (2 * _rand(x.shape, generator, x) - 1) * eps_b
    # Direction before radius, the order torchattacks draws them in: a shared seed gives both
    # engines the same start, which is how the tests compare them step for step.
    direction = _random_direction(x, "l2", generator)
    return direction * _rand(eps_b.shape, generator, x) * eps_b


def _random_direction(x: Tensor, norm: str, generator: torch.Generator | None) -> Tensor:
    """Per sample: a uniformly random unit-L2 direction, or a random +-1 sign per pixel."""
    if norm == "linf":
        return torch.where(_rand(x.shape, generator, x) < 0.5, -1.0, 1.0).to(x.dtype)
    g = _randn(x.shape, generator, x)
    length = torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim())), keepdim=True)
    return g / length


def _rand(shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    device = generator.device if generator is not None else like.device
    out = torch.rand(shape, generator=generator, device=device, dtype=like.dtype)
    return out.to(like.device).contiguous(memory_format=_layout(like))


def _randn(shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
    device = generator.device if generator is not None else like.device
    out = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return out.to(like.device).contiguous(memory_format=_layout(like))


def _layout(like: Tensor) -> torch.memory_format:
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) \
            and not like.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_objective(obj: Tensor, n: int) -> None:
    # Shapes are host metadata: this check costs no device sync.
    if not isinstance(obj, Tensor) or obj.shape != (n,):
        shape = tuple(obj.shape) if isinstance(obj, Tensor) else type(obj).__name__
        raise ConfigError(f"the objective must return one value per image, shape ({n},), "
                          f"got {shape}")


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


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
