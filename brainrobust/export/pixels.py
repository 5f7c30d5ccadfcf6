"""Pixels of an exported stimulus: 8-bit rounding, resizing between the model's size and the
dataset's native size, PNG bytes, and what an encoder sees of a written file.

One interpolation throughout, PIL's Lanczos (a = 3), the one the NSD and Algonauts loaders use
to bring the 425 px stimuli to `data.image_size`: the perturbation is enlarged with it to the
native size, and a written native-size file is shrunk with it to the model's size, exactly as
the loader would present that file to the encoder. PIL computes it in float32 on the CPU,
deterministically.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from brainrobust.analysis.media import to_uint8
from brainrobust.data.datamodule import to_float_images
from brainrobust.data.nsd import resize_images

INTERPOLATION = "PIL Image.LANCZOS (Lanczos a=3), as the NSD loader resizes stimuli"
# zlib level: any fixed value gives the same bytes for the same pixels; 9 gives the smallest.
PNG_COMPRESS_LEVEL = 9


def quantise(images: np.ndarray) -> np.ndarray:
    """(n, 3, S, S) floats in [0, 1] -> (n, S, S, 3) uint8, rounded to the nearest level."""
    return to_uint8(images)


def enlarge(images: np.ndarray, size: int) -> np.ndarray:
    """(n, 3, S, S) floats -> (n, 3, size, size) float32, each channel by PIL Lanczos in float
    ('F' mode): a perturbation keeps its sign and sub-level detail until the final rounding."""
    images = np.asarray(images, np.float32)
    if images.shape[-1] == size:
        return images.copy()
    out = np.empty((*images.shape[:2], size, size), np.float32)
    for i, image in enumerate(images):
        for c, channel in enumerate(image):
            out[i, c] = np.asarray(Image.fromarray(channel).resize(
                (size, size), Image.LANCZOS))
    return out


def native_versions(images: np.ndarray, sources: np.ndarray, native_sources: np.ndarray,
                    size: int) -> np.ndarray:
    """The stimuli at the native size: each native source plus its perturbation (image -
    source at the model's size) enlarged, rounded to 8 bits: (n, size, size, 3) uint8.

    `native_sources` is (n, 3, size, size) float: the dataset's own image where the source is
    one, else the enlarged source, for which this is the enlarged stimulus itself.
    """
    delta = enlarge(np.asarray(images, np.float32) - np.asarray(sources, np.float32), size)
    return quantise(np.clip(native_sources + delta, 0.0, 1.0))


def model_view(pngs: np.ndarray, size: int) -> torch.Tensor:
    """What an encoder of input size `size` sees of written uint8 (n, H, W, 3) files: the
    loader's Lanczos resize where the sizes differ, then [0, 1] floats (n, 3, size, size)."""
    return to_float_images(resize_images(np.ascontiguousarray(pngs), size))


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as PNG: fixed settings and no metadata chunks (no time), so the
    same pixels always give the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()

