"""The sweep cost model: each setting that changes a job's work moves the estimate by its factor."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import REPO, compose_config
from omegaconf import OmegaConf

from brainrobust.costs import GMACS, backbone_scale, search_rounds
from brainrobust.data.synthetic import ensure_synthetic_nsd
from brainrobust.errors import ConfigError
from brainrobust.identity import config_identity, key_columns
from brainrobust.models.zoo import list_models, model_config
from brainrobust.plan import job_configs, job_fingerprint, plan
from brainrobust.results.store import ResultsStore

# The default synthetic twin, before a run writes it: 80 test images.
N_TEST = 80


def job_overrides(tmp_path, *overrides):
    """One job (model, subject, ROI; 20-step PGD) with an empty results store, then `overrides`."""
    job = {"paths.results_dir": tmp_path / "results", "paths.cache_dir": tmp_path / "cache",
           "model": "resnet50", "subject": 1, "roi": "FFA", "attack": "pgd"}
    job.update(o.split("=", 1) for o in overrides)
    return [f"{key}={value}" for key, value in job.items()]


def one_job(tmp_path, *overrides, experiment="sensitivity"):
    return plan(experiment, job_overrides(tmp_path, *overrides))


def part(out, name):
    return out["parts"][name]


def test_sensitivity_counts_rows_times_steps(tmp_path):
    p = part(one_job(tmp_path), "sensitivity")
    ladder = len(compose_config("experiment=sensitivity").epsilon.ladder)
    assert p["image_steps"] == N_TEST * ladder * 20
    assert p["forwards"] == N_TEST * ladder * (2 + 4)  # clean, attacked, 4 random draws


@pytest.mark.parametrize(("override", "steps", "forwards"), [
    ("attack.steps=40", 2, 1),
    ("attack.steps=2000", 100, 1),
    ("attack.restarts=3", 3, 1),
    ("attack=pgd_strong", 25, 1),  # 100 steps x 5 restarts
    ("attack=apgd", 28, 1),  # (4 candidates x 10 steps + 100 steps) x at most 4 restarts
    ("epsilon=l2_small", 0.5, 0.5),  # 3 budgets instead of 6
    ("probe.sensitivity.max_images=8", 0.1, 0.1),
    ("probe.sensitivity.random_draws=8", 1, 10 / 6),
    ("roi=[FFA,EBA,PPA]", 3, 3),
])
def test_sensitivity_follows_its_settings(tmp_path, override, steps, forwards):
    before = part(one_job(tmp_path), "sensitivity")
    after = part(one_job(tmp_path, override), "sensitivity")
    assert after["image_steps"] == pytest.approx(steps * before["image_steps"])
    assert after["forwards"] == pytest.approx(forwards * before["forwards"])
    assert after["hours"] / before["hours"] == pytest.approx(steps, rel=0.1)


def test_an_attack_that_may_add_restarts_is_counted_at_its_most(tmp_path):
    out = one_job(tmp_path, "attack=apgd")
    assert ("probe.sensitivity's attack counted at max_restarts=4; an image stops earlier once a "
            "second restart confirms its best") in out["notes"]
    assert not any("max_restarts" in note for note in one_job(tmp_path)["notes"])


def test_probe_rois_narrow_the_encoders(tmp_path):
    one = part(one_job(tmp_path), "sensitivity")
    narrowed = part(one_job(tmp_path, "roi=[FFA,EBA,PPA]", "probe.sensitivity.rois=[FFA]"),
                    "sensitivity")
    assert narrowed["image_steps"] == one["image_steps"]


def test_test_images_come_from_the_dataset(tmp_path, synthetic_root):
    root, _ = synthetic_root
    out = one_job(tmp_path, "data=nsd", f"data.root={root}")
    assert part(out, "test-split forwards")["forwards"] == N_TEST
    assert part(out, "backbone feature passes")["forwards"] == 670  # subject 1: 3 sessions
    twin = one_job(tmp_path, "data=nsd", f"data.root={root}", "subject=3")
    assert part(twin, "backbone feature passes")["forwards"] == 638  # 2 sessions


def test_effect_matched_counts_bracketing_and_bisection(tmp_path):
    # eps 0.01 .. 10 by x2: 11 bracketing runs; bisection of a x2 bracket to 1%: 7 runs; then
    # one attempt at the interpolated crossing.
    assert search_rounds(0.01, 10.0, 2.0, 0.01) == 19
    assert search_rounds(0.01, 20.0, 2.0, 0.01) == 20
    assert search_rounds(0.01, 10.0, 2.0, 0.005) == 20
    assert search_rounds(0.01, 10.0, 4.0, 0.01) == 6 + 9 + 1
    base = part(one_job(tmp_path, experiment="effect_matched"), "effect_matched")
    assert base["image_steps"] == N_TEST * 19 * 20
    wider = part(one_job(tmp_path, "probe.effect_matched.eps_max=20.0", "attack.steps=40",
                         experiment="effect_matched"), "effect_matched")
    assert wider["image_steps"] == pytest.approx(base["image_steps"] * 20 / 19 * 2)


# (experiment, probe, image-steps at the experiment's settings, override, factor on them)
SUBSPACE, TARGETED = ("subspace", "subspace", 50 * 15 * 33), ("targeted", "targeted", 4 * 7 * 32)


@pytest.mark.parametrize(("job", "override", "factor"), [
    (SUBSPACE, "probe.subspace.k=20", 25 / 15),  # k + oversample block columns
    (SUBSPACE, "probe.subspace.oversample=0", 10 / 15),
    (SUBSPACE, "probe.subspace.max_iters=24", 49 / 33),  # 2 max_iters + 1 blocks
    (SUBSPACE, "probe.subspace.max_images=5", 0.1),
    (SUBSPACE, "roi=[FFA,EBA]", 2),
    (TARGETED, "probe.targeted.attack.steps=320", 10),
    (TARGETED, "probe.targeted.eps_schedule=[1.0,2.0]", 2 / 7),
    (TARGETED, "probe.targeted.images.n=40", 10),
])
def test_cost_follows_the_probe_settings(tmp_path, job, override, factor):
    experiment, probe, steps = job
    base = part(one_job(tmp_path, experiment=experiment), probe)
    assert base["image_steps"] == steps
    after = part(one_job(tmp_path, override, experiment=experiment), probe)
    assert after["image_steps"] == pytest.approx(factor * base["image_steps"])


def test_subspace_with_all_voxels_is_one_jacobian(tmp_path):
    out = one_job(tmp_path, "roi=[FFA,EBA]", "probe.subspace.voxels=all", experiment="subspace")
    assert part(out, "subspace")["image_steps"] == 50 * 15 * 33


def test_subspace_exact_needs_voxel_counts(tmp_path):
    with pytest.raises(ConfigError, match="method=exact"):
        one_job(tmp_path, "probe.subspace.method=exact", experiment="subspace")


def test_mei_follows_steps_seeds_and_rois(tmp_path):
    mei = ("probe=[mei]", "roi=[FFA,EBA,PPA]")
    base = part(one_job(tmp_path, *mei, experiment="targeted"), "mei")
    assert base["image_steps"] == 3 * 4 * 256  # 3 ROIs x 4 seeds x 256 steps
    for override, factor in (("probe.mei.steps=2560", 10), ("probe.mei.seeds=1", 0.25),
                             ("probe.mei.rois=[FFA]", 1 / 3)):
        after = part(one_job(tmp_path, *mei, override, experiment="targeted"), "mei")
        assert after["image_steps"] == pytest.approx(factor * base["image_steps"]), override


@pytest.mark.parametrize("model", ["clip_vit_b16", "vit_base_patch16_224"])
def test_vits_cost_as_vit_b16(tmp_path, model):
    resnet = one_job(tmp_path)["parts"]["sensitivity"]
    vit = one_job(tmp_path, f"model={model}")["parts"]["sensitivity"]
    assert vit["image_steps"] == resnet["image_steps"]
    assert vit["hours"] / resnet["hours"] == pytest.approx(17.6 / 4.1)


def test_every_zoo_model_has_a_cost():
    for name in list_models():
        assert backbone_scale(model_config(name)) > 0, name
    assert backbone_scale({"name": "m", "arch": "vit_base_patch16_clip_224.openai",
                           "input_size": 224}) == GMACS["vit_base_patch16_224"] / GMACS["resnet50"]


def test_unknown_architecture_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no cost for model.arch 'mystery_net'"):
        one_job(tmp_path, "model.arch=mystery_net")


def test_backbone_input_size_scales_pixels_and_stimulus_size_does_not(tmp_path):
    base = part(one_job(tmp_path), "sensitivity")["hours"]
    assert part(one_job(tmp_path, "model.input_size=448"), "sensitivity")["hours"] == \
        pytest.approx(4 * base)
    # The encoder resizes every stimulus to model.input_size before the backbone.
    assert part(one_job(tmp_path, "data.image_size=128"), "sensitivity")["hours"] == \
        pytest.approx(base)


def test_transfer_counts_sources_eps_and_draws(tmp_path):
    results = tmp_path / "results"

    def source(model):
        (cfg,) = job_configs("sensitivity", job_overrides(tmp_path, f"model={model}"))
        store = ResultsStore(results).run(config_identity(cfg, cuda_available=True),
                                          key_columns(cfg))
        store.save_array("perturbations_FFA_l2", {"delta": np.zeros((6, 1, 3, 2, 2)),
                                                  "image_id": np.arange(1), "eps": np.ones(6)})
        store.write_records("sensitivity", pd.DataFrame({"metric": ["s"], "value": [0.0]}))
        store.mark_complete()

    source("resnet50")
    one = part(one_job(tmp_path, experiment="transfer"), "transfer")
    assert one["forwards"] == N_TEST * 6 * (2 + 4)  # images x ladder x (clean, target, draws)
    source("resnet18")
    two = part(one_job(tmp_path, experiment="transfer"), "transfer")
    assert two["forwards"] == 2 * one["forwards"]
    fewer = part(one_job(tmp_path, "probe.transfer.sources=[{model:resnet18}]",
                         "probe.transfer.random_draws=1", experiment="transfer"), "transfer")
    assert fewer["forwards"] == N_TEST * 6 * (2 + 1)


def test_completed_jobs_are_not_counted(tmp_path):
    out = one_job(tmp_path, "subject=1,2")
    assert (out["jobs"], out["done"]) == (2, 0)
    (cfg,) = job_configs("sensitivity", job_overrides(tmp_path, "subject=2"))
    # A run's key holds its data's fingerprint (as pipeline.run makes it): the twin must exist.
    identity = config_identity(cfg, cuda_available=True)
    ensure_synthetic_nsd(cfg["data"]["root"], **cfg["data"]["synthetic"])
    identity["data_fingerprint"] = job_fingerprint(cfg["data"], 2)
    ResultsStore(tmp_path / "results").run(identity, key_columns(cfg)).mark_complete()
    after = one_job(tmp_path, "subject=1,2")
    assert (after["jobs"], after["done"], after["to_run"]) == (2, 1, 1)
    assert part(after, "sensitivity")["image_steps"] == part(out, "sensitivity")["image_steps"] / 2


@pytest.mark.parametrize("axes", [
    {"model": ["resnet50", "clip_vit_b16"], "roi": ["FFA", "[FFA,EBA]"],
     "attack.steps": ["10", "20"], "probe": ["[sensitivity]", "[subspace]"]},
    # Both axes change the model node: these jobs are composed whole.
    {"model": ["resnet50", "clip_vit_b16"], "++model.pool": ["avg", "max"], "roi": ["PPA"]},
])
def test_grid_matches_composing_every_job(tmp_path, axes):
    from hydra import compose, initialize_config_dir

    fixed = [f"paths.cache_dir={tmp_path}", "subject=2"]
    expected = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for combo in itertools.product(*axes.values()):
            job = [f"{key}={value}" for key, value in zip(axes, combo)]
            cfg = compose("config", overrides=["experiment=sensitivity", *fixed, *job])
            expected.append(OmegaConf.to_container(cfg, resolve=True))
    got = job_configs("sensitivity", [*fixed, *(f"{k}={','.join(v)}" for k, v in axes.items())])
    assert len(got) == len(expected)
    assert sorted(json.dumps(j, sort_keys=True) for j in got) == \
        sorted(json.dumps(j, sort_keys=True) for j in expected)


def run_plan(*args):
    return subprocess.run([sys.executable, "-m", "brainrobust.plan", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize(("root", "message"), [
    (None, "error: data.root is not set"),
    ("/nonexistent/nsd", "error: NSD root /nonexistent/nsd not found; set data.root="),
])
def test_missing_data_root_is_one_line(root, message):
    job = ["model=resnet50", "subject=1", "roi=FFA", "data=nsd"]
    out = run_plan("sensitivity", *job, *([f"data.root={root}"] if root else []))
    assert out.returncode == 2
    assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr


def test_plan_of_the_paper_grid_imports_no_torch(tmp_path):
    code = ("import sys; from brainrobust.plan import main; main(['sensitivity', "
            f"'paths.results_dir={tmp_path}']); assert 'torch' not in sys.modules, 'torch'")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("sensitivity: 336 jobs, 0 already in the results store")
