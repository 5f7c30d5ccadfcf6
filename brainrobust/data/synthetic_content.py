"""What the synthetic NSD twin holds: its design, images and per-subject files, with planted
responses (see `brainrobust.data.synthetic` for how a twin is written once and checked).

Planted structure:
- Images are drawn from content components: a face-like blob (skin ellipse, eyes, mouth), a
  body-like figure (torso, limbs), a place-like scene (horizon, perspective stripes), over a
  nuisance grating with random tint and luminance. Each image has strengths (face, body, place).
- Voxels respond linearly to the standardised features; voxels of a floc-faces / floc-bodies /
  floc-places label prefer faces / bodies / places, other voxels weakly follow nuisance.
- Each session scales (gain) and shifts (offset) every voxel, so z-scoring within session is
  needed to recover the responses; trial noise (half of it shared across voxels) sets a
  per-voxel noise ceiling, written as ncsnr.nii.gz; betas are stored as int16
  round(300 * percent signal change), 0 outside the brain.
- Design: each image is shown 3 times; the first n_shared images are shared. Of them, 80%
  (all when every subject completes the same sessions) get their 3 trials within the sessions
  the shortest subject completes: they are the test set; the rest get their third trial later.

No file holds a time stamp (gzip and MAT headers are fixed), so the same parameters give the
same bytes.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io

from brainrobust.data.nsd_files import N_SUBJECTS, TWIN_SESSIONS
from brainrobust.errors import ConfigError
from brainrobust.files import atomic_path, write_bytes, write_json, write_text

TRIALS = 750
CONTENT = ("face", "body", "place")
FEATURES = CONTENT + ("luminance", "tint", "texture")
SHARED_NOISE = 0.5  # fraction of each voxel's trial-noise variance common to all voxels

# Label codes as in the real ctab files.
LABELS = {
    "floc-faces": {"OFA": 1, "FFA-1": 2, "FFA-2": 3, "mTL-faces": 4, "aTL-faces": 5},
    "floc-bodies": {"EBA": 1, "FBA-1": 2, "FBA-2": 3, "mTL-bodies": 4},
    "floc-places": {"OPA": 1, "PPA": 2, "RSC": 3},
}
PREFERS = {"floc-faces": "face", "floc-bodies": "body", "floc-places": "place"}
# Bilateral voxel counts on the default grid (real subject 1 is ~100x larger).
DEFAULT_SIZES = {
    "OFA": 16, "FFA-1": 22, "FFA-2": 14, "mTL-faces": 6, "aTL-faces": 6, "EBA": 50,
    "FBA-1": 12, "FBA-2": 8, "mTL-bodies": 6, "OPA": 18, "PPA": 26, "RSC": 12,
}
# Left-hemisphere centres as fractions of the grid (x, y, z); right is mirrored in x.
CENTRES = {
    "OFA": (0.25, 0.2, 0.4), "FFA-1": (0.3, 0.35, 0.3), "FFA-2": (0.3, 0.5, 0.3),
    "mTL-faces": (0.35, 0.65, 0.3), "aTL-faces": (0.3, 0.8, 0.35), "EBA": (0.2, 0.3, 0.55),
    "FBA-1": (0.32, 0.38, 0.32), "FBA-2": (0.32, 0.55, 0.35), "mTL-bodies": (0.38, 0.65, 0.35),
    "OPA": (0.25, 0.2, 0.7), "PPA": (0.38, 0.5, 0.25), "RSC": (0.45, 0.35, 0.65),
}
# Planted absences: subject -> label -> hemispheres without it (the ctab still lists it).
ABSENT = {2: {"RSC": ("lh", "rh")}, 3: {"OPA": ("lh",)}, 4: {"aTL-faces": ("lh", "rh")},
          6: {"aTL-faces": ("lh", "rh")}, 8: {"aTL-faces": ("lh", "rh")}}


def write_files(folder: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Every data file of a twin with `params` under `folder`; returns what was planted, as
    the fields test_ids, sessions, grids, label_counts and content of `SyntheticTruth`."""
    rng = np.random.default_rng([params["seed"], 0])
    design = _design(rng, params["sessions"], params["n_shared"])
    n_images = int(design["subjectim"].max())
    drawing, features = _draw_content(rng, n_images)
    _write_design(folder, design)
    _write_stim_info(folder, design, rng)
    _write_stimuli(folder, drawing, params["image_size"])
    # Subjects without files count as completing every planned session, as NSD's design plans.
    sessions = params["sessions"]
    write_json(folder / TWIN_SESSIONS, sessions + [max(sessions)] * (N_SUBJECTS - len(sessions)))

    fz = (features - features.mean(0)) / features.std(0)
    planted = {"test_ids": design["test_ids"], "sessions": {}, "grids": {}, "label_counts": {},
               "content": features[:, :3]}
    for s in range(1, params["n_subjects"] + 1):
        subject_grid = tuple(g + d for g, d in zip(params["grid"], ((s - 1) % 2, (s - 1) % 3, 0)))
        planted["sessions"][s] = params["sessions"][s - 1]
        planted["grids"][s] = subject_grid
        planted["label_counts"][s] = _write_subject(
            folder, s, subject_grid, params["sessions"][s - 1], design, fz, params)
    return planted


# ---- design ------------------------------------------------------------------------------
def _design(rng: np.random.Generator, sessions: list[int], n_shared: int) -> dict[str, Any]:
    planned, shortest = max(sessions), min(sessions)
    total, early = TRIALS * planned, TRIALS * shortest
    n_per = total // 3
    n_late_shared = n_shared // 5 if shortest < planned else 0
    n_test = n_shared - n_late_shared
    test_idx = np.arange(1, n_test + 1)
    late_idx = np.arange(n_test + 1, n_shared + 1)
    other_reps = rng.permutation(np.repeat(np.arange(n_shared + 1, n_per + 1), 3))
    n_early_other = early - 3 * n_test - 2 * n_late_shared
    if n_early_other < 0 or n_late_shared > total - early:
        raise ConfigError(f"n_shared={n_shared} does not fit {shortest} sessions; lower it")
    first = np.concatenate([np.repeat(test_idx, 3), np.repeat(late_idx, 2),
                            other_reps[:n_early_other]])
    rest = np.concatenate([late_idx, other_reps[n_early_other:]])
    order = np.concatenate([rng.permutation(first), rng.permutation(rest)]).astype(np.int64)

    n_images = n_shared + 8 * (n_per - n_shared)
    ids = rng.permutation(n_images) + 1  # 1-based 73k ids
    sharedix = np.sort(ids[:n_shared])
    subjectim = np.hstack([np.tile(sharedix, (8, 1)), ids[n_shared:].reshape(8, -1)])

    basiccnt = np.zeros((3, planned), np.int64)
    for k in range(planned):
        reps = np.bincount(order[k * TRIALS:(k + 1) * TRIALS])
        basiccnt[:, k] = [(reps == r).sum() for r in (1, 2, 3)]
    stimpattern = np.zeros((planned, 12, 75), np.uint8)
    for run in range(12):
        slots = np.round(np.linspace(2, 72, 63 if run % 2 == 0 else 62)).astype(int)
        stimpattern[:, run, slots] = 1
    return {"masterordering": order, "subjectim": subjectim, "sharedix": sharedix,
            "basiccnt": basiccnt, "stimpattern": stimpattern,
            "test_ids": np.sort(sharedix[:n_test] - 1).astype(np.int64)}


def _write_design(root: Path, design: dict[str, Any]) -> None:
    path = root / "nsddata/experiments/nsd/nsd_expdesign.mat"
    with atomic_path(path) as tmp:
        scipy.io.savemat(tmp, {
            "masterordering": design["masterordering"][None, :].astype(np.float64),
            "subjectim": design["subjectim"].astype(np.float64),
            "sharedix": design["sharedix"][None, :].astype(np.float64),
            "basiccnt": design["basiccnt"].astype(np.float64),
            "stimpattern": design["stimpattern"].astype(np.float64),
        }, appendmat=False)
        # The 116-byte header text holds the time of writing: a fixed one keeps the bytes equal.
        with open(tmp, "r+b") as fh:
            fh.write(b"MATLAB 5.0 MAT-file Platform: posix, Created on: brainrobust.data.synthetic"
                     .ljust(116, b"\0"))


def _write_stim_info(root: Path, design: dict[str, Any], rng: np.random.Generator) -> None:
    subjectim, order = design["subjectim"], design["masterordering"]
    n_images = int(subjectim.max())
    table = pd.DataFrame({
        "cocoId": rng.choice(600_000, n_images, replace=False),
        "cocoSplit": np.where(rng.random(n_images) < 0.9, "train2017", "val2017"),
        "cropBox": "(0, 0, 0.1249, 0.1249)", "loss": 0.0, "nsdId": np.arange(n_images),
        "flagged": False, "BOLD5000": False,
        "shared1000": np.isin(np.arange(n_images), design["sharedix"] - 1),
    })
    for s in range(8):
        shown = subjectim[s, order - 1] - 1  # 0-based 73k id on each planned trial
        table[f"subject{s + 1}"] = np.isin(np.arange(n_images), shown).astype(int)
        trials = np.argsort(shown, kind="stable")  # every image has exactly 3 trials
        reps = (trials.reshape(-1, 3) + 1)  # 1-based trial ids, ascending per image
        for r in range(3):
            column = np.zeros(n_images, np.int64)
            column[shown[trials[::3]]] = reps[:, r]
            table[f"subject{s + 1}_rep{r}"] = column
    with atomic_path(root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv") as tmp:
        table.to_csv(tmp)


# ---- images ------------------------------------------------------------------------------
def _draw_content(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image drawing parameters and the response features (n, len(FEATURES))."""
    strength = np.where(rng.random((n, 3)) < 0.3, rng.uniform(0, 0.4, (n, 3)), 0.0)
    dominant = rng.integers(0, 4, n)  # 3: no dominant content, only nuisance
    has = dominant < 3
    strength[np.flatnonzero(has), dominant[has]] = rng.uniform(0.6, 1.0, has.sum())
    luminance = rng.uniform(0.7, 1.3, n)
    tint = rng.uniform(-0.15, 0.15, n)
    texture = rng.uniform(0.0, 0.25, n)
    layout = rng.random((n, 8))  # positions, sizes, phases: drawn, not encoded in responses
    params = np.column_stack([strength, luminance, tint, texture, layout])
    return params, params[:, : len(FEATURES)]


def _render(p: np.ndarray, size: int) -> np.ndarray:
    """Draw a batch of images from their parameters (see _draw_content) as uint8.

    Shapes are built from (b, 1, S) column and (b, S, 1) row conditions where possible and
    colours are applied per channel: a naive (b, S, S, 3) version is ~5x slower.
    """
    q = p.astype(np.float32)[:, :, None, None]  # each parameter broadcast over the pixels
    face, body, place, lum, tint, tex = (q[:, i] for i in range(6))
    r = [q[:, 6 + i] for i in range(8)]
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    u, v = axis[None, None, :], axis[None, :, None]  # column (x) and row (y, down) coordinates
    # Nuisance grating.
    angle, freq = r[0] * np.pi, 2 + 6 * r[1]
    grating = 0.5 + tex * np.sin(np.pi * freq * (u * np.cos(angle) + v * np.sin(angle)))
    # Place: sky above a horizon, ground with perspective stripes below.
    horizon = -0.3 + 0.5 * r[2]
    ground = v > horizon
    stripes = 0.75 + 0.25 * np.sin(3.0 / np.maximum(v - horizon, 1e-3))  # (b, S, 1)
    # Body: torso, legs and arms, each a column condition AND a row condition.
    bx, top = -0.4 + 0.8 * r[3], -0.5 + 0.3 * r[4]
    du = np.abs(u - bx)
    figure = ((du < 0.13) & (v > top) & (v < top + 0.5)) | (
        (np.abs(du - 0.07) < 0.045) & (v >= top + 0.5) & (v < top + 0.95)) | (
        (np.abs(du - 0.2) < 0.04) & (v > top + 0.03) & (v < top + 0.45))
    # Face: skin ellipse with two eyes and a mouth.
    fx, fy, scale = -0.3 + 0.6 * r[5], -0.3 + 0.6 * r[6], 0.7 + 0.5 * r[7]
    fu, fv = (u - fx) / scale, (v - fy) / scale
    head = (fu / 0.3) ** 2 + (fv / 0.38) ** 2 < 1
    eyes = (np.abs(fu) - 0.11) ** 2 + (fv + 0.08) ** 2 < 0.05**2
    dark = eyes | ((np.abs(fu) < 0.12) & (np.abs(fv - 0.17) < 0.03))
    body_alpha = figure * body
    face_alpha = head * face
    channels = []
    for c, (tint_c, sky_c, earth_c, cloth_c, skin_c) in enumerate(zip(
            (1 + tint, 1.0, 1 - tint), (0.55 - 0.1 * v, 0.7 - 0.1 * v, 0.95 + 0 * v),
            (0.45, 0.35, 0.2), (0.15, 0.2, 0.35), (0.92, 0.72, 0.6))):
        scene = np.where(ground, earth_c * stripes, sky_c)
        img = grating * tint_c * (1 - place) + scene * place
        img = img * (1 - body_alpha) + cloth_c * body_alpha
        skin = np.where(dark, (0.15, 0.08, 0.05)[c], skin_c)
        channels.append((img * (1 - face_alpha) + skin * face_alpha) * lum)
    return np.clip(np.rint(np.stack(channels, -1) * 255), 0, 255).astype(np.uint8)


def _write_stimuli(root: Path, params: np.ndarray, size: int) -> None:
    path = root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("imgBrick", (len(params), size, size, 3), np.uint8)
        for b in range(0, len(params), 64):  # small batches stay in cache: ~3x faster
            ds[b:b + 64] = _render(params[b:b + 64], size)


# ---- subjects ----------------------------------------------------------------------------
def _write_subject(root: Path, s: int, grid: tuple[int, int, int], n_sessions: int,
                   design: dict[str, Any], fz: np.ndarray,
                   params: dict[str, Any]) -> dict[str, dict[str, int]]:
    rng = np.random.default_rng([params["seed"], s])
    brain = _brain(grid)
    labels, counts = _place_rois(rng, brain, params["roi_sizes"], ABSENT.get(s, {}))
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = -0.9 * np.array(grid)
    roi_dir = root / f"nsddata/ppdata/subj{s:02d}/func1pt8mm/roi"
    for file, volumes in labels.items():
        for prefix, volume in zip(("", "lh.", "rh."), volumes):
            _write_nifti(roi_dir / f"{prefix}{file}.nii.gz", np.where(brain, volume, -1), affine)
        table = "0 Unknown\n" + "".join(f"{c} {n}\n" for n, c in LABELS[file].items())
        write_text(root / f"nsddata/freesurfer/subj{s:02d}/label/{file}.mgz.ctab", table)
    nsdgeneral = np.where(brain, (np.indices(grid)[1] < 0.6 * grid[1]).astype(np.int16), -1)
    _write_nifti(roi_dir / "nsdgeneral.nii.gz", nsdgeneral, affine)

    # Per-voxel response model on brain voxels, in NIfTI (x, y, z) order.
    xyz = np.argwhere(brain)
    n_vox = len(xyz)
    weights = rng.normal(0, 1, (n_vox, len(FEATURES))) * np.r_[0.3, 0.3, 0.3, 1, 1, 1]
    in_roi = np.zeros(n_vox, bool)
    for file, volumes in labels.items():
        member = volumes[0][tuple(xyz.T)] > 0
        weights[member, FEATURES.index(PREFERS[file])] += 3.0
        in_roi |= member
    weights /= np.linalg.norm(weights, axis=1, keepdims=True)
    amplitude = np.where(in_roi, rng.uniform(1.5, 2.5, n_vox), rng.uniform(0.3, 1.0, n_vox))
    snr = np.where(in_roi, rng.uniform(0.6, 1.0, n_vox), rng.uniform(0.1, 0.4, n_vox))
    images = np.unique(design["subjectim"][s - 1]) - 1
    cov = np.cov(fz[images], rowvar=False)
    signal_sd = amplitude * np.sqrt(np.einsum("vk,kl,vl->v", weights, cov, weights))
    noise_sd = signal_sd / snr
    baseline = rng.normal(1.0, 0.5, n_vox)
    ncsnr = np.zeros(grid, np.float32)
    ncsnr[tuple(xyz.T)] = snr
    betas_dir = root / f"nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    _write_nifti(betas_dir / "ncsnr.nii.gz", ncsnr, affine)

    trial_ids = design["subjectim"][s - 1, design["masterordering"] - 1] - 1
    gx, gy, gz = grid
    z_step = max(1, 4_000_000 // (TRIALS * gx * gy))  # slabs bound float temporaries
    # float32 throughout: drawing the noise dominates on real-size grids.
    loadings = (weights * amplitude[:, None]).astype(np.float32)
    own_sd = (np.sqrt(1 - SHARED_NOISE) * noise_sd).astype(np.float32)
    shared_sd = (np.sqrt(SHARED_NOISE) * noise_sd).astype(np.float32)
    for k in range(n_sessions):
        session_rng = np.random.default_rng([params["seed"], s, k + 1])
        offset = session_rng.normal(0, 2.0, n_vox).astype(np.float32)
        gain = session_rng.uniform(0.6, 1.5, n_vox).astype(np.float32)
        x = fz[trial_ids[k * TRIALS:(k + 1) * TRIALS]].astype(np.float32)
        # Trial noise shared by all voxels keeps ROI-mean noise ceilings realistic (not ~100%).
        shared = session_rng.standard_normal((TRIALS, 1), dtype=np.float32)
        path = betas_dir / f"betas_session{k + 1:02d}.hdf5"
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            ds = f.create_dataset("betas", (TRIALS, gz, gy, gx), np.int16)
            for z0 in range(0, gz, z_step):
                v = np.flatnonzero((xyz[:, 2] >= z0) & (xyz[:, 2] < z0 + z_step))
                psc = session_rng.standard_normal((TRIALS, len(v)), dtype=np.float32)
                psc *= own_sd[v]
                psc += shared * shared_sd[v]
                psc += x @ loadings[v].T
                psc += baseline[v].astype(np.float32)
                psc *= 300 * gain[v]
                psc += 300 * offset[v]
                np.clip(np.rint(psc, out=psc), -32768, 32767, out=psc)
                slab = np.zeros((TRIALS, min(z_step, gz - z0), gy, gx), np.int16)
                slab[:, xyz[v, 2] - z0, xyz[v, 1], xyz[v, 0]] = psc
                ds[:, z0:z0 + z_step] = slab
    return counts


def _brain(grid: tuple[int, int, int]) -> np.ndarray:
    centre = (np.array(grid) - 1) / 2
    coords = np.indices(grid).reshape(3, -1).T
    inside = (((coords - centre) / (0.47 * np.array(grid))) ** 2).sum(1) <= 1
    return inside.reshape(grid)


def _place_rois(rng: np.random.Generator, brain: np.ndarray, sizes: dict[str, int],
                absent: dict[str, tuple[str, ...]]
                ) -> tuple[dict[str, list[np.ndarray]], dict[str, dict[str, int]]]:
    """Grow each label as a blob per hemisphere; returns file -> [both, lh, rh] volumes."""
    grid = brain.shape
    half = grid[0] // 2
    volumes, counts = {}, {}
    for file, codes in LABELS.items():
        both = np.zeros(grid, np.int16)
        for label, code in codes.items():
            counts[label] = {}
            for hemi in ("lh", "rh"):
                n = 0 if hemi in absent.get(label, ()) else round(
                    sizes[label] / 2 * rng.uniform(0.8, 1.2))
                free = brain & (both == 0)
                free[slice(half, None) if hemi == "lh" else slice(None, half)] = False
                fx, fy, fz = CENTRES[label]
                centre = np.array([fx if hemi == "lh" else 1 - fx, fy, fz]) * (np.array(grid) - 1)
                region = _grow(rng, free, centre, n)
                both[tuple(region.T)] = code
                counts[label][hemi] = len(region)
        lh, rh = both.copy(), both.copy()
        lh[half:] = 0
        rh[:half] = 0
        volumes[file] = [both, lh, rh]
    return volumes, counts


def _grow(rng: np.random.Generator, free: np.ndarray, centre: np.ndarray, n: int) -> np.ndarray:
    """A connected random blob of up to n free voxels grown from the free voxel nearest centre."""
    candidates = np.argwhere(free)
    if n == 0 or len(candidates) == 0:
        return np.zeros((0, 3), np.int64)
    start = tuple(int(c) for c in candidates[np.argmin(((candidates - centre) ** 2).sum(1))])
    region, taken, frontier = [start], {start}, []
    steps = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))

    def push(voxel: tuple[int, ...]) -> None:
        for step in steps:
            nxt = tuple(a + b for a, b in zip(voxel, step))
            if (nxt not in taken and all(0 <= c < g for c, g in zip(nxt, free.shape))
                    and free[nxt]):
                taken.add(nxt)
                frontier.append(nxt)

    push(start)
    while frontier and len(region) < n:
        # Swap-remove a random frontier voxel: growth in random directions gives compact blobs.
        i = int(rng.integers(len(frontier)))
        frontier[i], frontier[-1] = frontier[-1], frontier[i]
        voxel = frontier.pop()
        region.append(voxel)
        push(voxel)
    return np.array(region, np.int64)


def _write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))
