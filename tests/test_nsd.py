"""NSD loader on the synthetic twin: known answers from an independent numpy reading of the files."""

import logging
import os
import shutil

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io

from brainrobust.data import datafiles, nsd
from brainrobust.data.datamodule import BrainDataModule
from brainrobust.data.layouts import data_fingerprint
from brainrobust.data.nsd import NSDLoader, read_boxes
from brainrobust.data.nsd_files import TWIN_SESSIONS
from brainrobust.data.rois import ROISpec, builtin_roi, read_ctab
from brainrobust.data.synthetic import write_synthetic_nsd
from brainrobust.errors import ConfigError, DataError

DESIGN = "nsddata/experiments/nsd/nsd_expdesign.mat"
EPS32, EPS64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)
CODES = {"FFA": ("floc-faces", [2, 3]), "EBA": ("floc-bodies", [1]), "PPA": ("floc-places", [2]),
         "OFA": ("floc-faces", [1])}
TINY = {"n_subjects": 2, "sessions": (2, 1), "grid": (10, 12, 8), "image_size": 16,
        "n_shared": 40, "seed": 1}


def betas_dir(root, s):
    return root / f"nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"


def roi_file(root, s, stem):
    return root / f"nsddata/ppdata/subj{s:02d}/func1pt8mm/roi/{stem}.nii.gz"


def reference(root, subject, rois):
    """Trial ids, per-session z-scored single trials and (x, y, z) of the ROIs' voxels.

    Written without the loader: full volumes, NIfTI indexing, the doc's 1-based formulas.
    """
    design = scipy.io.loadmat(root / DESIGN)
    order = design["masterordering"].ravel().astype(int)
    subjectim = design["subjectim"].astype(int)
    files = sorted(betas_dir(root, subject).glob("betas_session*.hdf5"))
    shown = subjectim[subject - 1, order[: 750 * len(files)] - 1] - 1
    mask = False
    for roi in rois:
        stem, codes = CODES[roi]
        mask = mask | np.isin(np.rint(nib.load(roi_file(root, subject, stem)).get_fdata()), codes)
    xyz = np.argwhere(mask)
    trials = []
    for path in files:
        with h5py.File(path, "r") as f:
            betas = f["betas"][:] / 300.0
        x = betas[:, xyz[:, 2], xyz[:, 1], xyz[:, 0]]
        trials.append((x - x.mean(0)) / x.std(0))
    return shown, np.concatenate(trials), xyz


def stored_trial_error(trials):
    """Bound of the change of each single trial when the loader keeps it in float32: half an ulp."""
    return EPS32 / 2 * np.abs(trials)


def noise_ceiling_error(triples, error, nc, k):
    """Bound of the change of NC = 100 s2 / (s2 + k), s2 = 1 / v^2 - 1, v^2 the mean variance
    (ddof=1) over `triples` (n, 3, V), when each trial moves by up to `error` (n, 3, V).

    To first order a triple's variance moves by sum_j (x_j - mean) * dx_j, so v^2 by the mean of
    sum_j |x_j - mean| * error_j, and NC by 100 k / (s2 + k)^2 / v^4 times that. The float32
    ncsnr and NC add half an ulp each, eps relative in all (s2 doubling ncsnr's).
    """
    dev = np.abs(triples - triples.mean(1, keepdims=True))
    var = triples.var(1, ddof=1).mean(0)
    d_var = (dev * error).sum(1).mean(0)
    s2 = np.maximum(0.0, 1 / var - 1)
    return 100 * k / (s2 + k) ** 2 / var**2 * d_var + 2 * EPS32 * np.abs(nc)


def columns_of(data, xyz):
    """Reference column of each loader column, matched by voxel coordinates."""
    where = {tuple(v): i for i, v in enumerate(xyz)}
    assert {tuple(v) for v in data.voxel_xyz} == set(where)
    return np.array([where[tuple(v)] for v in data.voxel_xyz])


@pytest.fixture(scope="module")
def loader(synthetic_root, tmp_path_factory):
    return NSDLoader(synthetic_root[0], cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_src")
    return root, write_synthetic_nsd(root, **TINY)


@pytest.fixture
def tiny(tiny_source, tmp_path):
    """A private copy of a small twin that a test may damage."""
    root = tmp_path / "nsd"
    shutil.copytree(tiny_source[0], root)
    return root, tiny_source[1]


# ---- known answers ----------------------------------------------------------------------
def test_test_set_matches_planted_ids(loader, synthetic_root):
    truth = synthetic_root[1]
    assert len(truth.test_ids) >= 60
    np.testing.assert_array_equal(loader.test_ids(), truth.test_ids)
    assert loader.subjects == list(range(1, 9))
    assert [loader.n_sessions(s) for s in range(1, 9)] == list(truth.params["sessions"])


def test_splits_follow_one_based_trial_ids_of_the_stim_table(loader, synthetic_root):
    """The csv's subjectX_repN are 1-based trial ids: an independent route to both splits."""
    root, truth = synthetic_root
    table = pd.read_csv(root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv", index_col=0)
    shown = {}
    for s in range(1, 9):
        reps = table[[f"subject{s}_rep{r}" for r in range(3)]].to_numpy()
        shown[s] = ((reps >= 1) & (reps <= 750 * truth.sessions[s])).sum(1)
    shared = table["shared1000"].to_numpy()
    test = np.flatnonzero(shared & np.all([shown[s] == 3 for s in shown], axis=0))
    np.testing.assert_array_equal(loader.test_ids(), test)
    for s in (1, 3):
        train = loader.load(s, "FFA", "train")
        expected = np.setdiff1d(np.flatnonzero(shown[s] > 0), test)
        np.testing.assert_array_equal(train.ids, expected)
        np.testing.assert_array_equal(train.n_repeats, shown[s][expected])
        assert len(train.ids) >= 500


@pytest.mark.parametrize("subject", [1, 3])
@pytest.mark.parametrize("split", ["train", "test"])
def test_responses_equal_independent_zscore_and_average(loader, synthetic_root, subject, split):
    root, truth = synthetic_root
    rois = ["FFA", "EBA", "PPA"]
    data = loader.load(subject, rois, split)
    shown, trials, xyz = reference(root, subject, rois)
    ids = truth.test_ids if split == "test" else np.setdiff1d(np.unique(shown), truth.test_ids)
    np.testing.assert_array_equal(data.ids, ids)
    expected = np.stack([trials[shown == i].mean(0) for i in ids])
    stored = np.stack([stored_trial_error(trials[shown == i]).mean(0) for i in ids])
    cols = columns_of(data, xyz)
    assert data.responses.dtype == np.float32 and data.n_dropped == 0
    # The loader averages float32-stored trials in float64 and stores the mean in float32: half
    # an ulp of each; 2x covers the float64 sums (~1e-13 relative)
    bound = 2 * (stored + EPS32 / 2 * np.abs(expected))
    np.testing.assert_array_less(np.abs(data.responses - expected[:, cols]), bound[:, cols])
    np.testing.assert_array_equal(data.n_repeats, [np.sum(shown == i) for i in ids])
    for roi in rois:
        assert len(data.rois[roi]) == truth.roi_voxel_count(subject, roi)
        block = data.responses[:, data.rois[roi]]
        # two float32 means of the same m columns (float32 sums): m * eps * mean|x| each
        bound = 2 * block.shape[1] * EPS32 * np.abs(block).mean(1)
        np.testing.assert_array_less(np.abs(data.roi_mean[roi] - block.mean(1)), bound)


def test_roi_voxel_counts_all_subjects_and_hemispheres(loader, synthetic_root):
    truth = synthetic_root[1]
    for s in range(1, 9):
        data = loader.load(s, ["FFA", "lh.EBA", "rh.PPA", "FBA"], "test")
        for roi in ("FFA", "lh.EBA", "rh.PPA", "FBA"):
            assert len(data.rois[roi]) == truth.roi_voxel_count(s, roi) > 0
        # FBA overlaps FFA (another file): shared voxels are one column listed in both ROIs.
        union = np.unique(np.concatenate(list(data.rois.values())))
        np.testing.assert_array_equal(union, np.arange(data.responses.shape[1]))
        assert len(np.unique(data.voxel_xyz, axis=0)) == data.responses.shape[1]


def test_noise_ceiling_from_ncsnr_file(loader, synthetic_root):
    root, _ = synthetic_root
    for split in ("test", "train"):
        data = loader.load(3, "FFA", split)
        ncsnr = nib.load(betas_dir(root, 3) / "ncsnr.nii.gz").get_fdata()
        s2 = ncsnr[tuple(data.voxel_xyz.T)] ** 2
        n = data.n_repeats
        k = ((n == 3).sum() / 3 + (n == 2).sum() / 2 + (n == 1).sum()) / len(n)
        # float64 from the same float64 ncsnr, rounded once to float32: half an ulp; eps leaves
        # room for the two ways k is summed
        np.testing.assert_allclose(data.noise_ceiling, 100 * s2 / (s2 + k), rtol=EPS32)
    assert k > 1 / 3  # the training split mixes 1, 2 and 3 repeats


def test_roi_noise_ceiling_from_roi_mean_series(loader, synthetic_root):
    root, _ = synthetic_root
    data = loader.load(1, "PPA", "test")
    shown, trials, _ = reference(root, 1, ["PPA"])
    raw = trials.mean(1).reshape(-1, 750)
    sd = raw.std(1, keepdims=True)
    series = ((raw - raw.mean(1, keepdims=True)) / sd).ravel()
    ids, counts = np.unique(shown, return_counts=True)
    triples = np.stack([series[shown == i] for i in ids[counts == 3]])[:, :, None]
    v = np.sqrt(triples.var(1, ddof=1).mean())
    ncsnr = np.sqrt(max(0.0, 1 - v**2)) / v
    expected = 100 * ncsnr**2 / (ncsnr**2 + 1 / 3)
    # The loader's series averages float32-stored trials: each raw value moves by at most the
    # mean of its trials' half ulps, and once z-scored (mean and sd moving too) by at most
    # (|shift| + max |shift| * (1 + |z|)) / sd
    shift = stored_trial_error(trials).mean(1).reshape(sd.shape[0], -1)
    moved = ((shift + shift.max(1, keepdims=True) * (1 + np.abs(series.reshape(shift.shape)))) / sd).ravel()
    error = np.stack([moved[shown == i] for i in ids[counts == 3]])[:, :, None]
    bound = noise_ceiling_error(triples, error, expected, 1 / 3)[0]
    assert abs(data.roi_noise_ceiling["PPA"] - expected) <= bound
    assert 30 < data.roi_noise_ceiling["PPA"] < 99


def test_each_roi_prefers_its_planted_content(loader, synthetic_root):
    truth = synthetic_root[1]
    data = loader.load(1, ["FFA", "EBA", "PPA"], "test")
    content = truth.content[data.ids]
    for j, roi in enumerate(["FFA", "EBA", "PPA"]):
        r = [np.corrcoef(data.roi_mean[roi], content[:, c])[0, 1] for c in range(3)]
        assert r[j] > 0.7 and r[j] == max(r), (roi, r)


def test_absent_roi_is_an_error_naming_roi_and_subject(loader):
    with pytest.raises(DataError, match=r"'RSC' is empty for subject 2"):
        loader.load(2, "RSC", "test")
    with pytest.raises(DataError, match=r"'lh.OPA' is empty for subject 3"):
        loader.load(3, ["FFA", "lh.OPA"], "test")
    assert len(loader.load(3, "OPA", "test").rois["OPA"]) > 0
    assert len(loader.load(1, "RSC", "test").rois["RSC"]) > 0


def test_images_are_rows_of_the_stimulus_brick(synthetic_root):
    root, _ = synthetic_root
    ids = np.array([17, 3, 17, 4000])
    with h5py.File(root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", "r") as f:
        expected = np.stack([f["imgBrick"][i] for i in ids])
    native = NSDLoader(root)
    np.testing.assert_array_equal(native.images(ids), expected)
    small = NSDLoader(root, image_size=32)
    images = small.images(ids)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert np.abs(images.mean((1, 2)) - expected.mean((1, 2))).max() < 8
    assert small.image_source_id != native.image_source_id
    with pytest.raises(DataError, match="outside"):
        native.images([10**6])


# ---- axis order and index conversions -----------------------------------------------------
def test_axis_order_single_planted_voxel(tiny):
    root, _ = tiny
    x0, y0, z0 = 3, 7, 5  # distinct coordinates inside the brain of subject 1's (10, 12, 8) grid
    path = roi_file(root, 1, "floc-faces")
    image = nib.load(path)
    labels = np.asarray(image.dataobj).copy()
    assert labels[x0, y0, z0] >= 0
    labels[labels > 0] = 0
    labels[x0, y0, z0] = 2  # FFA-1
    nib.save(nib.Nifti1Image(labels, image.affine), path)
    planted = (np.arange(750) % 7 - 3) * 300  # PSC -3..3 on the (750, Z, Y, X) grid
    with h5py.File(betas_dir(root, 1) / "betas_session01.hdf5", "r+") as f:
        f["betas"][:, z0, y0, x0] = planted
    data = NSDLoader(root).load(1, "FFA", "train")
    np.testing.assert_array_equal(data.voxel_xyz, [[x0, y0, z0]])
    shown, trials, _ = reference(root, 1, ["FFA"])
    z = (planted - planted.mean()) / planted.std()
    # float64 z-scores of the same 750 values in two ways: n-term sums, relative to max |x| / sd
    z_err = len(planted) * EPS64 * np.abs(planted).max() / planted.std()
    np.testing.assert_allclose(trials[:750, 0], z, rtol=0, atol=z_err)
    expected = np.array([trials[shown == i, 0].mean() for i in data.ids])
    stored = np.array([stored_trial_error(trials[shown == i, 0]).mean() for i in data.ids])
    # as in test_responses_equal_independent_zscore_and_average
    bound = 2 * (stored + EPS32 / 2 * np.abs(expected))
    np.testing.assert_array_less(np.abs(data.responses[:, 0] - expected), bound)


def test_one_based_design_indices(tiny):
    root, _ = tiny
    design = nsd.read_design(root / DESIGN)
    raw = scipy.io.loadmat(root / DESIGN)
    t = 5
    ten_k = int(raw["masterordering"][0, t])  # 1-based index into subjectim's columns
    assert design.trial_ids(2, 1)[t] == int(raw["subjectim"][1, ten_k - 1]) - 1
    assert raw["masterordering"].min() == 1 and raw["subjectim"].min() == 1
    np.testing.assert_array_equal(raw["subjectim"][:, :40], np.tile(raw["sharedix"], (8, 1)))


def test_read_boxes_split_bilateral_rois():
    left = np.argwhere(np.ones((3, 4, 2), bool))
    right = left + [0, 0, 20]
    groups = read_boxes(np.concatenate([left, right]))
    assert len(groups) == 2
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(left) * 2))
    assert len(read_boxes(left)) == 1


# ---- ROIs ---------------------------------------------------------------------------------
def test_roi_specs_and_ctab(tmp_path):
    spec = ROISpec(name="FFA", file="floc-faces", labels=["FFA-1", "FFA-2"])
    assert spec.labels == ("FFA-1", "FFA-2") and hash(spec) == hash(builtin_roi("FFA"))
    assert builtin_roi("lh.PPA").hemi == "lh" and builtin_roi("lh.PPA").volume_stem == (
        "lh.floc-places")
    with pytest.raises(ConfigError, match="FFA, "):
        builtin_roi("XYZ")
    with pytest.raises(ConfigError, match="hemi"):
        ROISpec(name="x", file="floc-faces", labels=["OFA"], hemi="left")
    ctab = tmp_path / "floc-faces.mgz.ctab"
    ctab.write_text("# comment\n0  Unknown 0 0 0 0\n\n  2  FFA-1  255 0 0 0\n")
    assert read_ctab(ctab) == {"Unknown": 0, "FFA-1": 2}
    ctab.write_text("x FFA-1\n")
    with pytest.raises(DataError, match="expected '<int> <name>'"):
        read_ctab(ctab)


# ---- cache --------------------------------------------------------------------------------
def count_opens(monkeypatch):
    opened = []
    real = nsd._open_h5
    monkeypatch.setattr(nsd, "_open_h5", lambda path: opened.append(path) or real(path))
    return opened


def test_second_load_reads_no_beta_file(tiny, tmp_path, monkeypatch):
    root, _ = tiny
    opened = count_opens(monkeypatch)
    first = NSDLoader(root, cache_dir=tmp_path / "c").load(1, ["FFA", "PPA"], "train")
    assert len(opened) == 2  # two sessions
    opened.clear()
    again = NSDLoader(root, cache_dir=tmp_path / "c")
    second = again.load(1, ["FFA", "PPA"], "train")
    test = again.load(1, ["PPA", "FFA"], "test")  # same voxel set, other split and order
    assert opened == []
    np.testing.assert_array_equal(first.responses, second.responses)
    assert test.responses.shape[1] == first.responses.shape[1]


def test_damaged_or_stale_cache_is_rebuilt(tiny, tmp_path, monkeypatch, caplog):
    root, _ = tiny
    cache = tmp_path / "c"
    expected = NSDLoader(root, cache_dir=cache).load(1, "FFA", "train").responses
    (npy,) = cache.glob("nsd/*.npy")
    npy.write_bytes(npy.read_bytes()[:-100])  # truncated
    opened = count_opens(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = NSDLoader(root, cache_dir=cache).load(1, "FFA", "train").responses
    assert "rebuilding" in caplog.text and len(opened) == 2
    np.testing.assert_array_equal(again, expected)
    opened.clear()
    beta = betas_dir(root, 1) / "betas_session02.hdf5"
    os.utime(beta, ns=(beta.stat().st_atime_ns, beta.stat().st_mtime_ns + 10**9))
    NSDLoader(root, cache_dir=cache).load(1, "FFA", "train")
    assert len(opened) == 2  # a changed beta file changes the key


def test_noise_ceiling_from_data_without_ncsnr_file(tiny, caplog):
    root, _ = tiny
    planted = nib.load(betas_dir(root, 1) / "ncsnr.nii.gz").get_fdata()
    (betas_dir(root, 1) / "ncsnr.nii.gz").unlink()
    with caplog.at_level(logging.INFO):
        data = NSDLoader(root).load(1, ["FFA", "EBA"], "test")
    assert "no ncsnr.nii.gz" in caplog.text
    shown, trials, xyz = reference(root, 1, ["FFA", "EBA"])
    ids, counts = np.unique(shown, return_counts=True)
    triples = np.stack([trials[shown == i] for i in ids[counts == 3]])
    var = triples.var(1, ddof=1).mean(0)
    ncsnr = np.sqrt(np.maximum(0, 1 - var)) / np.sqrt(var)
    cols = columns_of(data, xyz)
    expected = 100 * ncsnr**2 / (ncsnr**2 + 1 / 3)
    # the loader computes v^2 from its float32-stored trials
    bound = noise_ceiling_error(triples, stored_trial_error(triples), expected, 1 / 3)
    np.testing.assert_array_less(np.abs(data.noise_ceiling - expected[cols]), bound[cols])
    truth = planted[tuple(data.voxel_xyz.T)]
    assert np.corrcoef(ncsnr[cols], truth)[0, 1] > 0.5


# ---- bad input ----------------------------------------------------------------------------
def test_missing_root_and_files_name_the_expected_path(tiny, tmp_path):
    root, _ = tiny
    with pytest.raises(DataError, match="set data.root="):
        NSDLoader(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"betas_session01.hdf5 not found under .*subj05.*"
                                         r"set data.root="):
        NSDLoader(root).load(5, "FFA", "test")
    (root / DESIGN).unlink()
    with pytest.raises(DataError, match=r"nsd_expdesign.mat not found under "
                                        r".*nsddata/experiments/nsd; copy or fetch it there, "
                                        r"or, if the root is wrong, set data.root="):
        NSDLoader(root).load(1, "FFA", "test")


def test_missing_session_file_in_the_middle(tmp_path):
    root = tmp_path / "nsd"
    write_synthetic_nsd(root, **{**TINY, "sessions": (3, 1)})
    (betas_dir(root, 1) / "betas_session02.hdf5").unlink()
    with pytest.raises(DataError, match="betas_session02.hdf5 not found"):
        NSDLoader(root).n_sessions(1)


def test_unknown_subject_roi_split_list_valid_names(tiny):
    loader = NSDLoader(tiny[0])
    with pytest.raises(ConfigError, match=r"unknown subject 9; valid: 1-8 .*\[1, 2\]"):
        loader.load(9, "FFA", "test")
    with pytest.raises(ConfigError, match=r"unknown ROI .VWFA.; valid: EBA, FBA, .*\bFFA\b.*conf/roi"):
        loader.load(1, "VWFA", "test")
    with pytest.raises(ConfigError, match="valid"):
        loader.load(1, "FFA", "val")


def test_subjects_without_files_use_fallback_sessions(tiny, caplog):
    root, truth = tiny
    with caplog.at_level(logging.WARNING):
        ids = NSDLoader(root).test_ids()
    assert "subject 3 has no beta files" in caplog.text
    np.testing.assert_array_equal(ids, truth.test_ids)


@pytest.mark.parametrize("text", ["[2, 2]", "nope", '{"1": 2}', "[2, 2, 2, 2, 2, 2, 2, -1]",
                                  "[2, 2, 2, 2, 2, 2, 2, 1.5]", "[true, 2, 2, 2, 2, 2, 2, 2]"])
def test_a_malformed_twin_session_record_names_the_file_and_the_fix(tiny, text):
    """A wrong record would silently change which trials form the test set."""
    root, _ = tiny
    (root / TWIN_SESSIONS).write_text(text)
    with pytest.raises(DataError, match=rf"{TWIN_SESSIONS} \(expected a JSON list of 8 integer "
                                        r"session counts >= 1, .*delete the twin's folder"):
        NSDLoader(root)
    with pytest.raises(ConfigError, match="sessions_fallback needs 8 integer counts >= 1"):
        NSDLoader(root, sessions_fallback=[2] * 7 + [0])
    assert NSDLoader(root, sessions_fallback=np.full(8, 2)).sessions_fallback == (2,) * 8


def test_zero_constant_and_nan_voxels_are_dropped_and_counted(tiny, caplog):
    root, truth = tiny
    clean = NSDLoader(root).load(1, "FFA", "test")
    (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = clean.voxel_xyz[:3]
    with h5py.File(betas_dir(root, 1) / "betas_session02.hdf5", "r+") as f:
        f["betas"][:, z0, y0, x0] = 0
        # Constant but not zero: its z-scores are rounding noise over an SD of ~1e-16.
        f["betas"][:, z2, y2, x2] = 123
    path = betas_dir(root, 1) / "ncsnr.nii.gz"
    image = nib.load(path)
    ncsnr = image.get_fdata()
    ncsnr[x1, y1, z1] = np.nan
    nib.save(nib.Nifti1Image(ncsnr, image.affine), path)
    with caplog.at_level(logging.WARNING):
        data = NSDLoader(root).load(1, "FFA", "test")
    assert data.n_dropped == 3 and "dropped 3 of" in caplog.text
    assert len(data.rois["FFA"]) == truth.roi_voxel_count(1, "FFA") - 3
    assert np.isfinite(data.responses).all() and np.isfinite(data.noise_ceiling).all()
    assert np.isfinite(data.roi_mean["FFA"]).all()
    np.testing.assert_array_equal(data.voxel_xyz, clean.voxel_xyz[3:])


def rewrite_betas(path, transform, name="betas"):
    with h5py.File(path, "r") as f:
        data = f["betas"][:]
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=transform(data))


@pytest.mark.parametrize("session, transform, name, message", [
    (1, lambda b: b.transpose(0, 3, 2, 1), "betas", r"expected \(750, Z, Y, X\) = \(750, 8, 12, 10\)"),
    (2, lambda b: b[:749], "betas", r"shape \(749, 8, 12, 10\), expected \(750, Z, Y, X\)"),
    (1, lambda b: b.astype(np.float32), "betas", r"is float32, expected int16"),
    (2, lambda b: b, "data", r"no dataset 'betas' \(found \['data'\]\)"),
])
def test_bad_beta_file_names_file_and_expected_shape(tiny, session, transform, name, message):
    root, _ = tiny
    path = betas_dir(root, 1) / f"betas_session{session:02d}.hdf5"
    rewrite_betas(path, transform, name)
    with pytest.raises(DataError, match=message) as err:
        NSDLoader(root).load(1, "FFA", "test")
    assert f"betas_session{session:02d}.hdf5" in str(err.value)


def test_chunked_compressed_betas_read_the_same(tiny):
    """A re-packed (chunked, gzip) copy goes through HDF5 hyperslabs instead of a memory map."""
    root, _ = tiny
    expected = NSDLoader(root).load(1, ["FFA", "EBA"], "train")
    path = betas_dir(root, 1) / "betas_session01.hdf5"
    with h5py.File(path, "r") as f:
        data = f["betas"][:]
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=data, chunks=(750, 1, 4, 4), compression="gzip")
    again = NSDLoader(root).load(1, ["FFA", "EBA"], "train")
    np.testing.assert_array_equal(again.responses, expected.responses)


def test_truncated_beta_file(tiny):
    root, _ = tiny
    path = betas_dir(root, 1) / "betas_session01.hdf5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"betas_session01.hdf5.*truncated"):
        NSDLoader(root).load(1, "FFA", "test")


def test_roi_grid_not_matching_betas(tiny):
    root, _ = tiny
    path = roi_file(root, 1, "floc-faces")
    image = nib.load(path)
    padded = np.pad(np.asarray(image.dataobj), ((0, 1), (0, 0), (0, 0)), constant_values=-1)
    nib.save(nib.Nifti1Image(padded, image.affine), path)
    with pytest.raises(DataError, match=r"floc-faces.nii.gz has grid \(X, Y, Z\) = \(11, 12, 8\)"):
        NSDLoader(root).load(1, "FFA", "test")


def test_ctab_without_label_or_missing(tiny):
    root, _ = tiny
    ctab = root / "nsddata/freesurfer/subj01/label/floc-faces.mgz.ctab"
    ctab.write_text("\n".join(line for line in ctab.read_text().splitlines()
                              if "FFA-2" not in line))
    with pytest.raises(DataError, match=r"label 'FFA-2' of ROI 'FFA' not in .*floc-faces.mgz.ctab"):
        NSDLoader(root).load(1, "FFA", "test")
    ctab.unlink()
    with pytest.raises(DataError, match="floc-faces.mgz.ctab not found"):
        NSDLoader(root).load(1, "FFA", "test")


# ---- data fingerprint ---------------------------------------------------------------------
def flip_byte(path, offset, keep_mtime=True):
    """Change one byte in place; optionally set the mtime back, as a hostile edit would."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_fingerprint_follows_the_content_not_the_place(tiny, tmp_path):
    root, _ = tiny
    clean = NSDLoader(root).fingerprint(1, ["FFA", "PPA"])
    elsewhere = tmp_path / "copied"
    shutil.copytree(root, elsewhere, copy_function=shutil.copy)  # new path, new mtimes
    assert NSDLoader(elsewhere).fingerprint(1, ["FFA", "PPA"]) == clean
    assert NSDLoader(root).fingerprint(1, "FFA") != clean  # another ROI reads other files
    stimuli = root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    flip_byte(stimuli, stimuli.stat().st_size // 2)
    assert NSDLoader(root).fingerprint(1, ["FFA", "PPA"]) != clean
    flip_byte(stimuli, stimuli.stat().st_size // 2)  # back to the clean bytes
    assert NSDLoader(root).fingerprint(1, ["FFA", "PPA"]) == clean
    ctab = root / "nsddata/freesurfer/subj01/label/floc-places.mgz.ctab"
    ctab.write_text(ctab.read_text().replace("2 PPA", "2 PPA "))
    assert NSDLoader(root).fingerprint(1, ["FFA", "PPA"]) != clean


def test_fingerprint_counts_every_subjects_sessions(tiny):
    """Subject 2's sessions decide subject 1's test set, so they are part of its fingerprint."""
    root, _ = tiny
    clean = NSDLoader(root).fingerprint(1, "FFA")
    other = NSDLoader(tiny[0]).fingerprint(2, "FFA")
    (betas_dir(root, 2) / "betas_session01.hdf5").rename(root / "away.hdf5")
    assert NSDLoader(root).fingerprint(1, "FFA") != clean
    (root / "away.hdf5").rename(betas_dir(root, 2) / "betas_session01.hdf5")
    assert NSDLoader(root).fingerprint(1, "FFA") == clean != other


def test_a_missing_last_session_warns_and_changes_the_fingerprint(tiny, caplog):
    root, _ = tiny
    with caplog.at_level(logging.WARNING):
        full = NSDLoader(root).load(1, "FFA", "train")
        fingerprint = NSDLoader(root).fingerprint(1, "FFA")
    assert "sessions the dataset defines" not in caplog.text  # the twin records its own counts
    (betas_dir(root, 1) / "betas_session02.hdf5").unlink()
    with caplog.at_level(logging.WARNING):
        fewer = NSDLoader(root).load(1, "FFA", "train")
    assert "subject 1 has 1 of the 2 sessions the dataset defines" in caplog.text
    assert len(fewer.ids) < len(full.ids)
    assert NSDLoader(root).fingerprint(1, "FFA") != fingerprint
    with caplog.at_level(logging.WARNING):  # NSD's published counts when no twin recorded its own
        (root / TWIN_SESSIONS).unlink()
        NSDLoader(root).load(2, "FFA", "train")
    assert "subject 2 has 1 of the 2 sessions" in caplog.text


def test_large_files_are_fingerprinted_by_samples_size_and_mtime(tiny, monkeypatch):
    root, _ = tiny
    monkeypatch.setattr(datafiles, "FULL_HASH_BYTES", 4096)
    monkeypatch.setattr(datafiles, "SAMPLE_BYTES", 256)
    stimuli = root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    clean = NSDLoader(root).fingerprint(1, "FFA")
    flip_byte(stimuli, stimuli.stat().st_size - 1)  # in the last sample, mtime set back
    damaged = NSDLoader(root).fingerprint(1, "FFA")
    assert damaged != clean
    flip_byte(stimuli, stimuli.stat().st_size // 2 + 100, keep_mtime=False)  # between samples
    assert NSDLoader(root).fingerprint(1, "FFA") not in (clean, damaged)


def test_cached_responses_are_rebuilt_when_a_file_changes_behind_its_mtime(tiny, tmp_path,
                                                                          monkeypatch):
    root, _ = tiny
    first = NSDLoader(root, cache_dir=tmp_path / "c").load(1, "FFA", "train")
    path = betas_dir(root, 1) / "betas_session02.hdf5"
    st = path.stat()
    x, y, z = first.voxel_xyz[0]
    with h5py.File(path, "r+") as f:
        f["betas"][:5, z, y, x] = f["betas"][:5, z, y, x] + 3000
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    opened = count_opens(monkeypatch)
    again = NSDLoader(root, cache_dir=tmp_path / "c").load(1, "FFA", "train")
    assert len(opened) == 2 and not np.array_equal(again.responses, first.responses)


# ---- unusable paths -----------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda p: os.symlink(p.name, p), r"betas_session02.hdf5 is a symbolic link loop"),
    (lambda p: os.symlink("gone.hdf5", p), "betas_session02.hdf5 is a link to gone.hdf5, which"),
    (lambda p: p.mkdir(), r"betas_session02.hdf5 is a directory, expected a file"),
])
def test_unusable_session_files_are_one_line_errors(tiny, make, message):
    root, _ = tiny
    path = betas_dir(root, 1) / "betas_session02.hdf5"
    path.unlink()
    make(path)
    for call in (lambda: NSDLoader(root).load(1, "FFA", "test"),
                 lambda: NSDLoader(root).fingerprint(1, "FFA")):
        with pytest.raises(DataError, match=message):
            call()


def test_a_directory_where_the_stimuli_are_expected(tiny):
    root, _ = tiny
    path = root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    path.unlink()
    path.mkdir()
    loader = NSDLoader(root)
    with pytest.raises(DataError, match="nsd_stimuli.hdf5 is a directory, expected a file"):
        loader.images(loader.test_ids()[:2])


def test_permission_denied_says_so_and_names_the_file(tiny, monkeypatch):
    """Tests run as root, which reads any file: h5py and nibabel raise what they raise for
    another user on a 0600 file."""
    root, _ = tiny

    def denied(path, *args, **kwargs):
        raise PermissionError(13, f"Unable to synchronously open file (unable to open file: "
                                  f"name = '{path}', errno = 13, error message = 'Permission "
                                  "denied', flags = 0, o_flags = 0)")

    monkeypatch.setattr(h5py, "File", denied)
    with pytest.raises(DataError, match=r"cannot read .*betas_session01.hdf5: permission denied; "
                                        r"make it readable") as err:
        NSDLoader(root).load(1, "FFA", "test")
    assert "truncated" not in str(err.value)
    monkeypatch.setattr(nib, "load", denied)
    with pytest.raises(DataError, match=r"cannot read .*floc-faces.nii.gz: permission denied"):
        NSDLoader(root).load(1, "FFA", "test")


def test_long_root_and_image_sizes_out_of_range_are_one_line_errors(tiny, tmp_path):
    root, _ = tiny
    with pytest.raises(DataError, match="longer than the filesystem allows"):
        NSDLoader(tmp_path / ("x" * 300) / "nsd")
    for size in (1, 15, 100_000, 64.5, "224"):
        with pytest.raises(ConfigError, match=r"data.image_size must be an int in 16-1024"):
            NSDLoader(root, image_size=size)
        with pytest.raises(ConfigError, match=r"data.image_size must be an int in 16-1024"):
            BrainDataModule(str(root), subject=1, rois=["FFA"], image_size=size)
    assert NSDLoader(root, image_size=16).images([0]).shape == (1, 16, 16, 3)


def test_stimuli_below_the_smallest_size_need_an_image_size(tmp_path):
    root = tmp_path / "twin"
    write_synthetic_nsd(root, n_subjects=1, sessions=(1,), grid=(8, 9, 7), image_size=8,
                        n_shared=20)
    dm = BrainDataModule(str(root), subject=1, rois=["EBA"])
    dm.setup()
    with pytest.raises(ConfigError, match="are 8 px, outside 16-1024; set data.image_size=224"):
        dm.image_tensor("test")
    resized = BrainDataModule(str(root), subject=1, rois=["EBA"], image_size=32)
    resized.setup()
    assert resized.stimulus_size == 32


def test_data_module_fingerprint_writes_the_twin_and_leaves_the_path_out(tmp_path):
    small = {"n_subjects": 1, "sessions": [1], "grid": [8, 9, 7], "image_size": 16,
             "n_shared": 20}
    prints = []
    for name in ("a", "b"):
        dm = BrainDataModule(str(tmp_path / name), subject=1, rois=["EBA"], synthetic=small)
        prints.append(dm.fingerprint())
        assert prints[-1] == NSDLoader(tmp_path / name).fingerprint(1, "EBA")
    assert prints[0] == prints[1]
    # As a resolved config holds it (what `python -m brainrobust.plan` reads, without torch).
    eba = {"EBA": {"_target_": "brainrobust.data.rois.ROISpec", "name": "EBA",
                   "file": "floc-bodies", "labels": ["EBA"], "hemi": "both"}}
    assert data_fingerprint("nsd", tmp_path / "a", 1, eba, synthetic=small) == prints[0]
