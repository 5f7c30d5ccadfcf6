"""The pictures of the targeted and MEI probes, rendered from their stored arrays.

Nothing here touches a model: it reads the arrays the probes saved through the results store.

    targeted_media(arrays, out_dir, prefix)   per start image: video, PNG strip, response plot
    mei_grid(per_roi, path)                    one run's MEIs, ROI x seed
    run_media(store, out, names)               the media a run's probes asked for
    side_by_side(sources, roi, direction, out)   original | model rows, e.g. standard vs robust
    gallery(root, out)                         all of the above for every run under `root`
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from brainrobust.analysis.media import (
    eps_axis,
    labelled_grid,
    plot_responses,
    save_figure,
    to_uint8,
    write_strip,
    write_video,
)
from brainrobust.errors import DataError
from brainrobust.results.store import ResultsStore, RunStore

log = logging.getLogger(__name__)


def _text(arrays: Mapping[str, np.ndarray], key: str, default: str = "") -> str:
    return str(arrays[key]) if key in arrays else default


def _image_label(image_id: int, files: Sequence[str]) -> str:
    # User files get negative ids -1, -2, ... (see brainrobust.probes.image_selection).
    return (
        Path(files[-image_id - 1]).stem
        if image_id < 0 and len(files) >= -image_id
        else f"nsd{image_id}"
    )


def targeted_media(
    arrays: Mapping[str, np.ndarray], out_dir: str | Path, prefix: str, fps: float = 4.0
) -> list[Path]:
    """Per start image of a targeted trajectory: a video, a PNG strip and a response plot.

    `arrays` is what the targeted probe saves: images (n, T, 3, S, S) with frame 0 the start,
    eps (T,), responses (n, T, n_rois), rois, image_id, driven_roi, direction, hold, files.
    """
    out_dir = Path(out_dir)
    rois = [str(r) for r in arrays["rois"]]
    held = [str(r) for r in arrays.get("hold", [])]
    driven, direction = _text(arrays, "driven_roi"), _text(arrays, "direction")
    files = [str(f) for f in arrays.get("files", [])]
    sds = np.array([_roi_sd(arrays, roi) for roi in rois])
    # ROIs differ in response scale: plot in units of each ROI's measured test SD where stored.
    in_sd = bool(np.all(np.isfinite(sds) & (sds > 0)))
    scale = sds if in_sd else np.ones(len(rois))
    paths = []
    for i, image_id in enumerate(np.asarray(arrays["image_id"]).tolist()):
        label = _image_label(int(image_id), files)
        stem = out_dir / f"{prefix}_{label}"
        frames = arrays["images"][i]
        paths.append(write_video(frames, stem, fps=fps))
        paths.append(write_strip(frames, stem.with_name(stem.name + "_strip")))
        title = f"{_text(arrays, 'model')}: {direction} {driven}, image {label}"
        paths.append(
            plot_responses(
                np.asarray(arrays["eps"], dtype=np.float64),
                {roi: arrays["responses"][i, :, k] / scale[k] for k, roi in enumerate(rois)},
                stem.with_name(stem.name + "_responses"),
                driven=driven,
                held=held,
                title=title,
                unit="test SD" if in_sd else "predicted units",
            )
        )
    return paths


def _targeted_arrays(
    source: str | Path | Mapping[str, np.ndarray], roi: str, direction: str
) -> Mapping[str, np.ndarray]:
    if isinstance(source, Mapping):
        return source
    run_dir = Path(source)
    return RunStore(dir=run_dir, key=run_dir.name, columns={}).load_array(
        f"targeted_{roi}_{direction}"
    )


def _roi_sd(arrays: Mapping[str, np.ndarray], roi: str) -> float:
    if "test_sd" not in arrays:
        return float("nan")
    return float(np.asarray(arrays["test_sd"])[[str(r) for r in arrays["rois"]].index(roi)])


def side_by_side(
    sources: Mapping[str, str | Path | Mapping[str, np.ndarray]],
    roi: str,
    direction: str,
    out: str | Path,
    image_id: int | None = None,
) -> Path:
    """The talk's "standard vs robustified" panel for one start image, as a PNG.

    Parameters
    ----------
    sources
        Row label -> a run directory holding arrays/targeted_<roi>_<direction>.npz, or those
        arrays already loaded; rows appear in this order (e.g. {"standard": ..., "robust": ...}).
    roi, direction
        The driven ROI and direction, naming the arrays.
    out
        The PNG path.
    image_id
        The start image; by default the first one every source holds.

    The first row shows the original and the driven ROI's response change against eps for every
    source; each further row is that source's trajectory, one column per eps.
    """
    loaded = {label: _targeted_arrays(src, roi, direction) for label, src in sources.items()}
    if not loaded:
        raise DataError("side_by_side needs at least one source")
    eps = [np.asarray(a["eps"], dtype=np.float64) for a in loaded.values()]
    if any(e.shape != eps[0].shape or not np.allclose(e, eps[0], rtol=1e-3) for e in eps):
        raise DataError(
            f"side_by_side: the sources ran different eps schedules "
            f"({[e.tolist() for e in eps]}); rerun them with one schedule"
        )
    common = set.intersection(*(set(np.asarray(a["image_id"]).tolist()) for a in loaded.values()))
    if image_id is None:
        first = [
            i for i in np.asarray(next(iter(loaded.values()))["image_id"]).tolist() if i in common
        ]
        if not first:
            raise DataError(
                "side_by_side: the sources share no start image; select start images by "
                "measured response (images.by=measured) or give the same files"
            )
        image_id = first[0]
    elif image_id not in common:
        raise DataError(
            f"side_by_side: image {image_id} is not in every source; shared: {sorted(common)}"
        )

    eps = eps[0]
    n_cols = len(eps)
    # Changes in units of the ROI's measured test-set SD where every source stored it, so
    # subjects compare; else in the encoders' raw response units.
    sds = [_roi_sd(a, roi) for a in loaded.values()]
    in_sd = all(np.isfinite(sd) and sd > 0 for sd in sds)
    unit = f"test SD of {roi}" if in_sd else "predicted units"
    fig = plt.figure(figsize=(1.5 * n_cols + 0.6, 1.6 * (len(loaded) + 1) + 0.3))
    grid = fig.add_gridspec(len(loaded) + 1, n_cols)
    curve_ax = fig.add_subplot(grid[0, 1:]) if n_cols > 1 else None
    for row, ((label, arrays), sd) in enumerate(zip(loaded.items(), sds), start=1):
        i = np.asarray(arrays["image_id"]).tolist().index(image_id)
        k = [str(r) for r in arrays["rois"]].index(roi)
        frames = to_uint8(arrays["images"][i])
        response = np.asarray(arrays["responses"][i, :, k], dtype=np.float64) / (
            sd if in_sd else 1.0
        )
        if row == 1:
            ax = fig.add_subplot(grid[0, 0])
            ax.imshow(frames[0], interpolation="nearest")
            ax.set(xticks=[], yticks=[], title="original")
        for j in range(n_cols):
            ax = fig.add_subplot(grid[row, j])
            ax.imshow(frames[j], interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            ax.set_xlabel(f"{response[j] - response[0]:+.2f}", fontsize=7)
            if row == 1:
                ax.set_title(f"eps {eps[j]:g}", fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
        if curve_ax is not None:
            curve_ax.plot(eps, response - response[0], marker="o", ms=3, label=label)
    if curve_ax is not None:
        eps_axis(curve_ax, eps)
        curve_ax.set(xlabel="eps", ylabel=f"change in {roi}\n({unit})")
        curve_ax.axhline(0.0, color="0.6", lw=0.8)
        curve_ax.legend(fontsize=7)
    fig.suptitle(f"{direction} {roi}: image {image_id}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)


def mei_grid(per_roi: Mapping[str, Mapping[str, np.ndarray]], path: str | Path) -> Path:
    """ROI rows x seed columns of MEIs, each captioned with its target ROI's response."""
    rows, captions = [], []
    for roi, arrays in per_roi.items():
        k = [str(r) for r in arrays["rois"]].index(roi)
        rows.append(list(arrays["images"]))
        captions.append([f"{roi} {v:.2f}" for v in np.asarray(arrays["responses"])[:, k]])
    n_cols = max(len(r) for r in rows)
    return labelled_grid(
        rows,
        path,
        row_labels=list(per_roi),
        col_labels=[f"seed {j}" for j in range(n_cols)],
        captions=captions,
    )


def _model_label(arrays: Mapping[str, np.ndarray]) -> str:
    robust = bool(arrays["robust"]) if "robust" in arrays else False
    return f"{_text(arrays, 'model', '?')}" + (" (robust)" if robust else "")


def gallery(root: str | Path, out: str | Path) -> list[Path]:
    """Rebuild every targeted and MEI picture of the results store under `root` into `out`.

    Writes, per run, out/<model>_s<subject>/ (with the run key appended for a second run of
    the same model and subject) with the targeted videos, strips and response plots
    and an MEI grid (ROI x seed); across runs, per subject and targeted setting, one side-by-side
    panel (standard models above robust ones) and one MEI gallery (ROI x model, the best seed).
    Returns the written paths; raises DataError when no run holds targeted or MEI arrays.
    """
    root, out = Path(root), Path(out)
    paths: list[Path] = []
    # (subject, array name) -> [(row label, robust, run key, driven roi, direction, arrays)]
    targeted: dict[tuple[Any, str], list[tuple[str, bool, str, str, str, Mapping[str, np.ndarray]]]] = (
        defaultdict(list))
    meis: dict[Any, dict[str, dict[str, Mapping[str, np.ndarray]]]] = defaultdict(dict)
    used: set[Path] = set()

    for run in ResultsStore(root).runs():
        key = run["key"]
        store = ResultsStore(root).open(run)
        subject = run["columns"].get("subject", "?")
        # Two runs of one model and subject (e.g. two schedules) get folders of their own.
        run_out = out / f"{run['columns'].get('model', key)}_s{subject}"
        run_out = run_out if run_out not in used else run_out.with_name(f"{run_out.name}_{key[:8]}")
        used.add(run_out)
        arrays = {npz.stem: store.load_array(npz.stem)
                  for npz in sorted((store.dir / "arrays").glob("*.npz"))
                  if npz.stem.startswith(("targeted_", "mei_"))}
        paths += run_media(arrays, run_out)
        mei_arrays = {}
        for name, entries in arrays.items():
            if name.startswith("targeted_"):
                robust = bool(entries["robust"]) if "robust" in entries else False
                driven, direction = _text(entries, "driven_roi"), _text(entries, "direction")
                targeted[(subject, name)].append(
                    (_model_label(entries), robust, key, driven, direction, entries))
            else:
                mei_arrays[str(entries["target_roi"])] = entries
        if mei_arrays:
            label = _model_label(next(iter(mei_arrays.values())))
            label = label if label not in meis[subject] else f"{label} [{key[:6]}]"
            meis[subject][label] = mei_arrays
    for (subject, name), runs in sorted(targeted.items(), key=lambda kv: str(kv[0])):
        if len(runs) < 2:
            continue
        roi, direction = runs[0][3], runs[0][4]
        # Standard models first, robust ones below: the talk's panel reads top to bottom.
        ordered = sorted(runs, key=lambda r: (r[1], r[0]))
        sources = {}
        for label, _, key, _, _, entries in ordered:
            # Two runs of one model (e.g. two schedules) keep both rows, told apart by run key.
            sources[label if label not in sources else f"{label} [{key[:6]}]"] = entries
        try:
            paths.append(
                side_by_side(sources, roi, direction, out / f"side_by_side_s{subject}_{name}")
            )
        except DataError as err:
            log.warning("side-by-side %s (subject %s) skipped: %s", name, subject, err)
    for subject, by_model in meis.items():
        rois = sorted({roi for arrays in by_model.values() for roi in arrays})
        rows, captions = [], []
        for roi in rois:
            row, cap = [], []
            for arrays in by_model.values():
                if roi not in arrays:
                    row.append(None)
                    cap.append("")
                    continue
                a = arrays[roi]
                k = [str(r) for r in a["rois"]].index(roi)
                best = int(np.argmax(np.asarray(a["responses"])[:, k]))
                row.append(a["images"][best])
                cap.append(f"{roi} {float(a['responses'][best, k]):.2f}")
            rows.append(row)
            captions.append(cap)
        paths.append(
            labelled_grid(
                rows,
                out / f"mei_gallery_s{subject}",
                row_labels=rois,
                col_labels=list(by_model),
                captions=captions,
            )
        )
    if not paths:
        raise DataError(
            f"no targeted or MEI arrays under {root}; run `python run.py probe=[targeted]` "
            "or `probe=[mei]` first"
        )
    return paths


def run_media(arrays: Mapping[str, Mapping[str, np.ndarray]], out: str | Path,
              options: Mapping[str, Mapping[str, Any]] | None = None) -> list[Path]:
    """The media of one run's stored arrays (array name -> its entries) in `out`: a video, strip
    and response plot per targeted start image, and one grid of the run's MEIs. `options` holds
    keyword arguments per array name (e.g. {"targeted_FFA_increase": {"fps": 4}})."""
    out, paths, meis = Path(out), [], {}
    for name, entries in arrays.items():
        if name.startswith("targeted_"):
            paths += targeted_media(entries, out, name, **(options or {}).get(name, {}))
        elif name.startswith("mei_"):
            meis[str(entries["target_roi"])] = entries
        else:
            raise ValueError(f"no media for array {name!r}: only targeted_* and mei_* have pictures")
    if meis:
        paths.append(mei_grid(meis, out / "mei_grid"))
    return paths
