"""Media writers: videos a decoder can read back, pixel-exact PNG strips, plots, panels, gallery."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from brainrobust.analysis import gallery, media
from brainrobust.errors import DataError
from brainrobust.results.store import ResultsStore

S = 16


def _frames(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def _targeted_arrays(
    model: str, robust: bool, ids=(3, 7), eps=(0.0, 1.0, 2.0), seed: int = 0
) -> dict:
    rng = np.random.default_rng(seed)
    n, t = len(ids), len(eps)
    return {
        "images": rng.random((n, t, 3, S, S)).astype(np.float32),
        "delta": rng.standard_normal((n, t - 1, 3, S, S)).astype(np.float32),
        "eps": np.asarray(eps),
        "image_id": np.asarray(ids, dtype=np.int64),
        "responses": np.cumsum(rng.random((n, t, 3)), axis=1),
        "rois": np.array(["EBA", "FFA", "PPA"]),
        "test_sd": np.array([0.5, 0.8, 1.0]),
        "driven_roi": np.array("FFA"),
        "direction": np.array("increase"),
        "hold": np.array([], dtype=str),
        "files": np.array([], dtype=str),
        "model": np.array(model),
        "robust": np.array(robust),
    }


def _no_temp_files(folder):
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_to_uint8_layouts_and_rounding():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0] = 1.0
    x[1, 2] = 0.5
    out = media.to_uint8(x)
    assert out.shape == (2, 4, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, 0].tolist() == [255, 0, 0] and out[1, 0, 0].tolist() == [0, 0, 128]
    assert np.array_equal(media.to_uint8(out), out)
    with pytest.raises(DataError):
        media.to_uint8(np.zeros((2, 5, 4, 4)))


def test_mp4_reads_back_with_every_frame(tmp_path):
    path = media.write_video(_frames(5), tmp_path / "clip", fps=4)
    assert path.suffix == ".mp4" and path.exists()
    frames = iio.imread(path, plugin="FFMPEG", index=None)
    assert frames.shape[0] == 5
    assert frames.shape[1:] == (256, 256, 3)  # 16 px upscaled x16 for viewing
    _no_temp_files(tmp_path)


def test_gif_fallback_when_mp4_encoder_fails(tmp_path, monkeypatch):
    def broken(frames, fps):
        raise RuntimeError("no ffmpeg here")

    monkeypatch.setattr(media, "_encode_mp4", broken)
    path = media.write_video(_frames(4), tmp_path / "clip")
    assert path.suffix == ".gif" and not (tmp_path / "clip.mp4").exists()
    frames = iio.imread(path, index=None)
    assert frames.shape[0] == 4 and frames.shape[1:3] == (256, 256)


def test_gif_keeps_frame_content(tmp_path):
    frames = np.zeros((3, S, S, 3), dtype=np.uint8)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        frames[i] = colour
    back = iio.imread(media.write_gif(frames, tmp_path / "c", min_size=S), index=None)
    assert back.shape[0] == 3
    assert [tuple(f[0, 0, :3]) for f in back] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_strip_and_grid_are_pixel_exact(tmp_path):
    frames = _frames(4)
    img = Image.open(media.write_strip(frames, tmp_path / "strip", gap=2))
    assert img.format == "PNG" and img.size == (4 * S + 3 * 2, S)
    arr = np.asarray(img)
    assert np.array_equal(arr[:, S + 2 : 2 * S + 2], media.to_uint8(frames)[1])
    assert (arr[:, S : S + 2] == 255).all()
    grid = Image.open(media.write_grid(np.stack([frames, frames]), tmp_path / "grid", gap=1))
    assert grid.size == (4 * S + 3, 2 * S + 1)


def test_plots_and_labelled_grid_are_pngs(tmp_path):
    p = media.plot_responses(
        np.array([0, 1, 2.0]),
        {"FFA": np.array([0, 1, 2.0]), "EBA": np.array([1, 1, 1.0])},
        tmp_path / "resp",
        driven="FFA",
        held=["EBA"],
        title="t",
    )
    img = Image.open(p)
    assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 150
    g = media.labelled_grid(
        [[_frames(1)[0], None], [_frames(1)[0], _frames(1)[0]]],
        tmp_path / "lg",
        row_labels=["a", "b"],
        col_labels=["x", "y"],
    )
    assert Image.open(g).format == "PNG"


def test_targeted_media_writes_video_strip_and_plot_per_image(tmp_path):
    arrays = _targeted_arrays("m", False, ids=(3, -1), eps=(0.0, 1.0, 2.0, 4.0))
    arrays["files"] = np.array(["my_face.png"])
    paths = gallery.targeted_media(arrays, tmp_path, "targeted_FFA_increase")
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "targeted_FFA_increase_nsd3.mp4",
            "targeted_FFA_increase_nsd3_strip.png",
            "targeted_FFA_increase_nsd3_responses.png",
            "targeted_FFA_increase_my_face.mp4",
            "targeted_FFA_increase_my_face_strip.png",
            "targeted_FFA_increase_my_face_responses.png",
        ]
    )
    assert (
        iio.imread(tmp_path / "targeted_FFA_increase_nsd3.mp4", plugin="FFMPEG", index=None).shape[
            0
        ]
        == 4
    )
    assert Image.open(tmp_path / "targeted_FFA_increase_nsd3_strip.png").size == (4 * S + 6, S)


def test_side_by_side_panel_and_its_errors(tmp_path):
    std, rob = (
        _targeted_arrays("resnet50", False),
        _targeted_arrays("robust_eps3", True, ids=(7, 9), seed=1),
    )
    path = gallery.side_by_side(
        {"standard": std, "robust": rob}, "FFA", "increase", tmp_path / "panel"
    )
    img = Image.open(path)
    assert img.format == "PNG" and img.size[1] > img.size[0] * 0.5
    with pytest.raises(DataError, match="not in every source"):
        gallery.side_by_side(
            {"standard": std, "robust": rob}, "FFA", "increase", tmp_path / "p2", image_id=3
        )
    with pytest.raises(DataError, match="share no start image"):
        gallery.side_by_side(
            {"a": std, "b": _targeted_arrays("x", True, ids=(1,))},
            "FFA",
            "increase",
            tmp_path / "p3",
        )
    with pytest.raises(DataError, match="different eps"):
        gallery.side_by_side(
            {"a": std, "b": _targeted_arrays("x", True, eps=(0, 1, 3.0))},
            "FFA",
            "increase",
            tmp_path / "p4",
        )


def test_gallery_rebuilds_media_from_a_results_store(tmp_path):
    root = tmp_path / "results"
    with pytest.raises(DataError, match="no targeted or MEI arrays"):
        gallery.gallery(root, tmp_path / "fig")
    rng = np.random.default_rng(0)
    for model, robust in (("resnet50", False), ("robust_eps3", True)):
        store = ResultsStore(root).run({"model": model}, {"model": model, "subject": 1})
        store.save_array("targeted_FFA_increase", _targeted_arrays(model, robust))
        for roi in ("FFA", "PPA"):
            store.save_array(
                f"mei_{roi}",
                {
                    "images": rng.random((2, 3, S, S)),
                    "responses": rng.random((2, 2)),
                    "rois": np.array(["FFA", "PPA"]),
                    "target_roi": np.array(roi),
                    "model": np.array(model),
                    "robust": np.array(robust),
                },
            )
    paths = gallery.gallery(root, tmp_path / "fig")
    names = {p.name for p in paths}
    assert "side_by_side_s1_targeted_FFA_increase.png" in names
    assert "mei_gallery_s1.png" in names
    assert len([p for p in paths if p.name == "mei_grid.png"]) == 2
    assert all(p.exists() for p in paths)
    _no_temp_files(tmp_path)
