"""Top right singular vectors of a network's input Jacobian, matrix-free, and subspace similarity.

For an image x and responses r = f(x) in R^V, J = dr/dx is V x D (D = 3 S^2 pixels, 150,528 at
224). The most sensitive input directions are the top eigenvectors of J^T J, i.e. the top right
singular vectors of J. Neither J^T J (D x D) nor, in the randomized method, J itself is formed:
only Jacobian-vector products J v (forward mode) and vector-Jacobian products J^T u (reverse
mode) are used, vectorised with `torch.func.vmap` over the probe columns. The batch dimension
needs no loop: with the encoder in eval mode the samples of a batch are independent, so one
product with a batch of tangents returns every image's own J_b v_b.

Randomized subspace iteration (Halko, Martinsson & Tropp 2011, algorithm 4.4), l = k + oversample:

    Y = J^T G                                G ~ N(0, 1), V x l: l vector-Jacobian products
    repeat `iters` times:
        Z = orth(J orth(Y))                  l Jacobian-vector products
        Y = J^T Z                            l vector-Jacobian products
    Y = U S W^T   (thin SVD)
    P = U[:, :k], sigma = S[:k]

range(Y) is range((J^T J)^iters J^T G), so the gap sigma_k / sigma_(l+1) is raised to the power
2 iters + 1. The last step is the Rayleigh-Ritz projection of J onto range(Z): Z Z^T J =
(Z W) S U^T, so its right singular vectors come from the final J^T Z with no extra product.
Cost: l (2 iters + 1) products per image instead of the V products of the exact Jacobian.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from brainrobust.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("auto", "randomized", "exact")
JVP_MODES = ("auto", "forward", "double_vjp")


class JacobianProducts:
    """J v and J^T u for every image of a batch, vectorised over the columns of a probe block.

    Parameters
    ----------
    fn
        (B, ...) -> (B, V); samples must not interact (eval-mode BatchNorm is fine).
    x
        (B, ...) the point the Jacobian is taken at.
    chunk
        Probe columns per vectorised call: memory grows with chunk x B samples in flight.
    jvp_mode
        "forward" uses forward-mode AD (`torch.func.jvp`; the primal forward reruns per call).
        "double_vjp" differentiates the linear map u -> J^T u once more (J v = d/du <J^T u, v>),
        which needs only reverse-mode formulas, so it also works for ops without a forward-mode
        formula (some custom or fused kernels); its graph is built once per batch. On the tiny
        CNN on 2 CPU cores both cost about the same (benchmarks/bench_subspace.py). "auto" tries
        forward mode on the first call and falls back to double_vjp if it fails.
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        x: Tensor,
        chunk: int = 32,
        jvp_mode: Literal["auto", "forward", "double_vjp"] = "auto",
    ):
        if jvp_mode not in JVP_MODES:
            raise ConfigError(f"jvp_mode must be one of {JVP_MODES}, got {jvp_mode!r}")
        if chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {chunk}")
        self.fn, self.x, self.chunk, self.jvp_mode = fn, x, chunk, jvp_mode
        out, self._vjp_fn = vjp(fn, x)
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"fn must map (B, ...) to (B, V); got {tuple(x.shape)} -> {tuple(out.shape)}"
            )
        self.out = out.detach()
        self.n_out = out.shape[1]
        self.n_in = x[0].numel()
        self._double_vjp_fn: Callable | None = None

    def jt(self, u: Tensor) -> Tensor:
        """(B, V, l) cotangents -> (B, D, l) = J_b^T u_b for each image b."""
        cols = vmap(lambda c: self._vjp_fn(c)[0], in_dims=2, out_dims=-1, chunk_size=self.chunk)(
            u.to(self.out.dtype)
        )
        return cols.reshape(u.shape[0], self.n_in, u.shape[2])

    def j(self, v: Tensor) -> Tensor:
        """(B, D, l) tangents -> (B, V, l) = J_b v_b for each image b."""
        tangents = v.to(self.x.dtype).reshape(*self.x.shape, v.shape[2])
        if self.jvp_mode == "auto":
            try:
                result = self._forward(tangents)
            except (NotImplementedError, RuntimeError) as err:
                if isinstance(err, torch.OutOfMemoryError):
                    raise
                log.info("forward-mode JVP failed (%s); using the double-VJP trick", err)
                self.jvp_mode = "double_vjp"
            else:
                self.jvp_mode = "forward"
                return result
        return self._forward(tangents) if self.jvp_mode == "forward" else self._double(tangents)

    def jacobian(self) -> Tensor:
        """The full (B, V, D) Jacobian from V vector-Jacobian products (the exact reference)."""
        eye = torch.eye(self.n_out, dtype=self.out.dtype, device=self.out.device)
        return self.jt(eye.expand(self.x.shape[0], -1, -1)).transpose(1, 2)

    def _forward(self, tangents: Tensor) -> Tensor:
        return vmap(
            lambda t: jvp(self.fn, (self.x,), (t,))[1],
            in_dims=-1,
            out_dims=-1,
            chunk_size=self.chunk,
        )(tangents)

    def _double(self, tangents: Tensor) -> Tensor:
        if self._double_vjp_fn is None:
            # u -> J^T u is linear; its own VJP at any u (here 0) applied to v is J v. Built once
            # per batch, so every later call is a single backward through the stored graph.
            _, self._double_vjp_fn = vjp(
                lambda u: vjp(self.fn, self.x)[1](u)[0], torch.zeros_like(self.out)
            )
        return vmap(
            lambda t: self._double_vjp_fn(t)[0], in_dims=-1, out_dims=-1, chunk_size=self.chunk
        )(tangents)


def top_k_right_singular(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    k: int,
    oversample: int = 10,
    iters: int = 3,
    generator: torch.Generator | None = None,
    method: Literal["auto", "randomized", "exact"] = "randomized",
    chunk: int = 32,
    jvp_mode: Literal["auto", "forward", "double_vjp"] = "auto",
) -> tuple[Tensor, Tensor]:
    """Top-k right singular vectors and singular values of each image's Jacobian of `fn`.

    Parameters
    ----------
    fn
        (B, 3, S, S) -> (B, V), e.g. an encoder restricted to one ROI's voxels.
    x
        (B, 3, S, S) images.
    k
        Number of directions, 1 <= k <= min(V, D).
    oversample, iters
        Extra probe columns and subspace iterations of the randomized method (iters >= 1).
    generator
        Source of the Gaussian start block (on x's device); None uses the global RNG.
    method
        "randomized" (matrix-free), "exact" (V vector-Jacobian products, then an SVD of J) or
        "auto" (`choose_method`).
    chunk, jvp_mode
        See `JacobianProducts`.

    Returns
    -------
    P : (B, D, k) float32, orthonormal columns ordered by decreasing singular value (the sign
        of each column is arbitrary).
    sigma : (B, k) float32, descending; the eigenvalues of J^T J are sigma ** 2.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if oversample < 0:
        raise ConfigError(f"oversample must be >= 0, got {oversample}")
    if iters < 1:
        raise ConfigError(f"iters must be >= 1 (each applies J^T J once), got {iters}")
    # Parameters need no autograd graph of their own; torch.func transforms ignore no_grad.
    with torch.no_grad():
        ops = JacobianProducts(fn, x, chunk=chunk, jvp_mode=jvp_mode)
        rank_bound = min(ops.n_out, ops.n_in)
        if not 1 <= k <= rank_bound:
            raise ConfigError(
                f"k={k} must be between 1 and min(outputs, inputs) = min({ops.n_out}, {ops.n_in}); "
                f"lower k"
            )
        width = min(k + oversample, rank_bound)
        if method == "auto":
            method = choose_method(ops.n_out, ops.n_in, k, oversample, iters)
        if method == "exact":
            return _exact_top_k(ops.jacobian().float(), k)
        z = torch.randn(x.shape[0], ops.n_out, width, generator=generator, device=x.device)
        y = ops.jt(z).float()
        for _ in range(iters):
            z = orthonormalize(ops.j(orthonormalize(y)).float())
            y = ops.jt(z).float()
        u, s, _ = torch.linalg.svd(y, full_matrices=False)
        return u[:, :, :k].contiguous(), s[:, :k]


def choose_method(n_out: int, n_in: int, k: int, oversample: int, iters: int) -> str:
    """The cheaper method: "exact" needs n_out products, "randomized" l (2 iters + 1).

    Small ROIs (tens of voxels, as in the synthetic twin) get the exact answer for less work;
    real NSD ROIs (hundreds to thousands of voxels) get the matrix-free method.
    """
    width = min(k + oversample, n_out, n_in)
    return "exact" if n_out <= width * (2 * iters + 1) else "randomized"


def _exact_top_k(jac: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k right singular vectors and values of (B, V, D) Jacobians, exactly.

    J^T = Q R, so J = R^T Q^T and the SVD of the small factor R^T = U S W^T gives J's right
    singular vectors Q W. Same result as `torch.linalg.svd(J)` (both backward stable), but
    LAPACK's SVD of a wide V x D matrix measured 6x slower than this on 2 CPU cores.
    """
    q, r = torch.linalg.qr(jac.mT, mode="reduced")
    _, s, wh = torch.linalg.svd(r.mT, full_matrices=False)
    return q @ wh[:, :k].mT, s[:, :k]


def orthonormalize(a: Tensor) -> Tensor:
    """Orthonormal basis (..., n, m) of the columns of a (..., n, m) via thin QR."""
    return torch.linalg.qr(a, mode="reduced").Q


def _as_numpy(a: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    # float32 or float64 as given (large stacks stay small); fp16 products are too coarse.
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def _cosines(p: np.ndarray | Tensor, q: np.ndarray | Tensor) -> np.ndarray:
    """Cosines of the principal angles (..., k), descending, for orthonormal (..., D, k) bases."""
    p, q = _as_numpy(p), _as_numpy(q)
    if p.shape != q.shape or p.ndim < 2:
        raise ValueError(
            f"subspaces must have equal shapes (..., D, k); got {p.shape} and {q.shape}"
        )
    cos = np.linalg.svd((np.swapaxes(p, -1, -2) @ q).astype(np.float64), compute_uv=False)
    return np.clip(cos, 0.0, 1.0)


def subspace_similarity(p: np.ndarray | Tensor, q: np.ndarray | Tensor) -> float | np.ndarray:
    """Mean squared cosine of the principal angles, ||P^T Q||_F^2 / k, for orthonormal P, Q.

    1 for the same subspace, about k / D for independent random ones. (D, k) inputs give a
    float; stacks (..., D, k) give an array of shape (...).
    """
    sim = (_cosines(p, q) ** 2).mean(axis=-1)
    return float(sim) if sim.ndim == 0 else sim


def principal_angles(p: np.ndarray | Tensor, q: np.ndarray | Tensor) -> np.ndarray:
    """Principal angles (radians, ascending) between orthonormal (..., D, k) bases."""
    return np.arccos(_cosines(p, q))


def random_baseline(k: int, d: int) -> float:
    """Expected similarity of two independent uniformly random k-dim subspaces of R^D."""
    return k / d
