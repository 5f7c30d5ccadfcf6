"""A synthetic world whose brain is a fixed differentiable function of the pixels.

The twin (`brainrobust.data.synthetic`) plants responses on the latent content of each rendered
image, so the true response to a perturbed image is unknown. Here every subject's voxels read
out a hidden network of six pixel units (a face-, body- and place-tuned colour detector,
luminance, tint and texture energy), so the true response of every subject to ANY image is
computable: `SyntheticBrain.load(root).scorer(subject, split)` is that ground truth with the
encoder interface, on the voxels the loader returns.

The files are the twin's (design, stimuli, ROI volumes: the same NSD layout, read by the same
loader) with the betas and ncsnr replaced: per subject, voxel v's signal is
s_v(x) = sum_u L_vu z_u(x), z the units standardised over the world's images, L a seeded
readout in which the voxels of a floc-faces / bodies / places label load on their category's
unit; trials add noise (half of it shared by all voxels, so ROI-mean noise ceilings stay
realistic), sessions scale and shift every voxel, betas are int16 x 300 as in NSD.

The truth is in the units the loader measures: the loader z-scores each voxel within a session,
which removes gain, offset and baseline, so the expected measured response to x is
(s_v(x) - m_v) / sd_v with m_v and sd_v^2 the mean and the signal + noise variance of the
voxel over the subject's trials (`SyntheticBrain.responses`).

`kind: linear` makes every unit a linear function of the pixels, so each ROI's true response
is affine in x and its optimal perturbation is known in closed form (the tests use it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainrobust.cache import holding
from brainrobust.data.synthetic import (
    LOCK,
    MARKER,
    SyntheticTruth,
    _build,
    _existing,
    _params,
    _refuse_foreign,
    load_truth,
)
from brainrobust.data.synthetic_content import _write_nifti
from brainrobust.errors import ConfigError, DataError
from brainrobust.files import atomic_path, stable_hash, write_json

BRAIN_NPZ = "synthetic_brain.npz"
BRAIN_VERSION = 1
KINDS = ("nonlinear", "linear")
UNITS = ("face", "body", "place", "luminance", "tint", "texture")
PREFERS = {"floc-faces": 0, "floc-bodies": 1, "floc-places": 2}
# The renderer's colours (synthetic_content._render) at luminance 1: the colour each category
# unit is tuned to.
SKIN, CLOTH, EARTH, SKY = (0.92, 0.72, 0.6), (0.15, 0.2, 0.35), (0.45, 0.35, 0.2), (0.5, 0.65, 0.95)
GREY = (0.5, 0.5, 0.5)
SHARED_NOISE = 0.5  # fraction of each voxel's trial-noise variance common to all voxels
BETA_SCALE = 300  # NSD stores betas as int16 round(300 x percent signal change)


def brain_params(*, kind: str = "nonlinear", **twin: Any) -> dict[str, Any]:
    """The world's parameters: the twin's (design, images, grids, ROIs) and the brain's kind."""
    if kind not in KINDS:
        raise ConfigError(f"data.synthetic.kind must be one of {KINDS}, got {kind!r}")
    return {**_params(**twin), "world": "brain", "kind": kind, "brain_version": BRAIN_VERSION}


def ensure_synthetic_brain(root: str | os.PathLike, **params: Any) -> SyntheticTruth:
    """Write the world once under `root`; reuse it while its marker matches (as the twin)."""
    root = Path(root)
    params = brain_params(**params)
    truth = _existing(root, params)
    if not isinstance(truth, SyntheticTruth):
        _refuse_foreign(root)
        with holding(root / LOCK, f"synthetic brain at {root}"):
            truth = _existing(root, params)
            if not isinstance(truth, SyntheticTruth):
                truth = _build_brain(root, params)
    return truth


def _build_brain(root: Path, params: dict[str, Any]) -> SyntheticTruth:
    """The twin's files first, under a marker keyed on other parameters (so no reader takes
    them for this world, and a killed build is redone), then this world's betas and its marker."""
    staged = {**params, "stage": "twin files"}
    _build(root, staged)
    listed = json.loads((root / MARKER).read_text())["files"]
    units = PixelUnits(params["kind"])
    z, unit_mean, unit_sd = _standardised_units(root, units)
    truth = load_truth(root)
    arrays = {"unit_mean": unit_mean, "unit_sd": unit_sd}
    for s, n_sessions in truth.sessions.items():
        arrays.update(_write_subject(root, params, s, n_sessions, z))
    with atomic_path(root / BRAIN_NPZ) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    truth.params = params
    truth.save(root)
    files = {rel: (root / rel).stat().st_size for rel in [*listed, BRAIN_NPZ]}
    write_json(root / MARKER, {"key": stable_hash(params), "params": params, "files": files})
    return truth


class PixelUnits(nn.Module):
    """The brain's hidden network: (B, 3, S, S) in [0, 1] -> (B, 6) unit activations.

    nonlinear: per pixel, Gaussian tuning of the chromaticity to the renderer's skin, cloth and
    earth / sky colours (chromaticity, so the images' random luminance does not gate them), the
    face detector also needing bright pixels and the body detector dark ones; texture is the energy of a Laplacian; each map is
    averaged over space and compressed (log1p), like a saturating neural response.
    linear: the same units as linear projections of the pixels (colour contrasts against grey,
    the place unit split into sky above and earth below, texture a fixed oblique grating).
    """

    def __init__(self, kind: str = "nonlinear"):
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"brain kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        colours = torch.tensor([SKIN, CLOTH, EARTH, SKY], dtype=torch.float32)
        self.register_buffer("chroma", colours / colours.sum(1, keepdim=True))
        self.register_buffer("contrast", colours - torch.tensor(GREY))
        self.register_buffer("laplacian", torch.tensor(
            [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        axis = torch.linspace(-1.0, 1.0, size, device=x.device, dtype=x.dtype)
        below = torch.sigmoid(axis / 0.2).view(1, size, 1)  # soft lower half (rows go down)
        grey = x.mean(1)
        if self.kind == "linear":
            proj = torch.einsum("bchw,kc->bkhw", x, self.contrast.to(x.dtype))
            grating = torch.sin(6.0 * (axis.view(-1, 1) + axis.view(1, -1)))
            maps = [proj[:, 0], proj[:, 1], proj[:, 2] * below + proj[:, 3] * (1 - below),
                    grey, x[:, 0] - x[:, 2], grey * grating]
            return torch.stack([m.mean((-2, -1)) for m in maps], 1)
        total = x.sum(1, keepdim=True)
        chroma = x / (total + 0.05)

        def tuned(k: int, width: float) -> torch.Tensor:
            dist2 = (chroma - self.chroma[k].to(x.dtype).view(1, 3, 1, 1)).square().sum(1)
            return torch.exp(-dist2 / (2 * width**2))

        # Skin is bright and cloth dark at any luminance; the grating and the sky are neither.
        face = tuned(0, 0.03) * torch.sigmoid((total[:, 0] - 1.6) / 0.1)
        body = tuned(1, 0.05) * torch.sigmoid((1.0 - total[:, 0]) / 0.1)
        place = tuned(2, 0.05) * below + tuned(3, 0.05) * (1 - below)
        edges = F.conv2d(grey[:, None], self.laplacian.to(x.dtype), padding=1)[:, 0]
        pooled = torch.stack([m.mean((-2, -1)) for m in
                              (face, body, place, grey, x[:, 0] - x[:, 2],
                               edges.square())], 1)
        squash = torch.tensor([20.0, 20.0, 20.0, 0.0, 0.0, 50.0], device=x.device, dtype=x.dtype)
        return torch.where(squash > 0, torch.log1p(squash * pooled) / squash.clamp_min(1), pooled)


def _stimuli(root: Path) -> h5py.Dataset:
    return h5py.File(root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", "r")["imgBrick"]


def _standardised_units(root: Path, units: PixelUnits) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Units of every image of the world (as the loader reads them, uint8 / 255), standardised."""
    bricks = _stimuli(root)
    with torch.no_grad():
        raw = np.concatenate([
            units(torch.from_numpy(bricks[b:b + 512]).permute(0, 3, 1, 2).float() / 255).numpy()
            for b in range(0, bricks.shape[0], 512)]).astype(np.float64)
    mean, sd = raw.mean(0), raw.std(0)
    return (raw - mean) / sd, mean, sd


def _subject_files(root: Path, s: int) -> tuple[Path, Path]:
    return (root / f"nsddata/ppdata/subj{s:02d}/func1pt8mm/roi",
            root / f"nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR")


def _write_subject(root: Path, params: dict[str, Any], s: int, n_sessions: int,
                   z: np.ndarray) -> dict[str, np.ndarray]:
    """Replace subject s's betas and ncsnr with this brain's; return its readout arrays."""
    from brainrobust.data.nsd import NSDLoader

    roi_dir, betas_dir = _subject_files(root, s)
    general = nib.load(roi_dir / "nsdgeneral.nii.gz")
    brain = np.asarray(general.dataobj) >= 0
    xyz = np.argwhere(brain)
    rng = np.random.default_rng([params["seed"], s, 101])  # not the twin's streams
    n_vox = len(xyz)
    category = np.full(n_vox, -1)
    for file, unit in PREFERS.items():
        member = np.asarray(nib.load(roi_dir / f"{file}.nii.gz").dataobj)[tuple(xyz.T)] > 0
        category[member] = unit
    # Category voxels load on their unit, the rest mostly on luminance, tint and texture.
    loadings = rng.normal(0.0, 1.0, (n_vox, len(UNITS))) * np.r_[0.3, 0.3, 0.3, 1.0, 1.0, 1.0]
    selective = category >= 0
    loadings[np.flatnonzero(selective), category[selective]] += 3.0
    loadings *= (np.where(selective, rng.uniform(1.5, 2.5, n_vox), rng.uniform(0.3, 1.0, n_vox))
                 / np.linalg.norm(loadings, axis=1))[:, None]
    snr = np.where(selective, rng.uniform(0.6, 1.0, n_vox), rng.uniform(0.1, 0.4, n_vox))

    trial_ids = NSDLoader(root).design.trial_ids(s, n_sessions)
    signal = (z[trial_ids] @ loadings.T).astype(np.float32)  # (trials, voxels)
    noise_sd = signal.std(0) / snr
    mean, sd = signal.mean(0), np.sqrt(signal.var(0) + noise_sd**2)
    ncsnr = np.zeros(brain.shape, np.float32)
    ncsnr[tuple(xyz.T)] = snr
    _write_nifti(betas_dir / "ncsnr.nii.gz", ncsnr, general.affine)
    baseline = rng.normal(1.0, 0.5, n_vox)
    per_session = len(trial_ids) // n_sessions
    for k in range(n_sessions):
        rows = slice(k * per_session, (k + 1) * per_session)
        gain, offset = rng.uniform(0.6, 1.5, n_vox), rng.normal(0.0, 2.0, n_vox)
        own = rng.standard_normal((per_session, n_vox)) * np.sqrt(1 - SHARED_NOISE)
        shared = rng.standard_normal((per_session, 1)) * np.sqrt(SHARED_NOISE)
        psc = signal[rows] + (own + shared) * noise_sd + baseline
        betas = np.clip(np.rint(BETA_SCALE * (gain * psc + offset)), -32768, 32767)
        volume = np.zeros((per_session, *brain.shape), np.int16)  # (trials, X, Y, Z)
        volume[:, xyz[:, 0], xyz[:, 1], xyz[:, 2]] = betas
        with atomic_path(betas_dir / f"betas_session{k + 1:02d}.hdf5") as tmp, \
                h5py.File(tmp, "w") as f:
            f.create_dataset("betas", data=volume.transpose(0, 3, 2, 1))  # NSD's (t, Z, Y, X)
    return {f"s{s}_xyz": xyz, f"s{s}_loadings": loadings, f"s{s}_mean": mean.astype(np.float64),
            f"s{s}_sd": sd.astype(np.float64), f"s{s}_grid": np.array(brain.shape)}


class SyntheticBrain(nn.Module):
    """The world's ground truth: every subject's expected measured response to any image."""

    def __init__(self, kind: str, size: int, arrays: dict[str, np.ndarray]):
        super().__init__()
        self.units = PixelUnits(kind)
        self.size = int(size)
        self.register_buffer("unit_mean", torch.as_tensor(arrays["unit_mean"], dtype=torch.float32))
        self.register_buffer("unit_sd", torch.as_tensor(arrays["unit_sd"], dtype=torch.float32))
        self.subjects = sorted(int(k[1:].split("_")[0]) for k in arrays if k.endswith("_xyz"))
        self._readout: dict[int, dict[str, Any]] = {}
        for s in self.subjects:
            grid = tuple(int(g) for g in arrays[f"s{s}_grid"])
            xyz = arrays[f"s{s}_xyz"]
            index = np.full(int(np.prod(grid)), -1)
            index[np.ravel_multi_index(tuple(xyz.T), grid)] = np.arange(len(xyz))
            self._readout[s] = {"grid": grid, "index": index}
            for name in ("loadings", "mean", "sd"):
                self.register_buffer(f"s{s}_{name}",
                                     torch.as_tensor(arrays[f"s{s}_{name}"], dtype=torch.float32))

    @classmethod
    def load(cls, root: str | os.PathLike) -> SyntheticBrain:
        root = Path(root)
        if not (root / BRAIN_NPZ).is_file():
            raise DataError(f"{root} holds no synthetic brain ({BRAIN_NPZ}); use data=synthetic_brain "
                            "for in-silico ground truth")
        truth = load_truth(root)
        with np.load(root / BRAIN_NPZ) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return cls(truth.params["kind"], truth.params["image_size"], arrays).eval()

    def columns(self, subject: int, voxel_xyz: np.ndarray) -> torch.Tensor:
        """Indices of the brain voxels at (X, Y, Z) coordinates (the loader's `voxel_xyz`)."""
        if subject not in self._readout:
            raise ConfigError(f"the synthetic brain has subjects {self.subjects}, not {subject}")
        readout = self._readout[subject]
        index = readout["index"][np.ravel_multi_index(tuple(np.asarray(voxel_xyz).T),
                                                      readout["grid"])]
        if (index < 0).any():
            raise DataError(f"subject {subject}: {int((index < 0).sum())} voxels lie outside the "
                            "synthetic brain; the data and the brain are of different worlds")
        return torch.as_tensor(index, dtype=torch.long)

    def responses(self, x: torch.Tensor, subject: int,
                  columns: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V) expected measured (session z-scored) responses of `subject`'s voxels to x."""
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)
        z = (self.units(x) - self.unit_mean) / self.unit_sd
        loadings, mean, sd = (getattr(self, f"s{subject}_{n}") for n in ("loadings", "mean", "sd"))
        if columns is not None:
            columns = columns.to(x.device)
            loadings, mean, sd = loadings[columns], mean[columns], sd[columns]
        return (z @ loadings.T - mean) / sd

    def scorer(self, subject: int, voxel_xyz: np.ndarray, rois: dict[str, np.ndarray],
               input_size: int) -> BrainScorer:
        """This subject's truth on the loader's voxels, with the encoder interface."""
        return BrainScorer(self, subject, self.columns(subject, voxel_xyz), rois, input_size).eval()


class BrainScorer(nn.Module):
    """One subject of a SyntheticBrain as an encoder: forward(x) -> (B, V), rois, roi_response."""

    def __init__(self, brain: SyntheticBrain, subject: int, columns: torch.Tensor,
                 rois: dict[str, np.ndarray], input_size: int):
        super().__init__()
        self.brain = brain
        self.subject = subject
        self.register_buffer("cols", columns)
        self.rois = {k: torch.as_tensor(np.asarray(v), dtype=torch.long) for k, v in rois.items()}
        self.input_size = int(input_size)
        self.meta = {"model": "synthetic_brain", "layer": "truth", "subject": subject,
                     "robust": False}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.brain.responses(x, self.subject, self.cols)

    def roi_response(self, x: torch.Tensor, roi: str) -> torch.Tensor:
        return self(x)[:, self.rois[roi].to(x.device)].mean(1)
