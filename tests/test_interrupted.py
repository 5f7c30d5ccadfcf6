"""kill -9 a run during feature caching, during an attack and during the results write; rerun.

The rerun's records must equal an uninterrupted run's, and no partial file may ever be read.
Each kill happens in a child process that patches one function to SIGKILL itself at that point.
"""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, compose_config, isolated

from brainrobust.pipeline import run

OVERRIDES = ["attack.steps=3",
             "probe.sensitivity.max_images=3", "probe.sensitivity.random_draws=1",
             "probe.sensitivity.batch_size=1"]

# Where to die: (module to patch, attribute, condition on the call's arguments).
KILL_POINTS = {
    # After the features are computed, as their cache entry is renamed into place.
    "feature_cache": ("os", "replace",
                      "'features' in str(args[1]) and str(args[1]).endswith('.npy')"),
    # In the second PGD call of the sensitivity probe.
    "attack": ("brainrobust.probes.sensitivity", "pgd", "calls == 2"),
    # As the sensitivity records are renamed into place.
    "results_write": ("os", "replace", "str(args[1]).endswith('sensitivity.parquet')"),
}


def _run_in_process(tmp: Path, root):
    return run(compose_config(*isolated(root, tmp), *OVERRIDES))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, synthetic_root):
    root, _ = synthetic_root
    return _run_in_process(tmp_path_factory.mktemp("uninterrupted"), root).read_records("sensitivity")


@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_killed_run_resumes_to_identical_records(point, baseline, tmp_path, synthetic_root):
    root, _ = synthetic_root
    module, attr, condition = KILL_POINTS[point]
    script = textwrap.dedent(f"""
        import importlib, os, signal, sys
        mod = importlib.import_module({module!r})
        real = getattr(mod, {attr!r})
        calls = 0
        def dying(*args, **kwargs):
            global calls
            calls += 1
            if {condition}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        setattr(mod, {attr!r}, dying)
        from hydra import compose, initialize_config_dir
        from brainrobust.pipeline import run
        with initialize_config_dir(config_dir={str(REPO / 'conf')!r}, version_base="1.3"):
            run(compose("config", overrides={[*isolated(root, tmp_path), *OVERRIDES]!r}))
    """)
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                           timeout=600, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not list((tmp_path / "results").rglob("DONE"))

    store = _run_in_process(tmp_path, root)
    assert store.is_complete()
    records = store.read_records("sensitivity")
    assert records.drop(columns="run_key").equals(baseline.drop(columns="run_key"))
    # Temporary files of the killed write may remain; they are never read as results.
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert all(p.name.startswith(".") for p in leftovers)
