"""Shared caches under concurrent writers: real processes started together on a cold cache.

Each worker imports everything first, then waits for a go file, so the builds overlap for real;
the workers then start at staggered delays that land in different phases of the first build.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from brainrobust.data import synthetic
from brainrobust.data.nsd import NSDLoader
from brainrobust.data.synthetic import ensure_synthetic_nsd
from brainrobust.files import exclusive

TWIN = {"n_subjects": 2, "sessions": (2, 1), "grid": (10, 12, 8), "image_size": 16,
        "n_shared": 40, "seed": 1}
DELAYS = (0.0, 0.2, 0.6, 1.2)

PRELUDE = """
import json, logging, os, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
go, delay = Path(sys.argv[1]), float(sys.argv[2])
"""
WAIT = """
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
time.sleep(delay)
"""


def race(tmp_path: Path, setup: str, work: str, delays: tuple[float, ...] = DELAYS) -> list[str]:
    """Run `setup` then, once all are ready, `work` in one process per delay; their outputs."""
    code = textwrap.dedent(PRELUDE) + textwrap.dedent(setup) + WAIT + textwrap.dedent(work)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(go), str(delay)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for delay in delays]
    for proc in procs:
        seen = []
        while not seen or seen[-1] not in ("ready\n", ""):
            seen.append(proc.stdout.readline())
        assert seen[-1] == "ready\n", "".join(seen)[-3000:]
    go.touch()
    outs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:]
    return outs


def test_processes_writing_the_twin_at_once_leave_one_complete_twin(tmp_path):
    root = tmp_path / "twin"
    outs = race(tmp_path, """
        from brainrobust.data.synthetic import ensure_synthetic_nsd
        """, f"""
        truth = ensure_synthetic_nsd({str(root)!r}, **{TWIN!r})
        print("test images", len(truth.test_ids))
        """)
    assert sum("not written yet; writing it" in out for out in outs) == 1
    assert len({line for out in outs for line in out.splitlines() if "test images" in line}) == 1
    marker = json.loads((root / synthetic.MARKER).read_text())
    on_disk = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")
               if p.is_file() and not p.name.startswith(".brainrobust_synthetic.")}
    assert on_disk == marker["files"] and len(on_disk) > 30
    assert not (root / synthetic.PARTIAL).exists()
    assert not list(root.glob(f"{synthetic.BUILD}*"))
    written = (root / synthetic.MARKER).stat().st_mtime_ns
    ensure_synthetic_nsd(root, **TWIN)  # a later job reuses it
    assert (root / synthetic.MARKER).stat().st_mtime_ns == written
    data = NSDLoader(root).load(1, ["FFA", "PPA"], "train")
    assert len(data.ids) > 100 and np.isfinite(data.responses).all()


def test_processes_loading_one_subject_at_once_read_the_betas_once(tmp_path):
    root = tmp_path / "twin"
    ensure_synthetic_nsd(root, **TWIN)
    outs = race(tmp_path, f"""
        from brainrobust.data import nsd
        opened = []
        real = nsd._open_h5
        nsd._open_h5 = lambda path: opened.append(path) or real(path)
        loader = nsd.NSDLoader({str(root)!r}, cache_dir={str(tmp_path / "cache")!r})
        """, """
        data = loader.load(1, ["FFA", "EBA"], "train")
        print("betas opened", len(opened), "sum", float(data.responses.sum()))
        """, delays=(0, 0, 0))
    counts = [int(out.split("betas opened ")[1].split()[0]) for out in outs]
    assert sorted(counts) == [0, 0, 2]  # two sessions, read by one process
    assert len({out.split(" sum ")[1].split()[0] for out in outs}) == 1
    assert len(list((tmp_path / "cache/nsd").glob("*.npy"))) == 1


@pytest.mark.slow  # three processes importing Lightning and timm: ~20-60 s
def test_processes_extracting_one_feature_entry_at_once_run_the_backbone_once(tmp_path):
    cache = tmp_path / "features"
    outs = race(tmp_path, """
        import numpy as np
        from brainrobust.models.features import build_feature_model, extract_features
        from brainrobust.models.zoo import get_spec
        spec = get_spec("tiny_cnn_random")
        model = build_feature_model(spec)
        calls = []
        model[1].backbone.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
        images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
        """, f"""
        features = extract_features(spec, model, images, np.arange(24), "race", {str(cache)!r},
                                    batch_size=4, accelerator="cpu", progress_bar=False)
        print("images through the backbone", sum(calls), "sum", float(features.sum()))
        """, delays=(0, 0, 0))
    passes = [int(out.split("backbone ")[1].split()[0]) for out in outs]
    assert sorted(passes) == [0, 0, 24]
    assert len({out.split(" sum ")[1].split()[0] for out in outs}) == 1
    assert sorted(p.suffix for p in (cache / "tiny_cnn_random").iterdir()) == [".json", ".npy"]


def read_until(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """The process's output up to and including `text`, which must come within `timeout` s."""
    fd, out, end = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while text.encode() not in out:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        chunk = os.read(fd, 1 << 16) if ready else b""
        assert chunk, f"no {text!r} within {timeout} s: {out[-3000:]!r}"
        out += chunk
    return out.decode()


def test_a_process_waits_for_the_twin_being_written_and_says_so(tmp_path):
    root = tmp_path / "twin"
    root.mkdir()
    code = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from brainrobust.data.synthetic import ensure_synthetic_nsd
        ensure_synthetic_nsd({str(root)!r}, **{TWIN!r})
        """)
    with exclusive(root / synthetic.LOCK):  # as a process writing the twin holds it
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        read_until(proc, "is being built by another process; waiting for it", timeout=120)
        assert proc.poll() is None and not (root / synthetic.MARKER).exists()
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert (root / synthetic.MARKER).exists()
