"""Sweeps share work, skip what is done and resume what was interrupted."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import compose_config, isolated

import brainrobust.models.features as features_mod
from brainrobust.pipeline import run
from brainrobust.probes.sensitivity import SensitivityProbe
from brainrobust.results.store import ResultsStore, load

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sweep(tmp_path, synthetic_root, monkeypatch):
    root, _ = synthetic_root
    calls = {"backbone": 0, "probe": 0}
    real_predict, real_probe = features_mod._predict, SensitivityProbe.run

    def predict(*args, **kwargs):
        calls["backbone"] += 1
        return real_predict(*args, **kwargs)

    def probe(self, *args, **kwargs):
        calls["probe"] += 1
        return real_probe(self, *args, **kwargs)

    monkeypatch.setattr(features_mod, "_predict", predict)
    monkeypatch.setattr(SensitivityProbe, "run", probe)

    def _run_all():
        stores = []
        for model, subject in itertools.product(["tiny_cnn_random", "resnet18_random"], [1, 2]):
            stores.append(run(compose_config(
                *isolated(root, tmp_path), f"model={model}", f"subject={subject}", "model.input_size=64",
                "attack.steps=2", "probe.sensitivity.max_images=2", "probe.sensitivity.random_draws=1")))
        return stores
    return _run_all, calls, tmp_path / "results"


@pytest.mark.slow
def test_grid_runs_each_backbone_pass_once_and_resumes(sweep):
    run_all, calls, results = sweep
    stores = run_all()
    # One feature pass per (model, subject training set); every job runs its probe once.
    assert calls == {"backbone": 4, "probe": 4}
    assert load(results, probe="sensitivity").run_key.nunique() == 4

    run_all()
    assert calls == {"backbone": 4, "probe": 4}, "a finished sweep must do no work on rerun"

    # A job killed mid-probe: no DONE, no records of its probe. Only that job is redone,
    # from the cached readout (no backbone pass).
    killed = stores[1]
    (killed.dir / "DONE").unlink()
    killed.records_path("sensitivity").unlink()
    run_all()
    assert calls == {"backbone": 4, "probe": 5}
    assert all(s.is_complete() for s in stores)


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_sweep(tmp_path, synthetic_root):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    root, _ = synthetic_root
    out = subprocess.run(
        [sys.executable, "run.py", "--multirun", "hydra/launcher=submitit_local", "subject=1,2",
         *isolated(root, tmp_path), "attack.steps=2", "probe.sensitivity.max_images=2", "probe.sensitivity.random_draws=1",
         "hydra.launcher.timeout_min=10"],
        cwd=REPO, check=False, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = ResultsStore(tmp_path / "results").runs()
    assert sorted(r["columns"]["subject"] for r in runs) == [1, 2]
    assert all(r["complete"] for r in runs)
