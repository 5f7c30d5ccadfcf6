"""The synthetic twin: real NSD layout, planted structure, write-once behaviour."""

import json
import logging
import time

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from brainrobust.data import synthetic
from brainrobust.data.nsd import NSDLoader
from brainrobust.data.synthetic import ensure_synthetic_nsd, load_truth, write_synthetic_nsd
from brainrobust.errors import ConfigError, StorageError
from brainrobust.files import sha256_file

SMALL = {"n_subjects": 1, "sessions": (1,), "grid": (8, 9, 7), "image_size": 8, "n_shared": 20}


def test_files_in_the_real_layout(synthetic_root):
    root, truth = synthetic_root
    design = scipy.io.loadmat(root / "nsddata/experiments/nsd/nsd_expdesign.mat")
    order, subjectim = design["masterordering"], design["subjectim"]
    assert order.shape == (1, 750 * 3) and subjectim.shape == (8, 750)
    assert design["basiccnt"].shape == (3, 3) and design["stimpattern"].shape == (3, 12, 75)
    assert design["stimpattern"].sum((1, 2)).tolist() == [750] * 3
    assert order.min() == 1 and order.max() == 750 and subjectim.min() == 1
    np.testing.assert_array_equal(subjectim[:, :100], np.tile(design["sharedix"], (8, 1)))
    assert len(np.unique(subjectim)) == 100 + 8 * 650  # only the shared images overlap
    with h5py.File(root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", "r") as f:
        brick = f["imgBrick"]
        assert brick.dtype == np.uint8 and brick.shape == (subjectim.max(), 64, 64, 3)
    for s in (1, 2):
        x, y, z = truth.grids[s]
        faces = nib.load(root / f"nsddata/ppdata/subj{s:02d}/func1pt8mm/roi/floc-faces.nii.gz")
        labels = np.rint(faces.get_fdata()).astype(int)
        assert labels.shape == (x, y, z) and labels.min() == -1
        bdir = root / f"nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"
        with h5py.File(bdir / "betas_session01.hdf5", "r") as f:
            betas = f["betas"]
            assert betas.dtype == np.int16 and betas.shape == (750, z, y, x)
            assert betas.chunks is None and betas.compression is None
            nonzero = (betas[:] != 0).any(0)  # (Z, Y, X)
        np.testing.assert_array_equal(nonzero, (labels >= 0).T)  # 0 exactly outside the brain
        for hemi in ("lh", "rh"):
            assert (root / f"nsddata/ppdata/subj{s:02d}/func1pt8mm/roi/{hemi}.floc-places.nii.gz"
                    ).is_file()
        assert (root / f"nsddata/ppdata/subj{s:02d}/func1pt8mm/roi/nsdgeneral.nii.gz").is_file()
        assert nib.load(bdir / "ncsnr.nii.gz").shape == (x, y, z)


def test_hemisphere_files_split_the_bilateral_volume(synthetic_root):
    root, truth = synthetic_root
    roi = root / "nsddata/ppdata/subj01/func1pt8mm/roi"
    both, lh, rh = (np.rint(nib.load(roi / f"{p}floc-bodies.nii.gz").get_fdata())
                    for p in ("", "lh.", "rh."))
    assert ((lh > 0) & (rh > 0)).sum() == 0
    np.testing.assert_array_equal(np.maximum(lh, rh), both)
    assert (lh == 1).sum() == truth.label_counts[1]["EBA"]["lh"] > 0


def test_absent_label_still_listed_in_ctab(synthetic_root):
    root, truth = synthetic_root
    ctab = (root / "nsddata/freesurfer/subj02/label/floc-places.mgz.ctab").read_text()
    assert "3 RSC" in ctab
    places = nib.load(root / "nsddata/ppdata/subj02/func1pt8mm/roi/floc-places.nii.gz")
    assert not (np.rint(places.get_fdata()) == 3).any()
    assert truth.roi_voxel_count(2, "RSC") == 0 and truth.roi_voxel_count(1, "RSC") > 0


def test_session_offsets_and_gains_make_zscoring_matter(synthetic_root):
    """Raw per-session voxel means differ far beyond their sampling error, and so do SDs."""
    root, _ = synthetic_root
    bdir = root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    means, sds = [], []
    for k in (1, 2, 3):
        with h5py.File(bdir / f"betas_session{k:02d}.hdf5", "r") as f:
            b = f["betas"][:].reshape(750, -1).astype(float) / 300
        inside = (b != 0).any(0)
        means.append(b[:, inside].mean(0))
        sds.append(b[:, inside].std(0))
    standard_error = np.median(np.mean(sds, axis=0)) / np.sqrt(750)
    assert np.median(np.std(means, axis=0)) > 5 * standard_error
    assert np.median(np.abs(np.log(sds[0] / sds[1]))) > 0.1  # per-session gains


def test_sizes_fit_the_contract(synthetic_root):
    root, truth = synthetic_root
    assert len(truth.test_ids) >= 60
    loader = NSDLoader(root)
    for s in range(1, 9):
        assert len(loader.load(s, "EBA", "train").ids) >= 500
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 200e6


def test_truth_roundtrip_and_marker(synthetic_root):
    root, truth = synthetic_root
    again = load_truth(root)
    np.testing.assert_array_equal(again.test_ids, truth.test_ids)
    np.testing.assert_array_equal(again.content, truth.content)
    assert again.label_counts == truth.label_counts and again.grids == truth.grids
    marker = json.loads((root / synthetic.MARKER).read_text())
    assert marker["params"]["sessions"] == [3, 3, 2, 2, 3, 2, 3, 2]
    assert not (root / synthetic.PARTIAL).exists()


def test_ensure_writes_once_and_rewrites_on_change_or_half_write(tmp_path):
    root = tmp_path / "twin"
    ensure_synthetic_nsd(root, **SMALL)
    stimuli = root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    first = stimuli.stat().st_mtime_ns
    ensure_synthetic_nsd(root, **SMALL)
    assert stimuli.stat().st_mtime_ns == first  # reused
    (root / synthetic.MARKER).unlink()  # as if killed before the marker was written
    (root / synthetic.PARTIAL).write_text("")
    ensure_synthetic_nsd(root, **SMALL)
    assert stimuli.stat().st_mtime_ns != first
    second = stimuli.stat().st_mtime_ns
    truth = ensure_synthetic_nsd(root, **{**SMALL, "seed": 5})
    assert stimuli.stat().st_mtime_ns != second and truth.params["seed"] == 5
    with pytest.raises(ConfigError, match="already holds"):
        write_synthetic_nsd(root, **SMALL)


def test_refuses_to_overwrite_foreign_data(tmp_path):
    (tmp_path / "nsddata").mkdir()
    with pytest.raises(ConfigError, match="not written by the synthetic generator"):
        write_synthetic_nsd(tmp_path, **SMALL, overwrite=True)
    assert (tmp_path / "nsddata").is_dir()


def test_same_seed_same_files(tmp_path):
    a = write_synthetic_nsd(tmp_path / "a", **SMALL)
    b = write_synthetic_nsd(tmp_path / "b", **SMALL)
    rel = "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session01.hdf5"
    assert sha256_file(tmp_path / "a" / rel) == sha256_file(tmp_path / "b" / rel)
    np.testing.assert_array_equal(a.content, b.content)


def test_bad_parameters_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="n_shared"):
        write_synthetic_nsd(tmp_path, **{**SMALL, "n_shared": 10_000})
    with pytest.raises(ConfigError, match="roi_sizes"):
        write_synthetic_nsd(tmp_path, **SMALL, roi_sizes={"VWFA": 3})


def test_marker_lists_every_file_and_a_damaged_twin_is_rewritten(tmp_path, caplog):
    root = tmp_path / "twin"
    ensure_synthetic_nsd(root, **SMALL)
    listed = json.loads((root / synthetic.MARKER).read_text())["files"]
    assert listed == {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")
                      if p.is_file() and not p.name.startswith(".brainrobust_synthetic.")}
    stimuli = root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    session = root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/" \
                     "betas_session01.hdf5"
    for damage in (stimuli.unlink, lambda: session.write_bytes(session.read_bytes()[:-10])):
        damage()
        with caplog.at_level(logging.WARNING):
            ensure_synthetic_nsd(root, **SMALL)
        assert "is damaged" in caplog.text and "writing it" in caplog.text
        caplog.clear()
        assert stimuli.stat().st_size == listed[stimuli.relative_to(root).as_posix()]
        assert session.stat().st_size == listed[session.relative_to(root).as_posix()]
    written = (root / synthetic.MARKER).stat().st_mtime_ns
    ensure_synthetic_nsd(root, **SMALL)
    assert (root / synthetic.MARKER).stat().st_mtime_ns == written  # an intact twin is reused


def test_a_killed_build_leaves_nothing_that_is_trusted_or_kept(tmp_path):
    root = tmp_path / "twin"
    ensure_synthetic_nsd(root, **SMALL)
    stale = root / f"{synthetic.BUILD}dead"  # a build killed before its move into place
    (stale / "nsddata").mkdir(parents=True)
    (root / synthetic.MARKER).unlink()  # killed between the moves and the marker
    (root / synthetic.PARTIAL).write_text("")
    ensure_synthetic_nsd(root, **SMALL)
    assert not stale.exists() and not (root / synthetic.PARTIAL).exists()
    assert (root / synthetic.MARKER).is_file()


def test_same_parameters_give_the_same_bytes_anywhere(tmp_path):
    """No time stamp in any file the loader reads: the data fingerprint of a twin does not
    depend on its folder or on when it was written."""
    ensure_synthetic_nsd(tmp_path / "a", **SMALL)
    time.sleep(1.1)  # gzip and MAT headers store seconds
    ensure_synthetic_nsd(tmp_path / "b", **SMALL)
    files = [p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
             if p.is_file() and p.name != synthetic.TRUTH_JSON]
    assert len(files) > 20
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (NSDLoader(tmp_path / "a").fingerprint(1, ["FFA", "lh.PPA"])
            == NSDLoader(tmp_path / "b").fingerprint(1, ["FFA", "lh.PPA"]))


def test_a_root_that_cannot_be_made_is_one_line(tmp_path):
    with pytest.raises(StorageError, match="File name too long"):
        ensure_synthetic_nsd(tmp_path / ("x" * 300) / "twin", **SMALL)
    with pytest.raises(ConfigError, match="image_size in 8-1024"):
        ensure_synthetic_nsd(tmp_path / "twin", **{**SMALL, "image_size": 100_000})
