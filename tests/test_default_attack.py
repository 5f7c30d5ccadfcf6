"""The DEFAULT attack against known answers (issue 16): planted linear encoders whose optima are
closed-form, at the composed default config; the convergence report on every record; the
default's annealed step, Auto-PGD's mechanics and its torchattacks peer; and (slow) long
reference runs on the zoo's random CNN.

A planted encoder is f(x) = R B (x - 1/2): a linear "backbone" B (features x pixels) and a readout
R (voxels x features), both Gaussian, so the voxel-pattern optimum eps * sigma_1(R B) has
competitors close below it (sigma_2 / sigma_1 up to 0.98 here), which is what makes the
pattern objective slow for gradient ascent. Images lie within 0.05 of mid-grey and the optima
move no pixel by more than 0.45, so the [0, 1] box never binds at the optimum.

Tolerances: the spec's thresholds (>= 99% of the optimum, effect-matched eps within 0.5%) and,
for "never above the optimum", float32 rounding of the returned delta's norm (the objective of
the returned delta is recomputed in float64, so the encoder's own rounding plays no part).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import LinearEncoder, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from brainrobust.models.build import random_readout_encoder
from brainrobust.probes.ascent import STEP_RULES, apgd_checkpoints
from brainrobust.probes.attack import PGDConfig, _forked, expand_ladder, pgd, pgd_config
from brainrobust.probes.base import ProbeContext
from brainrobust.probes.objectives import make_objective
from brainrobust.probes.sensitivity import SensitivityProbe
from brainrobust.results.store import ResultsStore

U32 = 2.0 ** -24  # float32 unit roundoff
SIZE = 16
# ||delta|| may exceed eps only by float32 rounding: of eps itself (u), and in the L2 projection,
# of a norm summed pairwise (log2 D roundings) and of the rescaling (u).
NORM_SLACK = (2 + math.ceil(math.log2(3 * SIZE * SIZE))) * U32
EPS = {"l2": 0.5, "linf": 8 / 255}


pytestmark = pytest.mark.usefixtures("one_thread")


def default_attack(norm: str) -> PGDConfig:
    """The attack `python run.py` uses, with the norm of the given epsilon ladder."""
    cfg = compose_config() if norm == "l2" else compose_config("epsilon=linf")
    assert cfg.attack.norm == norm
    return pgd_config(OmegaConf.to_container(cfg.attack, resolve=True))


def planted(voxels: int = 200, features: int = 64, seed: int = 0) -> tuple[LinearEncoder, torch.Tensor]:
    """f(x) = R B (x - 1/2) with ROIs "roi" (the first half of the voxels) and "all"."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(features, 3 * SIZE * SIZE, generator=g, dtype=torch.float64) / SIZE
    R = torch.randn(voxels, features, generator=g, dtype=torch.float64) / math.sqrt(features)
    W = R @ B
    rois = {"roi": list(range(voxels // 2)), "all": list(range(voxels))}
    return LinearEncoder(W.float(), rois, b=-(W.sum(1) * 0.5).float()).eval(), W


def block_planted(voxels: int = 12, seed: int = 0) -> tuple[LinearEncoder, torch.Tensor]:
    """Voxels reading disjoint pixel blocks: the L-inf pattern optimum is known in closed form."""
    g = torch.Generator().manual_seed(seed)
    pixels = 3 * SIZE * SIZE
    W = torch.zeros(voxels, pixels, dtype=torch.float64)
    for v, block in enumerate(torch.randperm(pixels, generator=g).chunk(voxels)):
        W[v, block] = torch.randn(len(block), generator=g, dtype=torch.float64) / SIZE
    return LinearEncoder(W.float(), {"all": list(range(voxels))}, b=-(W.sum(1) * 0.5).float()).eval(), W


def near_grey(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 0.05 * (2 * torch.rand(n, 3, SIZE, SIZE, generator=g) - 1)


def smooth_images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    """Natural-image-like inputs: random 8 x 8 colour fields, upsampled."""
    low = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False)


def attack(encoder, W, roi, kind, norm, n=8, seed=0, cfg=None):
    """(exact float64 objective of the returned delta, the result) at the default config."""
    x = near_grey(n)
    cfg = cfg or default_attack(norm)
    result = pgd(make_objective(encoder, roi, kind, x), x, EPS[norm], cfg,
                 generator=torch.Generator().manual_seed(seed))
    rows = W[encoder.rois[roi]]
    change = result.delta.double().flatten(1) @ rows.T
    exact = {"increase": change.mean(1), "decrease": -change.mean(1), "abs": change.mean(1).abs(),
             "pattern": change.norm(dim=1)}[kind]
    return exact, result


def never_above(exact, optimum):
    assert (exact <= optimum * (1 + NORM_SLACK)).all(), (exact / optimum).max()


# --- known answers at the default config ----------------------------------------------------------

def box_optimum(g: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """max g . d over ||d|| <= eps and 0 <= x + d <= 1, per image, in float64 (the KKT solution:
    L-inf moves every pixel to its nearer bound; L2 is d = clip(t g) with t bisected to
    ||d|| = eps, or the whole box where it fits inside the ball)."""
    g, x = g.double(), x.double().flatten(1)
    lo, hi = -x, 1 - x
    if norm == "linf":
        return (g * torch.where(g > 0, hi.clamp(max=eps), lo.clamp(min=-eps))).sum(1)
    t_lo = torch.zeros(len(x), 1, dtype=torch.float64)
    t_hi = torch.full((len(x), 1), 1e6, dtype=torch.float64)
    for _ in range(200):
        t = (t_lo + t_hi) / 2
        inside = torch.minimum(torch.maximum(t * g, lo), hi).norm(dim=1, keepdim=True) < eps
        t_lo, t_hi = torch.where(inside, t, t_lo), torch.where(inside, t_hi, t)
    return (g * torch.minimum(torch.maximum(t_lo * g, lo), hi)).sum(1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_abs_finds_the_stronger_sign_where_the_box_binds_unevenly(norm):
    # The top half of every image is white, so there a pixel can only darken, and a weight on
    # those pixels makes darkening the stronger sign (the two optima differ by 4-6%). A run of
    # `abs` commits to one sign at its start (a quarter of images had both restarts on the weaker
    # one before the default screened its starts, reported as converged).
    _, W = planted()
    roi = list(range(100))
    white = torch.zeros(3, SIZE, SIZE, dtype=torch.float64)
    white[:, : SIZE // 2] = 1
    W = W + 0.1 * W[roi].mean(0).abs().mean() * white.flatten()
    encoder = LinearEncoder(W.float(), {"roi": roi}, b=-(W.sum(1) * 0.5).float()).eval()
    x = near_grey(16)
    x[:, :, : SIZE // 2] = 1.0
    g = W[roi].mean(0)
    optimum = torch.maximum(box_optimum(g, x, EPS[norm], norm), box_optimum(-g, x, EPS[norm], norm))
    result = pgd(make_objective(encoder, "roi", "abs", x), x, EPS[norm], default_attack(norm),
                 generator=torch.Generator().manual_seed(0))
    exact = (result.delta.double().flatten(1) @ g).abs()
    assert (exact >= 0.99 * optimum).all(), exact / optimum
    never_above(exact, optimum)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("kind", ["abs", "increase", "decrease"])
def test_roi_mean_reaches_its_optimum(norm, kind):
    encoder, W = planted()
    w_bar = W[encoder.rois["roi"]].mean(0)
    assert EPS["l2"] * w_bar.abs().max() / w_bar.norm() < 0.45  # the box never binds
    optimum = EPS[norm] * (w_bar.norm() if norm == "l2" else w_bar.abs().sum())
    exact, _ = attack(encoder, W, "roi", kind, norm)
    assert (exact >= 0.99 * optimum).all(), (exact / optimum).min()
    never_above(exact, optimum)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_l2_pattern_reaches_the_top_singular_value(seed):
    encoder, W = planted(seed=seed)
    sigma = torch.linalg.svdvals(W)
    top = torch.linalg.svd(W)[2][0]
    assert EPS["l2"] * top.abs().max() < 0.45  # the box never binds at the optimum
    optimum = EPS["l2"] * sigma[0]
    exact, _ = attack(encoder, W, "all", "pattern", "l2")
    assert (exact >= 0.99 * optimum).all(), ((exact / optimum).min(), sigma[1] / sigma[0])
    never_above(exact, optimum)


def test_linf_pattern_reaches_the_block_optimum():
    encoder, W = block_planted()
    # ||W d||^2 = sum_v (w_v . d)^2 with disjoint supports: each block at eps * sign(w_v).
    optimum = EPS["linf"] * W.abs().sum(1).norm()
    exact, _ = attack(encoder, W, "all", "pattern", "linf")
    assert (exact >= 0.99 * optimum).all(), (exact / optimum).min()
    never_above(exact, optimum)


def test_effect_matched_eps_is_within_half_a_percent(tmp_path):
    cfg = compose_config("probe=[effect_matched]")
    probe = instantiate(cfg.probe.effect_matched, _convert_="all")
    assert probe.attack == default_attack("l2")
    encoder, W = planted(voxels=6, features=6)
    images = near_grey(6)
    ids = np.arange(len(images))
    store = ResultsStore(tmp_path).run({"t": 1}, {"model": "planted"})
    stats = {"test_sd": 0.4, "noise_ceiling": 25.0}
    ctx = ProbeContext(images=images, image_ids=ids, responses=np.zeros((len(ids), 6)),
                       rois=["roi", "all"], roi_stats={"roi": stats, "all": stats},
                       meta={"model": "planted"}, store=store)
    probe.rois = ["roi"]
    probe.bind(ctx)
    records = probe.run(encoder, ctx)
    out = records.pivot_table(index="image_id", columns="metric", values="value")
    effect = probe.effect_value * stats["test_sd"]
    expected = effect / W[encoder.rois["roi"]].mean(0).norm().item()
    np.testing.assert_allclose(out["eps_found"], expected, rtol=0.005)
    # The final bracket is recorded; the stored delta (at its upper end) reaches the effect.
    assert (out["eps_lo"] < out["eps_found"]).all() and (out["eps_hi"] == out["eps_found"]).all()
    assert (out["effect"] >= effect).all()
    assert {"conv_gain", "conv_spread", "converged", "restarts"} <= set(out.columns)


# --- the convergence report ----------------------------------------------------------------------

def test_sensitivity_records_carry_the_convergence_report(tmp_path):
    encoder, _ = planted(voxels=6, features=6)
    images = near_grey(4)
    store = ResultsStore(tmp_path).run({"t": 1}, {"model": "planted"})
    stats = {"test_sd": 1.0, "noise_ceiling": 25.0}
    ctx = ProbeContext(images=images, image_ids=np.arange(4), responses=np.zeros((4, 6)),
                       rois=["roi"], roi_stats={"roi": stats}, meta={"model": "planted"}, store=store)
    for restarts in (1, 2):
        cfg = PGDConfig(method="apgd", steps=30, restarts=restarts)
        probe = SensitivityProbe(cfg, eps=[0.1, 0.3], random_draws=1)
        probe.bind(ctx)
        records = probe.run(encoder, ctx)
        wide = records.pivot_table(index=["image_id", "eps"], columns="metric", values="value",
                                   dropna=False)
        assert set(records.attack_method) == {"apgd"}
        assert (wide["converged"] == 1.0).all()  # a linear ROI mean: solved in a few steps
        assert (wide["conv_gain"].abs() <= cfg.conv_gain_max).all()
        # With one restart there is no spread to judge: NaN, honestly.
        assert wide["conv_spread"].isna().all() == (restarts == 1)
        assert (wide["restarts"] == restarts).all()  # no max_restarts: none added


def test_the_flag_catches_the_short_fixed_step_pgd():
    encoder, W = planted(seed=1)
    optimum = EPS["l2"] * torch.linalg.svdvals(W)[0]
    exact, result = attack(encoder, W, "all", "pattern", "l2", n=16, cfg=PGDConfig(norm="l2"))
    short = exact < 0.99 * optimum
    assert short.sum() >= 8  # 20 Madry steps fall short on most images ...
    assert (result.converged[short] == 0).all()  # ... and every short one is flagged


def test_spread_and_flag_follow_their_definitions():
    encoder, _ = planted(voxels=6, features=6)
    x = near_grey(5)
    objective = make_objective(encoder, "all", "pattern", x)
    cfg = PGDConfig(method="apgd", steps=6, restarts=3, conv_gain_max=0.5, conv_spread_max=1e-3)
    best = pgd(objective, x, 0.5, cfg, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same stream, one restart per call
    single = PGDConfig(**{**cfg.__dict__, "restarts": 1})
    values = torch.stack([pgd(objective, x, 0.5, single, generator=g).objective for _ in range(3)])
    top2 = values.topk(2, dim=0).values  # the best and the runner-up per image
    spread = (top2[0] - top2[1]) / top2[0]
    torch.testing.assert_close(best.conv_spread, spread)
    expected = (best.conv_gain <= 0.5) & (spread <= 1e-3)
    assert torch.equal(best.converged, expected.float())


@pytest.mark.parametrize("restarts, spread_max, expected", [(2, 1e-9, 5), (2, 0.5, 2), (1, 0.5, 2)])
def test_restarts_are_added_until_every_best_is_confirmed(restarts, spread_max, expected):
    """Through a wrapper that computes something else (twice the objective) but copies the
    objective's attributes, `rows` among them: the whole batch restarts on the wrapper, so the
    result is the best of the first k single restarts of the same streams. One restart
    confirms nothing."""
    encoder, _ = planted(voxels=6, features=6)
    x = near_grey(5)
    original = make_objective(encoder, "all", "pattern", x)
    objective = functools.wraps(original)(lambda images: 2 * original(images))
    cfg = PGDConfig(method="apgd", steps=6, restarts=restarts, max_restarts=5,
                    conv_spread_max=spread_max)
    result = pgd(objective, x, 0.5, cfg, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the first restarts' stream, then the added ones'
    single = PGDConfig(**{**cfg.__dict__, "restarts": 1, "max_restarts": None})
    values = [pgd(objective, x, 0.5, single, generator=g).objective for _ in range(restarts)]
    more = _forked(g)
    values += [pgd(objective, x, 0.5, single, generator=more).objective
               for _ in range(5 - restarts)]
    for k in range(2, 6):  # the first count at which every image's runner-up confirms its best
        top2 = torch.stack(values[:k]).topk(2, dim=0).values
        if ((top2[0] - top2[1]) / top2[0] <= spread_max).all():
            break
    assert result.restarts.tolist() == [k] * 5 and k == expected
    torch.testing.assert_close(result.objective, torch.stack(values[:k]).amax(0))


def test_only_the_unconfirmed_images_restart():
    encoder, _ = planted(voxels=6, features=6)
    x = near_grey(8)
    objective = make_objective(encoder, "all", "pattern", x)
    two = PGDConfig(method="apgd", steps=6, restarts=2, conv_spread_max=2e-3)
    first = pgd(objective, x, 0.5, two, generator=torch.Generator().manual_seed(3))
    unconfirmed = ~(first.conv_spread <= 2e-3)
    assert 0 < unconfirmed.sum() < len(x)  # the case this test is about
    g = torch.Generator().manual_seed(3)
    more = pgd(objective, x, 0.5, replace(two, max_restarts=6), generator=g)
    g_none = torch.Generator().manual_seed(3)  # the same settings, but every image confirmed
    pgd(objective, x, 0.5, replace(two, max_restarts=6, conv_spread_max=1.0), generator=g_none)
    # The caller's stream moves on the same however many images restarted.
    assert torch.equal(g.get_state(), g_none.get_state())
    assert (more.restarts[~unconfirmed] == 2).all() and (more.restarts[unconfirmed] > 2).all()
    for name in ("delta", "objective", "conv_spread"):  # the confirmed rows are untouched
        torch.testing.assert_close(getattr(more, name)[~unconfirmed],
                                   getattr(first, name)[~unconfirmed])
    assert (more.objective >= first.objective).all()
    assert ((more.conv_spread <= 2e-3) | (more.restarts == 6)).all()
    with torch.no_grad():  # each image's value is that of its own returned delta
        torch.testing.assert_close(objective(x + more.delta), more.objective)


# --- the annealed step (the default) and Auto-PGD's mechanics -------------------------------------

@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_the_annealed_step_falls_from_its_first_step_to_nothing(norm):
    # A recorder sees every iterate. The ball and the box are convex and hold the current
    # iterate, so their projections move it by at most the step: move t <= h_t = h_0
    # (1 + cos(pi t / T)) / 2 in the budget's norm, h_0 = 4 eps in L2 and 2 eps (the cube's
    # diameter) in L-inf, and the first move crosses much of the ball.
    # (A fixed step, or one that shrank more slowly, would exceed the bound near the end.)
    g = torch.Generator().manual_seed(0)
    pixels, units, eps, steps = 3 * SIZE * SIZE, 500, EPS[norm], 20
    U = torch.randn(units, pixels, generator=g, dtype=torch.float64) / math.sqrt(pixels)
    c = torch.randn(units, generator=g, dtype=torch.float64) / math.sqrt(units)
    seen = []

    def objective(z):
        seen.append(z.detach().clone())
        return torch.relu((z - 0.5).flatten(1) @ U.T) @ c

    x = near_grey(4).double()
    cfg = default_attack(norm)
    first = {"l2": 4.0, "linf": 2.0}[norm]
    assert (cfg.method, cfg.step_size) == ("cosine", first)
    pgd(objective, x, eps, replace(cfg, steps=steps, restarts=1, max_restarts=None, candidates=1),
        generator=torch.Generator().manual_seed(0))
    assert len(seen) == steps + 1
    moves = torch.stack([(b - a).flatten(1) for a, b in itertools.pairwise(seen)])
    length = moves.norm(dim=2) if norm == "l2" else moves.abs().amax(2)
    bound = torch.tensor([first * eps * (1 + math.cos(math.pi * t / steps)) / 2
                          for t in range(steps)], dtype=torch.float64)
    assert (length <= bound[:, None] * (1 + 1e-9) + 1e-12).all(), length / bound[:, None]
    assert (length[0] >= 0.5 * eps).all(), length[0] / eps
    # The rule's own step, set before each step t, is the bound itself.
    rule = STEP_RULES[cfg.method](replace(cfg, steps=steps), torch.full((1,), eps, dtype=torch.float64))
    steps_taken = []
    for t in range(steps):
        rule.update(t, torch.zeros(1), torch.zeros(1))
        steps_taken.append(float(rule.length))
    assert steps_taken == pytest.approx(bound.tolist(), rel=1e-12)


def test_checkpoints_are_croce_and_heins():
    # p_0 = 0, p_1 = 0.22, p_j+1 = p_j + max(p_j - p_j-1 - 0.03, 0.06): 0.22, 0.41, 0.57, ...
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1) == []
    assert apgd_checkpoints(5) == [1, 2, 3, 4]


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_step_halving_finds_an_interior_optimum(norm):
    # f(d) = -(w . d - a)^2 peaks inside the ball (w . d = a): a fixed step of 2 eps jumps
    # across it forever; Auto-PGD halves its step where the objective oscillates and lands on it.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 8 * 8, generator=g, dtype=torch.float64)
    x = torch.full((4, 3, 8, 8), 0.5, dtype=torch.float64)
    eps = 0.5
    reach = eps * (w.norm() if norm == "l2" else w.abs().sum())
    a = 0.3 * reach

    def objective(z):
        return -((z - 0.5).flatten(1) @ w - a) ** 2

    apgd = pgd(objective, x, eps, PGDConfig(method="apgd", norm=norm, steps=100), generator=g)
    fixed = pgd(objective, x, eps, PGDConfig(norm=norm, steps=100, step_size=2.0), generator=g)
    # Halved at 8 checkpoints, the last steps are eps / 128 long.
    assert (apgd.objective.abs().sqrt() <= reach / 128).all(), apgd.objective.abs().sqrt() / reach
    assert (fixed.objective.abs().sqrt() > 10 * reach / 128).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_the_last_evaluation_tries_the_mean_of_the_last_iterates(norm):
    # A recorder sees every point a run evaluates: its iterates, then (Auto-PGD) the mean of the
    # last three, scaled out to the budget and put back in the box; PGD evaluates no mean.
    encoder, _ = planted()
    x = near_grey(4)
    x[:, 0] = 1.0  # a white channel: the box binds on the mean too
    objective = make_objective(encoder, "all", "pattern", x)
    seen = []

    def recorded(z):
        seen.append(z.detach().clone() - x)
        return objective(z)

    eps = EPS[norm]
    result = pgd(recorded, x, eps, PGDConfig(method="apgd", norm=norm, steps=6),
                 generator=torch.Generator().manual_seed(0))
    assert len(seen) == 6 + 2
    mean = torch.stack(seen[-4:-1]).mean(0)
    scale = eps / mean.flatten(1).norm(dim=1) if norm == "l2" else eps / mean.flatten(1).abs().amax(1)
    expected = torch.minimum(torch.maximum(mean * scale.view(-1, 1, 1, 1), -x), 1 - x)
    torch.testing.assert_close(seen[-1], expected, rtol=0, atol=1e-6)
    values = torch.stack([objective(x + d) for d in seen])
    torch.testing.assert_close(result.objective, values.amax(0))  # kept where it is better
    seen.clear()
    pgd(recorded, x, eps, PGDConfig(norm=norm, steps=6), generator=torch.Generator().manual_seed(0))
    assert len(seen) == 6 + 1
    # Screened candidates (3 steps each) are ranked where their runs got: only the restart's own
    # run tries its mean.
    seen.clear()
    pgd(recorded, x, eps, PGDConfig(method="apgd", norm=norm, steps=30, candidates=2),
        generator=torch.Generator().manual_seed(0))
    assert len(seen) == 2 * (3 + 1) + 30 + 2


def test_the_mean_of_the_last_iterates_lifts_short_runs_on_a_relu_network():
    # A random one-hidden-layer ReLU network whose units switch at the scale of the budget, as a
    # random-init CNN's do: its gradient turns from iterate to iterate, so a short run's iterates
    # scatter around the optimum. Eight images, the mean over them; averaging off is the control.
    g = torch.Generator().manual_seed(0)
    pixels, units, eps = 3 * SIZE * SIZE, 2000, 0.5
    U = torch.randn(units, pixels, generator=g, dtype=torch.float64) / math.sqrt(pixels)
    b = torch.randn(units, generator=g, dtype=torch.float64) * eps / math.sqrt(pixels)
    c = torch.randn(units, generator=g, dtype=torch.float64) / math.sqrt(units)

    def objective(z):
        return torch.relu((z - 0.5).flatten(1) @ U.T + b) @ c

    x = near_grey(8).double()
    reference = pgd(objective, x, eps, PGDConfig(method="apgd", steps=400, restarts=4),
                    generator=torch.Generator().manual_seed(9)).objective
    quality = {}
    for average_last in (1, 3):
        cfg = PGDConfig(method="apgd", steps=6, average_last=average_last)
        result = pgd(objective, x, eps, cfg, generator=torch.Generator().manual_seed(0))
        quality[average_last] = float((result.objective / reference).mean())
    # Measured: 0.961 without the mean, 0.977 with it (a 40% smaller shortfall); a margin of
    # 0.008 leaves room for another CPU's rounding, which can move a trajectory at a ReLU's kink.
    assert quality[3] >= quality[1] + 0.008, quality


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_every_second_candidate_starts_at_the_mirror_image_of_the_one_before(norm):
    # A recorder sees every point the attack evaluates. Per restart: 4 candidates of 3 steps
    # (4 evaluations each), then the restart's own 30 steps (32 evaluations, its mean included).
    # A third restart is added where the two disagree at all (the recorder has no `rows`: the
    # whole batch restarts).
    encoder, _ = planted()
    x = near_grey(4)
    objective = make_objective(encoder, "all", "pattern", x)
    seen = []

    def recorded(z):
        seen.append(z.detach().clone() - x)
        return objective(z)

    def best(points):
        values = torch.stack([objective(x + d) for d in points])
        return torch.stack(points)[values.argmax(0), torch.arange(len(x))]

    cfg = PGDConfig(method="apgd", norm=norm, steps=30, restarts=2, max_restarts=3,
                    candidates=4, mirror_candidates=True, conv_spread_max=0.0)
    pgd(recorded, x, EPS[norm], cfg, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 3 * (4 * 4 + 32)
    exact = functools.partial(torch.testing.assert_close, rtol=0, atol=1e-7)
    for restart in (0, 48, 96):
        exact(seen[restart + 4], -best(seen[restart:restart + 4]))  # candidate 1: mirror of 0
        exact(seen[restart + 12], -best(seen[restart + 8:restart + 12]))  # 3 of 2
        assert not torch.allclose(seen[restart + 8], -best(seen[restart + 4:restart + 8]))
    # Nothing carries over: a later restart's first start is random, not the earlier best's mirror.
    for restart, earlier in ((48, seen[16:48]), (96, seen[16:48] + seen[64:96])):
        assert not torch.allclose(seen[restart], -best(earlier), atol=1e-3)
        assert not torch.allclose(seen[restart], best(earlier), atol=1e-3)
    seen.clear()
    pgd(recorded, x, EPS[norm], replace(cfg, mirror_candidates=False),
        generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(seen[4], -best(seen[:4]))


@pytest.mark.parametrize("steps, candidates, weaker", [(30, 4, 6), (100, 2, 7)])
def test_mirrored_candidates_find_the_stronger_of_a_mirror_pair(steps, candidates, weaker):
    # A planted even objective made uneven by a quadratic term along its top direction v1:
    # ||J d + beta (v1 . d)^2 u1|| has two local optima on the sphere ||d|| = eps, +eps v1 at
    # eps s1 + beta eps^2 (the global one) and its mirror -eps v1 at eps s1 - beta eps^2 (0.82
    # of it). A run settles in the pair's member its start leads to; with the mirrors, every
    # random candidate's mirror image is screened too. One restart of the default otherwise,
    # long enough for a candidate to settle (3 and 10 steps); 32 images are 32 independent
    # trials.
    g = torch.Generator().manual_seed(0)
    pixels, voxels, eps = 3 * SIZE * SIZE, 50, 0.5
    U = torch.linalg.qr(torch.randn(voxels, voxels, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(pixels, voxels, generator=g, dtype=torch.float64))[0]
    s = torch.cat([torch.tensor([2.0]), torch.linspace(1.0, 0.1, voxels - 1)]).double()
    J, beta = U @ torch.diag(s) @ V.T, 0.1 * s[0] / eps
    x = near_grey(32).double()

    def objective(z):
        d = (z - x).flatten(1)
        return (d @ J.T + beta * (d @ V[:, 0]).pow(2)[:, None] * U[:, 0]).norm(dim=1)

    optimum = eps * s[0] + beta * eps**2
    quality = {}
    for mirror in (False, True):
        cfg = replace(default_attack("l2"), steps=steps, restarts=1, max_restarts=None,
                      candidates=candidates, mirror_candidates=mirror)
        result = pgd(objective, x, eps, cfg, generator=torch.Generator().manual_seed(0))
        quality[mirror] = result.objective / optimum
    assert (quality[True] >= 0.99).all(), quality[True].min()
    # Measured without the mirrors: `weaker` of the 32 images on the weaker optimum.
    assert (quality[False] < 0.83).sum() >= weaker // 2, quality[False]
    assert (quality[True] <= 1 + 1e-9).all()  # never above the closed-form optimum


def test_auto_pgd_keeps_the_engine_guarantees():
    encoder, W = planted(voxels=6, features=6)
    x = near_grey(3)
    ladder = [0.05, 0.2, 0.8]
    xe, eps, _ = expand_ladder(x, ladder)
    cfg = PGDConfig(method="apgd", steps=12, restarts=2)
    for norm in ("l2", "linf"):
        cfg = PGDConfig(**{**cfg.__dict__, "norm": norm})
        objective = make_objective(encoder, "all", "pattern", xe)
        a = pgd(objective, xe, eps, cfg, generator=torch.Generator().manual_seed(5))
        b = pgd(objective, xe, eps, cfg, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a.delta, b.delta) and torch.equal(a.conv_gain, b.conv_gain)
        assert (a.norm <= eps * (1 + NORM_SLACK)).all()
        assert ((xe + a.delta) >= 0).all() and ((xe + a.delta) <= 1).all()
        with torch.no_grad():  # the reported objective is that of the returned delta
            torch.testing.assert_close(a.objective, objective(xe + a.delta))
    # From delta = 0 the pattern's gradient vanishes: the fallback direction moves it off.
    zero = pgd(make_objective(encoder, "all", "pattern", x), x, 0.5,
               PGDConfig(method="apgd", steps=30, random_start=False))
    assert (zero.objective >= 0.99 * 0.5 * torch.linalg.svdvals(W)[0]).all()


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 2 / 255)])
def test_as_strong_as_torchattacks_auto_pgd(norm, eps):
    torchattacks = pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(256, 10)).eval()
    with torch.no_grad():
        model[-1].weight.mul_(100.0)
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model(x).argmax(1)

    def loss(z):
        return F.cross_entropy(model(z), labels, reduction="none")

    ours = pgd(loss, x, eps, PGDConfig(method="apgd", norm=norm, steps=20),
               generator=torch.Generator().manual_seed(0))
    peer = torchattacks.APGD(model, norm={"l2": "L2", "linf": "Linf"}[norm], eps=eps, steps=20,
                             n_restarts=1, seed=0, loss="ce")
    with torch.no_grad():
        theirs = loss(peer.perturb(x, labels, best_loss=True)[1])
    # The same algorithm from other random starts: equal on average within their spread.
    assert ours.objective.mean() >= 0.99 * theirs.mean(), (ours.objective.mean(), theirs.mean())


# --- nonlinear encoders: the zoo's random-init CNN against a long reference ----------------------

@pytest.mark.slow
@pytest.mark.parametrize("norm,eps,floor", [("l2", 0.1, 0.99), ("linf", 0.5 / 255, 0.99),
                                            ("l2", 1.0, 0.98)])
def test_default_against_long_references_on_a_random_cnn(norm, eps, floor):
    # The smallest budgets of the default ladders (l2_small, linf) and the largest L2 one, against
    # long runs (400 steps x 4 restarts) of Auto-PGD and of the default's own schedule. Within 1%
    # of Auto-PGD's long runs everywhere (the spec's reference). Against the best of both: within
    # 1% at the small budgets; at eps 1.0 the random network is rugged and the default's own long
    # anneal still climbs 1-2% beyond its 100 steps (measured 0.986 here; at 64 px 97.9-98.8% of
    # the best of long runs of both, Auto-PGD at its budget 95.0-96.3%; RESULTS.md), and the
    # report flags those images.
    encoder = random_readout_encoder("tiny_cnn_random", size=32, voxels=100)
    x = smooth_images(6, 32)
    cfg = default_attack(norm)
    composed = compose_config("attack=apgd", *(["epsilon=linf"] if norm == "linf" else []))
    auto_pgd = pgd_config(OmegaConf.to_container(composed.attack, resolve=True))
    for kind in ("abs", "pattern"):
        objective = make_objective(encoder, "half", kind, x)
        long_auto_pgd, long_default = (
            pgd(objective, x, eps, replace(c, steps=400, restarts=4, max_restarts=None),
                generator=torch.Generator().manual_seed(9)).objective for c in (auto_pgd, cfg))
        ours = pgd(objective, x, eps, cfg, generator=torch.Generator().manual_seed(0)).objective
        # Means over images: the random CNN's optima differ by restart (conv_spread shows it),
        # so one image may land in a lower one; the study reports means over images.
        assert (ours / torch.maximum(long_auto_pgd, ours)).mean() >= 0.99, kind
        best = torch.stack([long_auto_pgd, long_default, ours]).amax(0)
        assert (ours / best).mean() >= floor, (kind, ours / best)
