import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from brainrobust.errors import BrainRobustError, DataError
from brainrobust.files import sha256_file
from brainrobust.results import store as store_mod
from brainrobust.results.store import ResultsStore, load


def _records(n=3):
    return pd.DataFrame({"roi": ["FFA"] * n, "image_id": np.arange(n), "metric": "s", "value": np.arange(n) * 0.5})


def test_one_record_set_per_config_and_merge(tmp_path):
    store = ResultsStore(tmp_path)
    for model in ("a", "b"):
        for roi in ("FFA", "PPA"):
            run = store.run({"model": model, "roi": roi}, {"model": model, "roi": roi})
            run.write_records("sensitivity", _records())
            run.mark_complete()
    merged = load(tmp_path)
    assert len(store.runs()) == 4
    assert len(merged) == 12
    assert set(merged.model) == {"a", "b"} and merged.run_key.nunique() == 4
    # The same config maps to the same run (resume), another config to another run.
    again = store.run({"model": "a", "roi": "FFA"}, {"model": "a", "roi": "FFA"})
    assert again.is_complete() and again.has_records("sensitivity")
    assert not store.run({"model": "a", "roi": "EBA"}, {}).is_complete()


def test_composing_a_run_writes_nothing(tmp_path):
    ResultsStore(tmp_path).run({"x": 1}, {"model": "a"})
    assert not (tmp_path / "runs").exists()


def test_key_is_independent_of_dict_order(tmp_path):
    store = ResultsStore(tmp_path)
    assert store.run({"a": 1, "b": {"c": 2, "d": 3}}, {}).key == store.run({"b": {"d": 3, "c": 2}, "a": 1}, {}).key


def test_arrays_are_fp16_and_round_trip(tmp_path):
    run = ResultsStore(tmp_path).run({"x": 1}, {})
    delta = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    info = run.save_array("perturbations_FFA_l2", {"delta": delta, "image_id": np.arange(2)})
    back = run.load_array("perturbations_FFA_l2")
    assert back["delta"].dtype == np.float16 and back["image_id"].dtype.kind == "i"
    # fp16 storage: half an ulp, eps16 / 2 relative (no value here is subnormal in fp16)
    assert np.abs(delta).min() > np.finfo(np.float16).tiny
    np.testing.assert_allclose(back["delta"], delta, rtol=float(np.finfo(np.float16).eps), atol=0)
    assert len(info["sha256"]) == 64
    with pytest.raises(DataError, match="not found"):
        run.load_array("missing")


def test_exact_entries_keep_their_dtype(tmp_path):
    run = ResultsStore(tmp_path).run({"x": 1}, {})
    images = np.random.default_rng(0).random((2, 3, 4, 4)).astype(np.float32)
    run.save_array("stimuli", {"images": images, "delta": images - 0.5}, exact=["images"])
    back = run.load_array("stimuli")
    assert back["images"].dtype == np.float32 and np.array_equal(back["images"], images)
    assert back["delta"].dtype == np.float16


def test_a_damaged_array_is_refused_not_read(tmp_path):
    run = ResultsStore(tmp_path).run({"x": 1}, {})
    info = run.save_array("subspace_FFA", {"basis": np.eye(4, dtype=np.float32)})
    path = run.array_path("subspace_FFA")
    assert sha256_file(path) == info["sha256"] == path.with_name(path.name + ".sha256").read_text()
    # Another run's array copied over it.
    other = ResultsStore(tmp_path / "b").run({"x": 1}, {})
    other.save_array("subspace_FFA", {"basis": 2 * np.eye(4, dtype=np.float32)})
    path.write_bytes(other.array_path("subspace_FFA").read_bytes())
    with pytest.raises(DataError, match=r"does not match its sha256 .*force=true"):
        run.load_array("subspace_FFA")
    # Killed between the array and its checksum: not there yet, so the run redoes it.
    path.with_name(path.name + ".sha256").unlink()
    assert not run.has_array("subspace_FFA")


def test_mixed_schema_versions_are_refused(tmp_path, monkeypatch):
    ResultsStore(tmp_path).run({"x": 1}, {}).write_records("p", _records())
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 99)
    ResultsStore(tmp_path).run({"x": 2}, {}).write_records("p", _records())
    with pytest.raises(DataError, match="mix record schema versions"):
        load(tmp_path)


def test_no_records_names_what_to_run(tmp_path):
    with pytest.raises(DataError, match="run `python run.py`"):
        load(tmp_path, probe="transfer")


def test_edited_run_json_is_detected(tmp_path):
    store = ResultsStore(tmp_path)
    run = store.run({"x": 1}, {})
    run.write_records("p", _records())
    meta = json.loads((run.dir / "run.json").read_text())
    meta["identity"] = {"x": 2}
    (run.dir / "run.json").write_text(json.dumps(meta))
    with pytest.raises(BrainRobustError, match="another config"):
        store.run({"x": 1}, {})


def test_kill_during_write_leaves_no_partial_file(tmp_path):
    """kill -9 a process in the middle of writing a large record set: no parquet is left."""
    script = textwrap.dedent(f"""
        import numpy as np, pandas as pd, sys
        from brainrobust.results.store import ResultsStore
        import brainrobust.files as files
        run = ResultsStore({str(tmp_path)!r}).run({{"x": 1}}, {{}})
        real_replace = files.os.replace
        def slow_replace(a, b):
            print("writing", flush=True)
            import time; time.sleep(60)
        files.os.replace = slow_replace
        df = pd.DataFrame({{"metric": "s", "value": np.arange(200000.0)}})
        run.write_records("sensitivity", df)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = ResultsStore(tmp_path).run({"x": 1}, {})
    assert not run.has_records("sensitivity")
    assert list(run.records_dir.glob("*.parquet")) == []
