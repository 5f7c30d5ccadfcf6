"""The package installed from a wheel (not editable) works from any directory: it carries its
Hydra configs, lists the zoo and runs the default job."""

import os
import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.slow  # builds a wheel and runs a job in a fresh process: ~30 s
def test_an_installed_wheel_lists_models_and_runs_from_another_directory(tmp_path):
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("brainrobust-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    # The wheel's copy, not the checkout's editable install, is what gets imported.
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*argv):
        return subprocess.run(argv, check=False, cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=600)

    where = run(sys.executable, "-c", "import brainrobust; print(brainrobust.CONF_DIR)")
    assert where.stdout.strip() == str(site / "brainrobust" / "conf")
    assert not (site / "brainrobust" / "conf").is_symlink()
    models = run(sys.executable, "-m", "brainrobust", "models")
    assert models.returncode == 0 and "tiny_cnn_random" in models.stdout, models.stderr
    job = run(sys.executable, str(site / "bin" / "brainrobust-run"), "logger=none",
              "probe.sensitivity.max_images=2", "probe.sensitivity.random_draws=1", "attack.steps=3")
    assert job.returncode == 0, job.stderr[-2000:]
    assert len(list((elsewhere / "results" / "runs").glob("*/DONE"))) == 1
    assert (elsewhere / ".cache" / "brainrobust" / "synthetic_nsd").is_dir()
