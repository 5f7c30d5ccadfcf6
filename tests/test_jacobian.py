"""Matrix-free top-k Jacobian subspaces and subspace similarity, against known answers."""

import math

import numpy as np
import pytest
import torch
from helpers import LinearEncoder
from torch import nn

from brainrobust.errors import ConfigError
from brainrobust.probes.jacobian import (
    JacobianProducts,
    choose_method,
    orthonormalize,
    principal_angles,
    random_baseline,
    subspace_similarity,
    top_k_right_singular,
)

S = 8
D = 3 * S * S


def planted_weights(basis, top, top_sigma, tail, tail_sigma, n_voxels, seed):
    """W = U diag(s) V^T with chosen right singular vectors: basis[:, top] then basis[:, tail]."""
    right = basis[:, list(top) + list(tail)]
    left = orthonormalize(
        torch.randn(n_voxels, right.shape[1], generator=torch.Generator().manual_seed(seed))
    )
    sigma = torch.tensor(list(top_sigma) + list(tail_sigma), dtype=torch.float32)
    return left @ torch.diag(sigma) @ right.T


@pytest.fixture(scope="module")
def planted():
    """Two linear models sharing 2 of their top-4 directions, each with 2 private ones."""
    g = torch.Generator().manual_seed(0)
    basis = orthonormalize(torch.randn(D, D, generator=g))
    k, n_vox = 4, 30
    top_sigma = [10.0, 8.0, 6.0, 5.0]
    tail_sigma = torch.linspace(1.0, 0.05, n_vox - k).tolist()
    w_a = planted_weights(basis, [0, 1, 2, 3], top_sigma, range(10, 36), tail_sigma, n_vox, 1)
    w_b = planted_weights(basis, [0, 1, 4, 5], top_sigma, range(40, 66), tail_sigma, n_vox, 2)
    return {
        "basis": basis,
        "k": k,
        "w_a": w_a,
        "w_b": w_b,
        "top_sigma": top_sigma,
        "shared": 2,
        "x": torch.rand(3, 3, S, S, generator=g),
    }


def test_randomized_recovers_planted_directions(planted):
    k, x = planted["k"], planted["x"]
    enc_a = LinearEncoder(planted["w_a"], {"FFA": torch.arange(30)}).eval()
    p, sigma = top_k_right_singular(
        enc_a, x, k, oversample=4, max_iters=2, generator=torch.Generator().manual_seed(0)
    )[:2]
    p_exact, sigma_exact = top_k_right_singular(enc_a, x, k, method="exact")[:2]
    truth = planted["basis"][:, :k]
    assert p.shape == (3, D, k) and sigma.shape == (3, k)
    for b in range(3):
        assert subspace_similarity(p[b], p_exact[b]) >= 0.99
        assert subspace_similarity(p[b], truth) >= 0.99
        assert subspace_similarity(p_exact[b], truth) == pytest.approx(1.0, abs=1e-5)
        # Columns come out orthonormal and ordered by singular value.
        torch.testing.assert_close(p[b].T @ p[b], torch.eye(k), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        sigma, torch.tensor(planted["top_sigma"]).expand(3, k), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(sigma_exact, sigma, rtol=1e-4, atol=0)


def test_similarity_of_planted_models_is_analytic(planted):
    k, x = planted["k"], planted["x"]
    rois = {"FFA": torch.arange(30)}
    p_a, _ = top_k_right_singular(LinearEncoder(planted["w_a"], rois), x, k, max_iters=2)[:2]
    p_b, _ = top_k_right_singular(LinearEncoder(planted["w_b"], rois), x, k, max_iters=2)[:2]
    expected = planted["shared"] / k
    assert subspace_similarity(p_a, p_b) == pytest.approx(np.full(3, expected), abs=1e-3)
    # Two shared directions (angle 0) and two private, orthogonal ones (angle pi/2).
    np.testing.assert_allclose(
        principal_angles(p_a[0], p_b[0]), [0, 0, math.pi / 2, math.pi / 2], atol=2e-2
    )


def test_per_image_jacobians_match_autograd():
    """A nonlinear map whose Jacobian differs per image: products, exact and randomized agree."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(12, D, generator=g) / math.sqrt(D)
    c = torch.randn(20, 12, generator=g) * torch.logspace(0, -2, 12)

    def fn(x):
        return torch.tanh(3 * x.flatten(1) @ a.T) @ c.T

    x = torch.rand(4, 3, S, S, generator=g)
    jac = torch.stack(
        [torch.func.jacrev(lambda xi: fn(xi[None])[0])(xi).reshape(20, D) for xi in x]
    )
    v = torch.randn(4, D, 5, generator=g)
    u = torch.randn(4, 20, 5, generator=g)
    for mode in ("forward", "double_vjp"):
        ops = JacobianProducts(fn, x, chunk=2, jvp_mode=mode)
        torch.testing.assert_close(ops.j(v), jac @ v, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ops.jt(u), jac.mT @ u, atol=1e-5, rtol=1e-4)
    _, s_ref, vh_ref = torch.linalg.svd(jac)
    p_exact, s_exact = top_k_right_singular(fn, x, 3, method="exact")[:2]
    p_rand, s_rand = top_k_right_singular(
        fn, x, 3, oversample=5, max_iters=3, jvp_mode="double_vjp"
    )[:2]
    torch.testing.assert_close(s_exact, s_ref[:, :3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s_rand, s_ref[:, :3], atol=1e-5, rtol=1e-3)
    for b in range(4):
        assert subspace_similarity(p_exact[b], vh_ref[b, :3].T) == pytest.approx(1.0, abs=1e-5)
        assert subspace_similarity(p_rand[b], vh_ref[b, :3].T) >= 0.99


class _NoForwardAD(torch.autograd.Function):
    """Square with a backward formula only: forward-mode AD cannot go through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_auto_mode_falls_back_to_double_vjp():
    w = torch.randn(6, D, generator=torch.Generator().manual_seed(4))

    def fn(x):
        return _NoForwardAD.apply(x.flatten(1)) @ w.T

    x = torch.rand(2, 3, S, S)
    v = torch.randn(2, D, 3)
    with pytest.raises((NotImplementedError, RuntimeError)):
        JacobianProducts(fn, x, jvp_mode="forward").j(v)
    ops = JacobianProducts(fn, x, jvp_mode="auto")
    expected = torch.einsum("vd,bdl->bvl", w, 2 * x.flatten(1)[:, :, None] * v)
    torch.testing.assert_close(ops.j(v), expected, atol=1e-5, rtol=1e-4)
    assert ops.jvp_mode == "double_vjp"


def test_small_cnn_modes_agree():
    from brainrobust.models.backbones import TinyCNN

    torch.manual_seed(0)
    net = nn.Sequential(TinyCNN(widths=(8, 8, 8, 8)), nn.Flatten(), nn.Linear(8, 10)).eval()
    x = torch.rand(2, 3, 16, 16)
    v = torch.randn(2, 3 * 16 * 16, 4)
    forward = JacobianProducts(net, x, jvp_mode="forward").j(v)
    double = JacobianProducts(net, x, jvp_mode="double_vjp").j(v)
    torch.testing.assert_close(forward, double, atol=1e-5, rtol=1e-4)
    p_exact, _ = top_k_right_singular(net, x, 3, method="exact")[:2]
    p_rand, _ = top_k_right_singular(net, x, 3, oversample=7, max_iters=3)[:2]
    # 10 outputs and 3 + 7 probe columns: the randomized range is the whole row space.
    assert subspace_similarity(p_exact, p_rand) == pytest.approx(np.ones(2), abs=1e-4)


def test_auto_method_takes_the_cheaper_one(planted):
    # 30 outputs vs (4 + 4) x (2 x 2 + 1) = 40 products: exact; 1000 outputs: randomized.
    assert choose_method(30, D, 4, oversample=4, max_iters=2) == "exact"
    assert choose_method(1000, D, 4, oversample=4, max_iters=2) == "randomized"
    enc = LinearEncoder(planted["w_a"], {"FFA": torch.arange(30)})
    p_auto, s_auto = top_k_right_singular(
        enc, planted["x"], 4, oversample=4, max_iters=2, method="auto"
    )[:2]
    p_exact, s_exact = top_k_right_singular(enc, planted["x"], 4, method="exact")[:2]
    torch.testing.assert_close(s_auto, s_exact)
    torch.testing.assert_close(p_auto.abs(), p_exact.abs())


def test_random_subspaces_give_k_over_d():
    rng = np.random.default_rng(0)
    d, k = 1000, 10
    sims = [
        subspace_similarity(
            np.linalg.qr(rng.normal(size=(d, k)))[0], np.linalg.qr(rng.normal(size=(d, k)))[0]
        )
        for _ in range(20)
    ]
    assert random_baseline(k, d) == k / d
    assert np.mean(sims) == pytest.approx(k / d, rel=0.3)


def test_identical_and_rotated_subspaces_give_one():
    rng = np.random.default_rng(1)
    p = np.linalg.qr(rng.normal(size=(50, 5)))[0]
    rotation = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    assert subspace_similarity(p, p) == pytest.approx(1.0)
    assert subspace_similarity(p, p @ rotation) == pytest.approx(1.0)
    np.testing.assert_allclose(principal_angles(p, p @ rotation), 0.0, atol=1e-6)


def test_principal_angles_are_consistent_with_similarity():
    e = np.eye(6)
    a, b = 0.3, 1.1
    p = e[:, [0, 1]]
    q = np.stack(
        [np.cos(b) * e[:, 0] + np.sin(b) * e[:, 2], np.cos(a) * e[:, 1] + np.sin(a) * e[:, 3]],
        axis=1,
    )
    angles = principal_angles(p, q)
    np.testing.assert_allclose(angles, [a, b], atol=1e-7)
    assert subspace_similarity(p, q) == pytest.approx(np.mean(np.cos(angles) ** 2))
    rng = np.random.default_rng(2)
    ps = np.linalg.qr(rng.normal(size=(4, 40, 3)))[0]
    qs = np.linalg.qr(rng.normal(size=(4, 40, 3)))[0]
    np.testing.assert_allclose(
        subspace_similarity(ps, qs), (np.cos(principal_angles(ps, qs)) ** 2).mean(-1)
    )


def test_bad_arguments_are_config_errors(planted):
    enc = LinearEncoder(planted["w_a"], {"FFA": torch.arange(30)})
    x = planted["x"]
    with pytest.raises(ConfigError, match="k=31.*min\\(30, 192\\)"):
        top_k_right_singular(enc, x, 31)
    with pytest.raises(ConfigError, match="iters"):
        top_k_right_singular(enc, x, 2, max_iters=0)
    with pytest.raises(ConfigError, match="tol"):
        top_k_right_singular(enc, x, 2, tol=0.0)
    with pytest.raises(ConfigError, match="method"):
        top_k_right_singular(enc, x, 2, method="lanczos")
    with pytest.raises(ConfigError, match="jvp_mode"):
        top_k_right_singular(enc, x, 2, jvp_mode="fwd")
