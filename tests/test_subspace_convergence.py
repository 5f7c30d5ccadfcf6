"""Randomized subspaces run to a tolerance and record the accuracy they reached.

Known answers: linear encoders r = W x with a planted spectrum, so J = W and its top-k right
singular vectors are known exactly. The hard case is flat: 64 singular values evenly spaced
from 10 down to 5 with k = 10, so sigma_11 / sigma_10 = 0.991 and the top-10 subspace is barely
separated from the next direction (three fixed subspace iterations reached overlap 0.78 there).
Settings are the probe's defaults (conf/probe/subspace.yaml), whatever they are.

Tolerances come from the spectrum, not from the machine. With Ritz residuals r_j = A p_j -
theta_j p_j (A = J^T J), Davis & Kahan bound the subspace error, 1 - overlap <= mean_j
||r_j||^2 / delta^2 with delta = theta_k - lambda_(k+1), and each Ritz value lies within
||R||_2 <= ||R||_F of its eigenvalue; float32 rounding is orders of magnitude below both.
"""

import inspect

import numpy as np
import pytest
import torch
from helpers import CONF, LinearEncoder, compose_config, isolated
from omegaconf import OmegaConf
from test_subspace import run_probe

from brainrobust.models.build import build, build_encoder
from brainrobust.probes.jacobian import orthonormalize, subspace_similarity, top_k_right_singular

S = 16
D = 3 * S * S
FLAT = torch.linspace(10, 5, 64)
# Weaker directions after the flat top, so that the Krylov basis cannot just fill J's row space.
TAIL = torch.linspace(4.9, 0.1, 192)
DEFAULTS = OmegaConf.to_container(OmegaConf.load(CONF / "probe" / "subspace.yaml").subspace)
K, TOL, MAX_ITERS = DEFAULTS["k"], DEFAULTS["tol"], DEFAULTS["max_iters"]


def default_settings(**overrides):
    """The probe config's defaults for every argument `top_k_right_singular` takes."""
    takes = inspect.signature(top_k_right_singular).parameters
    settings = {key: value for key, value in DEFAULTS.items() if key in takes}
    return settings | {"method": "randomized"} | overrides


def planted(sigma, n_voxels, seed=0, right=None):
    """W (n_voxels x D) with singular values sigma and right singular vectors `right`."""
    g = torch.Generator().manual_seed(seed)
    if right is None:
        right = orthonormalize(torch.randn(D, len(sigma), generator=g))
    left = orthonormalize(torch.randn(n_voxels, len(sigma), generator=g))
    return (left * sigma) @ right.T, right


def check_certified(sub, truth, eig_next):
    """Converged, accurate, and the recorded accuracy certifies it (Davis-Kahan)."""
    overlap = subspace_similarity(sub.p, truth)
    assert overlap.min() >= 0.99
    residual, bound = sub.residual.double().numpy(), sub.error_bound.double().numpy()
    assert ((residual <= TOL).all(1) | (bound <= TOL)).all()
    assert ((sub.iterations >= 1) & (sub.iterations <= MAX_ITERS)).all()
    # With the exact gap the bound is a theorem; the recorded one estimates the gap. Both up to
    # float32 rounding of the two subspaces, orders of magnitude below 1e-5.
    theta_k = sub.sigma[:, -1].double().numpy() ** 2
    gap = 1 - eig_next / theta_k
    np.testing.assert_array_less(1 - overlap, (residual**2).mean(1) / gap**2 + 1e-5)
    np.testing.assert_array_less(1 - overlap, bound + 1e-5)


@pytest.mark.parametrize(
    "n_voxels, tail",
    [(64, False), (256, True)],
)
def test_flat_spectrum_converges_at_the_default_settings(n_voxels, tail):
    sigma = torch.cat([FLAT, TAIL]) if tail else FLAT
    w, right = planted(sigma, n_voxels)
    enc = LinearEncoder(w, {"FFA": torch.arange(n_voxels)}).eval()
    x = torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(1))
    sub = top_k_right_singular(
        enc, x, generator=torch.Generator().manual_seed(2), **default_settings()
    )
    truth = right[:, :K].expand(3, -1, -1)
    # The target itself before anything the result records (P is its first field).
    assert subspace_similarity(sub[0], truth).min() >= 0.99
    check_certified(sub, truth, eig_next=sigma[K].item() ** 2)
    # Each Ritz value within ||R||_F of its eigenvalue.
    eig, theta = sigma[:K].double() ** 2, sub.sigma.double() ** 2
    bound = sub.residual.double().norm(dim=1, keepdim=True) * theta[:, -1:]
    assert ((theta - eig).abs() <= bound + 1e-5 * eig).all()
    # The recorded residual is the true one, recomputed from W.
    a = w.double().T @ w.double()
    p = sub.p.double()
    true_residual = (a @ p - p * theta[:, None]).norm(dim=1) / theta[:, -1:]
    torch.testing.assert_close(sub.residual.double(), true_residual, atol=TOL / 10, rtol=0)
    exact = top_k_right_singular(enc, x, **default_settings(method="exact"))
    assert (exact.iterations == 0).all() and (exact.residual <= TOL).all()


def test_images_of_a_batch_converge_separately():
    """J_b = 2 W diag(x_b): one image sees the flat spectrum, the other a wide gap after k."""
    sigma = torch.cat([FLAT, TAIL])
    # Planted directions along pixels, so that an image's pixel values rescale them.
    w, _ = planted(sigma, len(sigma), right=torch.eye(D)[:, : len(sigma)])
    enc = LinearEncoder(w, {"FFA": torch.arange(len(sigma))})

    def fn(x):
        return enc(x**2)

    x = torch.full((2, 3, S, S), 0.5)
    x[1].view(-1)[K:] = 0.1
    sub = top_k_right_singular(
        fn, x, generator=torch.Generator().manual_seed(0), **default_settings()
    )
    exact = top_k_right_singular(fn, x, **default_settings(method="exact", k=K + 1))
    check_certified(sub, exact.p[:, :, :K], exact.sigma[:, K].double().numpy() ** 2)
    # About 7 iterations against 3 (residuals fall about 10x per iteration on either).
    assert sub.iterations[1] < sub.iterations[0]


def test_an_image_stopped_by_max_iters_reports_it():
    w, right = planted(FLAT, 64)
    enc = LinearEncoder(w, {"FFA": torch.arange(64)})
    x = torch.rand(2, 3, S, S)
    sub = top_k_right_singular(
        enc, x, generator=torch.Generator().manual_seed(0), **default_settings(max_iters=2)
    )
    assert (sub.iterations == 2).all()
    assert (sub.residual.amax(1) > TOL).all() and (sub.error_bound > TOL).all()
    assert subspace_similarity(sub.p, right[:, :K].expand(2, -1, -1)).max() < 0.99


def test_probe_records_the_accuracy_it_reached(tmp_path):
    sigma = torch.cat([FLAT, TAIL])
    w, right = planted(sigma, 256)
    enc = LinearEncoder(w, {"FFA": torch.arange(256), "EBA": torch.arange(3)}).eval()
    images = torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(3))
    ids = np.array([5, 1, 9])
    settings = DEFAULTS | {"method": "randomized", "rois": ["FFA"], "max_images": None}
    settings.pop("_target_")
    store, records = run_probe(tmp_path, enc, "flat", images, ids, **settings)
    metric = records.set_index(["metric", "image_id"]).value
    arrays = store.load_array("subspace_FFA")
    assert arrays["residual"].shape == (3, K)
    assert arrays["error_bound"].shape == arrays["iterations"].shape == (3,)
    np.testing.assert_array_equal(metric["iterations"].loc[ids], arrays["iterations"])
    assert ((arrays["iterations"] >= 1) & (arrays["iterations"] <= MAX_ITERS)).all()
    residual = metric["residual"].loc[ids].to_numpy()
    bound = metric["error_bound"].loc[ids].to_numpy()
    assert ((residual <= TOL) | (bound <= TOL)).all()
    # fp16 arrays, float64 records.
    np.testing.assert_allclose(residual, arrays["residual"].max(1), rtol=1e-3)
    np.testing.assert_allclose(bound, arrays["error_bound"], rtol=1e-3, atol=1e-7)
    p = np.linalg.qr(arrays["P"].astype(np.float32))[0]
    truth = np.broadcast_to(right[:, :K].numpy(), p.shape)
    assert subspace_similarity(p, truth).min() >= 0.99
    assert (records.tol == TOL).all() and (records.max_iters == MAX_ITERS).all()


@pytest.fixture(scope="module")
def twin_encoder(synthetic_root, tmp_path_factory):
    """The default run's encoder (tiny CNN + ridge readout) on the synthetic twin."""
    cfg = compose_config(*isolated(synthetic_root[0], tmp_path_factory.mktemp("twin")))
    dm = build(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup()
    encoder = build_encoder(cfg, build(cfg.model), dm).cpu().eval()
    return encoder, dm.image_tensor("test")[:2]


def test_twin_encoder_converges_at_the_default_settings(twin_encoder):
    # Every voxel the twin predicts (about a hundred): its ROIs alone (tens of voxels) are so
    # small that the Krylov basis covers their whole row space within two or three iterations.
    encoder, x = twin_encoder
    sub = top_k_right_singular(
        encoder, x, generator=torch.Generator().manual_seed(0), **default_settings()
    )
    exact = top_k_right_singular(encoder, x, **default_settings(method="exact", k=K + 1))
    check_certified(sub, exact.p[:, :, :K], exact.sigma[:, K].double().numpy() ** 2)
