"""User mistakes, one row each: the expected project exception and the words of its one-line message.

Every row runs against a results store that already holds a finished run, and must leave it
byte-for-byte untouched. Lower-level file faults (truncated HDF5, wrong dataset names, ROI grids,
ctab labels, NaN betas) are covered row by row in test_nsd.py; checkpoints in test_weights.py.
"""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, compose_config, isolated
from hydra.errors import ConfigCompositionException

from brainrobust.errors import BrainRobustError, ConfigError, DataError, WeightsError
from brainrobust.models.backbones import TinyCNN
from brainrobust.pipeline import run


def _compose(root, tmp, overrides):
    return compose_config(*isolated(root, tmp), "attack.steps=3", "probe.sensitivity.max_images=2",
                          "probe.sensitivity.random_draws=1", *overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synthetic_root):
    """A results store with one finished run, and a snapshot of its bytes."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    root, _ = synthetic_root
    store = run(_compose(root, tmp, []))
    assert store.is_complete()
    return root, tmp


def _snapshot(path: Path) -> dict[str, str]:
    """Every results file's hash. The empty lock files a run claims its key with (`runs/.claims`)
    hold no result: a failed run may leave one."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and ".claims" not in p.parts}


# (overrides, exception, words of the message)
ROWS = [
    (["epsilon.ladder=[-0.1]"], ConfigError, "eps must be finite and > 0"),
    (["epsilon.ladder=[nan]"], ConfigError,
     "epsilon.ladder (probe.sensitivity.eps): every eps must be finite and > 0"),
    # A probe's own value is named as the probe's key; an interpolated one by the key set.
    (["probe.sensitivity.eps=[nan]"], ConfigError, "probe.sensitivity.eps: every eps must be finite"),
    (["probe=[sensitivity,targeted]", "probe.targeted.eps_schedule=[0.5,nan]"], ConfigError,
     "probe.targeted.eps_schedule: every eps must be finite and > 0"),
    (["probe=[sensitivity,effect_matched]", "probe.sensitivity.eps=[0.1]", "epsilon.ladder=[-1.0]"],
     ConfigError, "epsilon.ladder[0] (probe.effect_matched.eps_min) must be a finite number > 0"),
    (["epsilon.ladder=[]"], ConfigError, "eps is empty"),
    (["epsilon.ladder=[true]"], ConfigError, "a flat list of them"),
    (["epsilon.ladder=[[0.1]]"], ConfigError, "a flat list of them"),
    (["epsilon.ladder=[0.1,0.1]"], ConfigError, "repeats a budget"),
    (["attack.clamp=no"], ConfigError, "attack.clamp must be true or false"),
    (["attack.random_start=maybe"], ConfigError, "attack.random_start must be true or false"),
    (["data.subject=3"], ConfigError, "set subject=... instead of data.subject"),
    (["data.rois=[PPA]"], ConfigError, "set roi=... instead of data.rois"),
    (["epsilon.norm=l3"], ConfigError, "attack.norm must be one of"),
    (["attack.norm=linf"], ConfigError, "attack.norm=linf disagrees with epsilon.norm=l2"),
    (["epsilon.ladder=[1e-30]"], ConfigError, "float32 images cannot hold it"),
    (["attack.steps=0"], ConfigError, "attack.steps"),
    (["attack.step_size=-1"], ConfigError, "attack.step_size"),
    (["probe.sensitivity.objective=maximise"], ConfigError, "probe.sensitivity.objective must be one of"),
    (["probe.sensitivity.batch_size=0"], ConfigError, "batch_size must be an integer >= 1"),
    (["probe.sensitivity.batch_size=2.5"], ConfigError, "batch_size must be an integer >= 1"),
    (["probe.sensitivity.max_images=0"], ConfigError, "max_images must be an integer >= 1"),
    (["probe.sensitivity.random_draws=0"], ConfigError, "random_draws must be an integer >= 1"),
    (["probe.sensitivity.rois=[PPA]"], ConfigError, "not in this encoder"),
    (["probe.sensitivity.rois=PPA"], ConfigError, "ROI(s) ['PPA'] not in this encoder"),
    (["data.batch_size=0"], ConfigError, "data.batch_size must be an integer >= 1"),
    (["data.batch_size=1.5"], ConfigError, "data.batch_size must be an integer >= 1"),
    (["data.num_workers=-1"], ConfigError, "data.num_workers must be an integer >= 0"),
    (["subject=0"], ConfigError, "subject must be an NSD subject 1-8"),
    (["readout.method=lasso"], ConfigError, "unknown readout.method"),
    (["readout.alphas=[-1.0]"], ConfigError, "alpha"),
    (["model.layer=block9"], ConfigError, "block4"),
    (["model.input_size=3"], ConfigError, "input_size"),
    (["model.pool=median"], ConfigError, "pool"),
    (["model.std=[nan,1,1]"], ConfigError, "mean and std need 3 finite values"),
    (["model.seed=-1"], ConfigError, "model.seed must be an integer >= 0"),
    (["model=resnet50"], WeightsError, "resnet50"),
    (["model=robust_resnet50_eps3"], WeightsError, "model.weights="),
    (["subject=2", "roi=RSC"], DataError, "RSC"),
    (["data=nsd", "data.root=/nonexistent/nsd"], DataError, "not found; set data.root="),
    (["+probe.sensitivity.epsilon=0.1"], ConfigError, "cannot build brainrobust.probes.sensitivity"),
    (["+data.subjct=2"], ConfigError, "cannot build brainrobust.data.datamodule"),
    (["+trainer.devicez=1"], ConfigError, "trainer config"),
]


@pytest.mark.parametrize("overrides,exc,words", ROWS, ids=[" ".join(r[0]) for r in ROWS])
def test_bad_input_is_one_line_and_leaves_results(finished, overrides, exc, words):
    root, tmp = finished
    before = _snapshot(tmp / "results")
    with pytest.raises(exc) as err:
        run(_compose(root, tmp, overrides))
    message = str(err.value)
    assert words in message
    # One line; long enough for a command and two paths (the weights message has both).
    assert "\n" not in message and len(message) < 600
    assert _snapshot(tmp / "results") == before


def test_weights_of_another_architecture(finished, tmp_path):
    root, tmp = finished
    weights = tmp_path / "tiny.pt"
    torch.save(TinyCNN().state_dict(), weights)
    with pytest.raises(WeightsError, match="missing|unexpected"):
        run(_compose(root, tmp, ["model=resnet18_random", f"model.weights={weights}"]))


@pytest.mark.parametrize("override", ["model=no_such_model", "roi=XYZ", "epsilon=l7", "probe=[nothing]",
                                      "logger=neptune", "data=hcp", "attack=cw"])
def test_unknown_config_names_list_the_valid_ones(finished, override):
    root, tmp = finished
    with pytest.raises(ConfigCompositionException, match="Available options|Could not (find|load)"):
        _compose(root, tmp, [override])


def test_cli_prints_one_line_and_exits_non_zero(finished):
    root, tmp = finished
    out = subprocess.run([sys.executable, "run.py", *isolated(root, tmp), "attack.steps=0"],
                         cwd=REPO, check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "attack.steps" in errors[0]
    assert "Traceback" not in out.stderr


def test_all_errors_share_one_base(finished):
    assert all(issubclass(exc, BrainRobustError) for _, exc, _ in ROWS)


def test_identical_predictions_for_every_test_image_are_refused():
    # All-black stimuli (an incomplete stimuli file) make every prediction the same: r would read
    # as 0 and the attack as converged, with nothing wrong in sight.
    from brainrobust.models.encoder import predictivity_table
    true = np.random.default_rng(0).random((5, 3))
    with pytest.raises(DataError, match="identical for every test image"):
        predictivity_table(np.ones((5, 3)), true, {"FFA": torch.arange(3)}, None, {})
