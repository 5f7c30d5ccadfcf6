"""The tables a run (or a whole sweep) prints when it ends, built from the results store alone.

One block per probe, long format (one row per ROI and setting), so runs with different norms,
subjects or budgets sit side by side without one column meaning two things. Every number carries
its unit in the block's heading.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from brainrobust.results.store import RunStore
from brainrobust.units import format_eps

RUN_COLUMNS = ["model", "subject"]


def predictivity_rows(store: RunStore) -> pd.DataFrame:
    pred = store.read_records("predictivity")
    roi_level = pred[pred.voxel == -1].pivot_table(index="roi", columns="metric", values="value")
    voxels = pred[pred.metric == "r"].groupby("roi").size().rename("voxels")
    rows = roi_level.join(voxels).reset_index()
    rows = rows.rename(columns={"r_roi_mean": "r", "r_roi_mean_nc": "r/sqrt(NC)",
                                "r_voxel_median": "median voxel r"})
    return _with_run(rows, store)


def sensitivity_rows(store: RunStore) -> pd.DataFrame:
    sens = store.read_records("sensitivity")
    keys = ["roi", "norm_type", "objective", "attack_steps", "eps"]
    wide = sens.pivot_table(index=keys + ["image_id"], columns="metric", values="value").reset_index()
    grouped = wide.groupby(keys)
    rows = grouped.agg(images=("image_id", "nunique"), abs_s=("abs_s", "mean"),
                       abs_s_sd=("s_sd", lambda v: float(np.mean(np.abs(v)))),
                       random=("random_abs_s", "mean")).reset_index()
    rows["|s| / random"] = rows.abs_s / rows.random.where(rows.random > 0)
    if "converged" in wide:
        rows["not converged"] = grouped["converged"].apply(lambda v: float((v == 0).mean())).values
    rows["eps"] = [format_eps(e, n) for e, n in zip(rows.eps, rows.norm_type)]
    rows = rows.rename(columns={"norm_type": "norm", "attack_steps": "steps", "abs_s": "|s|",
                                "abs_s_sd": "|s| (test SD)"})
    return _with_run(rows, store)


def subspace_rows(store: RunStore) -> pd.DataFrame:
    sub = store.read_records("subspace")
    wide = sub.pivot_table(index=["roi", "image_id"], columns="metric", values="value").reset_index()
    named = {"sigma_1": "sigma_1", "participation_ratio": "participation", "gap_ratio": "gap ratio",
             "residual": "residual"}
    present = {k: v for k, v in named.items() if k in wide}
    rows = wide.groupby("roi").agg(images=("image_id", "nunique"),
                                   **{v: (k, "mean") for k, v in present.items()}).reset_index()
    return _with_run(rows, store)


BLOCKS = {
    "predictivity": (("predictivity: Pearson r of the ROI-mean prediction on the test split; "
                     "r/sqrt(NC) divides by the noise ceiling"), predictivity_rows),
    "sensitivity": (("sensitivity: mean |s| = |r(x) - r(x + delta)| of the ROI-mean prediction, in "
                    "response units (betas z-scored per session) and in test-set SDs; eps is the "
                    "budget of delta in [0, 1] pixel units at the stimulus size (L-inf in k/255 "
                    "steps); random = noise of the same norm"), sensitivity_rows),
    "subspace": (("subspace: mean over images of the top singular value of the ROI's Jacobian, the "
                 "participation ratio of the top k, sigma_k+1/sigma_k and the Ritz residual"),
                 subspace_rows),
}


def summary_tables(stores: Iterable[RunStore]) -> dict[str, pd.DataFrame]:
    """probe -> its rows over every store that holds its records."""
    frames: dict[str, list[pd.DataFrame]] = {}
    for store in stores:
        for probe, (_, rows) in BLOCKS.items():
            if store.has_records(probe):
                frames.setdefault(probe, []).append(rows(store))
    return {probe: pd.concat(parts, ignore_index=True) for probe, parts in frames.items()}


def render(tables: dict[str, pd.DataFrame]) -> str:
    blocks = []
    for probe, table in tables.items():
        text = table.to_string(index=False, float_format=lambda v: f"{v:.4g}")
        blocks.append(f"{BLOCKS[probe][0]}\n{text}")
    return "\n\n".join(blocks)


def _with_run(rows: pd.DataFrame, store: RunStore) -> pd.DataFrame:
    for i, column in enumerate(RUN_COLUMNS):
        rows.insert(i, column, store.columns.get(column))
    return rows
