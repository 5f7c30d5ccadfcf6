import warnings

import numpy as np
import pytest
import safetensors.numpy
import torch
from himalaya.backend import get_backend, set_backend
from himalaya.ridge import RidgeCV as HimalayaRidgeCV
from sklearn.linear_model import RidgeCV

from brainrobust.errors import CacheError, ConfigError, DataError
from brainrobust.models.readout import LinearReadout, pearson_r
from brainrobust.models.ridge import DEFAULT_ALPHAS, RidgeFit, fit_ridge

EPS32, EPS64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)


def planted(n=300, p=40, n_strong=15, n_weak=15, n_noise=20, offset=0.0, seed=0):
    """Correlated features; voxels with strong, weak and no signal; returns X, Y, signal mask."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((p, p)) * (np.arange(1, p + 1) ** -0.5)[:, None]
    X = rng.standard_normal((n, p)) @ mixing + offset * rng.random(p)
    B = rng.standard_normal((p, n_strong + n_weak + n_noise)) / np.sqrt(p)
    gain = np.r_[np.full(n_strong, 3.0), np.full(n_weak, 0.3), np.zeros(n_noise)]
    Y = (
        (X - X.mean(0)) @ B * gain
        + rng.standard_normal((n, B.shape[1]))
        + 2 * offset * rng.random(B.shape[1])
    )
    return X.astype(np.float32), Y.astype(np.float32), gain


def sklearn_loo(X, Y, alphas=DEFAULT_ALPHAS):
    return RidgeCV(alphas=alphas, alpha_per_target=True).fit(X, Y)


# ----------------------------------------------------------------------------- rounding bounds
# Every tolerance below is a bound of the rounding error, computed from the test's own data, so
# the assertions hold on any CPU and BLAS kernel (they choose the summation order).


def ridge_bound(X, alphas, eps):
    """Relative rounding error of a ridge solution, residual or score, per penalty: sums of at
    most n + p terms (eps each) amplified by cond(X^T X + a I) = (l_max + a) / (l_min + a) over
    the centred design's non-zero eigenvalues l."""
    n, p = X.shape
    Xc = X.astype(np.float64) - X.mean(0, dtype=np.float64)
    lam = np.linalg.svd(Xc, compute_uv=False)[: min(n - 1, p)] ** 2  # centring removes one
    alphas = np.asarray(alphas, np.float64)
    return (n + p) * eps * (lam.max() + alphas) / (lam.min() + alphas)


def decided(scores, slack):
    """Voxels whose best penalty survives any change of the (n_alphas, V) scores by up to
    `slack`: the best leads every other penalty by more than twice the largest slack."""
    ranked = np.sort(scores, axis=0)
    return ranked[-1] - ranked[-2] > 2 * np.max(slack, axis=0)


def loo_reference(X, Y, alphas=DEFAULT_ALPHAS):
    """scikit-learn's LOO fit and its (n_alphas, V) scores. It solves in float64 but stores the
    squared errors in X's dtype: the scores carry that rounding, half an ulp each."""
    ref = RidgeCV(alphas=alphas, alpha_per_target=True, store_cv_results=True).fit(X, Y)
    scores = -ref.cv_results_.mean(0, dtype=np.float64).T
    return ref, scores, np.finfo(X.dtype).eps / 2 * np.abs(scores)


def assert_within(actual, desired, bound, what):
    err = np.abs(np.asarray(actual, np.float64) - np.asarray(desired, np.float64))
    ratio = err / np.broadcast_to(bound, err.shape)
    worst = np.unravel_index(np.argmax(ratio), ratio.shape)
    assert ratio[worst] <= 1, (
        f"{what}: error {err[worst]:.3g} exceeds its rounding bound {ratio[worst]:.3g}-fold at {worst}"
    )


def on_grid(A, step=2.0**-12):
    """A rounded to multiples of `step`, its last row reset so each column's mean is a multiple
    of `step` too: sums, means and centred values are then exact in float32 and float64, so any
    code that centres A gets the same bits. |A| must stay below 2^24 * step."""
    A = np.round(np.asarray(A, np.float64) / step)
    A[-1] = len(A) * np.round(A.mean(0)) - A[:-1].sum(0)
    return (A * step).astype(np.float32)


# ----------------------------------------------------------------------------- agreement with peers


def test_readout_reproduces_himalaya_predictions():
    # On the grid our centring and the reference's give the same float32 arrays: the two himalaya
    # fits are one computation, equal to the last bit.
    X, Y = (on_grid(A) for A in planted(n=240, p=30)[:2])
    x_test = planted(n=100, p=30, seed=1)[0]
    fit = fit_ridge(X, Y, method="himalaya", cv=5)
    readout = LinearReadout.from_fit(fit)

    before = get_backend().name
    set_backend("numpy")
    try:
        x_mean, y_mean = X.mean(0, dtype=np.float64), Y.mean(0, dtype=np.float64)
        ref = HimalayaRidgeCV(alphas=DEFAULT_ALPHAS, cv=5, fit_intercept=False)
        ref.fit((X - x_mean).astype(np.float32), (Y - y_mean).astype(np.float32))
        centred_test = (x_test - x_mean).astype(np.float32)
        expected = ref.predict(centred_test) + y_mean
    finally:
        set_backend(before)
    assert get_backend().name == before  # the solver restores the caller's backend

    np.testing.assert_array_equal(fit.weights, ref.coef_)
    # himalaya reports exp(-log(alpha)) in float32: relative error eps * (1 + |log alpha|)
    alpha_err = EPS32 * (1 + np.abs(np.log(fit.alphas))) * fit.alphas
    assert_within(ref.best_alphas_, fit.alphas, alpha_err, "himalaya's alphas")
    chosen = fit.cv_scores[np.searchsorted(fit.alpha_grid, fit.alphas), np.arange(len(fit.alphas))]
    np.testing.assert_array_equal(chosen, ref.cv_scores_)

    with torch.no_grad():
        ours = readout(torch.from_numpy(x_test)).numpy()
    # The same weights in two float32 evaluations, x @ W + (y_mean - x_mean @ W) and
    # (x - x_mean) @ W + y_mean: (p + 1)-term sums, plus one rounding of the centring.
    W = np.abs(fit.weights).astype(np.float64)
    terms = np.abs(x_test) @ W + np.abs(fit.intercept) + np.abs(centred_test) @ W + np.abs(y_mean)
    assert_within(ours, expected, (X.shape[1] + 2) * EPS32 * terms, "predictions")


@pytest.mark.parametrize("n, p", [(300, 40), (60, 150)], ids=["tall", "wide"])
def test_loo_alphas_equal_sklearn(n, p):
    X, Y, _ = planted(n=n, p=p, offset=5.0)
    ref, ref_scores, stored = loo_reference(X, Y)
    exact = fit_ridge(X, Y, method="loo", backend_dtype=torch.float64)
    # a score is a mean of squared residuals: twice their relative error
    err64 = 2 * ridge_bound(X, DEFAULT_ALPHAS, EPS64)[:, None] * np.abs(ref_scores)
    assert_within(exact.cv_scores, ref_scores, err64 + stored, "float64 LOO scores")
    # sklearn chooses with its own float64 scores: the same penalties, as no float64 rounding
    # of either side can reorder the penalties of any voxel
    assert decided(exact.cv_scores, 2 * err64).all()
    np.testing.assert_array_equal(exact.alphas, ref.alpha_)

    fit = fit_ridge(X, Y, method="loo")
    err32 = 2 * ridge_bound(X, DEFAULT_ALPHAS, EPS32)[:, None] * np.abs(exact.cv_scores)
    assert_within(fit.cv_scores, exact.cv_scores, err32, "float32 LOO scores")
    same = decided(exact.cv_scores, np.abs(fit.cv_scores - exact.cv_scores))
    np.testing.assert_array_equal(fit.alphas[same], ref.alpha_[same])
    agree = fit.alphas == ref.alpha_
    w_err = ridge_bound(X, fit.alphas, EPS32) * np.linalg.norm(exact.weights, axis=0)
    assert_within(fit.weights[:, agree], exact.weights[:, agree], w_err[agree], "float32 weights")
    # pred = y_mean + (x - x_mean) @ W exactly, so weight errors reach it through |x - x_mean|;
    # both sides then round x @ W + intercept in float32, p + 1 terms
    pred = X @ fit.weights + fit.intercept
    centred = np.linalg.norm(X - X.mean(0, dtype=np.float64), axis=1)
    terms = np.abs(X) @ np.abs(fit.weights.astype(np.float64)) + np.abs(fit.intercept)
    pred_err = centred[:, None] * w_err + 2 * (p + 1) * EPS32 * terms
    assert_within(pred[:, agree], ref.predict(X)[:, agree], pred_err[:, agree], "predictions")


def test_gcv_matches_sklearn_test_r_and_picks_sensible_alphas():
    X_all, Y_all, gain = planted(n=700, p=50, n_strong=20, n_weak=20, n_noise=40)
    X, Y, x_test, y_test = X_all[:400], Y_all[:400], X_all[400:], Y_all[400:]

    fit = fit_ridge(X, Y, method="gcv")
    ref = sklearn_loo(X, Y)
    r_ours = pearson_r(y_test, x_test @ fit.weights + fit.intercept)
    r_ref = pearson_r(y_test, ref.predict(x_test))
    signal = gain > 0
    assert abs(r_ours[signal].mean() - r_ref[signal].mean()) < 0.01
    assert r_ours[gain == 3.0].mean() > 0.8
    assert np.median(fit.alphas[gain == 3.0]) <= 10.0
    # pure noise: shrink everything away; the largest penalty for most voxels
    assert np.median(fit.alphas[~signal]) == DEFAULT_ALPHAS[-1]
    assert (
        fit.alphas[gain == 3.0].max()
        < fit.alphas[gain == 0.3].min()
        <= fit.alphas[gain == 0.3].max()
        <= fit.alphas[~signal].min()
    )
    assert np.mean(fit.alphas == ref.alpha_) >= 0.9  # GCV and LOO mostly agree


@pytest.mark.parametrize("n, p", [(50, 10), (30, 60)], ids=["tall", "wide"])
def test_gcv_scores_equal_explicit_hat_matrix(n, p):
    X, Y, _ = planted(n=n, p=p, n_strong=3, n_weak=3, n_noise=2, offset=3.0)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    fit = fit_ridge(X, Y, method="gcv", backend_dtype=torch.float64)
    Xc = X64 - X64.mean(0)
    cond = ridge_bound(X, DEFAULT_ALPHAS, EPS64)
    for i, alpha in enumerate(DEFAULT_ALPHAS):
        hat = Xc @ np.linalg.solve(Xc.T @ Xc + alpha * np.eye(p), Xc.T) + 1.0 / n
        residual = Y64 - hat @ Y64
        dof = np.trace(hat)
        gcv = (residual**2).mean(0) / (1 - dof / n) ** 2
        # residual and n - dof are differences: their relative errors grow by |y| / |residual|
        # and n / (n - dof); both enter squared
        growth = np.linalg.norm(Y64, axis=0) / np.linalg.norm(residual, axis=0) + n / (n - dof)
        assert_within(-fit.cv_scores[i], gcv, 2 * cond[i] * growth * gcv, f"GCV, alpha {alpha}")


def test_kfold_scores_equal_explicit_folds():
    X, Y, _ = planted(n=120, p=12, n_strong=4, n_weak=4, n_noise=4, offset=2.0)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    fit = fit_ridge(X, Y, method="kfold", cv=4, backend_dtype=torch.float64)
    expected = np.zeros((len(DEFAULT_ALPHAS), Y.shape[1]))
    err = np.zeros_like(expected)  # bound of the rounding error of `expected`, and of ours
    for val in np.array_split(np.arange(120), 4):
        train = np.setdiff1d(np.arange(120), val)
        xm, ym = X64[train].mean(0), Y64[train].mean(0)
        Xt = X64[train] - xm
        cond = ridge_bound(X[train], DEFAULT_ALPHAS, EPS64)
        for i, alpha in enumerate(DEFAULT_ALPHAS):
            W = np.linalg.solve(Xt.T @ Xt + alpha * np.eye(12), Xt.T @ (Y64[train] - ym))
            target = Y64[val] - ym
            sq = ((target - (X64[val] - xm) @ W) ** 2).sum(0)
            expected[i] -= sq
            # a squared residual's relative error: twice the solve's, grown by |target| / |residual|
            growth = np.linalg.norm(target, axis=0) / np.sqrt(sq)
            err[i] += 2 * cond[i] * growth * sq
    assert_within(fit.cv_scores, expected / 120, 2 * err / 120, "K-fold scores")
    assert decided(expected, 2 * err).all()  # no rounding can change the best penalties
    np.testing.assert_array_equal(fit.alphas, DEFAULT_ALPHAS[expected.argmax(0)])


def test_target_batches_give_the_same_fit():
    X, Y, _ = planted()
    whole = fit_ridge(X, Y, method="loo")
    batched = fit_ridge(X, Y, method="loo", n_targets_batch=7)
    # LOO scores use float32 products, whose rounding depends on the batch's shape
    err32 = 2 * ridge_bound(X, DEFAULT_ALPHAS, EPS32)[:, None] * np.abs(whole.cv_scores)
    assert_within(batched.cv_scores, whole.cv_scores, err32, "batched LOO scores")
    same = decided(whole.cv_scores, np.abs(batched.cv_scores - whole.cv_scores))
    np.testing.assert_array_equal(batched.alphas[same], whole.alphas[same])
    # The weights are float64 products: batching moves them by float64 rounding, far below
    # float32's, so they round to the same float32 except across a rounding boundary (1 ulp).
    agree = batched.alphas == whole.alphas
    w = whole.weights[:, agree]
    err64 = ridge_bound(X, whole.alphas[agree], EPS64) * np.linalg.norm(w, axis=0)
    assert_within(batched.weights[:, agree], w, EPS32 * np.abs(w) + err64, "batched weights")


# ----------------------------------------------------------------------------- intercept and module


def test_intercept_with_large_offsets():
    X_all, Y_all, _ = planted(n=400, p=20, offset=1000.0)
    X, Y, x_test = X_all[:300], Y_all[:300], X_all[300:]
    n, p = X.shape
    alphas = [1.0, 10.0]
    ref, ref_scores, _ = loo_reference(X.astype(np.float64), Y.astype(np.float64), alphas)
    exact = fit_ridge(X, Y, method="loo", alphas=alphas, backend_dtype=torch.float64)
    err64 = 2 * ridge_bound(X, alphas, EPS64)[:, None] * np.abs(ref_scores)
    assert decided(exact.cv_scores, 2 * err64).all()
    np.testing.assert_array_equal(exact.alphas, ref.alpha_)
    # intercept = y_mean - x_mean @ W with W the stored float32 weights: their rounding (half an
    # ulp) times offsets of 1000 dominates; then float64 sums (n + p terms) and one float32 rounding
    x_mean, y_mean = X.mean(0, dtype=np.float64), Y.mean(0, dtype=np.float64)
    terms = np.abs(x_mean) @ np.abs(ref.coef_.T) + np.abs(y_mean)
    w_err = ridge_bound(X, exact.alphas, EPS64) * np.linalg.norm(ref.coef_.T, axis=0)
    bound = EPS32 / 2 * (terms + np.abs(ref.intercept_)) + np.linalg.norm(x_mean) * w_err
    assert_within(exact.intercept, ref.intercept_, bound + (n + p) * EPS64 * terms, "intercept")

    fit = fit_ridge(X, Y, method="loo", alphas=alphas)
    W = fit.weights.astype(np.float64)
    expected = y_mean - x_mean @ W
    terms = np.abs(x_mean) @ np.abs(W) + np.abs(y_mean)
    # our float64 formula on the same weights: float64 sums, then one float32 rounding (half an
    # ulp, at most eps / 2 relative; eps also covers the float64 sums straddling a rounding tie)
    bound = EPS32 * np.abs(expected) + (n + p) * EPS64 * terms
    assert_within(fit.intercept, expected, bound, "intercept of the float32 fit")

    readout = LinearReadout.from_fit(fit)
    with torch.no_grad():
        at_mean = readout(torch.from_numpy(x_mean.astype(np.float32)[None])).numpy()[0]
        pred = readout(torch.from_numpy(x_test)).numpy()
    # The intercept makes the readout exact at the mean features but for float32 rounding: of
    # x_mean, of the (p + 1)-term forward, and of the intercept itself
    forward = np.abs(x_mean) @ np.abs(W) + np.abs(fit.intercept)
    bound = (p + 2) * EPS32 * forward + (n + p) * EPS64 * terms
    assert_within(at_mean, y_mean, bound, "readout at the mean features")
    # Against sklearn's float64 fit: the float32 fit's weight error reaches a prediction through
    # |x - x_mean| (the intercept cancels x_mean @ W), then a float32 forward at offsets of 1000.
    agree = fit.alphas == ref.alpha_
    w_err = ridge_bound(X, fit.alphas, EPS32) * np.linalg.norm(ref.coef_.T, axis=0)
    centred = np.linalg.norm(x_test - x_mean, axis=1)
    forward = np.abs(x_test) @ np.abs(W) + np.abs(fit.intercept)
    bound = centred[:, None] * w_err + (p + 2) * EPS32 * forward
    assert_within(pred[:, agree], ref.predict(x_test)[:, agree], bound[:, agree], "predictions")


def test_readout_is_fixed_but_passes_gradients_to_features():
    X, Y, _ = planted(n=100, p=8, n_strong=2, n_weak=1, n_noise=1)
    readout = LinearReadout.from_fit(fit_ridge(X, Y))
    assert list(readout.parameters()) == []
    feats = torch.from_numpy(X[:5]).requires_grad_(True)
    readout(feats).sum().backward()
    # the gradient sums each feature's V weights in a matrix product, the reference in sum(1):
    # two float32 orders of V terms
    W = readout.weights.numpy()
    bound = W.shape[1] * EPS32 * np.abs(W).sum(1)
    assert_within(feats.grad.numpy(), np.tile(W.sum(1), (5, 1)), bound, "feature gradient")
    with pytest.raises(DataError, match="expects 8 features"):
        readout(torch.zeros(2, 9))


def test_save_load_round_trip(tmp_path):
    X, Y, _ = planted(n=100, p=8, n_strong=2, n_weak=1, n_noise=1)
    fit = fit_ridge(X, Y)
    readout = LinearReadout.from_fit(fit)
    meta = {
        "model": "resnet18_random",
        "layer": "avgpool",
        "subject": 1,
        "rois": ["FFA", "PPA"],
        "train_ids_sha256": "ab12",
    }
    path = tmp_path / "readout.safetensors"
    readout.save(path, meta)

    raw = safetensors.numpy.load_file(path)
    np.testing.assert_array_equal(raw["weights"], fit.weights)
    np.testing.assert_array_equal(raw["intercept"], fit.intercept)
    np.testing.assert_array_equal(raw["alphas"], fit.alphas)

    loaded, stored = LinearReadout.load(
        path, expect={"model": "resnet18_random", "rois": ("FFA", "PPA"), "subject": 1}
    )
    assert {k: stored[k] for k in meta} == meta
    assert stored["method"] == "gcv" and stored["alpha_grid"] == DEFAULT_ALPHAS.tolist()
    for name in ("weights", "intercept", "alphas"):
        assert torch.equal(getattr(loaded, name), getattr(readout, name))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_load_refuses_other_keys_and_damaged_files(tmp_path):
    X, Y, _ = planted(n=100, p=8, n_strong=2, n_weak=1, n_noise=1)
    path = tmp_path / "readout.safetensors"
    LinearReadout.from_fit(fit_ridge(X, Y)).save(path, {"model": "a", "subject": 1})

    with pytest.raises(CacheError, match="readout.safetensors.*subject=1"):
        LinearReadout.load(path, expect={"subject": 2})
    with pytest.raises(CacheError, match="layer=None"):
        LinearReadout.load(path, expect={"layer": "avgpool"})

    blob = path.read_bytes()
    for cut in (len(blob) - 10, 20, 4):
        path.write_bytes(blob[:cut])
        with pytest.raises(CacheError, match=str(path)):
            LinearReadout.load(path)
    with pytest.raises(CacheError, match="does not exist"):
        LinearReadout.load(tmp_path / "missing.safetensors")
    safetensors.numpy.save_file({"weights": np.zeros((8, 4), np.float32)}, path)
    with pytest.raises(CacheError, match="not a"):
        LinearReadout.load(path)


def test_save_refuses_metadata_that_contradicts_the_fit(tmp_path):
    X, Y, _ = planted(n=100, p=8, n_strong=2, n_weak=1, n_noise=1)
    readout = LinearReadout.from_fit(fit_ridge(X, Y, method="loo"))
    with pytest.raises(ConfigError, match="method"):
        readout.save(tmp_path / "r.safetensors", {"method": "gcv"})


# ----------------------------------------------------------------------------- bad input and metric


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda X, Y: (np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X), Y),
            DataError,
            "NaN or inf",
        ),
        (
            lambda X, Y: (X, np.where(np.arange(Y.size).reshape(Y.shape) == 3, np.inf, Y)),
            DataError,
            "NaN or inf",
        ),
        (lambda X, Y: (X, Y[:-1]), DataError, "same images"),
    ],
    ids=["nan-X", "inf-Y", "n-mismatch"],
)
def test_bad_data(change, error, message):
    X, Y, _ = planted(n=50, p=5, n_strong=1, n_weak=1, n_noise=1)
    with pytest.raises(error, match=message):
        fit_ridge(*change(X, Y))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alphas": []}, "non-empty"),
        ({"alphas": [1.0, 0.0]}, "> 0"),
        ({"alphas": [-1.0]}, "> 0"),
        ({"method": "lasso"}, "'gcv', 'himalaya', 'kfold', 'loo'"),
        ({"method": "kfold", "cv": 1}, "cv=1"),
        ({"n_targets_batch": 0}, "n_targets_batch"),
    ],
)
def test_bad_config(kwargs, message):
    X, Y, _ = planted(n=50, p=5, n_strong=1, n_weak=1, n_noise=1)
    with pytest.raises(ConfigError, match=message):
        fit_ridge(X, Y, **kwargs)


def test_pearson_r():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 3)), rng.standard_normal((50, 3))
    b[:, 1] = 2 * a[:, 1] + 1
    a[:, 2] = 0.1  # constant column: r = 0, no division warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = pearson_r(a, torch.from_numpy(b))
    assert r.shape == (3,)
    # float64 sums of n products on both sides, and |r| <= 1: an absolute error of a few n * eps
    sums = 4 * len(a) * EPS64
    assert r[0] == pytest.approx(np.corrcoef(a[:, 0], b[:, 0])[0, 1], abs=sums)
    assert r[1] == pytest.approx(1.0, abs=sums) and r[2] == 0.0
    assert pearson_r(a[:, 0], b[:, 0]).shape == (1,)
    with pytest.raises(DataError):
        pearson_r(a, b[:-1])


def test_ridge_fit_shapes_and_dtypes():
    X, Y, _ = planted(n=80, p=6, n_strong=2, n_weak=1, n_noise=1)
    fit = fit_ridge(X, Y[:, 0])  # one voxel as a vector
    assert isinstance(fit, RidgeFit)
    assert fit.weights.shape == (6, 1) and fit.weights.dtype == np.float32
    assert fit.intercept.shape == (1,) and fit.intercept.dtype == np.float32
    assert fit.cv_scores.shape == (9, 1) and fit.alpha_grid.shape == (9,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["gcv", "loo", "himalaya"])
def test_cuda_fit_equals_cpu(method):
    X, Y, _ = planted()
    cpu = fit_ridge(X, Y, method=method, backend_dtype=torch.float64)
    gpu = fit_ridge(X, Y, method=method, device="cuda", backend_dtype=torch.float64)
    # float64 on both: scores within float64 rounding, whose slack reorders no penalty here
    # (himalaya reports only the chosen penalty's score)
    err64 = ridge_bound(X, DEFAULT_ALPHAS, EPS64)[:, None] * np.abs(cpu.cv_scores)
    if method != "himalaya":
        assert_within(gpu.cv_scores, cpu.cv_scores, 4 * err64, "scores")
        assert decided(cpu.cv_scores, 4 * err64).all()
    np.testing.assert_array_equal(cpu.alphas, gpu.alphas)
    # float64 weights rounded to float32 on each device: at most an ulp apart, plus float64 error
    w_err = 2 * ridge_bound(X, cpu.alphas, EPS64) * np.linalg.norm(cpu.weights, axis=0)
    assert_within(gpu.weights, cpu.weights, EPS32 * np.abs(cpu.weights) + w_err, "weights")
