"""`python -m brainrobust fetch nsd`: the loader's files from a real HTTP server on 127.0.0.1.

The server (tests/http_server.py) holds the synthetic twin at the real NSD paths. Fetches of two
subjects must give the twin's files byte for byte, resume a download that broke off or was
killed, fetch again what was truncated or corrupted, and say every mistake in one line; with
--roi-only the loader must give the same responses and images from the partial copies.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from helpers import REPO, one_line_error
from http_server import FolderServer

from brainrobust.cli import main
from brainrobust.data import partial
from brainrobust.data.nsd import NSDLoader
from brainrobust.data.synthetic import write_synthetic_nsd
from brainrobust.errors import DataError
from brainrobust.fetch import http, remote
from brainrobust.fetch.nsd import MANIFEST, TERMS

SESSION = "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session02.hdf5"
ROI_FILE = "nsddata/ppdata/subj02/func1pt8mm/roi/floc-faces.nii.gz"
STIMULI = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """A two-subject twin: the design still lists 8 subjects, like a fetch of 2 of them."""
    root = tmp_path_factory.mktemp("twin")
    write_synthetic_nsd(root, n_subjects=2)
    return root


@pytest.fixture
def server(twin):
    with FolderServer(twin) as srv:
        yield srv


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(http, "BACKOFF", 0.0)


def fetch(root, server_url, *extra, subjects=("1", "2")):
    main(["fetch", "nsd", "--root", str(root), "--subjects", *subjects, "--base-url", server_url,
          "--accept-terms", *extra])


def loader_files(root: Path) -> list[str]:
    """What NSDLoader reads under a root (the twin also holds files it never reads)."""
    skip = ("nsdgeneral", "stim_info", "synthetic", MANIFEST)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not any(s in p.name for s in skip))


def gets(server, path: str) -> list[str | None]:
    """The Range headers of the GETs of one path."""
    return [r for m, p, r in server.requests if m == "GET" and p.lstrip("/") == path]


def test_terms_must_be_accepted_first(tmp_path, capsys, server):
    line = one_line_error(capsys, ["fetch", "nsd", "--root", str(tmp_path / "nsd"), "--subjects",
                                   "1", "--base-url", server.url])
    assert TERMS in line and "--accept-terms" in line and "naturalscenesdataset.org" in line
    assert not (tmp_path / "nsd").exists() and not server.requests


def test_two_subjects_arrive_byte_identical_and_are_not_fetched_twice(tmp_path, twin, server,
                                                                      capsys):
    fetch(tmp_path, server.url)
    out = capsys.readouterr().out
    assert TERMS in out and "subjects 1 (3 sessions), 2 (3 sessions): 34 files" in out
    assert loader_files(tmp_path) == loader_files(twin)
    for rel in loader_files(twin):
        assert (tmp_path / rel).read_bytes() == (twin / rel).read_bytes(), rel
    assert not list(tmp_path.rglob(".partial.*"))
    n_gets = len([r for r in server.requests if r[0] == "GET"])
    fetch(tmp_path, server.url)
    assert len([r for r in server.requests if r[0] == "GET"]) == n_gets  # HEADs only
    assert "0.0 MB to fetch" in capsys.readouterr().out


def test_a_broken_off_download_resumes_to_an_identical_file(tmp_path, twin, server):
    server.drop_after[SESSION] = 1_000_000
    fetch(tmp_path, server.url, subjects=("1",))
    assert gets(server, SESSION) == [None, "bytes=1000000-"]
    assert (tmp_path / SESSION).read_bytes() == (twin / SESSION).read_bytes()


def test_a_killed_fetch_resumes_where_it_stopped(tmp_path, twin, server):
    server.slow[SESSION] = 0.02  # 64 KiB per 20 ms: the file takes a few seconds
    part = (tmp_path / SESSION).with_name(".partial." + Path(SESSION).name)
    child = subprocess.Popen(
        [sys.executable, "-m", "brainrobust", "fetch", "nsd", "--root", str(tmp_path),
         "--subjects", "1", "--base-url", server.url, "--accept-terms", "--jobs", "1"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (part.is_file() and part.stat().st_size > 300_000):
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    have = part.stat().st_size
    server.slow.clear()
    fetch(tmp_path, server.url, subjects=("1",))
    assert gets(server, SESSION)[-1] == f"bytes={have}-"
    assert (tmp_path / SESSION).read_bytes() == (twin / SESSION).read_bytes()


def test_truncated_or_corrupted_files_are_fetched_again(tmp_path, twin, server):
    fetch(tmp_path, server.url)
    with open(tmp_path / SESSION, "r+b") as fh:
        fh.truncate(1000)
    data = bytearray((tmp_path / ROI_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte off: the ETag's MD5 tells
    (tmp_path / ROI_FILE).write_bytes(bytes(data))
    before = {p: len(gets(server, p)) for p in (SESSION, ROI_FILE)}
    fetch(tmp_path, server.url)
    for rel in (SESSION, ROI_FILE):
        assert len(gets(server, rel)) == before[rel] + 1
        assert (tmp_path / rel).read_bytes() == (twin / rel).read_bytes()


@pytest.mark.parametrize("extra,words", [
    (["--sessions", "5"], "subject 1 has 3 sessions at http"),
    (["--subjects", "9"], "unknown subject 9"),
    (["--roi-only", "FFX"], "unknown ROI 'FFX'"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--sessions", "99"], "--sessions must be <= 40 (NSD's most sessions per subject), got 99"),
    (["--sessions"], "expected one argument"),
])
def test_mistakes_are_one_line(tmp_path, server, capsys, extra, words):
    argv = ["fetch", "nsd", "--root", str(tmp_path), "--subjects", "1", "--base-url", server.url,
            "--accept-terms", *extra]
    assert words in one_line_error(capsys, argv)


def test_a_root_that_cannot_be_written_is_one_line(tmp_path, server, capsys):
    (tmp_path / "file").write_text("")
    line = one_line_error(capsys, ["fetch", "nsd", "--root", str(tmp_path / "file"), "--subjects",
                                   "1", "--base-url", server.url, "--accept-terms"])
    assert line.startswith(f"error: cannot write under {tmp_path / 'file'}: File exists; free")


def test_server_errors_are_one_line(tmp_path, twin, capsys):
    with FolderServer(twin / "nsddata") as wrong:  # a base URL one folder too deep: 404s
        line = one_line_error(capsys, ["fetch", "nsd", "--root", str(tmp_path), "--subjects", "1",
                                       "--base-url", wrong.url, "--accept-terms"])
    assert "answered HTTP 404 Not Found; check the address (--base-url)" in line
    with FolderServer(twin) as gone:
        url = gone.url
    line = one_line_error(capsys, ["fetch", "nsd", "--root", str(tmp_path), "--subjects", "1",
                                   "--base-url", url, "--accept-terms"])
    assert "retries; check the network and run the same command again" in line


def test_roi_only_gives_the_same_responses_and_images(tmp_path, twin, server, capsys):
    fetch(tmp_path, server.url, "--roi-only", "FFA", "PPA", subjects=("1",))
    assert "--roi-only FFA PPA: 4 partial files" in capsys.readouterr().out
    full, part = NSDLoader(twin), NSDLoader(tmp_path)
    for rois in (["FFA", "PPA"], ["PPA"]):
        for split in ("train", "test"):
            a, b = full.load(1, rois, split), part.load(1, rois, split)
            assert np.array_equal(a.ids, b.ids) and np.array_equal(a.responses, b.responses)
            assert a.roi_noise_ceiling == b.roi_noise_ceiling
    ids = full.load(1, "FFA", "train").ids
    assert np.array_equal(full.images(ids), part.images(ids))
    assert server.body_bytes[STIMULI] < 0.6 * (twin / STIMULI).stat().st_size  # 750 of 5300 images
    # Adding an ROI adds its voxels and leaves the stimuli alone; the same ROIs fetch nothing.
    stimuli_gets = len(gets(server, STIMULI))
    fetch(tmp_path, server.url, "--roi-only", "EBA", subjects=("1",))
    assert len(gets(server, STIMULI)) == stimuli_gets
    a, b = full.load(1, ["EBA", "FFA"], "train"), part.load(1, ["EBA", "FFA"], "train")
    assert np.array_equal(a.responses, b.responses)
    with h5py.File(tmp_path / SESSION) as f:
        assert list(f.attrs[partial.ROIS_ATTR]) == ["FFA", "PPA", "EBA"]
    sent = sum(server.body_bytes.values())
    fetch(tmp_path, server.url, "--roi-only", "PPA", "EBA", subjects=("1",))
    assert sum(server.body_bytes.values()) == sent


def test_partial_copies_refuse_what_they_do_not_hold(tmp_path):
    path = tmp_path / "part.hdf5"
    with h5py.File(path, "w") as f:
        f[partial.VOXELS] = np.array([3, 5])
        f[partial.ROWS] = np.array([10, 20])
        f.attrs[partial.ROIS_ATTR] = ["FFA"]
        f.attrs[partial.SUBJECTS_ATTR] = [1]
    with h5py.File(path) as f:
        partial.require_voxels(f, path, np.array([5]))
        partial.require_rows(f, path, np.array([20, 10]))
        with pytest.raises(DataError, match=r"holds only the voxels of FFA .*add the ROIs"):
            partial.require_voxels(f, path, np.array([4, 5]))
        with pytest.raises(DataError, match=r"subjects 1 .* not image 11; fetch nsd --roi-only"):
            partial.require_rows(f, path, np.array([11]))


def test_the_loader_refuses_rois_and_images_not_fetched(tmp_path, twin, server):
    fetch(tmp_path, server.url, "--roi-only", "FFA", subjects=("1",))
    loader = NSDLoader(tmp_path)
    with pytest.raises(DataError, match="holds only the voxels of FFA"):
        loader.load(1, ["FFA", "EBA"], "train")
    other = np.setdiff1d(NSDLoader(twin).design.subjectim[1] - 1,
                         NSDLoader(twin).design.subjectim[0] - 1)
    with pytest.raises(DataError, match="holds only the images of subjects 1"):
        loader.images(other[:1])


def test_a_killed_stimuli_fetch_keeps_the_rows_it_listed(tmp_path, twin, server, monkeypatch):
    monkeypatch.setattr(remote, "_FLUSH_BYTES", 1)  # list rows after every request
    client = http.Client()
    found = client.head(f"{server.url}/{STIMULI}")
    rows = NSDLoader(twin).design.subjectim[0] - 1
    calls = []

    def dies_on_the_tenth(*args):
        calls.append(args)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return http.Client.read_range(client, *args)

    monkeypatch.setattr(client, "read_range", dies_on_the_tenth)
    with pytest.raises(KeyboardInterrupt):
        remote.fetch_stimuli(client, found, tmp_path / "stim.hdf5", rows, [1], 1, lambda n: None)
    left = remote.stimuli_rows_missing(tmp_path / "stim.hdf5", found, np.unique(rows))
    assert 0 < len(left) < len(np.unique(rows)) and not (tmp_path / "stim.hdf5").exists()
    monkeypatch.setattr(client, "read_range", lambda *a: http.Client.read_range(client, *a))
    remote.fetch_stimuli(client, found, tmp_path / "stim.hdf5", rows, [1], 1, lambda n: None)
    with h5py.File(tmp_path / "stim.hdf5") as got, h5py.File(twin / STIMULI) as want:
        keep = np.unique(rows)
        assert np.array_equal(got["imgBrick"][keep], want["imgBrick"][keep])
        assert sorted(got[partial.ROWS][()]) == list(keep)


def test_plan_requests_merges_close_runs_and_caps_their_size():
    elements = np.array([0, 1, 2, 10, 11, 50])
    assert remote.plan_requests(elements, unit=2, gap=16) == [(0, 12), (50, 51)]
    assert remote.plan_requests(elements, unit=2, gap=0) == [(0, 3), (10, 12), (50, 51)]
    assert remote.plan_requests(np.arange(10), unit=4, gap=0, cap=12) == [
        (0, 3), (3, 6), (6, 9), (9, 10)]


@pytest.mark.slow
def test_runs_on_the_fetched_data_give_the_twins_records(tmp_path, twin, server):
    fetched = tmp_path / "fetched"
    fetch(fetched, server.url)
    records = {}
    for name, root in (("twin", twin), ("fetched", fetched)):
        out = tmp_path / name
        subprocess.run(
            [sys.executable, "run.py", "data=nsd", f"data.root={root}", "data.image_size=null",
             f"paths.cache_dir={out / 'cache'}", f"paths.results_dir={out / 'results'}",
             f"paths.log_dir={out / 'logs'}", "logger=none", "trainer.enable_progress_bar=false",
             "subject=2", "roi=[FFA,PPA]", "attack.steps=3", "probe.sensitivity.max_images=3",
             "probe.sensitivity.random_draws=1"],
            cwd=REPO, check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        # run_key hashes the config, data.root included: the one column that must differ.
        records[name] = {p.name: pd.read_parquet(p).drop(columns="run_key")
                         for p in (out / "results").rglob("*.parquet")}
    assert records["twin"].keys() == records["fetched"].keys()
    assert "sensitivity.parquet" in records["twin"]
    for probe, table in records["twin"].items():
        pd.testing.assert_frame_equal(table, records["fetched"][probe], check_exact=True)


def test_copying_a_fetched_root_keeps_it_complete(tmp_path, server, capsys):
    """A root moved to a cluster is still complete: the manifest holds sizes, not paths."""
    fetch(tmp_path / "a", server.url, subjects=("1",))
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # copytree keeps mtimes
    capsys.readouterr()
    fetch(tmp_path / "b", server.url, subjects=("1",))
    assert "0.0 MB to fetch" in capsys.readouterr().out
