"""Sweeps share work, skip what is done and resume what was interrupted."""

import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import compose_config, isolated

import brainrobust.models.features as features_mod
from brainrobust.pipeline import run
from brainrobust.probes.sensitivity import SensitivityProbe
from brainrobust.results.store import ResultsStore, load
from brainrobust.sweep import _descendants

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sweep(tmp_path, synthetic_root, monkeypatch):
    root, _ = synthetic_root
    calls = {"backbone": 0, "probe": 0}
    real_predict, real_probe = features_mod._predict, SensitivityProbe.run_batch

    def predict(*args, **kwargs):
        calls["backbone"] += 1
        return real_predict(*args, **kwargs)

    def probe(self, *args, **kwargs):
        calls["probe"] += 1
        return real_probe(self, *args, **kwargs)

    monkeypatch.setattr(features_mod, "_predict", predict)
    monkeypatch.setattr(SensitivityProbe, "run_batch", probe)

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
    # One feature pass per (model, subject training set); every job runs its probe on its one
    # test-loop batch (2 images).
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


def _sweep_records(results: Path) -> dict[str, pd.DataFrame]:
    store = ResultsStore(results)
    return {meta["key"]: store.open(meta).read_records("sensitivity").sort_values(
        ["roi", "image_id", "eps", "metric"]).reset_index(drop=True) for meta in store.runs()}


@pytest.mark.slow
def test_readme_multirun_stopped_by_sigterm_resumes_to_an_uninterrupted_sweep(tmp_path):
    """The README's local --multirun on a cold cache (the twin not yet written), two jobs at a
    time: SIGTERM once the first job is done ends the sweep and its workers, and the rerun
    completes every run with the records of a sweep that was never stopped."""
    def sweep(results: str) -> list[str]:
        return [sys.executable, "run.py", "--multirun", "hydra/launcher=local",
                "model=tiny_cnn_random", "subject=1,2", "roi=FFA,PPA",
                f"paths.cache_dir={tmp_path / 'cache'}", f"paths.results_dir={tmp_path / results}",
                f"paths.log_dir={tmp_path / 'logs'}", "logger=none", "trainer.enable_progress_bar=false",
                "attack.steps=10", "probe.sensitivity.max_images=6", "probe.sensitivity.random_draws=1"]

    proc = subprocess.Popen(sweep("a"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "a" / "runs"
    deadline = time.monotonic() + 900
    while not list(runs.glob("*/DONE")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    workers = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    done_before = len(list(runs.glob("*/DONE")))
    assert 1 <= done_before < 4  # stopped mid-way: two jobs run at once, four in all

    deadline = time.monotonic() + 60  # the workers stop at their next safe point
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "joblib workers outlived the sweep"
        time.sleep(0.2)

    resumed = subprocess.run(sweep("a"), cwd=REPO, check=False, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(list(runs.glob("*/DONE"))) == 4
    assert resumed.stderr.count("is complete") == done_before  # finished jobs are not redone
    whole = subprocess.run(sweep("b"), cwd=REPO, check=False, capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr[-2000:]
    a, b = _sweep_records(tmp_path / "a"), _sweep_records(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 4
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key])
