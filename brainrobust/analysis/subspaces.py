"""Perturbation-subspace similarity across stored runs (method.md section 4).

The subspace probe stores each run's per-image top-k Jacobian subspaces as
`<run dir>/arrays/subspace_<roi>.npz`; this module compares them between runs, on the image ids
two runs share, with no recomputation:

    pair_table(root, roi)          long table: one row per (a, b, image_id), the similarity
                                   ||P_a^T P_b||_F^2 / k, principal angles angle_1..angle_k
                                   (radians, ascending) and the random baseline k / D
    matrix(table)                  label x label mean over images of one column
    similarity_matrix(root, roi)   both in one call (model x model by default)

Command line: `python -m brainrobust.analysis.subspaces --root results --rois FFA --subjects 1`
prints each matrix and writes it as CSV under --out.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainrobust.errors import BrainRobustError, DataError
from brainrobust.files import write_text
from brainrobust.probes.jacobian import principal_angles, random_baseline, subspace_similarity
from brainrobust.results.store import ResultsStore


@dataclass
class StoredSubspaces:
    """One run's subspaces for one ROI, re-orthonormalised after the fp16 round trip."""

    label: str
    key: str
    columns: dict[str, Any]
    p: np.ndarray  # (n, D, k) float32, orthonormal columns
    image_id: np.ndarray  # (n,)


def produce_command(columns: dict[str, Any], roi: str) -> str:
    """The run.py command that stores `roi`'s subspaces for a run with these key columns."""
    model = columns.get("model") or "<model>"
    subject = columns.get("subject") or "<subject>"
    # "all" is the probe's every-voxel Jacobian, not an ROI of the roi= group.
    target = "probe.subspace.voxels=all" if roi == "all" else f"roi={roi}"
    return f"python run.py experiment=subspace model={model} subject={subject} {target}"


def _label(columns: dict[str, Any], by: Sequence[str]) -> str:
    return "/".join(str(columns.get(c)) for c in by)


def _has_subspace_records(run_dir: Path, roi: str) -> bool:
    path = run_dir / "records" / "subspace.parquet"
    return path.exists() and roi in set(pd.read_parquet(path, columns=["roi"])["roi"])


def load_subspaces(
    root: str | Path,
    roi: str,
    subject: int | None = None,
    models: Sequence[str] | None = None,
    by: Sequence[str] = ("model",),
) -> list[StoredSubspaces]:
    """The stored subspaces of `roi` of every matching run under `root`.

    Runs that never ran the subspace probe on `roi` are skipped unless their model is
    requested in `models`; a requested model without subspaces, or a run whose subspace
    records exist but whose array is gone, is a DataError naming the run and the command
    that produces it.
    """
    store = ResultsStore(root)
    runs = [
        r
        for r in store.runs()
        if (subject is None or str(r["columns"].get("subject")) == str(subject))
        and (models is None or r["columns"].get("model") in models)
    ]
    found: list[StoredSubspaces] = []
    for r in runs:
        run, name = store.open(r), f"subspace_{roi}"
        run_dir, path = run.dir, run.array_path(name)
        if not run.has_array(name):
            if _has_subspace_records(run_dir, roi):
                who = _label(r["columns"], ("model", "subject"))
                raise DataError(
                    f"run {r['key']} ({who}) has subspace records for {roi} but {path} is "
                    f"missing; rerun it: `{produce_command(r['columns'], roi)} force=true`"
                )
            continue
        stored = run.load_array(name)
        p, ids = stored["P"].astype(np.float32), stored["image_id"]
        # fp16 storage leaves the columns slightly off orthonormal; QR restores an exact basis
        # of the same subspace, so a subspace compared with itself gives 1.
        p = np.linalg.qr(p, mode="reduced")[0]
        found.append(StoredSubspaces(_label(r["columns"], by), r["key"], r["columns"], p, ids))

    where = f"subject {subject}" if subject is not None else "any subject"
    for model in models or []:
        if not any(s.columns.get("model") == model for s in found):
            run = next((r for r in runs if r["columns"].get("model") == model), None)
            owner = (
                f"run {run['key']} (model={model})" if run else f"no run of model {model} ({where})"
            )
            cols = run["columns"] if run else {"model": model, "subject": subject}
            raise DataError(
                f"{owner} has no stored subspaces for {roi} under {root}; "
                f"produce them with `{produce_command(cols, roi)}`"
            )
    if not found:
        raise DataError(
            f"no stored subspaces for {roi} ({where}) under {root}; "
            f"run experiments/subspace.sh or `{produce_command({'subject': subject}, roi)}`"
        )
    labels = [s.label for s in found]
    duplicate = next((lab for lab in labels if labels.count(lab) > 1), None)
    if duplicate is not None:
        keys = [s.key for s in found if s.label == duplicate]
        raise DataError(
            f"runs {keys} are all labelled {duplicate!r} by {tuple(by)}; "
            f"pass subject=... or a finer by=(...) such as ('model', 'subject', 'layer')"
        )
    shapes = {s.p.shape[1:] for s in found}
    if len(shapes) > 1:
        raise DataError(
            f"stored subspaces of {roi} differ in (pixels, k): {sorted(shapes)}; "
            "compare runs at one image size and one probe.subspace.k"
        )
    return found


def pair_table(
    root: str | Path,
    roi: str,
    subject: int | None = None,
    models: Sequence[str] | None = None,
    by: Sequence[str] = ("model",),
) -> pd.DataFrame:
    """Similarity and principal angles per shared image, for every pair of runs.

    Both orders of each pair and each run with itself (a == b) are listed.
    """
    found = load_subspaces(root, roi, subject=subject, models=models, by=by)
    frames = []
    for a, b in itertools.combinations_with_replacement(found, 2):
        shared, ia, ib = np.intersect1d(a.image_id, b.image_id, return_indices=True)
        if len(shared) == 0:
            raise DataError(
                f"runs {a.key} ({a.label}) and {b.key} ({b.label}) share no images; "
                "probe the same test images (same data and probe.subspace.max_images)"
            )
        pa, pb = a.p[ia], b.p[ib]
        angles = principal_angles(pa, pb)
        rows = pd.DataFrame(
            {
                "roi": roi,
                "a": a.label,
                "b": b.label,
                "image_id": shared,
                "similarity": subspace_similarity(pa, pb),
            }
        )
        for i in range(angles.shape[1]):
            rows[f"angle_{i + 1}"] = angles[:, i]
        frames.append(rows)
        if a is not b:
            frames.append(rows.assign(a=b.label, b=a.label))
    table = pd.concat(frames, ignore_index=True)
    _, d, k = found[0].p.shape
    table["k"], table["pixels"], table["random_baseline"] = k, d, random_baseline(k, d)
    return table


def matrix(table: pd.DataFrame, value: str = "similarity") -> pd.DataFrame:
    """Label x label mean over images of `value` (a pair_table column)."""
    out = table.pivot_table(index="a", columns="b", values=value, aggfunc="mean")
    out.index.name, out.columns.name = None, None
    out.attrs["random_baseline"] = float(table["random_baseline"].iloc[0])
    out.attrs["n_images"] = table.groupby(["a", "b"])["image_id"].nunique().to_dict()
    return out


def similarity_matrix(
    root: str | Path,
    roi: str,
    subject: int | None = None,
    models: Sequence[str] | None = None,
    by: Sequence[str] = ("model",),
) -> pd.DataFrame:
    """Model x model (or `by` labels) mean subspace similarity over shared images.

    `attrs` holds the random baseline k / D and the number of images behind each cell.
    """
    return matrix(pair_table(root, roi, subject=subject, models=models, by=by))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="results")
    parser.add_argument("--out", default="figures/subspace")
    parser.add_argument("--rois", required=True, help="comma-separated, e.g. FFA,EBA")
    parser.add_argument("--subjects", default=None, help="comma-separated; default: pool subjects")
    args = parser.parse_args(argv)
    subjects = [int(s) for s in args.subjects.split(",")] if args.subjects else [None]
    for roi, subject in itertools.product(args.rois.split(","), subjects):
        try:
            table = pair_table(args.root, roi, subject=subject)
        except BrainRobustError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        sim = matrix(table)
        name = f"similarity_{roi}" + (f"_s{subject}" if subject is not None else "")
        write_text(Path(args.out) / f"{name}.csv", sim.to_csv())
        print(
            f"{roi}, subject {subject if subject is not None else 'any'} "
            f"(random baseline {sim.attrs['random_baseline']:.2e}):"
        )
        print(sim.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
