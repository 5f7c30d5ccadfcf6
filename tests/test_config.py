"""The Hydra app composes: groups, overrides, multirun, --help and --cfg job."""

import subprocess
import sys
import warnings

import pytest
from helpers import REPO, compose_config
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from brainrobust.data.rois import ROISpec
from brainrobust.models.zoo import list_models
from brainrobust.pipeline import run_identity

GROUPS = ["model", "roi", "attack", "epsilon", "data", "probe", "logger", "experiment"]


def test_required_groups_exist():
    # subject is a plain value (1-8): Hydra cannot select group options by numeric names.
    for group in GROUPS + ["hydra/launcher"]:
        assert (REPO / "conf" / group).is_dir(), group


def test_default_composes_without_deprecation_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        cfg = compose_config()
    assert cfg.subject == 1 and list(cfg.roi) == ["FFA"]
    assert cfg.data.subject == 1 and cfg.attack.norm == cfg.epsilon.norm


def test_user_command_composes():
    cfg = compose_config("model=robust_resnet50_eps3", "roi=FFA")
    assert cfg.model.name == "robust_resnet50_eps3" and cfg.model.family == "madry"
    rois = instantiate(cfg.data.rois, _convert_="all")
    assert isinstance(rois["FFA"], ROISpec) and tuple(rois["FFA"].labels) == ("FFA-1", "FFA-2")


def test_several_rois_in_one_encoder():
    cfg = compose_config("roi=[FFA,EBA,PPA]")
    assert sorted(cfg.roi) == ["EBA", "FFA", "PPA"]


def test_every_model_and_roi_composes():
    for name in list_models():
        assert compose_config(f"model={name}").model.name == name
    for roi in ("FFA", "OFA", "EBA", "FBA", "PPA", "OPA", "RSC"):
        assert compose_config(f"roi={roi}").roi[roi].name == roi


def test_linf_epsilon_switches_the_attack_norm():
    cfg = compose_config("epsilon=linf")
    # the YAML writes the budgets to 10 decimals
    assert cfg.attack.norm == "linf" and max(cfg.epsilon.ladder) == pytest.approx(8 / 255, abs=5e-11)


def test_unknown_option_lists_valid_names():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("model=resnet_does_not_exist")
    assert "resnet50" in str(err.value.__cause__ or err.value) or "Available options" in str(err.value)


def test_identity_ignores_paths_and_logger():
    a = run_identity(compose_config("paths.results_dir=/tmp/a", "logger=none"))
    b = run_identity(compose_config("paths.results_dir=/tmp/b"))
    assert a == b
    assert run_identity(compose_config("subject=2")) != b


def _run_py(*args):
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, check=False, capture_output=True, text=True, timeout=120)


def test_cli_help_and_cfg_job():
    out = _run_py("--help")
    assert out.returncode == 0 and "model:" in out.stdout
    out = _run_py("model=robust_resnet50_eps3", "roi=FFA", "--cfg", "job")
    assert out.returncode == 0 and "robust_resnet50_eps3" in out.stdout
    assert "Deprecat" not in out.stderr


@pytest.mark.slow
def test_multirun_composes(tmp_path):
    # dry_run composes every job and prints its results key without loading anything.
    out = _run_py("--multirun", "subject=1,2", "roi=FFA,PPA", "dry_run=true",
                  f"paths.results_dir={tmp_path}", f"paths.log_dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    jobs = [line for line in out.stdout.splitlines() if line.startswith("run ")]
    assert len(jobs) == 4 and len({line.split()[1] for line in jobs}) == 4
    assert sum("subject=2 rois=PPA" in line for line in jobs) == 1


@pytest.mark.slow
def test_bad_subject_is_one_line(tmp_path):
    out = _run_py("subject=9", f"paths.results_dir={tmp_path}", f"paths.log_dir={tmp_path}")
    assert out.returncode == 2
    assert "subject must be an NSD subject 1-8, got 9" in out.stderr and "Traceback" not in out.stderr
