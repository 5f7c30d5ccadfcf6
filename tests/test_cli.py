"""What a user sees at the command line: every mistake is one `error:` line and exit code 2.

The mistakes Hydra would report (unknown config names, undefined keys, unset mandatory values)
are caught by `run.py`'s preflight before anything launches; the rest by the pipeline. Every row
of the README's "What can go wrong" table (`test_bad_inputs.ROWS`) runs through `run.py` as a
user types it.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CONF, REPO, isolated
from test_bad_inputs import ROWS, _snapshot

from brainrobust.errors import ConfigError
from brainrobust.preflight import check_overrides


def _preflight(argv, capsys):
    """run.py's preflight in this process: (exit code, or whether it is a multirun; stderr)."""
    spec = importlib.util.spec_from_file_location("run_entry", REPO / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        code = module.preflight(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,words", [
    (["model=resnet5"], "unknown model 'resnet5'; did you mean resnet50"),
    (["roi=FFX"], "unknown roi 'FFX'; did you mean FFA?"),
    (["epsilon=l7"], "unknown epsilon 'l7'"),
    (["probe=[nothing]"], "unknown probe 'nothing'"),
    (["logger=neptune"], "unknown logger 'neptune'"),
    (["data=hcp"], "unknown data 'hcp'"),
    (["attack=cw"], "unknown attack 'cw'"),
    (["data=nsd"], "data.root is not set; pass data.root="),
    (["data=algonauts"], "data.root is not set; pass data.root="),
    (["subjct=2"], "unknown config key 'subjct'; did you mean subject?"),
    (["attack.stpes=5"], "unknown config key 'attack.stpes'; did you mean attack.steps?"),
    (["-m", "model=tiny_cnn_random,resnt18"], "unknown model 'resnt18'; did you mean resnet18"),
    (["--multirun", "subject=1,2", "roi=FFA,PPX"], "unknown roi 'PPX'"),
    (["--multirun", "subject=1,9"], "subject must be an NSD subject 1-8, got 9"),
    (["model=[oops"], "cannot read the command line"),
    (["roi=[]"], "no ROI selected; pass roi=FFA"),
    (["+eps=-1"], "adds a top-level key 'eps' that nothing reads"),
    (["++seeds=3"], "did you mean seed?"),
    (["roi=null"], "roi cannot be null"),
    (["model=null"], "model cannot be null"),
    (["subject=1,2"], "'subject=1,2' is a sweep: add --multirun"),
    (["paths.log_dir=/proc/brainrobust/nope"], "cannot create paths.log_dir"),
    (["paths.results_dir=null"], "paths.results_dir must be a folder"),
    (["data.root="], "data.root must be a folder, got ''"),
    (["~model"], "'~model' removes model, which every run reads; set it instead (model=...)"),
    (["~seed"], "'~seed' removes seed, which every run reads"),
    (["data=nsd", "data.root=null"], "data.root must be a folder, got None"),
    (["data.cache_dir="], "data.cache_dir must be a folder, got ''"),
    (["attack.norm=linf"], ("attack.norm=linf disagrees with epsilon.norm=l2, the norm of the eps "
                            "ladder; pick the norm with epsilon=... (linf, or l2 / l2_small)")),
    (["epsilon=linf", "attack.norm=l2"], "attack.norm=l2 disagrees with epsilon.norm=linf"),
    (["probe=[transfer]", "probe.sensitivty.max_images=2"],
     "did you mean probe.sensitivity.max_images?"),
    (["probe=[mei]", "probe.targeted.images.n=2"],
     "'probe.targeted.images.n' sets probe targeted, which this run does not select"),
    (["probe.sensitivity.rois.x=1"], "probe.sensitivity.rois is a value, not a group"),
    (["probe=[transfer]", "probe.sensitivity.random_draws=1", "probe.sensitivity.max_images=2"],
     ("'probe.sensitivity.random_draws' sets probe sensitivity, which this run does not select; "
      "drop it or add sensitivity to probe=[...]")),
    (["probe.sensitivty.max_images=2"], ("unknown config key 'probe.sensitivty.max_images'; did "
                                         "you mean probe.sensitivity.max_images?")),
    (["data.root=2024"], ("data.root must be a folder, got the number 2024; for a folder named "
                          "so, quote the name as typed: 'data.root=\"NAME\"'")),
    (["data.root=1e3"], "data.root must be a folder, got the number 1000.0"),
])
def test_config_mistakes_are_one_line_and_exit_2(argv, words, capsys):
    code, err = _preflight(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err


@pytest.mark.parametrize("argv", [[], ["model=resnet50", "roi=[FFA,PPA]"],
                                  ["-m", "model=resnet18_random,tiny_cnn_random", "subject=1,2"],
                                  ["--cfg", "job"], ["experiment=sensitivity"], ["-m", "model=glob(*)"],
                                  ["data.cache_dir=null"], ["~logger"], ['data.root="2024"'],
                                  ["epsilon=linf", "attack.norm=linf"]])
def test_valid_command_lines_pass_the_preflight(argv, capsys):
    assert _preflight(argv, capsys) == ("-m" in argv, "")


def test_preflight_composes_each_value_once_not_each_job(monkeypatch):
    import brainrobust.preflight as pre

    seen = []
    real = pre._compose
    monkeypatch.setattr(pre, "_compose", lambda o: seen.append(o) or real(o))
    check_overrides(["model=tiny_cnn_random,resnet18_random", "subject=1,2,3", "roi=FFA,PPA"], CONF)
    assert len(seen) == 1 + 1 + 2 + 1  # the first values, then each other value once
    with pytest.raises(ConfigError, match="unknown roi 'XYZ'"):
        check_overrides(["subject=1,2", "roi=FFA,XYZ"], CONF)


@pytest.mark.slow
@pytest.mark.parametrize("overrides,exc,words", ROWS, ids=[" ".join(r[0]) for r in ROWS])
def test_readme_mistakes_through_run_py(finished_cli, overrides, exc, words):
    """Each row of the README's table as the user meets it: exit 2, one line, results untouched."""
    root, tmp = finished_cli
    before = _snapshot(tmp / "results")
    out = subprocess.run([sys.executable, "run.py", *isolated(root, tmp), "attack.steps=3",
                          "probe.sensitivity.max_images=2", "probe.sensitivity.random_draws=1",
                          *overrides], check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(errors) == 1 and words in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert _snapshot(tmp / "results") == before


@pytest.fixture(scope="module")
def finished_cli(tmp_path_factory, synthetic_root):
    """A store holding one finished run, made through run.py itself."""
    tmp = tmp_path_factory.mktemp("cli")
    root, _ = synthetic_root
    subprocess.run([sys.executable, "run.py", *isolated(root, tmp), "attack.steps=3",
                    "probe.sensitivity.max_images=2", "probe.sensitivity.random_draws=1"],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    return root, tmp


@pytest.mark.slow
def test_a_failed_job_does_not_end_the_sweep(synthetic_root, tmp_path):
    """On real NSD some ROIs are missing in some subjects: the sweep runs every other job,
    prints one table over them and lists the failure, exit 2."""
    root, _ = synthetic_root
    out = subprocess.run(
        [sys.executable, "run.py", "--multirun", "subject=2,1", "roi=RSC", *isolated(root, tmp_path),
         "attack.steps=2", "probe.sensitivity.max_images=2", "probe.sensitivity.random_draws=1"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "1 of 2 jobs failed:" in out.stderr
    assert "subject=2: ROI 'RSC' is empty for subject 2" in out.stderr
    assert "Traceback" not in out.stderr
    # The other job (subject 1) ran and is in the sweep's one table, printed once.
    assert out.stdout.count("sensitivity: mean |s|") == 1
    table = out.stdout.split("sensitivity: mean |s|")[1]
    assert len([line for line in table.splitlines() if " RSC " in line]) == 3  # its three eps
    assert len(list((tmp_path / "results" / "runs").glob("*/DONE"))) == 1


def test_no_readme_or_docs_points_outside_the_repository():
    for path in [REPO / "README.md", *Path(REPO / "docs").rglob("*.md")]:
        assert "../shared" not in path.read_text(), path
