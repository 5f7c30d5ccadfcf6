"""Algonauts 2023 layout loader on a tiny layout written here."""

import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from brainrobust.data.algonauts import AlgonautsLoader
from brainrobust.errors import ConfigError, DataError

N_LH, N_RH = 30, 25
FACES = {0: "Unknown", 1: "OFA", 2: "FFA-1", 3: "FFA-2", 4: "mTL-faces", 5: "aTL-faces"}
PLACES = {0: "Unknown", 1: "OPA", 2: "PPA", 3: "RSC"}


def image_of(nsd_id, size=12):
    """An image whose pixels encode its id, so a returned image can be traced to its file."""
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = nsd_id % 256, nsd_id // 256, 77
    return img


def write_layout(root, subjects=(1, 2)):
    """Per subject: 40 shared + 20 own images, fMRI whose value encodes (image, column)."""
    truth = {}
    for s in subjects:
        d = root / f"subj{s:02d}"
        ids = np.concatenate([np.arange(100, 140), 1000 * s + np.arange(20)])
        ids = np.random.default_rng(s).permutation(ids)
        for sub in ("training_split/training_fmri", "training_split/training_images",
                    "test_split/test_images", "roi_masks"):
            (d / sub).mkdir(parents=True)
        lh = (ids[:, None] * 1000 + np.arange(N_LH)).astype(np.float32)
        rh = (ids[:, None] * 1000 + 500 + np.arange(N_RH)).astype(np.float32)
        rh[:, 3] = np.nan  # a vertex with NaN is dropped, never propagated
        np.save(d / "training_split/training_fmri/lh_training_fmri.npy", lh)
        np.save(d / "training_split/training_fmri/rh_training_fmri.npy", rh)
        for row, i in enumerate(ids, 1):
            Image.fromarray(image_of(i)).save(
                d / f"training_split/training_images/train-{row:04d}_nsd-{i:05d}.png")
        Image.fromarray(image_of(5000 + s)).save(
            d / f"test_split/test_images/test-0001_nsd-{5000 + s:05d}.png")
        faces_lh = np.zeros(N_LH)
        faces_lh[[2, 3, 4]] = 2  # FFA-1
        faces_lh[[10]] = 1  # OFA
        faces_rh = np.zeros(N_RH)
        faces_rh[[3, 5, 6]] = 3  # FFA-2; vertex 3 is NaN
        places_lh = np.zeros(N_LH)
        places_lh[[20, 21]] = 2  # PPA only on the left
        np.save(d / "roi_masks/lh.floc-faces_challenge_space.npy", faces_lh)
        np.save(d / "roi_masks/rh.floc-faces_challenge_space.npy", faces_rh)
        np.save(d / "roi_masks/lh.floc-places_challenge_space.npy", places_lh)
        np.save(d / "roi_masks/rh.floc-places_challenge_space.npy", np.zeros(N_RH))
        np.save(d / "roi_masks/mapping_floc-faces.npy", FACES)
        np.save(d / "roi_masks/mapping_floc-places.npy", PLACES)
        truth[s] = ids
    return truth


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "algonauts"
    return root, write_layout(root)


def test_splits_are_a_seeded_holdout_of_shared_images(layout):
    root, ids = layout
    loader = AlgonautsLoader(root, test_fraction=0.25, seed=3)
    assert loader.subjects == [1, 2]
    test = loader.test_ids()
    assert len(test) == 10 and set(test) <= set(range(100, 140))
    np.testing.assert_array_equal(test, np.sort(test))
    np.testing.assert_array_equal(test, AlgonautsLoader(root, test_fraction=0.25, seed=3).test_ids())
    assert not np.array_equal(test, AlgonautsLoader(root, test_fraction=0.25, seed=4).test_ids())
    for s in (1, 2):
        train = loader.load(s, "FFA", "train")
        held = loader.load(s, "FFA", "test")
        np.testing.assert_array_equal(held.ids, test)
        np.testing.assert_array_equal(train.ids, np.setdiff1d(ids[s], test))


def test_responses_are_the_roi_columns_of_the_released_rows(layout, caplog):
    root, _ = layout
    with caplog.at_level(logging.INFO):
        data = AlgonautsLoader(root).load(1, ["FFA", "OFA", "lh.PPA"], "train")
    assert data.n_dropped == 1 and "dropped 1 of" in caplog.text
    # FFA: lh 2, 3, 4 and rh 5, 6 (rh 3 is NaN); OFA lh 10; PPA lh 20, 21.
    vertex_value = np.r_[[2, 3, 4, 10, 20, 21], [505, 506]]
    np.testing.assert_array_equal(data.responses, data.ids[:, None] * 1000 + vertex_value)
    assert {k: len(v) for k, v in data.rois.items()} == {"FFA": 5, "OFA": 1, "lh.PPA": 2}
    # integers below 2^24 and a one-vertex mean: exact in float32
    np.testing.assert_array_equal(data.roi_mean["OFA"], data.ids * 1000 + 10)
    assert np.isnan(data.noise_ceiling).all() and np.isnan(data.roi_noise_ceiling["FFA"])
    assert "no single trials" in caplog.text
    assert (data.n_repeats == 0).all() and data.voxel_xyz.shape == (8, 3)


def test_cache_gives_the_same_answer(layout, tmp_path):
    root, _ = layout
    first = AlgonautsLoader(root, cache_dir=tmp_path / "c").load(2, "FFA", "test")
    assert len(list((tmp_path / "c/algonauts").glob("*.npy"))) == 1
    second = AlgonautsLoader(root, cache_dir=tmp_path / "c").load(2, "FFA", "test")
    np.testing.assert_array_equal(first.responses, second.responses)


def test_images_by_id_from_train_and_test_folders(layout):
    root, _ = layout
    loader = AlgonautsLoader(root)
    images = loader.images([1005, 100, 5002])
    np.testing.assert_array_equal(images, np.stack([image_of(i) for i in (1005, 100, 5002)]))
    resized = AlgonautsLoader(root, image_size=20)
    assert resized.images([100]).shape == (1, 20, 20, 3)
    assert resized.image_source_id != loader.image_source_id
    with pytest.raises(DataError, match="nsd-99999"):
        loader.images([99999])


def test_bad_input(layout, tmp_path):
    root, _ = layout
    with pytest.raises(DataError, match="set data.root="):
        AlgonautsLoader(tmp_path / "nowhere")
    loader = AlgonautsLoader(root)
    with pytest.raises(ConfigError, match=r"valid: 1-8 .*\[1, 2\]"):
        loader.load(11, "FFA", "test")
    with pytest.raises(DataError, match=r"lh_training_fmri.npy not found .*subj03"):
        loader.load(3, "FFA", "test")
    with pytest.raises(DataError, match=r"'RSC' is empty for subject 1"):
        loader.load(1, "RSC", "test")
    with pytest.raises(DataError, match=r"'rh.PPA' is empty for subject 1"):
        loader.load(1, "rh.PPA", "test")
    with pytest.raises(ConfigError, match="test_fraction"):
        AlgonautsLoader(root, test_fraction=1.5)
    np.save(root / "subj01/roi_masks/mapping_floc-faces.npy", {0: "Unknown", 1: "OFA"})
    with pytest.raises(DataError, match=r"label 'FFA-1' of ROI 'FFA' not in .*mapping_floc-faces"):
        loader.load(1, "FFA", "test")
    np.save(root / "subj02/roi_masks/lh.floc-faces_challenge_space.npy", np.zeros(N_LH + 1))
    with pytest.raises(DataError, match=r"expected \(30,\)"):
        loader.load(2, "FFA", "test")
    np.save(root / "subj02/training_split/training_fmri/rh_training_fmri.npy",
            np.zeros((5, N_RH)))
    with pytest.raises(DataError, match=r"rh_training_fmri.npy holds float64 \(5, 25\), "
                                        r"expected float32 \(60 training images"):
        loader.load(2, "FFA", "test")


def test_the_split_follows_the_subjects_present_and_so_does_the_fingerprint(tmp_path, caplog):
    root = tmp_path / "algonauts"
    write_layout(root, subjects=(1,))
    with caplog.at_level(logging.WARNING):
        alone = AlgonautsLoader(root)
        split, fingerprint = alone.test_ids(), alone.fingerprint(1, "FFA")
    assert "only subjects [1] are under" in caplog.text and "changes when subjects are added" \
        in caplog.text
    write_layout(root, subjects=(2, 3))
    more = AlgonautsLoader(root)
    assert not np.array_equal(more.test_ids(), split)
    assert more.fingerprint(1, "FFA") != fingerprint


def test_fingerprint_follows_the_files_not_the_place(layout, tmp_path):
    root, _ = layout
    clean = AlgonautsLoader(root).fingerprint(1, ["FFA", "lh.PPA"])
    shutil.copytree(root, tmp_path / "elsewhere")
    assert AlgonautsLoader(tmp_path / "elsewhere").fingerprint(1, ["FFA", "lh.PPA"]) == clean
    assert AlgonautsLoader(root).fingerprint(1, "FFA") != clean
    fmri = root / "subj01/training_split/training_fmri/rh_training_fmri.npy"
    st = fmri.stat()
    data = np.load(fmri)
    data[0, 0] += 1
    np.save(fmri, data)
    os.utime(fmri, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert AlgonautsLoader(root).fingerprint(1, ["FFA", "lh.PPA"]) != clean


def test_an_image_rewritten_in_place_gets_new_features(layout):
    """The feature cache is keyed by image_source_id: a folder's mtime and file count do not
    change when a file in it is rewritten."""
    root, _ = layout
    before = AlgonautsLoader(root).image_source_id
    (path,) = root.glob("subj01/training_split/training_images/train-0001_*.png")
    Image.fromarray(image_of(7)).save(path)
    assert AlgonautsLoader(root).image_source_id != before


def test_unusable_paths_and_sizes_are_one_line_errors(layout, tmp_path):
    root, _ = layout
    fmri = root / "subj02/training_split/training_fmri/lh_training_fmri.npy"
    fmri.unlink()
    os.symlink(fmri.name, fmri)
    with pytest.raises(DataError, match="lh_training_fmri.npy is a symbolic link loop"):
        AlgonautsLoader(root).load(2, "FFA", "test")
    (path,) = root.glob("subj01/training_split/training_images/*_nsd-01005.png")  # subject 1's
    path.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read .*_nsd-01005.png .*not an image; re-download it"):
        AlgonautsLoader(root).images([1005])
    with pytest.raises(DataError, match="longer than the filesystem allows"):
        AlgonautsLoader(tmp_path / ("x" * 300))
    for size in (1, 100_000):
        with pytest.raises(ConfigError, match="data.image_size must be an int in 16-1024"):
            AlgonautsLoader(root, image_size=size)
