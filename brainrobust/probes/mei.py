"""Maximally exciting images (MEIs): unconstrained maximisation of an ROI's predicted response
(method.md section 5), a hypothesis about what the region codes (FFA -> faces, PPA -> places).

Feature visualisation as in lucent / Horama, written for our encoder interface:

- Parametrisation: the image is sigmoid(decorrelate(irfft(scale * spectrum) / 4)), where the
  spectrum is the free parameter, `scale` = 1 / max(|f|, 1/S) ** decay_power boosts low spatial
  frequencies (natural images have a ~1/f amplitude spectrum, so plain pixel ascent would give
  high-frequency noise), and `decorrelate` mixes channels with lucent's ImageNet colour
  correlation matrix. The sigmoid maps any parameter value into (0, 1) smoothly; clamping instead
  would zero the gradient of every saturated pixel and stall the ascent.
- Transformation robustness: every step sees each image under a fresh random jitter, scale and
  rotation (one differentiable affine warp, torch affine_grid / grid_sample with reflected
  borders), so the MEI cannot rely on pixel-exact adversarial patterns.
- Several seeds per ROI (different random spectra); an optional diversity term subtracts the
  mean pairwise cosine similarity of the (image - 0.5) vectors of one ROI's MEIs. The encoder
  exposes only voxel responses, so diversity is measured in pixel space, not on hidden-layer
  Gram matrices as in lucent.
- Start: noise (a faint random spectrum, i.e. a near-grey image) or natural images, which the
  parametrisation then reproduces exactly (the spectrum is initialised by inverting it).

Records: for each MEI, the final predicted response of EVERY ROI of the encoder (the selectivity
check: the FFA MEI should raise FFA more than PPA and EBA), as raw value, change from its start
and z-score against the model's predicted responses to the test images; plus L2, L-inf, PSNR
and SSIM against the start image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from brainrobust.errors import ConfigError
from brainrobust.probes.base import Probe, ProbeContext
from brainrobust.probes.image_selection import ImageSelection, predicted_responses
from brainrobust.probes.perceptual import perceptual_measures

# lucent's square root of the ImageNet colour correlation matrix (columns = decorrelated axes).
COLOR_CORRELATION_SVD_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]]
)
COLOR_MATRIX = COLOR_CORRELATION_SVD_SQRT / COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max()
# lucent divides the inverse FFT by this constant so that the initial image has a sane range.
FFT_MAGIC = 4.0
# Natural-image starts are clamped away from 0 and 1 before inverting the sigmoid.
LOGIT_MARGIN = 1e-3


def spectrum_scale(size: int, decay_power: float) -> torch.Tensor:
    """(S, S//2 + 1) gain of every rfft2 frequency: 1 / max(|f|, 1/S) ** decay_power."""
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    freqs = torch.sqrt(fx**2 + fy**2)
    return 1.0 / freqs.clamp(min=1.0 / size) ** decay_power


class FourierImage(nn.Module):
    """Images (B, 3, S, S) in (0, 1) parametrised by a scaled, colour-decorrelated spectrum.

    Parameters
    ----------
    batch, size
        Number and side of the images.
    decay_power
        Exponent of the 1/frequency gain (0 = white, 1 = lucent's default).
    decorrelate
        Mix channels with lucent's colour correlation matrix.
    sd
        Standard deviation of the random initial spectrum (noise starts).
    init
        Optional (B, 3, S, S) images in [0, 1] to start from instead of noise.
    generator
        Seeds the initial spectrum.
    """

    def __init__(
        self,
        batch: int,
        size: int,
        decay_power: float = 1.0,
        decorrelate: bool = True,
        sd: float = 0.01,
        init: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        self.size = size
        self.decorrelate = decorrelate
        self.register_buffer("scale", spectrum_scale(size, decay_power).to(device))
        self.register_buffer("color", COLOR_MATRIX.to(device))
        if init is None:
            shape = (batch, 3, size, size // 2 + 1, 2)
            spectrum = torch.randn(shape, generator=generator, device=device) * sd
        else:
            spectrum = self._invert(init.to(device).float())
        self.spectrum = nn.Parameter(spectrum)

    def _mix(self, t: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,dc->bdhw", t, matrix)

    def _invert(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.logit(images.clamp(LOGIT_MARGIN, 1 - LOGIT_MARGIN))
        if self.decorrelate:
            logits = self._mix(logits, torch.linalg.inv(self.color))
        spectrum = torch.fft.rfftn(logits * FFT_MAGIC, dim=(-2, -1), norm="ortho") / self.scale
        return torch.view_as_real(spectrum).contiguous()

    def forward(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        image = (
            torch.fft.irfftn(spectrum, s=(self.size, self.size), dim=(-2, -1), norm="ortho")
            / FFT_MAGIC
        )
        if self.decorrelate:
            image = self._mix(image, self.color)
        return torch.sigmoid(image)


def random_affine(
    x: torch.Tensor,
    jitter: float,
    scale: tuple[float, float],
    rotate: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Each image under its own random shift (px), zoom and rotation (degrees); differentiable."""
    b, size = x.shape[0], x.shape[-1]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator, device=x.device)

    shift = 2.0 * jitter / size  # affine_grid works in [-1, 1] coordinates
    tx, ty = uniform(-shift, shift), uniform(-shift, shift)
    s = uniform(*scale)
    angle = torch.deg2rad(uniform(-rotate, rotate))
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def pairwise_cosine(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of (x - 0.5) between different images of the same group."""
    v = F.normalize((x - 0.5).flatten(1), dim=1)
    sim = v @ v.T
    same = (groups[:, None] == groups[None, :]) & ~torch.eye(
        len(x), dtype=torch.bool, device=x.device
    )
    if not same.any():
        return sim.new_zeros(())
    return sim[same].mean()


def roi_weights(encoder: nn.Module, targets: Sequence[str], device: torch.device) -> torch.Tensor:
    """(B, V) matrix whose row b averages the voxels of targets[b]: r = (encoder(x) * M).sum(1)."""
    n_vox = max(int(idx.max()) for idx in encoder.rois.values()) + 1
    m = torch.zeros(len(targets), n_vox, device=device)
    for b, roi in enumerate(targets):
        idx = encoder.rois[roi].to(device)
        m[b, idx] = 1.0 / len(idx)
    return m


def optimise_mei(
    encoder: nn.Module,
    targets: Sequence[str],
    size: int,
    steps: int = 256,
    lr: float = 0.05,
    decay_power: float = 1.0,
    decorrelate: bool = True,
    jitter: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    rotate: float = 0.0,
    diversity: float = 0.0,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    advance: Callable[[int], Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise each targets[b]'s predicted response over image b; one batched Adam run.

    Returns the final images (B, 3, S, S) in (0, 1), untransformed, and their start images.
    `advance(1)` follows every step (a progress bar).
    """
    device = torch.device(device)
    param = FourierImage(
        len(targets), size, decay_power, decorrelate, init=init, generator=generator, device=device
    )
    weights = roi_weights(encoder, targets, device)
    groups = torch.tensor([sorted(set(targets)).index(t) for t in targets], device=device)
    transform = jitter > 0 or scale != (1.0, 1.0) or rotate > 0
    with torch.no_grad():
        start = param().detach()
    opt = torch.optim.Adam(param.parameters(), lr=lr)
    for _ in range(steps):
        x = param()
        seen = random_affine(x, jitter, scale, rotate, generator) if transform else x
        response = (encoder(seen)[:, : weights.shape[1]] * weights).sum(1)
        loss = -response.mean()
        if diversity > 0:
            loss = loss + diversity * pairwise_cosine(x, groups)
        # Gradient of the spectrum only: backward() would also fill the encoder's weight grads.
        (param.spectrum.grad,) = torch.autograd.grad(loss, [param.spectrum])
        opt.step()
        if advance is not None:
            advance(1)
    with torch.no_grad():
        return param().detach(), start


class MEIProbe(Probe):
    """Maximally exciting images per ROI; records every ROI's response to each MEI."""

    name = "mei"
    settings: ClassVar[tuple[str, ...]] = ("target_roi",)

    def __init__(
        self,
        rois: list[str] | None = None,
        start: str | Mapping[str, Any] | Sequence[str] = "noise",
        seeds: int = 4,
        steps: int = 256,
        lr: float = 0.05,
        decay_power: float = 1.0,
        decorrelate: bool = True,
        transforms: Mapping[str, Any] | None = None,
        diversity: float = 0.0,
        batch_size: int = 64,
        save_media: bool = True,
        max_images: int | None = None,
        force: bool = False,
    ):
        super().__init__(rois=rois, max_images=max_images, force=force)
        self.start = None if start == "noise" else ImageSelection.parse(start, "probe.mei.start")
        self.check(integers={"seeds": (seeds, 1), "steps": (steps, 1), "batch_size": (batch_size, 1)},
                   above={"lr": (lr, 0)},
                   at_least={"diversity": (diversity, 0), "decay_power": (decay_power, 0)})
        t = dict(transforms or {})
        unknown = sorted(set(t) - {"jitter", "scale", "rotate"})
        if unknown:
            raise ConfigError(
                f"mei.transforms: unknown key(s) {unknown}; use jitter, scale, rotate"
            )
        self.jitter = float(t.get("jitter", 0.0))
        self.scale = tuple(float(s) for s in t.get("scale", (1.0, 1.0)))
        self.rotate = float(t.get("rotate", 0.0))
        if (
            self.jitter < 0
            or self.rotate < 0
            or len(self.scale) != 2
            or not 0 < self.scale[0] <= self.scale[1]
        ):
            raise ConfigError(
                "mei.transforms: jitter and rotate >= 0, "
                "scale a [low, high] pair with 0 < low <= high"
            )
        self.seeds, self.steps, self.lr = seeds, steps, lr
        self.decay_power, self.decorrelate, self.diversity = decay_power, decorrelate, diversity
        self.batch_size = batch_size
        self.save_media = save_media

    def _starts(
        self, encoder: nn.Module, ctx: ProbeContext, roi: str, images: torch.Tensor, ids: np.ndarray
    ) -> tuple[torch.Tensor | None, np.ndarray, str]:
        if self.start is None:
            return None, np.full(self.seeds, -1, dtype=np.int64), "noise"
        x, start_ids, files = self.start.resolve(
            encoder, images, ids, roi, ctx.responses[: len(ids)], self.batch_size
        )
        return x, start_ids, "file" if files else "image"

    def run(self, encoder: nn.Module, ctx: ProbeContext) -> pd.DataFrame:
        images, ids = self.selected_images(ctx)
        all_rois = list(ctx.rois)
        size = int(encoder.input_size)
        # Test-set predictions calibrate the MEI responses: z = (r - mean) / sd over test images.
        test_pred = torch.stack(
            [predicted_responses(encoder, images, roi, self.batch_size) for roi in all_rois], 1
        )
        test_mean, test_sd = test_pred.mean(0), test_pred.std(0).clamp_min(1e-12)

        targets, inits, start_ids, start_kind = [], [], [], []
        for roi in self.selected_rois():
            x0, sid, kind = self._starts(encoder, ctx, roi, images, ids)
            targets += [roi] * len(sid)
            start_ids.append(sid)
            start_kind += [kind] * len(sid)
            if x0 is not None:
                inits.append(x0)
        init = torch.cat(inits) if inits else None
        bar = self.progress(
            self.steps, "step", f"{len(targets)} images of {', '.join(dict.fromkeys(targets))}"
        )
        mei, start = optimise_mei(
            encoder,
            targets,
            size,
            steps=self.steps,
            lr=self.lr,
            decay_power=self.decay_power,
            decorrelate=self.decorrelate,
            jitter=self.jitter,
            scale=self.scale,
            rotate=self.rotate,
            diversity=self.diversity,
            init=init,
            generator=ctx.generator(),
            device=ctx.device,
            advance=bar.update,
        )
        bar.close()
        with torch.no_grad():
            resp = torch.stack(
                [predicted_responses(encoder, mei, roi, self.batch_size) for roi in all_rois], 1
            )
            resp0 = torch.stack(
                [predicted_responses(encoder, start, roi, self.batch_size) for roi in all_rois], 1
            )
        measures = {k: v.cpu().numpy() for k, v in perceptual_measures(mei, start).items()}
        start_ids = np.concatenate(start_ids)
        seed = np.concatenate(
            [np.arange((np.asarray(targets) == roi).sum()) for roi in dict.fromkeys(targets)]
        )
        rows = []
        for b, target in enumerate(targets):
            common = {
                "target_roi": target,
                "mei_seed": int(seed[b]),
                "start": start_kind[b],
                "image_id": int(start_ids[b]),
            }
            for k, roi in enumerate(all_rois):
                for metric, value in (
                    ("response", resp[b, k]),
                    ("response_change", resp[b, k] - resp0[b, k]),
                    ("response_z", (resp[b, k] - test_mean[k]) / test_sd[k]),
                ):
                    rows.append({**common, "roi": roi, "metric": metric, "value": float(value)})
            for metric, values in measures.items():
                rows.append({**common, "roi": None, "metric": metric, "value": float(values[b])})
        records = pd.DataFrame(rows)
        records["steps"] = self.steps
        records["decay_power"] = self.decay_power
        records["diversity"] = self.diversity

        per_roi = {}
        for roi in dict.fromkeys(targets):
            sel = np.flatnonzero(np.asarray(targets) == roi)
            per_roi[roi] = {
                "images": mei[sel].cpu().numpy(),
                "start_images": start[sel].cpu().numpy(),
                "responses": resp[sel].cpu().numpy(),
                "rois": np.array(all_rois),
                "target_roi": np.array(roi),
                "image_id": start_ids[sel],
                "mei_seed": seed[sel],
                "model": np.array(str(encoder.meta.get("model", ""))),
                "robust": np.array(bool(encoder.meta.get("robust", False))),
            }
            ctx.store.save_array(f"mei_{roi}", per_roi[roi])
        return records

    def media(self) -> dict[str, dict[str, Any]]:
        return {f"mei_{roi}": {} for roi in self.selected_rois()} if self.save_media else {}
