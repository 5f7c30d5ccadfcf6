"""Top right singular vectors of a network's input Jacobian, matrix-free, and subspace similarity.

For an image x and responses r = f(x) in R^V, J = dr/dx is V x D (D = 3 S^2 pixels, 150,528 at
224). The most sensitive input directions are the top eigenvectors of A = J^T J, i.e. the top
right singular vectors of J. Neither A (D x D) nor, in the randomized method, J itself is formed:
only Jacobian-vector products J v (forward mode) and vector-Jacobian products J^T u (reverse
mode) are used, vectorised with `torch.func.vmap` over the probe columns. The batch dimension
needs no loop: with the encoder in eval mode the samples of a batch are independent, so one
product with a batch of tangents returns every image's own J_b v_b.

Randomized block Krylov iteration, l = k + oversample columns per block:

    Q = orth(J^T G),  G ~ N(0, 1) V x l                  l vector-Jacobian products
    JQ = J Q                                             l Jacobian-vector products
    repeat (iteration i = 1, 2, ..., max_iters):
        JQ = U S W^T;  P = Q W[:, :l],  sigma = S[:l]     Rayleigh-Ritz, no product
        R = J^T (U S)[:, :l] - P sigma^2                  l VJPs: the Ritz residuals A p - sigma^2 p
        stop if ||r_j|| <= tol sigma_k^2 for j <= k, or if their error bound is <= tol
        B = orth(R against Q);  Q = [Q B];  JQ = [JQ, J B]   l JVPs

The residual block is orthogonal to Q (Galerkin) and spans A B_last modulo Q, so Q grows as the
block Krylov space [J^T G, A J^T G, ..., A^(i-1) J^T G] (Musco & Musco 2015) without storing A Q,
and the residuals it needs come free with the next block. After i iterations: l (2 i + 1)
products, as many as i iterations of plain subspace iteration (Halko, Martinsson & Tropp 2011,
algorithm 4.4), whose error falls like (sigma_(l+1) / sigma_k)^(2 i); the Krylov space's falls
like exp(-2 i sqrt(gap)) (Chebyshev), which is what converges a flat spectrum: on 64 singular
values 10..5 (and a tail below 5) with k = 10, l = 20 it reaches overlap 0.9996 in 5 iterations
where subspace iteration needs about 16 (0.78 at 3). The price is memory: Q holds l i columns of
D per image.

Stopping, per image: every top-k relative Ritz residual ||A p_j - sigma_j^2 p_j|| / sigma_k^2 is
<= tol or, sooner, the error bound they give is. That bound is why residuals: by Davis & Kahan's
sin-theta theorem, 1 - overlap with the exact top-k (overlap = the mean squared cosine of the
principal angles) is at most mean_j ||r_j||^2 / delta^2, delta = sigma_k^2 - sigma_(k+1)^2 the
eigengap of A (sigma_(k+1)^2 estimated as its Ritz value plus its residual). Residuals <= tol
alone give overlap >= 1 - (tol / relgap)^2, relgap = 1 - (sigma_(k+1) / sigma_k)^2, so at
tol = 1e-3 the first test certifies 0.99 down to relgap 0.01 (0.017 for 64 singular values
10..5), and it stops an image whose gap is too small to resolve; the second stops a gapped
spectrum an iteration or two sooner. The change between successive iterates' subspaces, the
other common test, is smallest where convergence is slowest (a small gap), so it stops early
exactly there. A converged image leaves the batch (the products are rebuilt for the rest), and
the batch stops when none is left or at max_iters; `Subspace` records what each image reached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, NamedTuple

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


class Subspace(NamedTuple):
    """Each image's top-k right singular vectors of J and the accuracy they reached.

    p : (B, D, k) float32, orthonormal columns ordered by decreasing singular value (the sign of
        each column is arbitrary).
    sigma : (B, k) float32, descending; the eigenvalues of J^T J are sigma ** 2.
    residual : (B, k) float32, ||J^T J p_j - sigma_j^2 p_j|| / sigma_k^2 (float rounding only,
        for the exact method); NaN where J = 0.
    error_bound : (B,) float32, the Davis-Kahan bound on 1 - overlap with the exact top-k,
        mean_j ||r_j||^2 / (sigma_k^2 - lambda_(k+1))^2, with lambda_(k+1) taken as its Ritz value
        plus its residual (an estimate: Ritz values only underestimate, and an eigenvalue lies
        within each residual); inf where that leaves no gap.
    iterations : (B,) int64, applications of J^T J the randomized method used (0: exact).
    sigma_next : (B,) float32, sigma_(k+1), for the gap sigma_(k+1) / sigma_k that says how well
        the top-k subspace is determined: a Rayleigh-Ritz value (a slight underestimate) for the
        randomized method; 0 where J's rank cannot exceed k; NaN where the randomized basis held
        only k directions (oversample 0, stopped after one iteration).
    """

    p: Tensor
    sigma: Tensor
    residual: Tensor
    error_bound: Tensor
    iterations: Tensor
    sigma_next: Tensor


def top_k_right_singular(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    k: int,
    oversample: int = 5,
    max_iters: int = 16,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    method: Literal["auto", "randomized", "exact"] = "randomized",
    chunk: int = 32,
    jvp_mode: Literal["auto", "forward", "double_vjp"] = "auto",
) -> Subspace:
    """Top-k right singular vectors and singular values of each image's Jacobian of `fn`.

    Parameters
    ----------
    fn
        (B, 3, S, S) -> (B, V), e.g. an encoder restricted to one ROI's voxels.
    x
        (B, 3, S, S) images.
    k
        Number of directions, 1 <= k <= min(V, D).
    oversample
        Extra probe columns per block of the randomized method.
    max_iters, tol
        The randomized method stops an image once each of its top-k relative Ritz residuals is
        <= tol or their error bound is, or after max_iters applications of J^T J (module
        docstring).
    generator
        Source of the Gaussian start block (on x's device); None uses the global RNG.
    method
        "randomized" (matrix-free), "exact" (V vector-Jacobian products, then an SVD of J) or
        "auto" (`choose_method`).
    chunk, jvp_mode
        See `JacobianProducts`.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if oversample < 0:
        raise ConfigError(f"oversample must be >= 0, got {oversample}")
    if max_iters < 1:
        raise ConfigError(f"max_iters must be >= 1 (each applies J^T J once), got {max_iters}")
    if not tol > 0:
        raise ConfigError(f"tol must be > 0 (a relative residual and error bound), got {tol}")
    # Parameters need no autograd graph of their own; torch.func transforms ignore no_grad.
    with torch.no_grad():
        ops = JacobianProducts(fn, x, chunk=chunk, jvp_mode=jvp_mode)
        rank_bound = min(ops.n_out, ops.n_in)
        if not 1 <= k <= rank_bound:
            raise ConfigError(
                f"k={k} must be between 1 and min(outputs, inputs) = min({ops.n_out}, {ops.n_in}); "
                f"lower k"
            )
        if method == "auto":
            method = choose_method(ops.n_out, ops.n_in, k, oversample, max_iters)
        if method == "exact":
            return _exact_top_k(ops.jacobian().float(), k)
        width = min(k + oversample, rank_bound)
        return _block_krylov(fn, x, ops, k, width, max_iters, tol, generator)


def _accuracy(norms: Tensor, s: Tensor, k: int, rank_bound: int) -> tuple[Tensor, Tensor]:
    """Relative residuals (B, k) and error bounds (B,) of `Subspace` from n >= k Ritz pairs'
    residual norms and singular values, both (B, n); n > k unless the rank bound is k."""
    eig = s**2
    eig_k = eig[:, k - 1]
    if s.shape[1] > k:
        next_eig = eig[:, k] + norms[:, k]
    else:
        next_eig = torch.full_like(eig_k, 0.0 if rank_bound == k else float("inf"))
    gap = eig_k - next_eig
    bound = (norms[:, :k] ** 2).mean(1) / gap**2
    return norms[:, :k] / eig_k[:, None], torch.where(gap > 0, bound, float("inf"))


def _sigma_after(s: Tensor, k: int, rank_bound: int) -> Tensor:
    """sigma_(k+1) from (B, n) descending singular values (see `Subspace.sigma_next`)."""
    if s.shape[1] > k:
        return s[:, k]
    return torch.full_like(s[:, 0], 0.0 if rank_bound == k else float("nan"))


def _block_krylov(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    ops: JacobianProducts,
    k: int,
    width: int,
    max_iters: int,
    tol: float,
    generator: torch.Generator | None,
) -> Subspace:
    """The randomized method of the module docstring, images leaving the batch as they converge."""
    n = x.shape[0]
    out = Subspace(
        p=x.new_empty(n, ops.n_in, k, dtype=torch.float32),
        sigma=x.new_empty(n, k, dtype=torch.float32),
        residual=x.new_empty(n, k, dtype=torch.float32),
        error_bound=x.new_empty(n, dtype=torch.float32),
        iterations=torch.zeros(n, dtype=torch.int64, device=x.device),
        sigma_next=x.new_empty(n, dtype=torch.float32),
    )
    rank_bound = min(ops.n_out, ops.n_in)
    active = torch.arange(n, device=x.device)
    q = orthonormalize(
        ops.jt(torch.randn(n, ops.n_out, width, generator=generator, device=x.device)).float()
    )
    jq = ops.j(q).float()
    # The basis cannot outgrow the input space (only tiny test inputs come near it).
    last = min(max_iters, ops.n_in // width)
    for iteration in range(1, last + 1):
        u, s_all, wh = torch.linalg.svd(jq, full_matrices=False)
        s = s_all[:, :width]
        p = q @ wh[:, :width].mT
        r = ops.jt(u[:, :, :width] * s[:, None]).float() - p * s[:, None] ** 2
        norms = torch.linalg.vector_norm(r, dim=1)
        residual, bound = _accuracy(norms, s, k, rank_bound)
        # Residuals compared unscaled, so an image whose J is 0 (0 <= 0) converges.
        converged = (norms[:, :k] <= tol * s[:, k - 1 : k] ** 2).all(1) | (bound <= tol)
        done = converged | (iteration == last)
        # One host sync per iteration, negligible next to its 2 l products.
        if done.any().item():
            idx = active[done]
            out.p[idx], out.sigma[idx] = p[done, :, :k], s[done, :k]
            out.residual[idx], out.error_bound[idx] = residual[done], bound[done]
            out.iterations[idx] = iteration
            out.sigma_next[idx] = _sigma_after(s_all[done], k, rank_bound)
            if done.all().item():
                break
            keep = ~done
            active, q, jq, r = active[keep], q[keep], jq[keep], r[keep]
            ops = JacobianProducts(fn, x[active], chunk=ops.chunk, jvp_mode=ops.jvp_mode)
        block = _next_block(q, r, generator)
        q = torch.cat([q, block], dim=2)
        jq = torch.cat([jq, ops.j(block).float()], dim=2)
    return out


def _next_block(q: Tensor, r: Tensor, generator: torch.Generator | None) -> Tensor:
    """An orthonormal basis (B, D, l) of the residuals' directions outside range(q).

    Projecting twice keeps float32 Q orthonormal to working precision (Giraud et al. 2005). A
    column that loses most of its norm in the second pass was rounding noise inside range(q):
    once the basis holds an invariant subspace of J^T J (all of J's row space, for a small ROI)
    the residuals are noise, and where J^T J lives on a coordinate subspace (pixels no output
    depends on) that noise cannot leave it. Such columns are replaced by random directions.
    """
    block = r
    while True:
        for _ in range(2):
            block, tri = torch.linalg.qr(block - q @ (q.mT @ block), mode="reduced")
        lost = tri.diagonal(dim1=-2, dim2=-1).abs() < 0.5
        if not lost.any().item():
            return block
        fresh = torch.randn(block.shape, generator=generator, device=block.device)
        block = torch.where(lost[:, None, :], fresh, block)


def choose_method(n_out: int, n_in: int, k: int, oversample: int, max_iters: int) -> str:
    """Exact (n_out products) unless that costs more than the randomized method's worst case.

    The randomized method needs l (2 i + 1) products for i iterations, at most i = max_iters,
    so "auto" never costs more products than the exact Jacobian, and is exact wherever the
    randomized method could have cost more. Small ROIs (tens of voxels, as in the synthetic twin)
    get the exact answer; real NSD ROIs (hundreds to thousands of voxels) the matrix-free method.
    """
    width = min(k + oversample, n_out, n_in)
    return "exact" if n_out <= width * (2 * max_iters + 1) else "randomized"


def _exact_top_k(jac: Tensor, k: int) -> Subspace:
    """Top-k right singular vectors and values of (B, V, D) Jacobians, exactly.

    J^T = Q R, so J = R^T Q^T and the SVD of the small factor R^T = U S W^T gives J's right
    singular vectors Q W. Same result as `torch.linalg.svd(J)` (both backward stable), but
    LAPACK's SVD of a wide V x D matrix measured 6x slower than this on 2 CPU cores.
    """
    q, r = torch.linalg.qr(jac.mT, mode="reduced")
    _, s, wh = torch.linalg.svd(r.mT, full_matrices=False)
    rank_bound = s.shape[1]
    # The randomized method's accuracy measures, so records compare across methods; one pair
    # past k for the gap.
    n = min(k + 1, rank_bound)
    p = q @ wh[:, :n].mT
    norms = torch.linalg.vector_norm(jac.mT @ (jac @ p) - p * s[:, None, :n] ** 2, dim=1)
    residual, bound = _accuracy(norms, s[:, :n], k, rank_bound)
    iterations = torch.zeros(jac.shape[0], dtype=torch.int64, device=jac.device)
    sigma_next = _sigma_after(s, k, rank_bound)
    return Subspace(p[:, :, :k], s[:, :k], residual, bound, iterations, sigma_next)


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
