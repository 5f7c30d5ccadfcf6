"""Start images of the targeted and MEI probes: ranked test images or user image files.

A selection is configured as

    images: {select: top | bottom | first, n: 4, by: predicted | measured}
    images: [path/to/a.png, path/to/b.jpg]

`top`/`bottom` rank the test split by the ROI's predicted response (the "high predicted FFA
response" starting images) or, with `by: measured`, by the measured fMRI response, which does not
depend on the model, so a robust and a standard model start from the same images. User files are
centre-cropped to a square and resized to the canonical stimulus size; they get the negative
image ids -1, -2, ... in records and arrays (NSD ids are >= 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from brainrobust.checks import require_integer
from brainrobust.errors import ConfigError, DataError

SELECT = ("top", "bottom", "first")
RANK_BY = ("predicted", "measured")
# Modes PIL converts to 8-bit RGB without losing the meaning of the values; 16-bit and float
# images ("I;16", "I", "F") would be clipped to 255 by convert("RGB"), so they are refused.
RGB_MODES = {
    "1",
    "L",
    "LA",
    "La",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
}


@dataclass(frozen=True)
class ImageSelection:
    """Which start images a probe uses: a ranking of the test split, or files."""

    select: str = "top"
    n: int = 4
    by: str = "predicted"
    files: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def parse(cls, spec: Mapping[str, Any] | Sequence[str] | str, key: str) -> ImageSelection:
        """Validate the config value at `key` (mapping or list of files); ConfigError on anything
        else."""
        if isinstance(spec, (str, Path)):
            spec = [spec]
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - {"select", "n", "by", "files"})
            if unknown:
                raise ConfigError(
                    f"{key}: unknown key(s) {unknown}; use select, n, by or files"
                )
            if spec.get("files"):
                return cls.parse(list(spec["files"]), key)
            sel = cls(
                select=str(spec.get("select", "top")),
                n=spec.get("n", 4),
                by=str(spec.get("by", "predicted")),
            )
            if sel.select not in SELECT:
                raise ConfigError(
                    f"{key}.select must be one of {SELECT}, got {sel.select!r}"
                )
            if sel.by not in RANK_BY:
                raise ConfigError(f"{key}.by must be one of {RANK_BY}, got {sel.by!r}")
            require_integer(f"{key}.n", sel.n, 1)
            return sel
        files = tuple(str(f) for f in spec)
        if not files:
            raise ConfigError(
                f"{key}: give {{select: top, n: 4}} or a non-empty list of image files"
            )
        return cls(select="files", n=len(files), files=files)

    def resolve(
        self,
        encoder: torch.nn.Module,
        images: torch.Tensor,
        image_ids: np.ndarray,
        roi: str,
        responses: np.ndarray | None = None,
        batch_size: int = 64,
    ) -> tuple[torch.Tensor, np.ndarray, list[str]]:
        """The start images (n, 3, S, S) on images.device, their ids, and the file names (or [])."""
        if self.files:
            loaded = load_image_files(self.files, int(encoder.input_size)).to(images.device)
            return loaded, -np.arange(1, len(self.files) + 1, dtype=np.int64), list(self.files)
        if self.select == "first":
            idx = np.arange(min(self.n, len(images)))
        else:
            if self.by == "measured":
                if responses is None:
                    raise ConfigError("images.by=measured needs the measured test responses")
                columns = encoder.rois[roi].cpu().numpy()
                scores = np.asarray(responses)[:, columns].mean(axis=1)
            else:
                scores = predicted_responses(encoder, images, roi, batch_size).cpu().numpy()
            order = np.argsort(-scores if self.select == "top" else scores, kind="stable")
            idx = order[: self.n]
        return images[torch.as_tensor(idx, device=images.device)], np.asarray(image_ids)[idx], []


def predicted_responses(
    encoder: torch.nn.Module, images: torch.Tensor, roi: str, batch_size: int = 64
) -> torch.Tensor:
    """The ROI's predicted response to every image, (n,), without building a graph."""
    with torch.no_grad():
        return torch.cat(
            [
                encoder.roi_response(images[i : i + batch_size], roi)
                for i in range(0, len(images), batch_size)
            ]
        )


def load_image_file(path: str | Path, size: int) -> np.ndarray:
    """One image file -> (size, size, 3) uint8: centre-cropped to a square, resized (Lanczos)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} not found; check images: in the probe config")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            if img.mode not in RGB_MODES:
                raise DataError(
                    f"image file {path} has mode {img.mode!r} (16-bit, float or unknown); "
                    "save it as 8-bit RGB (e.g. PNG or JPEG)"
                )
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(
            f"image file {path} cannot be read as an image ({err}); give a PNG or JPEG"
        ) from None
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side))
    if side != size:
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def load_image_files(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """Image files -> float (n, 3, size, size) in [0, 1]; DataError naming the first bad file."""
    arr = np.stack([load_image_file(p, size) for p in paths])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0)
