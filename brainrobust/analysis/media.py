"""Writing images: videos, PNG strips and grids, labelled grids and response plots.

The building blocks of `brainrobust.analysis.gallery` (and of exported stimulus sets): each takes
plain arrays in [0, 1] and writes one file. Videos are MP4 (H.264 through imageio-ffmpeg, whose
ffmpeg binary ships inside the wheel); where that encoder fails, a GIF is written instead. Every
file goes through `brainrobust.files`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import imageio.v3 as iio
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from brainrobust.errors import DataError
from brainrobust.files import write_bytes

log = logging.getLogger(__name__)

ImageBatch = np.ndarray | torch.Tensor


def to_uint8(images: ImageBatch) -> np.ndarray:
    """(n, 3, S, S) or (n, S, S, 3) floats in [0, 1] (or uint8) -> (n, S, S, 3) uint8."""
    arr = (
        images.detach().float().cpu().numpy()
        if isinstance(images, torch.Tensor)
        else np.asarray(images)
    )
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or 3 not in (arr.shape[1], arr.shape[-1]):
        raise DataError(f"expected images (n, 3, S, S) or (n, S, S, 3), got shape {arr.shape}")
    if arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    return np.round(np.clip(arr.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def _upscale(frames: np.ndarray, min_size: int) -> np.ndarray:
    """Nearest-neighbour integer upscaling: a 64 px stimulus becomes watchable, pixels sharp."""
    factor = max(1, -(-min_size // frames.shape[1]))
    frames = frames.repeat(factor, axis=1).repeat(factor, axis=2)
    # H.264 in yuv420p needs even sides: pad one edge row/column where needed.
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def write_gif(frames: ImageBatch, path: str | Path, fps: float = 4.0, min_size: int = 256) -> Path:
    """An endlessly looping GIF of the frames."""
    path = Path(path).with_suffix(".gif")
    data = iio.imwrite(
        "<bytes>",
        _upscale(to_uint8(frames), min_size),
        extension=".gif",
        duration=1000.0 / fps,
        loop=0,
    )
    write_bytes(path, data)
    return path


def _encode_mp4(frames: np.ndarray, fps: float) -> bytes:
    return iio.imwrite(
        "<bytes>",
        frames,
        extension=".mp4",
        plugin="FFMPEG",
        fps=fps,
        codec="libx264",
        macro_block_size=2,
        pixelformat="yuv420p",
    )


def write_video(
    frames: ImageBatch, path: str | Path, fps: float = 4.0, min_size: int = 256
) -> Path:
    """An MP4 of the frames, or a GIF beside it where the MP4 encoder is unavailable.

    Returns the path actually written (suffix .mp4 or .gif).
    """
    arr = _upscale(to_uint8(frames), min_size)
    try:
        data = _encode_mp4(arr, fps)
    # Any encoder failure (missing binary, codec, odd platform): the GIF still shows the frames.
    except Exception as err:  # noqa: BLE001
        log.warning("MP4 encoding failed (%s); writing a GIF instead", err)
        return write_gif(arr, path, fps=fps, min_size=0)
    out = Path(path).with_suffix(".mp4")
    write_bytes(out, data)
    return out


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_grid(images: Sequence[ImageBatch] | np.ndarray, path: str | Path, gap: int = 2) -> Path:
    """A pixel-exact PNG grid: rows of equally sized images, `gap` white pixels between cells.

    `images` is a sequence of rows (each (c, 3, S, S) or (c, S, S, 3)) or one (r, c, 3, S, S)
    array. The PNG is c*S + (c-1)*gap wide and r*S + (r-1)*gap high.
    """
    rows = [to_uint8(row) for row in images]
    n_cols = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    if any(r.shape[1:3] != (h, w) for r in rows):
        raise DataError("write_grid needs images of one size")
    canvas = np.full(
        (len(rows) * (h + gap) - gap, n_cols * (w + gap) - gap, 3), 255, dtype=np.uint8
    )
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = img
    path = Path(path).with_suffix(".png")
    write_bytes(path, _png_bytes(canvas))
    return path


def write_strip(frames: ImageBatch, path: str | Path, gap: int = 2) -> Path:
    """One row of frames as a PNG (see `write_grid` for its size)."""
    return write_grid([frames], path, gap=gap)


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    """`fig` as a PNG through the atomic writer (no partial PNG is ever read), then closed."""
    path = Path(path).with_suffix(".png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path


def eps_axis(ax: plt.Axes, eps: np.ndarray) -> None:
    eps = np.asarray(eps, dtype=np.float64)
    if len(eps) > 2 and eps[0] == 0 and eps[1] > 0:
        # Schedules are usually geometric: log-spaced beyond the first budget, linear down to 0.
        ax.set_xscale("symlog", linthresh=float(eps[1]))
        ax.set_xticks(eps, [f"{e:g}" for e in eps], fontsize=7)
        ax.minorticks_off()
        ax.set_xlim(0.0, float(eps[-1]) * 1.15)


def plot_responses(
    eps: np.ndarray,
    responses: Mapping[str, np.ndarray],
    path: str | Path,
    driven: str | None = None,
    held: Sequence[str] = (),
    title: str = "",
    unit: str = "predicted units",
) -> Path:
    """Change of every ROI's predicted response along an eps trajectory, as a PNG line plot.

    `responses` maps ROI -> (n_eps,) predicted responses (eps[0] is the start, usually 0); the plot
    shows r(eps) - r(start), the driven ROI bold, held ROIs dashed.
    """
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for i, (roi, r) in enumerate(responses.items()):
        r = np.asarray(r, dtype=np.float64)
        style = "--" if roi in held else "-"
        width = 2.6 if roi == driven else 1.3
        label = roi + (" (driven)" if roi == driven else " (held)" if roi in held else "")
        ax.plot(eps, r - r[0], style, lw=width, marker="o", ms=3, color=f"C{i % 10}", label=label)
    ax.axhline(0.0, color="0.6", lw=0.8)
    eps_axis(ax, eps)
    ax.set(xlabel="eps (perturbation budget)", ylabel=f"response change ({unit})", title=title)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def labelled_grid(
    images: Sequence[Sequence[ImageBatch | None]],
    path: str | Path,
    row_labels: Sequence[str] = (),
    col_labels: Sequence[str] = (),
    captions: Sequence[Sequence[str]] | None = None,
    cell: float = 1.6,
) -> Path:
    """A human-facing PNG grid with row/column labels and optional per-cell captions.

    `images[i][j]` is one image ((3, S, S) or (S, S, 3)) or None for an empty cell.
    """
    n_rows, n_cols = len(images), max(len(r) for r in images)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(cell * n_cols + 0.8, cell * n_rows + 0.4), squeeze=False
    )
    for i in range(n_rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            img = images[i][j] if j < len(images[i]) else None
            if img is None:
                ax.axis("off")
                continue
            ax.imshow(to_uint8(img)[0], interpolation="nearest")
            if captions is not None:
                ax.set_xlabel(captions[i][j], fontsize=7)
            if i == 0 and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=8)
            if j == 0 and i < len(row_labels):
                ax.set_ylabel(row_labels[i], fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
