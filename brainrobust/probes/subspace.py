"""Perturbation subspaces of an encoder (method.md section 4).

For every selected test image and ROI: the top-k right singular vectors P (D x k) of the
Jacobian J (voxels x pixels) of the ROI's predicted voxel responses, i.e. the k pixel-space
directions that change the ROI's response pattern most per unit L2 norm, and their singular
values sigma (the eigenvalues of J^T J are sigma^2). Computed matrix-free
(`brainrobust.probes.jacobian`); method "auto" takes the exact Jacobian when an ROI has so few
voxels that it is the cheaper of the two, and the records' `method` column says which ran.

Records (long format), per image and ROI: metric "sigma_1" .. "sigma_k" (descending; one metric
per rank so the default per-metric summary stays meaningful); "participation_ratio", the
effective dimensionality of the top-k eigenvalues, (sum sigma^2)^2 / sum sigma^4: 1 when one
direction dominates, k when all k are equally sensitive; "gap_ratio" = sigma_(k+1) / sigma_k
(when the ROI has more than k voxels): close to 1, the top-k subspace is barely separated from
the next direction, so it, and its similarity to other models' subspaces, is ill-determined
(and the randomized method converges slowly). With the randomized method sigma_(k+1) is a
Rayleigh-Ritz value, a slight underestimate. The accuracy reached: "residual", the largest
relative Ritz residual of the top k, ||J^T J p_j - sigma_j^2 p_j|| / sigma_k^2 (float rounding
for the exact method); "error_bound", the Davis-Kahan bound they give on 1 - overlap with the
exact top-k (inf where the gap is unresolved); and "iterations" (0 for exact). A converged image
has residual <= tol or error_bound <= tol; iterations = max_iters with neither did not converge.

Arrays: `subspace_<roi>` holds P (n, D, k), sigma (n, k), residual (n, k), error_bound (n,),
iterations (n,) and image_id (n,), floats as fp16 (full precision is in the records), so
`brainrobust.analysis.subspaces` compares any pair of runs without recomputing. At 224 x 224
with k = 10 that is 3 MB per image and ROI: cap max_images.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import torch

from brainrobust.errors import ConfigError
from brainrobust.probes.base import Probe, ProbeContext
from brainrobust.probes.jacobian import (
    JVP_MODES,
    METHODS,
    choose_method,
    top_k_right_singular,
)

VOXELS = ("roi", "all")


class SubspaceProbe(Probe):
    """Top-k Jacobian subspaces per image and ROI.

    Parameters
    ----------
    k
        Directions per image; at most the number of voxels of each ROI.
    oversample, max_iters, tol, method, chunk, jvp_mode
        See `brainrobust.probes.jacobian.top_k_right_singular`.
    voxels
        "roi": J of each selected ROI's voxels (stored as subspace_<roi>); "all": one J of every
        voxel the encoder predicts (stored as subspace_all, records with roi "all").
    batch_size
        Images per call; memory grows with batch_size x min(chunk, k + oversample).
    """

    name = "subspace"
    image_axes: ClassVar[dict[str, int]] = {
        "image_id": 0,
        "P": 0,
        "sigma": 0,
        "residual": 0,
        "error_bound": 0,
        "iterations": 0,
    }

    def __init__(
        self,
        k: int = 10,
        oversample: int = 5,
        max_iters: int = 16,
        tol: float = 1e-3,
        method: Literal["auto", "randomized", "exact"] = "auto",
        voxels: Literal["roi", "all"] = "roi",
        batch_size: int = 8,
        chunk: int = 32,
        jvp_mode: Literal["auto", "forward", "double_vjp"] = "auto",
        max_images: int | None = None,
        rois: list[str] | None = None,
        force: bool = False,
    ):
        super().__init__(rois=rois, max_images=max_images, force=force)
        self.check(integers={"k": (k, 1), "oversample": (oversample, 0), "max_iters": (max_iters, 1),
                             "batch_size": (batch_size, 1), "chunk": (chunk, 1)},
                   above={"tol": (tol, 0)},
                   choices={"method": (method, METHODS), "voxels": (voxels, VOXELS),
                            "jvp_mode": (jvp_mode, JVP_MODES)})
        self.k, self.oversample, self.method = k, oversample, method
        self.max_iters, self.tol = max_iters, tol
        self.voxels, self.batch_size = voxels, batch_size
        self.chunk, self.jvp_mode = chunk, jvp_mode

    def targets(self, encoder: torch.nn.Module) -> dict[str, tuple[torch.Tensor | None, int]]:
        """Name -> (voxel columns of its Jacobian or None for every voxel, voxel count)."""
        if self.voxels == "all":
            with torch.no_grad():
                n_all = int(encoder(self.context.images[:1].to(self.context.device)).shape[1])
            targets = {"all": (None, n_all)}
        else:
            targets = {
                roi: (encoder.rois[roi], len(encoder.rois[roi])) for roi in self.selected_rois()
            }
        for name, (_, size) in targets.items():
            if self.k > size:
                raise ConfigError(
                    f"probe.subspace.k={self.k} exceeds the {size} voxels of {name}: "
                    f"J has rank <= {size}; set probe.subspace.k <= {size}"
                )
        return targets

    def run_batch(self, encoder: torch.nn.Module, ctx: ProbeContext, images: torch.Tensor,
                  ids: np.ndarray) -> pd.DataFrame:
        generator = ctx.generator()
        frames = []
        for name, (idx, size) in self.targets(encoder).items():
            method = self.method
            if method == "auto":
                method = choose_method(
                    size, images[0].numel(), self.k, self.oversample, self.max_iters
                )
            arrays = self.subspaces(encoder, idx, images, method, generator)
            # Everything stored is per image, so batches merge along image_axes.
            stored = {key: arrays[key] for key in self.image_axes if key != "image_id"}
            ctx.store.save_array(f"subspace_{name}", stored | {"image_id": ids})
            frames.append(self.records(arrays, ids, name, size).assign(method=method))
        records = pd.concat(frames, ignore_index=True)
        for setting in ("k", "max_iters", "tol", "oversample", "voxels"):
            records[setting] = getattr(self, setting)
        return records

    def subspaces(
        self,
        encoder: torch.nn.Module,
        idx: torch.Tensor | None,
        images: torch.Tensor,
        method: str,
        generator: torch.Generator,
    ) -> dict[str, np.ndarray]:
        """Every image's P (n, D, k) fp16, iterations (n,) and, as float64, sigma, residual (n, k),
        error_bound and sigma_next (n,), batch by batch (`brainrobust.probes.jacobian.Subspace`)."""
        if idx is None:
            fn = encoder
        else:
            cols = idx.to(images.device)

            def fn(x: torch.Tensor) -> torch.Tensor:
                return encoder(x)[:, cols]

        parts = []
        for start in range(0, len(images), self.batch_size):
            sub = top_k_right_singular(
                fn,
                images[start : start + self.batch_size],
                self.k,
                oversample=self.oversample,
                max_iters=self.max_iters,
                tol=self.tol,
                generator=generator,
                method=method,
                chunk=self.chunk,
                jvp_mode=self.jvp_mode,
            )
            # fp16 at once: P is what dominates memory, and it is stored as fp16 anyway.
            part = {"P": sub.p.half().cpu().numpy(), "iterations": sub.iterations.cpu().numpy()}
            for key in ("sigma", "residual", "error_bound", "sigma_next"):
                part[key] = getattr(sub, key).double().cpu().numpy()
            parts.append(part)
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def records(
        self, arrays: dict[str, np.ndarray], ids: np.ndarray, roi: str, size: int
    ) -> pd.DataFrame:
        """Long-format records from `subspaces`' arrays for an ROI of `size` voxels."""
        top = arrays["sigma"]
        eig = top**2
        wide = pd.DataFrame({f"sigma_{i + 1}": top[:, i] for i in range(self.k)})
        with np.errstate(invalid="ignore", divide="ignore"):
            # 0/0 (an image where the ROI does not respond to any pixel) stays NaN: undefined.
            wide["participation_ratio"] = eig.sum(1) ** 2 / (eig**2).sum(1)
            # With k voxels sigma_(k+1) = 0: no gap to speak of, so none is recorded.
            if size > self.k:
                wide["gap_ratio"] = arrays["sigma_next"] / top[:, -1]
        wide["residual"] = arrays["residual"].max(1)
        wide["error_bound"] = arrays["error_bound"]
        wide["iterations"] = arrays["iterations"]
        wide["image_id"] = ids
        wide["roi"] = roi
        return wide.melt(id_vars=["image_id", "roi"], var_name="metric", value_name="value")
