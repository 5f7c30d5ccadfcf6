"""The feasible set of an attack and random draws in it: per-sample L2 / L-inf balls in [0, 1].

Pure tensor functions with no host syncs, shared by the step loop (`ascent.py`) and the attack's
public API (`attack.py`, which re-exports `norm_of`, `project` and `clamp_to_box`).
"""

from __future__ import annotations

import torch
from torch import Tensor

NORMS = ("l2", "linf")

# Floor for norms that divide, so a zero delta or a zero baseline never divides by 0.
TINY = 1e-12


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
    return delta * (eps / length.clamp_min(TINY)).clamp(max=1.0)


def clamp_to_box(x: Tensor, delta: Tensor) -> Tensor:
    """Clip delta so x + delta stays in [0, 1].

    Clipping each component towards 0 (the interval [-x, 1 - x] contains 0) only shrinks it, so
    a delta inside a ball, L2 or L-inf, stays inside it.
    """
    return torch.maximum(torch.minimum(delta, 1.0 - x), -x)


def constrain(x: Tensor, delta: Tensor, eps_b: Tensor, norm: str, clamp: bool) -> Tensor:
    """The ball, then (with `clamp`) the box: a feasible delta."""
    delta = project(delta, eps_b, norm)
    return clamp_to_box(x, delta) if clamp else delta


def unit_direction(grad: Tensor, norm: str, fallback: Tensor) -> Tensor:
    """Steepest ascent direction of unit norm: normalised gradient (L2) or its sign (L-inf).

    Where the gradient vanishes or is not finite everywhere (a dead ReLU region, the pattern
    objective at delta = 0) `fallback` is used, so the sample still moves.
    """
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    dims = tuple(range(1, grad.dim()))
    if norm == "l2":
        length = torch.linalg.vector_norm(grad, dim=dims, keepdim=True)
        direction = grad / length.clamp_min(torch.finfo(grad.dtype).tiny)
    else:
        length = grad.abs().amax(dim=dims, keepdim=True)
        direction = grad.sign()
    return torch.where(length > 0, direction, fallback)


def random_start(x: Tensor, eps_b: Tensor, norm: str, generator: torch.Generator | None) -> Tensor:
    """A random point of each ball: L2 Gaussian direction with radius uniform in [0, eps];
    L-inf uniform in the cube."""
    if norm == "linf":
        return (2 * rand(x.shape, generator, x) - 1) * eps_b
    # Direction before radius, the order torchattacks draws them in: a shared seed gives both
    # engines the same start, which is how the tests compare them step for step.
    direction = random_direction(x, "l2", generator)
    return direction * rand(eps_b.shape, generator, x) * eps_b


def random_direction(x: Tensor, norm: str, generator: torch.Generator | None) -> Tensor:
    """Per sample: a uniformly random unit-L2 direction, or a random +-1 sign per pixel."""
    if norm == "linf":
        return torch.where(rand(x.shape, generator, x) < 0.5, -1.0, 1.0).to(x.dtype)
    g = randn(x.shape, generator, x)
    length = torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim())), keepdim=True)
    return g / length


def rand(shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    device = generator.device if generator is not None else like.device
    out = torch.rand(shape, generator=generator, device=device, dtype=like.dtype)
    return out.to(like.device).contiguous(memory_format=_layout(like))


def randn(shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
    device = generator.device if generator is not None else like.device
    out = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return out.to(like.device).contiguous(memory_format=_layout(like))


def _layout(like: Tensor) -> torch.memory_format:
    if (
        like.dim() == 4
        and like.is_contiguous(memory_format=torch.channels_last)
        and not like.is_contiguous()
    ):
        return torch.channels_last
    return torch.contiguous_format
