"""The in-silico validation: stimuli of every method, scored by brains that never saw them."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import config_maker
from test_synthetic_brain import SMALL, linear_brain

from brainrobust.analysis.insilico import figures, ranking, summary
from brainrobust.errors import ConfigError
from brainrobust.plan import plan
from brainrobust.probes.insilico import RUN_KEYS, InSilicoProbe, Scorer

SIZE = 16
D = 3 * SIZE * SIZE
L2, LINF = 0.5, 0.01
N_STARTS = 6
ROIS = {"FFA": np.arange(0, 4), "EBA": np.arange(4, 8), "PPA": np.arange(8, 12)}
CONTRACT = {"images", "source_images", "image_id", "method", "norm", "budget", "achieved_norm",
            "converged", "roi"}


def probe(**kwargs) -> InSilicoProbe:
    settings = {"roi": "FFA", "budgets": {"l2": [L2], "linf": [LINF]},
                "run": {k: {} for k in RUN_KEYS},
                "attack": {"method": "apgd", "steps": 10, "random_start": False},
                "images": {"select": "first", "n": N_STARTS}, "mei": {"steps": 5}}
    return InSilicoProbe(**{**settings, **kwargs})


@pytest.fixture(scope="module")
def linear_world():
    """A linear brain of 3 subjects; the source encoder is subject 1's truth itself."""
    brain = linear_brain(SIZE)
    scorers = {s: brain.scorer(s, np.argwhere(np.ones((12, 1, 1), bool)), ROIS, SIZE)
               for s in brain.subjects}
    gen = torch.Generator().manual_seed(0)
    # Pixels in [0.3, 0.7]: the budgets below never reach the [0, 1] box (checked in the test).
    pool = 0.3 + 0.4 * torch.rand(12, 3, SIZE, SIZE, generator=gen)
    ids = np.arange(100, 112)
    p = probe()
    stimuli = p.make_stimuli(scorers[1], pool, ids, pool[:N_STARTS], ids[:N_STARTS],
                             torch.Generator().manual_seed(1)).arrays("FFA")
    sd = {r: 1.0 for r in ROIS}
    frames = [p.score(Scorer("source", "linear", 1, scorers[1], sd), stimuli, list(ROIS), "cpu")]
    frames += [p.score(Scorer("brain", "synthetic_brain", s, scorers[s], sd), stimuli, list(ROIS),
                       "cpu") for s in brain.subjects]
    records = pd.concat(frames, ignore_index=True).assign(probe="insilico", run_key="k",
                                                          source_model="linear")
    return scorers, stimuli, records


def gradient(scorer, roi: str = "FFA") -> torch.Tensor:
    x = torch.full((1, 3, SIZE, SIZE), 0.5, requires_grad=True)
    scorer.roi_response(x, roi).sum().backward()
    return x.grad[0].flatten().double()


def test_stimuli_keep_the_contract(linear_world):
    scorers, stimuli, _ = linear_world
    n = len(stimuli["images"])
    assert set(stimuli) == CONTRACT and n == N_STARTS * (3 * 2 + 3)
    assert stimuli["images"].shape == stimuli["source_images"].shape == (n, 3, SIZE, SIZE)
    assert stimuli["images"].dtype == np.float32 and stimuli["image_id"].dtype == np.int64
    assert stimuli["budget"].dtype == np.float32 and stimuli["converged"].dtype == bool
    assert set(stimuli["method"]) == {"targeted_increase", "targeted_decrease", "noise", "mei",
                                      "natural_top", "natural_bottom"}
    for k in range(n):
        diff = torch.from_numpy(stimuli["images"][k] - stimuli["source_images"][k])
        norm = diff.norm() if stimuli["norm"][k] == "l2" else diff.abs().max()
        # float32 norms of 768 pixels: relative rounding far below 1e-5.
        assert stimuli["achieved_norm"][k] == pytest.approx(float(norm), rel=1e-5, abs=1e-7)
        if not math.isnan(stimuli["budget"][k]):
            assert stimuli["achieved_norm"][k] <= stimuli["budget"][k] * (1 + 1e-5)
    top = stimuli["method"] == "natural_top"
    with torch.no_grad():
        ranked = np.argsort(-scorers[1].roi_response(
            torch.from_numpy(stimuli["images"][top]), "FFA").numpy())
    assert (np.diff(ranked) == 1).all()  # stored best first


def test_targeted_beats_noise_by_the_analytic_margin(linear_world):
    scorers, _, records = linear_world
    g = {s: gradient(m) for s, m in scorers.items()}
    unit = g[1] / g[1].norm()
    # The box is never reached: the largest pixel step of the optimum stays below 0.3.
    assert L2 * unit.abs().max() < 0.3 and LINF < 0.3
    # The brain's ROI is affine: the optimal L2 step is L2 * g1 / ||g1|| (L-inf: LINF sign(g1)),
    # and every subject s moves by g_s . step. PGD reaches that optimum at its first projected
    # step; float32 sums over 768 pixels leave relative errors near 1e-5.
    for s in scorers:
        rows = records[(records.scorer_kind == "brain") & (records.scorer_subject == s)]
        for norm, step in (("l2", L2 * unit), ("linf", LINF * torch.sign(g[1]))):
            for method, sign in (("targeted_increase", 1), ("targeted_decrease", -1)):
                got = rows[(rows.method == method) & (rows.norm_type == norm)].roi_change
                assert np.allclose(got, sign * float(g[s] @ step), rtol=1e-3), (s, norm, method)
    # Noise of norm eps along a random direction moves subject s by eps ||g_s|| / sqrt(D) x N(0, 1)
    # per image; its mean over N_STARTS images lies within 5 of those SDs.
    table = summary(records, n_boot=200)
    brain = table[table.scorer_kind == "brain"].set_index(["method", "norm_type"])
    own = table[table.scorer_kind == "source"].set_index(["method", "norm_type"])
    mean_g = float(np.mean([g[s] @ unit for s in scorers]))
    bound = 5 * L2 * max(float(v.norm()) for v in g.values()) / math.sqrt(D * N_STARTS)
    assert brain.loc[("targeted_increase", "l2"), "change"] == pytest.approx(L2 * mean_g, rel=1e-3)
    assert abs(brain.loc[("noise", "l2"), "change"]) <= bound
    margin = brain.loc[("targeted_increase", "l2"), "change"] - brain.loc[("noise", "l2"), "change"]
    assert margin >= L2 * mean_g - bound > 0
    assert own.loc[("targeted_increase", "l2"), "intended"] == 1.0
    assert own.loc[("targeted_increase", "l2"), "change"] == pytest.approx(
        L2 * float(g[1].norm()), rel=1e-3)


def test_ranking_and_figures_from_the_records(linear_world):
    _, _, records = linear_world
    # One held-out kind scoring exactly as the brain does ranks every condition as it does.
    copy = records[records.scorer_kind == "brain"].assign(scorer_kind="other_subject")
    ranks = ranking(pd.concat([records, copy]), n_boot=50)
    assert ranks.scorer_kind.tolist() == ["other_subject"]
    assert ranks.rho.iloc[0] == pytest.approx(1.0)
    figs, tables, not_drawn = figures(pd.concat([records, copy]), n_boot=50)
    assert set(figs) == {"insilico_change", "insilico_selectivity", "insilico_intended",
                         "insilico_ranking"} and not not_drawn and tables


@pytest.mark.parametrize("kwargs, message", [
    ({"budgets": {"l3": [1.0]}}, "budgets must map norms"),
    ({"run": {"data": {}}}, "insilico.run lacks"),
    ({"scorers": {"subject": [2]}}, "unknown key"),
    ({"mei": {"stpes": 3}}, "unknown key"),
])
def test_bad_settings_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        probe(**kwargs)


def test_plan_counts_attack_and_mei_steps(tmp_path):
    out = plan("insilico", [f"paths.results_dir={tmp_path}", f"paths.cache_dir={tmp_path}",
                            "probe.insilico.attack.steps=10", "probe.insilico.mei.steps=20"])
    # 8 starts x (2 directions x 4 budgets x 10 steps + 20 MEI steps)
    assert out["parts"]["insilico"]["image_steps"] == 8 * (2 * 4 * 10 + 20)


@pytest.mark.slow
def test_experiment_runs_on_the_synthetic_brain(tmp_path):
    from brainrobust.pipeline import run

    world = tmp_path / "world"
    # SMALL's world on the default grid, whose ROIs keep their default sizes.
    small = [f"++data.synthetic.{k}={v}" for k, v in SMALL.items() if k not in ("grid", "roi_sizes")]
    make = config_maker(world, tmp_path, "experiment=insilico", *small)
    cfg = make("probe.insilico.images.n=2", "probe.insilico.attack.steps=3",
               "probe.insilico.mei.steps=2", "probe.insilico.budgets.linf=[0.01]",
               "probe.insilico.budgets.l2=[0.5]", "probe.insilico.scorers.subjects=[2]")
    store = run(cfg)
    arrays = store.load_array("insilico_stimuli")
    assert set(arrays) == CONTRACT and len(arrays["images"]) == 2 * (3 * 2 + 3)
    records = store.read_records("insilico")
    scorers = records[["scorer_kind", "scorer_model", "scorer_subject"]].drop_duplicates()
    # Held-out kinds never use the encoder that made the stimuli (tiny_cnn_random, subject 1).
    held_out = scorers[~scorers.scorer_kind.isin(["source", "brain"])]
    assert not ((held_out.scorer_model == "tiny_cnn_random") & (held_out.scorer_subject == 1)).any()
    assert set(held_out.scorer_kind) == {"other_subject", "other_model", "other_both"}
    assert sorted(scorers[scorers.scorer_kind == "brain"].scorer_subject) == [1, 2]
    assert len(records) == len(arrays["images"]) * len(scorers)
