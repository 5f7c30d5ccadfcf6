"""PGD engine and attack objectives: known answers on linear encoders, budgets, controls, peers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import LinearEncoder
from torch import nn

from brainrobust.errors import BrainRobustError, ConfigError
from brainrobust.probes.ascent import ascend
from brainrobust.probes.attack import (
    AttackRuntime,
    PGDConfig,
    check_budget,
    clamp_to_box,
    expand_ladder,
    norm_of,
    pgd,
    project,
    random_perturbation,
    validate_eps,
)
from brainrobust.probes.objectives import OBJECTIVES, make_objective

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def svd_encoder(size: int = 8, voxels: int = 12, seed: int = 0):
    """Linear encoder with a known spectrum: (encoder, sigma_1, top right singular vector)."""
    g = gen(seed)
    pixels = 3 * size * size
    left, _ = torch.linalg.qr(torch.randn(voxels, voxels, generator=g))
    right, _ = torch.linalg.qr(torch.randn(pixels, voxels, generator=g))
    sigma = torch.linspace(1.5, 0.5, voxels)
    sigma[0] = 3.0
    W = left @ torch.diag(sigma) @ right.T
    rois = {"A": list(range(voxels // 2)), "B": list(range(voxels // 2, voxels)),
            "all": list(range(voxels))}
    return LinearEncoder(W, rois).eval(), 3.0, right[:, 0]


class TinyCNNEncoder(nn.Module):
    """A small nonlinear encoder with the encoder interface."""

    def __init__(self, voxels: int = 6, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, voxels))
        self.rois = {"A": torch.arange(voxels // 2), "B": torch.arange(voxels // 2, voxels)}

    def forward(self, x):
        return self.net(x)


def images(n: int, size: int, seed: int = 1, saturated: bool = True) -> torch.Tensor:
    x = torch.rand(n, 3, size, size, generator=gen(seed))
    # Many pixels exactly at 0 or 1, where the box bites.
    return (x * 1.6 - 0.3).clamp(0, 1) if saturated else x


NO_CLAMP = {"clamp": False}


# --- known answers on linear encoders -----------------------------------------------------------

# PGD from delta = 0 walks straight to the optimum. From a random start orthogonal to the optimum
# the normalised steps turn delta by angle theta with d(theta)/d(path) = -sin(theta), so a path of
# L * eps ends at cos(2 atan(exp(-L))): 0.9866 for the Madry path L = 2.5 (20 steps of eps / 8),
# 0.9999 for L = 5.
START_AND_PATH = [(False, 0.125, 0.99), (True, 0.25, 0.99), (True, 0.125, 0.98)]


@pytest.mark.parametrize("random_start,step_size,floor", START_AND_PATH)
def test_l2_pattern_reaches_top_singular_value(random_start, step_size, floor):
    enc, sigma1, v1 = svd_encoder()
    x = torch.full((4, 3, 8, 8), 0.5)
    eps = 0.5
    cfg = PGDConfig(norm="l2", step_size=step_size, random_start=random_start, **NO_CLAMP)
    res = pgd(make_objective(enc, "all", "pattern", x), x, eps, cfg, generator=gen())
    optimum = eps * sigma1
    assert (res.objective >= floor * optimum).all(), res.objective / optimum
    assert (res.objective <= optimum * (1 + 1e-5)).all()
    cosine = (res.delta.flatten(1) @ v1).abs() / res.delta.flatten(1).norm(dim=1)
    assert (cosine >= floor).all()


@pytest.mark.parametrize("kind,sign", [("abs", 1), ("increase", 1), ("decrease", -1)])
@pytest.mark.parametrize("random_start,step_size,floor", START_AND_PATH)
def test_l2_roi_mean_optimum_is_eps_along_w(kind, sign, random_start, step_size, floor):
    enc, _, _ = svd_encoder()
    w = enc.W[enc.rois["A"]].mean(0)
    x = torch.full((3, 3, 8, 8), 0.5)
    eps = 0.3
    cfg = PGDConfig(norm="l2", step_size=step_size, random_start=random_start, **NO_CLAMP)
    res = pgd(make_objective(enc, "A", kind, x), x, eps, cfg, generator=gen())
    optimum = eps * w.norm()
    assert (res.objective >= floor * optimum).all(), res.objective / optimum
    assert (res.objective <= optimum * (1 + 1e-5)).all()
    change = res.delta.flatten(1) @ w
    if kind != "abs":
        assert (sign * change >= floor * optimum).all()
    if not random_start:  # every step points along +-w (abs: sign(0) = +1): the optimum exactly
        assert torch.allclose(res.delta.flatten(1), sign * eps * w / w.norm(), atol=1e-6)


@pytest.mark.parametrize("kind", ["abs", "increase"])
def test_linf_roi_mean_optimum_is_eps_sign_w(kind):
    enc, _, _ = svd_encoder()
    w = enc.W[enc.rois["B"]].mean(0)
    x = torch.full((3, 3, 8, 8), 0.5)
    eps = 8 / 255
    for random_start in (True, False):
        res = pgd(make_objective(enc, "B", kind, x), x, eps,
                  PGDConfig(norm="linf", random_start=random_start, **NO_CLAMP), generator=gen())
        optimum = eps * w.sign().expand(3, -1)
        if kind == "abs":  # -optimum is as good; PGD may end at either
            optimum = optimum * res.delta.flatten(1)[:, :1].sign() * w[0].sign()
        assert torch.allclose(res.delta.flatten(1), optimum, atol=1e-7)
        assert torch.allclose(res.objective, eps * w.abs().sum().expand(3), rtol=1e-5)


def test_steps_used_counts_steps_to_the_best_iterate():
    enc, _, _ = svd_encoder()
    x = torch.full((2, 3, 8, 8), 0.5)
    # L-inf from 0 with step eps/8 saturates at eps * sign(w) after exactly 8 steps; later
    # iterates repeat it without improving.
    cfg = PGDConfig(norm="linf", steps=20, random_start=False, **NO_CLAMP)
    res = pgd(make_objective(enc, "A", "increase", x), x, 0.5, cfg)
    assert res.steps_used.dtype == torch.int64
    assert res.steps_used.tolist() == [8, 8]


# --- budgets, box, ladder ------------------------------------------------------------------------

@pytest.mark.parametrize("norm,ladder", [("l2", [0.05, 0.5, 2.0, 8.0]),
                                         ("linf", [1 / 255, 8 / 255, 0.3])])
def test_norm_never_exceeds_eps_and_pixels_stay_in_box(norm, ladder):
    enc = TinyCNNEncoder().eval()
    x = images(6, 16)
    xe, eps, index = expand_ladder(x, ladder)
    res = pgd(make_objective(enc, "A", "pattern", xe), xe, eps, PGDConfig(norm=norm, steps=10),
              generator=gen())
    achieved = norm_of(res.delta, norm)
    assert (achieved <= eps * (1 + 1e-6)).all()
    assert torch.equal(achieved, res.norm)
    adv = xe + res.delta
    assert adv.min() >= 0 and adv.max() <= 1
    assert res.delta.dtype == torch.float32 and res.delta.is_contiguous()
    assert index.tolist() == [e for e in range(len(ladder)) for _ in range(6)]
    assert (res.objective > 0).all()


def test_project_then_clamp_keeps_l2_budget():
    g = gen(3)
    x = images(64, 8, seed=3)
    delta = torch.randn(64, 3, 8, 8, generator=g) * 5
    eps = torch.rand(64, generator=g).add(0.01).view(-1, 1, 1, 1)
    out = clamp_to_box(x, project(delta, eps, "l2"))
    assert (norm_of(out, "l2") <= eps.flatten() * (1 + 1e-6)).all()
    assert ((x + out) >= 0).all() and ((x + out) <= 1).all()


def test_eps_ladder_in_one_call_is_monotone_and_equals_separate_calls():
    enc, _, _ = svd_encoder(size=8)
    x = images(5, 8, saturated=False)
    ladder = [0.05, 0.1, 0.2, 0.4, 0.8]
    cfg = PGDConfig(norm="l2", random_start=False)
    xe, eps, _ = expand_ladder(x, ladder)
    res = pgd(make_objective(enc, "A", "abs", xe), xe, eps, cfg)
    per_eps = res.objective.view(len(ladder), 5)
    assert (per_eps[1:] >= per_eps[:-1] - 1e-6).all()
    for e, value in enumerate(ladder):
        alone = pgd(make_objective(enc, "A", "abs", x), x, value, cfg)
        assert torch.allclose(alone.delta, res.delta[e * 5:(e + 1) * 5], atol=1e-6)


# --- negative control ----------------------------------------------------------------------------

def test_random_control_is_far_below_the_attack():
    size = 32
    g = gen(5)
    W = torch.randn(6, 3 * size * size, generator=g) / size
    enc = LinearEncoder(W, {"A": [0, 1, 2], "B": [3, 4, 5]}).eval()
    x = images(4, size, saturated=False) * 0.8 + 0.1
    for norm, eps in (("l2", 1.0), ("linf", 4 / 255)):
        attack = pgd(make_objective(enc, "A", "abs", x), x, eps, PGDConfig(norm=norm), generator=g)
        r0 = enc.roi_response(x, "A")
        controls = torch.stack([
            (enc.roi_response(x + random_perturbation(x, eps, norm, g, match_norm=attack.norm), "A")
             - r0).abs() for _ in range(8)])
        assert (controls.mean(0) < 0.2 * attack.objective).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_random_perturbation_has_the_requested_norm_inside_the_box(norm):
    x = images(8, 16)
    target = torch.tensor([0.01, 0.1, 1.0, 3.0, 6.0, 0.5, 0.0, 2.0])
    if norm == "linf":
        target = target.clamp(max=0.9) / 4
    for kwargs in ({"eps": target.clamp_min(1e-3)}, {"eps": 1.0, "match_norm": target}):
        p = random_perturbation(x, norm=norm, generator=gen(2), **kwargs)
        want = kwargs.get("match_norm", kwargs["eps"])
        assert torch.allclose(norm_of(p, norm), want, rtol=1e-4, atol=1e-7)
        assert ((x + p) >= 0).all() and ((x + p) <= 1).all()
    if norm == "l2":  # the clipped Gaussian would have fallen short: the rescale was needed
        raw = random_perturbation(x, target.clamp_min(1e-3), norm, gen(2), clamp=False)
        assert (norm_of(clamp_to_box(x, raw), norm)[2:5] < 0.999 * target[2:5]).all()
    else:  # every unclipped pixel moves by exactly +-eps
        p = random_perturbation(x, 0.1, norm, gen(2))
        free = ((x > 0.1) & (x < 0.9))
        assert torch.allclose(p[free].abs(), torch.tensor(0.1))


def test_random_perturbation_infeasible_target_gives_the_largest_possible():
    x = torch.zeros(2, 3, 8, 8)  # only positive components can move, by at most 1
    p = random_perturbation(x, 100.0, "l2", gen(4))
    room = ((p > 0).flatten(1).sum(1).float()).sqrt()
    assert torch.allclose(norm_of(p, "l2"), room, rtol=1e-5)


def test_random_perturbation_draws_differ_and_are_reproducible():
    x = images(3, 8)
    g = gen(9)
    a, b = random_perturbation(x, 0.5, "l2", g), random_perturbation(x, 0.5, "l2", g)
    assert not torch.equal(a, b)
    assert torch.equal(a, random_perturbation(x, 0.5, "l2", gen(9)))


# --- restarts, determinism, runtime -------------------------------------------------------------

def test_restarts_keep_the_best_run_per_sample():
    enc = TinyCNNEncoder().eval()
    x = images(8, 16)
    objective = make_objective(enc, "B", "abs", x)
    cfg = PGDConfig(norm="l2", steps=5, step_size=0.5)
    best = pgd(objective, x, 2.0, PGDConfig(**{**cfg.__dict__, "restarts": 3}), generator=gen(7))
    g = gen(7)  # the same stream, one restart per call
    singles = [pgd(objective, x, 2.0, cfg, generator=g) for _ in range(3)]
    values = torch.stack([s.objective for s in singles])
    assert torch.equal(best.objective, values.amax(0))
    winner = values.argmax(0)
    for i in range(8):
        assert torch.equal(best.delta[i], singles[winner[i]].delta[i])
        assert best.steps_used[i] == singles[winner[i]].steps_used[i]
    assert len(set(winner.tolist())) > 1  # the restarts really differ


def test_each_restart_continues_from_the_best_of_its_candidates():
    enc = TinyCNNEncoder().eval()
    x = images(8, 16)
    objective = make_objective(enc, "B", "abs", x)
    cfg = PGDConfig(norm="l2", steps=10, step_size=0.5, candidates=3, candidate_fraction=0.3)
    screened = pgd(objective, x, 2.0, cfg, generator=gen(7))
    g = gen(7)  # the same stream: three short runs of 3 steps, then the restart from their best
    short = [pgd(objective, x, 2.0, PGDConfig(norm="l2", steps=3, step_size=0.5), generator=g)
             for _ in range(3)]
    values = torch.stack([s.objective for s in short])
    assert len(set(values.argmax(0).tolist())) > 1  # the candidates really differ
    start = torch.stack([s.delta for s in short])[values.argmax(0), torch.arange(8)]
    eps_b = torch.full((8, 1, 1, 1), 2.0)
    run = ascend(objective, x, eps_b, PGDConfig(norm="l2", steps=10, step_size=0.5), g,
                 AttackRuntime(), start=start)
    assert torch.equal(screened.delta, run.delta)
    assert torch.equal(screened.objective, run.objective)


def test_seeded_runs_are_bit_identical():
    enc = TinyCNNEncoder().eval()
    x = images(6, 16)
    objective = make_objective(enc, "A", "decrease", x)
    for norm in ("l2", "linf"):
        cfg = PGDConfig(norm=norm, steps=5, restarts=2)
        a, b = pgd(objective, x, 0.1, cfg, gen(11)), pgd(objective, x, 0.1, cfg, gen(11))
        c = pgd(objective, x, 0.1, cfg, gen(12))
        assert torch.equal(a.delta, b.delta) and torch.equal(a.objective, b.objective)
        assert torch.equal(a.steps_used, b.steps_used)
        assert not torch.equal(a.delta, c.delta)


def test_bf16_and_channels_last_keep_the_guarantees():
    enc = TinyCNNEncoder().eval()
    x = images(6, 16)
    objective = make_objective(enc, "A", "abs", x)
    cfg = PGDConfig(norm="l2", steps=8)
    plain = pgd(objective, x, 1.0, cfg, gen())
    for runtime in (AttackRuntime(amp_dtype="bfloat16"), AttackRuntime(channels_last=True)):
        res = pgd(objective, x, 1.0, cfg, gen(), runtime=runtime)
        assert (res.norm <= 1.0 + 1e-6).all() and ((x + res.delta) >= 0).all()
        assert ((x + res.delta) <= 1).all() and res.delta.is_contiguous()
        with torch.no_grad():  # the reported objective is the fp32 value of the returned delta
            assert torch.allclose(res.objective, objective(x + res.delta), rtol=1e-5, atol=1e-7)
        if runtime.channels_last:  # same search, another memory layout
            assert torch.allclose(res.objective, plain.objective, rtol=1e-3)
        else:  # bf16 rounding perturbs the search a little, never the reported numbers
            assert res.objective.mean() >= 0.9 * plain.objective.mean()


@pytest.mark.slow
def test_compiled_objective_matches_eager():
    enc, _, _ = svd_encoder()
    x = images(4, 8)
    objective = make_objective(enc, "A", "abs", x)
    cfg = PGDConfig(norm="l2", steps=5)
    eager = pgd(objective, x, 0.3, cfg, gen())
    compiled = pgd(objective, x, 0.3, cfg, gen(), runtime=AttackRuntime(compile=True))
    assert torch.allclose(eager.delta, compiled.delta, atol=1e-5)


def test_no_gradient_and_nan_objectives():
    x = images(3, 8)
    flat = pgd(lambda z: z.sum((1, 2, 3)) * 0.0, x, 0.5, PGDConfig(random_start=False))
    assert torch.isfinite(flat.delta).all() and (flat.norm <= 0.5 + 1e-6).all()
    with pytest.raises(BrainRobustError, match="NaN"):
        pgd(lambda z: z.sum((1, 2, 3)) * math.nan, x, 0.5, PGDConfig(steps=2))
    with pytest.raises(ConfigError, match=r"shape \(3,\)"):
        pgd(lambda z: z.sum(), x, 0.5, PGDConfig(steps=2))


# --- against torchattacks on a classifier ---------------------------------------------------------

def test_at_least_as_strong_as_torchattacks_on_a_classifier():
    torchattacks = pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(256, 10)).eval()
    with torch.no_grad():  # confident logits, so the budgets below fool some images, not all
        model[-1].weight.mul_(100.0)
    x = images(64, 16, saturated=False)
    with torch.no_grad():
        labels = model(x).argmax(1)

    def loss(z):
        return F.cross_entropy(model(z), labels, reduction="none")

    for norm, eps, peer in (("l2", 0.1, torchattacks.PGDL2), ("linf", 0.5 / 255, torchattacks.PGD)):
        cfg = PGDConfig(norm=norm, steps=10, step_size=0.25)
        # Both draw their random start from the global generator in the same order: same start.
        torch.manual_seed(1)
        ours = pgd(loss, x, eps, cfg)
        torch.manual_seed(1)
        theirs_adv = peer(model, eps=eps, alpha=cfg.step_size * eps, steps=cfg.steps,
                          random_start=True)(x, labels)
        with torch.no_grad():
            theirs = loss(theirs_adv)
            fooled_ours = (model(x + ours.delta).argmax(1) != labels).sum()
            fooled_theirs = (model(theirs_adv).argmax(1) != labels).sum()
        assert ours.objective.mean() >= theirs.mean(), (norm, ours.objective.mean(), theirs.mean())
        assert (ours.objective >= theirs - 1e-4).float().mean() >= 0.95
        assert fooled_ours >= fooled_theirs > 0, (norm, fooled_ours, fooled_theirs)
        assert fooled_theirs < len(x)


# --- objectives ----------------------------------------------------------------------------------

def test_objective_values_match_their_definitions():
    enc, _, _ = svd_encoder()
    x = images(4, 8)
    d = torch.randn(4, 3, 8, 8, generator=gen(3)) * 0.05
    r0, r1 = enc(x), enc(x + d)
    m0, m1 = r0[:, :6].mean(1), r1[:, :6].mean(1)
    expected = {"abs": (m1 - m0).abs(), "increase": m1 - m0, "decrease": m0 - m1,
                "pattern": (r1[:, :6] - r0[:, :6]).norm(dim=1)}
    assert set(OBJECTIVES) == set(expected)
    for kind, want in expected.items():
        assert torch.allclose(make_objective(enc, "A", kind, x)(x + d), want, atol=1e-6), kind
    held = make_objective(enc, "A", "increase", x, hold={"B": 2.0})(x + d)
    b_change = r1[:, 6:].mean(1) - r0[:, 6:].mean(1)
    assert torch.allclose(held, m1 - m0 - 2.0 * b_change ** 2, atol=1e-6)


def test_abs_objective_has_the_roi_gradient_at_zero():
    enc, _, _ = svd_encoder()
    x = images(2, 8)
    z = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(make_objective(enc, "A", "abs", x)(z).sum(), z)
    w = enc.W[enc.rois["A"]].mean(0)
    assert torch.allclose(grad.flatten(1), w.expand(2, -1), atol=1e-6)


def test_hold_keeps_the_other_roi_nearly_fixed():
    enc, _, _ = svd_encoder()
    x = torch.full((2, 3, 8, 8), 0.5)
    # Small steps: the penalty's curvature needs them, or PGD rattles across its valley.
    cfg = PGDConfig(norm="l2", steps=100, step_size=0.02, **NO_CLAMP)
    free = pgd(make_objective(enc, "A", "increase", x), x, 1.0, cfg, gen())
    held = pgd(make_objective(enc, "A", "increase", x, hold={"B": 100.0}), x, 1.0, cfg, gen())

    def change(delta, roi):
        return enc.roi_response(x + delta, roi) - enc.roi_response(x, roi)

    assert (change(held.delta, "B").abs() < 0.2 * change(free.delta, "B").abs()).all()
    assert (change(held.delta, "A") >= 0.95 * change(free.delta, "A")).all()


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"restarts": 0}, "restarts"),
    ({"step_size": 0.0}, "step_size"), ({"step_size": -1.0}, "step_size"),
    ({"step_size": math.nan}, "step_size"), ({"step_size": math.inf}, "step_size"),
    ({"norm": "l1"}, "norm"), ({"restarts": 2, "random_start": False}, "restarts"),
    ({"method": "fgsm"}, "method"),
    ({"conv_window": 0.0}, "conv_window"), ({"conv_window": 1.5}, "conv_window"),
    ({"conv_gain_max": -0.1}, "conv_gain_max"), ({"conv_spread_max": math.nan}, "conv_spread_max"),
    ({"candidates": 0}, "candidates"), ({"candidates": 1.5}, "candidates"),
    ({"candidates": 4, "random_start": False}, "candidates"),
    ({"candidate_fraction": 0.0}, "candidate_fraction"),
    ({"candidate_fraction": math.nan}, "candidate_fraction"),
    ({"average_last": 0}, "average_last"), ({"average_last": 2.5}, "average_last"),
    ({"mirror_candidates": "yes"}, "mirror_candidates"), ({"mirror_candidates": 1}, "mirror_candidates"),
    ({"restarts": 2, "max_restarts": 1}, "max_restarts must be an integer >= 2"),
    ({"max_restarts": 2.5}, "max_restarts"), ({"max_restarts": True}, "max_restarts"),
    ({"max_restarts": 3, "random_start": False}, "max_restarts=3 needs attack.random_start"),
])
def test_bad_config_is_a_one_line_config_error(kwargs, field):
    with pytest.raises(ConfigError, match=field) as err:
        PGDConfig(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("eps", [0.0, -0.1, math.nan, math.inf, [], [0.1, 0.0], "big"])
def test_bad_eps_is_a_config_error_before_any_work(eps):
    with pytest.raises(ConfigError, match="eps"):
        validate_eps(eps)
    calls = []

    def objective(z):
        calls.append(1)
        return z.sum((1, 2, 3))

    with pytest.raises(ConfigError, match="eps"):
        pgd(objective, images(2, 8), eps, PGDConfig())
    assert calls == []


def test_bad_inputs_to_pgd_and_objectives():
    enc, _, _ = svd_encoder()
    x = images(2, 8)
    with pytest.raises(ConfigError, match="one per image"):
        pgd(lambda z: z.sum((1, 2, 3)), x, torch.tensor([0.1, 0.2, 0.3]), PGDConfig())
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        pgd(lambda z: z.sum((1, 2, 3)), x + 1, 0.1, PGDConfig())
    with pytest.raises(ConfigError, match="abs"):
        make_objective(enc, "A", "maximal", x)
    with pytest.raises(ConfigError, match="'B'"):
        make_objective(enc, "FFA", "abs", x)
    with pytest.raises(ConfigError, match="hold"):
        make_objective(enc, "A", "abs", x, hold={"B": -1.0})
    with pytest.raises(ConfigError, match="eval"):
        make_objective(enc.train(), "A", "abs", x)
    with pytest.raises(ConfigError, match="amp_dtype"):
        AttackRuntime(amp_dtype="int8")


# The bounds: L-inf 1e-6 and 1 per pixel; L2 1e-6 and 1 times sqrt(3 S^2) (110.85 at 64 px,
# 387.98 at 224 px).
@pytest.mark.parametrize("eps,norm,size,refused", [
    (1.2e-4, "l2", 64, None), (1.1e-4, "l2", 64, "is below 0.00011"),
    (4.0e-4, "l2", 224, None), (3.8e-4, "l2", 224, "is below 0.00039"),
    (110.8, "l2", 64, None), (110.9, "l2", 64, "reaches the largest l2"),
    (1e-6, "linf", 64, None), (9.9e-7, "linf", 224, "is below 1e-06"),
    (0.999, "linf", 224, None), (1.0, "linf", 64, "reaches the largest linf"),
])
def test_budgets_are_refused_at_their_bounds_and_kept_inside(eps, norm, size, refused):
    if refused is None:
        check_budget([eps], norm, size)
    else:
        with pytest.raises(ConfigError, match=refused):
            check_budget([eps], norm, size)
