import warnings

import numpy as np
import pytest
import safetensors.numpy
import torch
from himalaya.backend import get_backend, set_backend
from himalaya.ridge import RidgeCV as HimalayaRidgeCV
from sklearn.linear_model import RidgeCV

from brainrobust.errors import CacheError, ConfigError, DataError
from brainrobust.models.readout import DEFAULT_ALPHAS, LinearReadout, RidgeFit, fit_ridge, pearson_r


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


# ----------------------------------------------------------------------------- agreement with peers


def test_readout_reproduces_himalaya_predictions():
    X, Y, _ = planted(n=240, p=30)
    x_test = planted(n=100, p=30, seed=1)[0]
    fit = fit_ridge(X, Y, method="himalaya", cv=5)
    readout = LinearReadout.from_fit(fit)

    before = get_backend().name
    set_backend("numpy")
    try:
        x_mean, y_mean = X.mean(0, dtype=np.float64), Y.mean(0, dtype=np.float64)
        ref = HimalayaRidgeCV(alphas=DEFAULT_ALPHAS, cv=5, fit_intercept=False)
        ref.fit((X - x_mean).astype(np.float32), (Y - y_mean).astype(np.float32))
        expected = ref.predict((x_test - x_mean).astype(np.float32)) + y_mean
    finally:
        set_backend(before)

    with torch.no_grad():
        ours = readout(torch.from_numpy(x_test)).numpy()
    assert np.abs(ours - expected).max() < 1e-4
    assert np.allclose(fit.alphas, ref.best_alphas_, rtol=1e-5)
    assert get_backend().name == before  # the solver restores the caller's backend
    chosen = fit.cv_scores[np.searchsorted(fit.alpha_grid, fit.alphas), np.arange(len(fit.alphas))]
    assert np.allclose(chosen, ref.cv_scores_, rtol=1e-5)


@pytest.mark.parametrize("n, p", [(300, 40), (60, 150)], ids=["tall", "wide"])
def test_loo_alphas_equal_sklearn(n, p):
    X, Y, _ = planted(n=n, p=p, offset=5.0)
    ref = sklearn_loo(X, Y)
    fit = fit_ridge(X, Y, method="loo")
    np.testing.assert_array_equal(fit.alphas, ref.alpha_)
    np.testing.assert_allclose(fit.cv_scores.max(0), ref.best_score_, rtol=1e-4)
    pred = X @ fit.weights + fit.intercept
    np.testing.assert_allclose(pred, ref.predict(X), atol=1e-3 * np.abs(Y).max())


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
    for i, alpha in enumerate(DEFAULT_ALPHAS):
        hat = Xc @ np.linalg.solve(Xc.T @ Xc + alpha * np.eye(p), Xc.T) + 1.0 / n
        residual = Y64 - hat @ Y64
        gcv = (residual**2).mean(0) / (1 - np.trace(hat) / n) ** 2
        np.testing.assert_allclose(-fit.cv_scores[i], gcv, rtol=1e-6)


def test_kfold_scores_equal_explicit_folds():
    X, Y, _ = planted(n=120, p=12, n_strong=4, n_weak=4, n_noise=4, offset=2.0)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    fit = fit_ridge(X, Y, method="kfold", cv=4, backend_dtype=torch.float64)
    expected = np.zeros((len(DEFAULT_ALPHAS), Y.shape[1]))
    for val in np.array_split(np.arange(120), 4):
        train = np.setdiff1d(np.arange(120), val)
        xm, ym = X64[train].mean(0), Y64[train].mean(0)
        Xt = X64[train] - xm
        for i, alpha in enumerate(DEFAULT_ALPHAS):
            W = np.linalg.solve(Xt.T @ Xt + alpha * np.eye(12), Xt.T @ (Y64[train] - ym))
            expected[i] -= ((Y64[val] - ym - (X64[val] - xm) @ W) ** 2).sum(0)
    np.testing.assert_allclose(fit.cv_scores, expected / 120, rtol=1e-8)
    np.testing.assert_array_equal(fit.alphas, DEFAULT_ALPHAS[expected.argmax(0)])


def test_target_batches_give_the_same_fit():
    X, Y, _ = planted()
    whole = fit_ridge(X, Y, method="loo")
    batched = fit_ridge(X, Y, method="loo", n_targets_batch=7)
    np.testing.assert_array_equal(whole.alphas, batched.alphas)
    np.testing.assert_allclose(whole.weights, batched.weights, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- intercept and module


def test_intercept_with_large_offsets():
    X_all, Y_all, _ = planted(n=400, p=20, offset=1000.0)
    X, Y, x_test = X_all[:300], Y_all[:300], X_all[300:]
    ref = RidgeCV(alphas=[1.0, 10.0], alpha_per_target=True).fit(
        X.astype(np.float64), Y.astype(np.float64)
    )
    exact = fit_ridge(X, Y, method="loo", alphas=[1.0, 10.0], backend_dtype=torch.float64)
    np.testing.assert_allclose(exact.intercept, ref.intercept_, rtol=1e-6)

    fit = fit_ridge(X, Y, method="loo", alphas=[1.0, 10.0])
    expected = Y.mean(0, dtype=np.float64) - X.mean(0, dtype=np.float64) @ fit.weights.astype(
        np.float64
    )
    np.testing.assert_allclose(fit.intercept, expected, rtol=1e-6)
    readout = LinearReadout.from_fit(fit)
    with torch.no_grad():
        at_mean = readout(torch.from_numpy(X.mean(0, keepdims=True))).numpy()[0]
        pred = readout(torch.from_numpy(x_test)).numpy()
    np.testing.assert_allclose(at_mean, Y.mean(0), atol=2e-3)  # float32 forward at offsets ~1e3
    # float32 weights times offsets of 1000: predictions agree to a small fraction of the noise sd (1)
    assert np.abs(pred - ref.predict(x_test)).max() < 0.02


def test_readout_is_fixed_but_passes_gradients_to_features():
    X, Y, _ = planted(n=100, p=8, n_strong=2, n_weak=1, n_noise=1)
    readout = LinearReadout.from_fit(fit_ridge(X, Y))
    assert list(readout.parameters()) == []
    feats = torch.from_numpy(X[:5]).requires_grad_(True)
    readout(feats).sum().backward()
    np.testing.assert_allclose(
        feats.grad.numpy(), np.tile(readout.weights.sum(1).numpy(), (5, 1)), rtol=1e-6
    )
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
    assert r[0] == pytest.approx(np.corrcoef(a[:, 0], b[:, 0])[0, 1], abs=1e-12)
    assert r[1] == pytest.approx(1.0) and r[2] == 0.0
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
    np.testing.assert_array_equal(cpu.alphas, gpu.alphas)
    np.testing.assert_allclose(cpu.weights, gpu.weights, rtol=1e-4, atol=1e-5)
