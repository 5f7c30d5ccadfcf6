"""Source x target transfer matrices from the merged records of the transfer probe.

A cell is what the source's perturbations do to the target, over the images both share:

    value="ratio"       mean |target change| / mean |source change|   (1 on the diagonal)
    value="abs_change"  mean |target change|

A ratio of means rather than a mean of per-image ratios: at small eps a few images barely move
the source, and their per-image ratios would dominate the mean. The control matrix holds the same
quantity for random noise of the same norm on the target; `normalise_by_random` divides by it
(mean |target change| / mean random |target change|, the same for both values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainrobust.errors import ConfigError, DataError
from brainrobust.results.store import load

VALUES = ("ratio", "abs_change")
BY = ("model", "model_subject")
KINDS = ("fixed_eps", "effect_matched")


def transfer_matrix(root: str | Path, roi: str, **options: Any) -> pd.DataFrame:
    """`matrix_from_records` of the transfer records under the results store `root`."""
    return matrix_from_records(load(root, probe="transfer"), roi, **options)


def matrix_from_records(
    records: pd.DataFrame,
    roi: str,
    eps: float | None = None,
    kind: str = "fixed_eps",
    value: str = "ratio",
    normalise_by_random: bool = False,
    by: str = "model",
    subject: int | None = None,
    source_roi: str | None = None,
    control: bool = False,
    norm: str | None = None,
) -> pd.DataFrame:
    """Source x target matrix of transfer for one target ROI.

    Parameters
    ----------
    records : the transfer records (brainrobust.results.store.load(root, probe="transfer")).
    roi : the target ROI; `source_roi` (default: the same) is the ROI the perturbations targeted.
    eps : the budget (kind="fixed_eps"); None is allowed when the records hold a single eps.
        kind="effect_matched" has one budget per image, so eps must be None.
    value : "ratio" or "abs_change" (see the module docstring).
    normalise_by_random : divide by the random control of the same norm on the target.
    by : "model" (within-subject pairs, averaged over subjects) or "model_subject"
        (rows/columns "model/s<subject>", every pair, so cross-subject transfer shows).
    subject : keep only pairs whose source and target are this subject.
    control : return the random-control matrix instead (in the units of `value`).
    norm : the perturbation norm; None is allowed when the records hold a single norm.

    Returns
    -------
    DataFrame indexed by source, columns target, sorted labels; attrs["n_subjects"] is the
    number of target subjects behind it.
    """
    if value not in VALUES:
        raise ConfigError(f"value must be one of {list(VALUES)}, got {value!r}")
    if by not in BY:
        raise ConfigError(f"by must be one of {list(BY)}, got {by!r}")
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if control and normalise_by_random:
        raise ConfigError("control=True with normalise_by_random=True is 1 by construction; drop one")
    df = _select_norm(records[records.kind == kind], norm)
    if df.empty:
        raise DataError(f"no {kind} transfer records; run the transfer probe with "
                        f"probe.transfer.kind={kind} first")
    source_roi = source_roi or roi
    selected = df[(df.roi == roi) & (df.source_roi == source_roi)]
    if selected.empty:
        pairs = sorted(set(zip(df.source_roi, df.roi)))
        raise DataError(f"no transfer records for source_roi={source_roi} -> roi={roi}; "
                        f"available (source_roi, roi): {pairs}")
    selected = _select_eps(selected, eps, kind)
    if subject is not None:
        selected = selected[(selected.source_subject.astype(int) == int(subject))
                            & (selected.target_subject.astype(int) == int(subject))]
    if by == "model":
        selected = selected[selected.source_subject.astype(int) == selected.target_subject.astype(int)]
    if selected.empty:
        raise DataError(f"no transfer pairs left for roi={roi} subject={subject} by={by}")
    source, target = _labels(selected, "source", by), _labels(selected, "target", by)
    means = (selected.assign(source=source, target=target)
             .groupby(["source", "target", "metric"])["value"].mean().unstack("metric"))
    if control:
        cell = means["random_abs_change"]
        if value == "ratio":
            cell = cell / means["abs_source_change"]
    elif normalise_by_random:
        cell = means["abs_target_change"] / means["random_abs_change"]
    elif value == "ratio":
        cell = means["abs_target_change"] / means["abs_source_change"]
    else:
        cell = means["abs_target_change"]
    matrix = cell.unstack("target").sort_index().sort_index(axis=1)
    matrix.attrs["n_subjects"] = int(selected.target_subject.nunique())
    return matrix


def _select_norm(df: pd.DataFrame, norm: str | None) -> pd.DataFrame:
    norms = sorted(df.norm_type.unique())
    if norm is None:
        if len(norms) > 1:
            raise ConfigError(f"the records hold several norms {norms}; pass norm= one of them")
        return df
    if norm not in norms:
        raise DataError(f"no transfer records of norm {norm!r}; available: {norms}")
    return df[df.norm_type == norm]


def _select_eps(df: pd.DataFrame, eps: float | None, kind: str) -> pd.DataFrame:
    if kind == "effect_matched":
        if eps is not None:
            raise ConfigError("effect-matched transfer has one eps per image; call with eps=None")
        return df
    ladder = np.sort(df.eps.unique())
    if eps is None:
        if len(ladder) > 1:
            raise ConfigError(f"the records hold several eps {ladder.tolist()}; pass eps= one of them")
        return df
    keep = np.isclose(df.eps.to_numpy(), eps, rtol=1e-6)
    if not keep.any():
        raise DataError(f"no transfer records at eps={eps:g}; available: {ladder.tolist()}")
    return df[keep]


def _labels(df: pd.DataFrame, side: str, by: str) -> pd.Series:
    model = df[f"{side}_model"].astype(str)
    if by == "model":
        return model
    return model + "/s" + df[f"{side}_subject"].astype(int).astype(str)
