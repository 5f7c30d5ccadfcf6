"""Ridge regression from backbone features to voxels: one penalty chosen per voxel.

`fit_ridge` returns a `RidgeFit`; `brainrobust.models.readout.LinearReadout` turns it into the
last, frozen layer of the differentiable brain encoder.

The torch solvers work in the eigenbasis of the centred design, decomposed ONCE per fit: every
penalty is then a diagonal rescaling there. GCV scores a penalty with one (p, V) pass; exact
leave-one-out and K-fold still need one (n, p) @ (p, V) product per penalty. The intercept is
never penalised: X and Y are centred with the training means, the ridge is fit without
intercept and intercept = y_mean - x_mean @ W.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from brainrobust.errors import ConfigError, DataError

DEFAULT_ALPHAS = np.logspace(-2, 6, 9)

Array = np.ndarray | torch.Tensor


@dataclass
class RidgeFit:
    """A fitted ridge readout.

    `cv_scores` holds, per penalty and voxel, the score used for the choice; higher is better.
    It is the negative mean squared error of held-out predictions for every method: the GCV
    estimate ("gcv"), leave-one-out ("loo"), pooled K-fold ("kfold"), and himalaya's
    `l2_neg_loss` averaged over folds ("himalaya", which reports only the chosen penalty's
    score: the other rows are NaN).
    """

    weights: np.ndarray  # (p, V) float32
    intercept: np.ndarray  # (V,) float32
    alphas: np.ndarray  # (V,) float64, chosen penalty per voxel (values of alpha_grid)
    cv_scores: np.ndarray  # (n_alphas, V) float64
    alpha_grid: np.ndarray  # (n_alphas,) float64
    method: str


# ----------------------------------------------------------------------------- fitting


def fit_ridge(
    X: Array,
    Y: Array,
    alphas: Any = DEFAULT_ALPHAS,
    method: str = "gcv",
    cv: Any = 5,
    device: str | torch.device = "cpu",
    backend_dtype: torch.dtype = torch.float32,
    n_targets_batch: int | None = None,
) -> RidgeFit:
    """Fit ridge regression from features to voxels with one penalty per voxel.

    Parameters
    ----------
    X : (n, p) features of the training images.
    Y : (n, V) voxel responses (or (n,) for one voxel).
    alphas : penalties to try, all > 0.
    method : "gcv" (default; generalised cross-validation), "loo" (exact leave-one-out, as
        scikit-learn's RidgeCV), "kfold" (K-fold CV) or "himalaya" (himalaya's RidgeCV,
        torch_cuda backend when `device` is a CUDA device, else numpy).
    cv : folds for "kfold" and "himalaya": an int (contiguous KFold) or a scikit-learn splitter.
    device : torch device of the computation.
    backend_dtype : torch.float32 or torch.float64, the dtype of the design and of the scorers'
        products; eigendecompositions and the products that carry the responses into the
        weights always run in float64.
    n_targets_batch : voxels per batch (bounds memory); None fits all voxels at once.

    Returns
    -------
    RidgeFit
    """
    solver = SOLVERS.get(method)
    if solver is None:
        raise ConfigError(f"unknown ridge method {method!r}; choose one of {sorted(SOLVERS)}")
    grid = _check_alphas(alphas)
    dev = _check_device(device)
    if backend_dtype not in (torch.float32, torch.float64):
        raise ConfigError(
            f"backend_dtype={backend_dtype} is not supported; use torch.float32 or torch.float64"
        )
    Xt, Yt = _check_data(X, Y, dev)
    n_targets = Yt.shape[1]
    if n_targets_batch is not None and (
        not isinstance(n_targets_batch, int) or n_targets_batch < 1
    ):
        raise ConfigError(f"n_targets_batch={n_targets_batch!r} must be a positive int or None")
    batch = n_targets_batch or n_targets

    Xc, x_mean = _centre(Xt, "X", backend_dtype)
    Yc, y_mean = _centre(Yt, "Y", backend_dtype)
    del Xt, Yt
    weights, chosen, scores = solver(Xc, Yc, grid, cv, batch)
    # float64 keeps large feature offsets from eating the intercept's precision
    intercept = y_mean.cpu().numpy() - x_mean.cpu().numpy() @ weights.astype(np.float64)
    return RidgeFit(
        weights=weights,
        intercept=intercept.astype(np.float32),
        alphas=chosen,
        cv_scores=scores,
        alpha_grid=grid,
        method=method,
    )


def _check_alphas(alphas: Any) -> np.ndarray:
    grid = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if grid.ndim != 1 or grid.size == 0:
        raise ConfigError(
            "ridge alphas must be a non-empty 1-d list of penalties, e.g. logspace(-2, 6, 9)"
        )
    if not np.all(np.isfinite(grid)) or np.any(grid <= 0):
        raise ConfigError(f"ridge alphas must be finite and > 0, got {grid.tolist()}")
    return grid


def _check_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} requested but CUDA is not available; set device=cpu")
    return dev


def _as_tensor(a: Array, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()  # torch refuses to wrap read-only (memory-mapped) arrays without a warning
    t = torch.as_tensor(a, device=device)
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise DataError(f"ridge {name} has dtype {t.dtype}; pass real-valued features/responses")
    if not t.is_floating_point():
        return t.to(torch.float64)
    return t if torch.finfo(t.dtype).bits >= 32 else t.float()  # centring needs >= float32


def _check_data(X: Array, Y: Array, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    Xt, Yt = _as_tensor(X, "X", device), _as_tensor(Y, "Y", device)
    if Yt.ndim == 1:
        Yt = Yt[:, None]
    if Xt.ndim != 2 or Yt.ndim != 2:
        raise DataError(
            f"ridge needs X (n, p) and Y (n, V); got X {tuple(Xt.shape)}, Y {tuple(Yt.shape)}"
        )
    if Xt.shape[0] != Yt.shape[0]:
        raise DataError(
            f"X has {Xt.shape[0]} samples but Y has {Yt.shape[0]}; features and responses must list the same images"
        )
    if Xt.shape[0] < 3 or Xt.shape[1] < 1 or Yt.shape[1] < 1:
        raise DataError(
            f"ridge needs >= 3 samples, >= 1 feature and >= 1 voxel; got X {tuple(Xt.shape)}, Y {tuple(Yt.shape)}"
        )
    return Xt, Yt


def _centre(a: torch.Tensor, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract the float64 column means, returning (centred in `dtype`, means).

    The mean is split into its value in a's dtype plus the remainder that cast dropped: both
    subtractions then round only their result, so large feature offsets cost no precision.
    A column holding NaN or inf has a non-finite mean, which is how it is detected (one pass).
    """
    mean = a.mean(0, dtype=torch.float64)
    if not bool(torch.isfinite(mean).all()):
        raise DataError(f"ridge {name} contains NaN or inf; drop or impute those samples first")
    if torch.finfo(dtype).bits > torch.finfo(a.dtype).bits:
        a = a.to(dtype)
    head = mean.to(a.dtype)
    centred = a - head
    centred -= (mean - head.double()).to(a.dtype)
    return centred.to(dtype), mean


# ----------------------------------------------------------------------------- eigenbasis


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run a CPU eigendecomposition on one thread. MKL's threaded symmetric eigensolver is
    memory-bound and collapses when cores are shared: 2048 x 2048 on 2 cores took 3.8 s idle
    with 2 threads, 4.5 s with 1, but 45 s with 2 threads beside another job."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Eigenbasis:
    """Centred design X (n, p) rotated onto orthonormal feature directions: A = X @ basis with
    A^T A = diag(eigvals), decomposing X^T X (p <= n) or X X^T (n < p), whichever is smaller.
    The ridge solution for penalty a is basis @ (z / (eigvals + a)) with z = A^T y.

    Directions whose eigenvalue is below the rounding noise of a Gram matrix in X's dtype are
    dropped (they carry no signal at that precision and 1 / eigval would amplify their noise);
    at most n - 1 remain, centring having removed one. `spans_samples` says the kept directions
    span all centred sample space, so nothing of a centred y lies outside them.

    The Gram matrix, the basis and the products with the responses (`project`, `weights`) are
    float64 whatever X's dtype: their rounding is amplified by up to cond(X) on its way into
    the weights, and in float32 it moved weights by 1e-4 of their scale, differently for each
    voxel batch size and CPU (BLAS kernels choose their summation order from the matrix shapes
    and the instruction set). In float64 the weights are exact to far below their float32
    rounding, so a fit does not depend on the batch size or the machine. Only the design and
    `transform`, which feed the per-penalty products of the LOO and K-fold scores, are in X's
    dtype.
    """

    def __init__(self, X: torch.Tensor):
        n, p = X.shape
        eps = torch.finfo(X.dtype).eps
        X64 = X.double()
        gram = (X64.T @ X64) if p <= n else (X64 @ X64.T)
        with _one_cpu_thread(gram.device):
            eigvals, vecs = torch.linalg.eigh(gram)  # ascending
        floor = eigvals[-1].clamp_min(0.0) * eps * math.sqrt(max(n, p))
        n_keep = min(int((eigvals > floor).sum()), n - 1)
        eigvals, vecs = eigvals[len(eigvals) - n_keep :], vecs[:, len(eigvals) - n_keep :]
        basis64 = vecs if p <= n else (X64.T @ vecs) / eigvals.sqrt()
        self.eigvals = eigvals  # (k,) float64
        self.basis = basis64.to(X.dtype)  # (p, k)
        self.spans_samples = n_keep == n - 1
        self._X64 = X64
        self._basis64 = basis64
        self._design: torch.Tensor | None = None

    def project(self, Y: torch.Tensor) -> torch.Tensor:
        """z = A^T Y, (k, b) float64."""
        return self._basis64.T @ (self._X64.T @ Y.double())

    def transform(self, X_new: torch.Tensor) -> torch.Tensor:
        """Rotated features X_new @ basis, (m, k)."""
        return X_new @ self.basis

    @property
    def design(self) -> torch.Tensor:
        """A = X @ basis in the basis' dtype, computed once on first use."""
        if self._design is None:
            self._design = (self._X64 @ self._basis64).to(self.basis.dtype)
        return self._design

    def coefs(self, z: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        """Rotated coefficients z / (eigvals + alpha); alphas (b,) per column or (,) shared."""
        shrink = 1.0 / (self.eigvals[:, None] + alphas.reshape(1, -1))
        return z * shrink.to(z.dtype)

    def weights(self, coefs: torch.Tensor) -> torch.Tensor:
        """basis @ coefs, (p, b) float64."""
        return self._basis64 @ coefs


# A scorer is built once per fit (it may precompute what does not depend on the voxels) and then
# called per voxel batch: score(columns, z float64) -> (n_alphas, b) float64, higher is better.
# GCV and LOO split every residual into the part outside the kept directions (independent of the
# penalty) and the in-span part a / (l + a) * (component): near interpolation (n < p, small a)
# the usual "1 - leverage" and "y - fit" forms cancel to noise in float32, these do not.
Scorer = Callable[[slice, torch.Tensor], torch.Tensor]
ScorerFactory = Callable[[_Eigenbasis, torch.Tensor, torch.Tensor, torch.Tensor, Any], Scorer]


def _gcv_scorer(
    eig: _Eigenbasis, X: torch.Tensor, Y: torch.Tensor, grid: torch.Tensor, cv: Any
) -> Scorer:
    """Negative GCV error ||y - X w_a||^2 / n / (1 - dof_a / n)^2, dof_a = tr(hat) + 1 (intercept).

    In the eigenbasis ||y - X w_a||^2 = ||y_out||^2 + sum_k z_k^2 a^2 / (l_k (l_k + a)^2) and
    n - dof_a = (n - 1 - k) + sum_k a / (l_k + a): one (n_alphas, k) @ (k, b) product per batch.
    """
    n, k = X.shape[0], len(eig.eigvals)
    lam, a = eig.eigvals[:, None], grid[None, :]
    in_span_gain = (a**2 / (lam * (lam + a) ** 2)).T  # (n_alphas, k)
    resid_dof = (n - 1 - k) + (a / (lam + a)).sum(0)  # > 0 for every a > 0
    denom = (resid_dof / n) ** 2

    def score(cols: slice, z: torch.Tensor) -> torch.Tensor:
        z_sq = z.square()
        if eig.spans_samples:
            out_rss = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
        else:
            y_sq = Y[:, cols].double().square().sum(0)
            out_rss = (y_sq - (z_sq / lam).sum(0)).clamp_min(0.0)
        rss = out_rss[None, :] + in_span_gain @ z_sq
        return -(rss / n) / denom[:, None]

    return score


def _loo_scorer(
    eig: _Eigenbasis, X: torch.Tensor, Y: torch.Tensor, grid: torch.Tensor, cv: Any
) -> Scorer:
    """Negative mean squared leave-one-out error, as scikit-learn's RidgeCV (cv=None,
    fit_intercept=True): looe_i = r_i / (1 - h_ii - 1/n), 1/n being the intercept's leverage.

    With u_ik^2 = A_ik^2 / l_k: 1 - h_ii - 1/n = out_i + sum_k u_ik^2 a / (l_k + a) where
    out_i = 1 - 1/n - sum_k u_ik^2, and r = y_out + A (z a / (l (l + a))).
    """
    n = X.shape[0]
    A = eig.design
    lam = eig.eigvals[:, None]
    u_sq = A.square() / eig.eigvals.to(A.dtype)  # (n, k)
    if eig.spans_samples:
        out_lev = torch.zeros(n, 1, dtype=A.dtype, device=A.device)
    else:
        out_lev = (1.0 - 1.0 / n - u_sq.sum(1, keepdim=True)).clamp_min(0.0)
    keep = out_lev + u_sq @ (grid[None, :] / (lam + grid[None, :])).to(A.dtype)  # (n, n_alphas)
    in_span = (grid[None, :] / (lam * (lam + grid[None, :]))).to(A.dtype)  # (k, n_alphas)

    def score(cols: slice, z: torch.Tensor) -> torch.Tensor:
        z = z.to(A.dtype)
        y_out = 0.0 if eig.spans_samples else Y[:, cols] - A @ (z / lam.to(z.dtype))
        out = torch.empty(len(grid), z.shape[1], dtype=torch.float64, device=z.device)
        for j in range(len(grid)):
            residual = y_out + A @ (z * in_span[:, j : j + 1])
            out[j] = -(residual / keep[:, j : j + 1]).square().sum(0, dtype=torch.float64) / n
        return out

    return score


def _kfold_scorer(
    eig: _Eigenbasis, X: torch.Tensor, Y: torch.Tensor, grid: torch.Tensor, cv: Any
) -> Scorer:
    """Negative held-out mean squared error pooled over K folds; each training part is centred
    with its own means and decomposed once for all penalties."""
    n = X.shape[0]
    folds = []
    for train, val in _splitter(cv, n).split(np.zeros((n, 1))):
        train_t = torch.as_tensor(train, device=X.device)
        val_t = torch.as_tensor(val, device=X.device)
        x_mean = X[train_t].mean(0)
        fold_eig = _Eigenbasis(X[train_t] - x_mean)
        folds.append((train_t, val_t, fold_eig, fold_eig.transform(X[val_t] - x_mean)))

    def score(cols: slice, z: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(grid), z.shape[1], dtype=torch.float64, device=z.device)
        for train, val, fold_eig, rotated_val in folds:
            Ytr = Y[train, cols]
            y_mean = Ytr.mean(0)
            z_fold = fold_eig.project(Ytr - y_mean)
            target = Y[val, cols] - y_mean
            for j in range(len(grid)):
                coefs = fold_eig.coefs(z_fold, grid[j]).to(rotated_val.dtype)
                residual = target - rotated_val @ coefs
                out[j] -= residual.square().sum(0, dtype=torch.float64)
        return out / n

    return score


def _splitter(cv: Any, n: int) -> Any:
    from sklearn.model_selection import KFold

    if isinstance(cv, (int, np.integer)) and not isinstance(cv, bool):
        if not 2 <= cv <= n:
            raise ConfigError(f"cv={cv} folds is invalid for {n} samples; use an int in [2, {n}]")
        return KFold(int(cv))
    if hasattr(cv, "split"):
        return cv
    raise ConfigError(f"cv={cv!r} must be a number of folds or a scikit-learn splitter")


def _eigen_solver(
    make_scorer: ScorerFactory,
) -> Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]:
    def solve(X: torch.Tensor, Y: torch.Tensor, grid: np.ndarray, cv: Any, batch: int):
        eig = _Eigenbasis(X)
        grid_t = torch.as_tensor(grid, dtype=torch.float64, device=X.device)
        score = make_scorer(eig, X, Y, grid_t, cv)
        n_targets = Y.shape[1]
        weights = np.empty((X.shape[1], n_targets), dtype=np.float32)
        scores = np.empty((len(grid), n_targets), dtype=np.float64)
        best = np.empty(n_targets, dtype=np.int64)
        for start in range(0, n_targets, batch):
            cols = slice(start, start + batch)
            z = eig.project(Y[:, cols])
            s = score(cols, z)
            idx = s.argmax(0)  # first maximum, as scikit-learn keeps the first best penalty
            weights[:, cols] = eig.weights(eig.coefs(z, grid_t[idx])).float().cpu().numpy()
            scores[:, cols] = s.cpu().numpy()
            best[cols] = idx.cpu().numpy()
        return weights, grid[best], scores

    return solve


def _himalaya_solver(X: torch.Tensor, Y: torch.Tensor, grid: np.ndarray, cv: Any, batch: int):
    from himalaya.backend import get_backend, set_backend
    from himalaya.ridge import RidgeCV

    on_gpu = X.device.type == "cuda"
    splitter = _splitter(cv, X.shape[0])
    previous = get_backend()
    backend = set_backend("torch_cuda" if on_gpu else "numpy")
    try:
        model = RidgeCV(
            alphas=grid,
            cv=splitter,
            fit_intercept=False,  # X and Y arrive centred
            solver_params={"n_targets_batch": batch, "n_targets_batch_refit": batch},
        )
        if on_gpu:
            model.fit(X, Y)
        else:
            model.fit(X.cpu().numpy(), Y.cpu().numpy())
        coef = np.asarray(backend.to_numpy(model.coef_), dtype=np.float32).reshape(X.shape[1], -1)
        found = np.asarray(backend.to_numpy(model.best_alphas_), dtype=np.float64).reshape(-1)
        best_scores = np.asarray(backend.to_numpy(model.cv_scores_), dtype=np.float64).reshape(-1)
    finally:
        set_backend(previous)
    # himalaya returns exp(-log(alpha)) in the data's dtype: snap back onto the grid
    idx = np.abs(np.log(found)[None, :] - np.log(grid)[:, None]).argmin(0)
    scores = np.full((len(grid), coef.shape[1]), np.nan)
    scores[idx, np.arange(coef.shape[1])] = best_scores
    return coef, grid[idx], scores


SOLVERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
    "gcv": _eigen_solver(_gcv_scorer),
    "loo": _eigen_solver(_loo_scorer),
    "kfold": _eigen_solver(_kfold_scorer),
    "himalaya": _himalaya_solver,
}
