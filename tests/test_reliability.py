"""Sweeps under real conditions: damaged results, unwritable or full disks, concurrent jobs."""

import errno
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from helpers import REPO, config_maker, isolated
from omegaconf import OmegaConf

from brainrobust import files, pipeline
from brainrobust.cli import main as cli_main
from brainrobust.errors import ConfigError, StorageError
from brainrobust.pipeline import run
from brainrobust.results.store import ResultsStore, _compact


@pytest.fixture
def make_cfg(tmp_path, synthetic_root):
    return config_maker(synthetic_root[0], tmp_path, "attack.steps=2",
                        "probe.sensitivity.max_images=2", "probe.sensitivity.random_draws=1")


def test_damaged_results_files_mean_not_done_and_are_redone(make_cfg, tmp_path, capsys):
    store = run(make_cfg())
    clean = store.read_records("sensitivity")
    records = store.records_path("sensitivity")
    records.write_bytes(records.read_bytes()[: len(records.read_bytes()) // 2])  # truncated
    assert not store.has_records("sensitivity") and not store.is_complete()
    cli_main(["list", "--root", str(tmp_path / "results")])
    assert "partial" in capsys.readouterr().out
    again = run(make_cfg())
    assert again.is_complete()
    np.testing.assert_array_equal(again.read_records("sensitivity").value, clean.value)

    (store.dir / "run.json").write_text('{"key": "trunc')
    cli_main(["list", "--root", str(tmp_path / "results")])
    assert "no runs under" in capsys.readouterr().out
    assert run(make_cfg()).is_complete()
    assert [r["key"] for r in ResultsStore(tmp_path / "results").runs()] == [store.key]


def test_unwritable_results_folder_fails_before_any_compute(make_cfg, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(pipeline, "compute", lambda *a, **k: pytest.fail("computed before the check"))
    with pytest.raises(StorageError, match=f"cannot write {blocker}/results"):
        run(make_cfg(f"paths.results_dir={blocker}/results"))


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(StorageError) as err:
        files.write_json(tmp_path / "run.json", {"a": 1})
    assert str(err.value).startswith(f"cannot write {tmp_path / 'run.json'}: No space left on device")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


@pytest.mark.parametrize("seed", ["abc", -1, 2**32, 10**40])
def test_seed_must_be_a_seed(make_cfg, seed):
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        run(make_cfg(f"seed={seed}"))


def test_no_stored_number_becomes_inf():
    eps = np.array([0.1, 1e9])
    assert np.array_equal(_compact(eps), eps.astype(np.float32))
    assert _compact(np.array([0.1, 3.0])).dtype == np.float16


@pytest.mark.slow
def test_two_processes_compute_one_run_once(synthetic_root, tmp_path):
    """Two sweeps on one store: the second job waits for the first and then skips it."""
    root, _ = synthetic_root
    argv = [sys.executable, "run.py", *isolated(root, tmp_path), "attack.steps=2",
            "probe.sensitivity.max_images=2", "probe.sensitivity.random_draws=1", "print_table=false"]
    # Build the twin and caches first: this test is about the run claim, not the cache locks.
    subprocess.run([*argv, "seed=1"], cwd=REPO, check=True, capture_output=True, timeout=600)
    procs = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    computed = [log for log in logs if "probe sensitivity:" in log]
    skipped = [log for log in logs if "is complete" in log and "skipped" in log]
    assert len(computed) == 1 and len(skipped) == 1, logs


@pytest.mark.slow
def test_sigterm_stops_at_a_batch_and_the_rerun_resumes_there(synthetic_root, tmp_path):
    """A preempted probe keeps the test loop's batches it finished; the rerun continues from them
    and gives the records of an uninterrupted run."""
    root, _ = synthetic_root
    settings = ["attack.steps=20", "probe.sensitivity.max_images=12", "data.batch_size=1",
                "probe.sensitivity.random_draws=1", "print_table=false"]
    argv = [sys.executable, "run.py", *isolated(root, tmp_path / "a"), *settings]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "a" / "results" / "runs"
    deadline = time.monotonic() + 600
    while len(list(partial.glob("*/partial/sensitivity-1ranks/*.npz"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and time.monotonic() - sent < 60, err
    assert "stopped: stopped by a signal" in err and "Traceback" not in err
    kept = sorted(partial.glob("*/partial/sensitivity-1ranks/*.npz"))
    assert 2 <= len(kept) < 12 and not list(partial.glob("*/records/sensitivity.parquet"))

    resumed = subprocess.run(argv, check=False, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert f"reused {len(kept)} kept batches" in resumed.stderr
    whole = subprocess.run([sys.executable, "run.py", *isolated(root, tmp_path / "b"), *settings],
                           check=False, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr
    a, b = (pd.read_parquet(next((tmp_path / d / "results" / "runs").glob("*/records/sensitivity.parquet")))
            for d in ("a", "b"))
    np.testing.assert_array_equal(a.sort_values(["roi", "image_id", "eps", "metric"]).value.to_numpy(),
                                  b.sort_values(["roi", "image_id", "eps", "metric"]).value.to_numpy())
    assert not list(partial.glob("*/partial/sensitivity-*"))


def test_an_objective_refuses_an_encoder_put_in_train_mode_after_it_was_built():
    import torch
    from helpers import LinearEncoder

    from brainrobust.probes.objectives import make_objective

    encoder = LinearEncoder(torch.randn(4, 3 * 8 * 8), {"A": [0, 1]}).eval()
    x = torch.rand(2, 3, 8, 8)
    objective = make_objective(encoder, "A", "increase", x)
    objective(x)  # eval mode: fine
    encoder.train()
    with pytest.raises(ConfigError, match="eval mode"):
        objective(x)


@pytest.mark.parametrize("eps, where", [
    ("${epsilon.ladder}", "epsilon.ladder (probe.p.eps)"),
    ("${oc.select:epsilon.ladder,[0.1]}", "probe.p.eps"),  # a resolver: the probe's own key
    ("${probe.q.eps}", "probe.q.eps (probe.p.eps)"),
    ([0.1, "${epsilon.big}"], "probe.p.eps"),  # interpolated elements: the list's key
])
def test_a_refused_budget_names_the_key_it_came_from(eps, where):
    cfg = OmegaConf.create({"epsilon": {"norm": "l2", "ladder": [1e9], "big": 1e9},
                            "probe": {"p": {"eps": eps}, "q": {"eps": [1e9]}}})
    with pytest.raises(ConfigError, match=r"^" + re.escape(where) + ": eps .* reaches the largest"):
        pipeline.check_budgets(cfg, 64)


# The message names the key to change: the ladder the user set, where the probe takes it from there.
LADDER = r"^epsilon.ladder \(probe.sensitivity.eps\): "


@pytest.mark.parametrize("overrides,words", [
    (["epsilon.ladder=[1e9]"], LADDER + "eps .* reaches the largest l2 distance"),
    (["epsilon=linf", "epsilon.ladder=[2.0]"], LADDER + "eps .* reaches the largest linf distance"),
    # Equal to the largest distance constrains nothing either.
    (["epsilon=linf", "epsilon.ladder=[0.1,1.0]"], LADDER + r"eps \[1.0\] reaches the largest linf"),
    # The twin's stimuli are 64 px: 1e-6 per pixel is an L2 norm of 1e-6 * sqrt(3 * 64**2).
    (["epsilon.ladder=[1e-30,0.1]"],
     LADDER + r"eps \[1e-30\] is below 0.00011, a change of 1e-06 per pixel"),
    (["epsilon=linf", "epsilon.ladder=[5e-7]"], LADDER + r"eps \[5e-07\] is below 1e-06"),
    # A probe's own value is named as such.
    (["probe.sensitivity.eps=[1e9]"], r"^probe.sensitivity.eps: eps \[1000000000.0\] reaches"),
    (["probe=[sensitivity,targeted]", "probe.targeted.images.n=1", "probe.targeted.eps_schedule=[0.5,200.0]"],
     r"^probe.targeted.eps_schedule: eps \[200.0\] reaches the largest l2"),
])
def test_budgets_that_cannot_be_meant_are_refused(make_cfg, overrides, words):
    with pytest.raises(ConfigError, match=words):
        run(make_cfg(*overrides))
