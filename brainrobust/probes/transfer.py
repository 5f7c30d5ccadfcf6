"""Transfer of stored perturbations from source runs to this run's encoder (method.md section 3).

This run is the TARGET. For every source run that stored perturbations for the ROI and norm
(the sensitivity probe's fixed-eps ladder, or the effect-matched probe's per-image budgets) and
every test image both runs share:

    target change  t = r_t(x) - r_t(clip(x + delta))
    source change  s = r_s(x) - r_s(x + delta)        read from the source's own records
    ratio            = |t| / |s|

with a random control on the target: noise of the same norm as the applied delta. Nothing is
attacked here: a transfer study costs one attack per source and one forward pass per
source x target pair.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from brainrobust.errors import ConfigError, DataError
from brainrobust.probes.attack import NORMS, norm_of, random_perturbation
from brainrobust.probes.base import Probe, ProbeContext
from brainrobust.results.store import ResultsStore, RunStore

log = logging.getLogger(__name__)

METRICS = ("target_change", "abs_target_change", "source_change", "abs_source_change", "ratio",
           "delta_norm", "random_abs_change", "random_abs_change_max", "random_ratio")
# The data settings that define the stimuli: runs differing in these show different images under
# the same ids, so their perturbations must not be applied to each other. (A different
# data.image_size is the same stimuli at another resolution: refused by the shape check instead.)
STIMULUS_KEYS = ("layout", "root", "synthetic")
# Source columns copied into the records when the source's records carry them.
SOURCE_SETTINGS = ("effect_kind", "effect_value")


@dataclass(frozen=True)
class SourceKind:
    """Where one kind of source perturbation lives: `<array>_<roi>_<norm>` + `<probe>` records."""

    array: str
    probe: str


# Kept in step with the arrays and records the producing probes write (probes never import
# each other, so the names are the contract).
# The source runs a transfer weighed, beside its records.
SOURCES_ARRAY = "transfer_sources"
KINDS = {
    "fixed_eps": SourceKind(array="perturbations", probe="sensitivity"),
    "effect_matched": SourceKind(array="effect_matched", probe="effect_matched"),
}


class TransferProbe(Probe):
    name = "transfer"
    image_axes: ClassVar[dict[str, int]] = {}
    # Reading the sources' perturbations dominates: each rank reads them once, for all its images.
    per_batch: ClassVar[bool] = False
    settings: ClassVar[tuple[str, ...]] = (
        "kind",
        "source_roi",
        "source_model",
        "source_subject",
        "norm_type",
        "eps",
    )

    def __init__(
        self,
        sources: str | Sequence[Mapping[str, Any]] = "all",
        kind: str = "fixed_eps",
        norm: str = "l2",
        source_rois: list[str] | None = None,
        random_draws: int = 4,
        batch_size: int = 32,
        results_dir: str | None = None,
        max_images: int | None = None,
        rois: list[str] | None = None,
        force: bool = False,
    ):
        super().__init__(rois=rois, max_images=max_images, force=force)
        self.selectors = _parse_sources(sources)
        self.check(integers={"random_draws": (random_draws, 1), "batch_size": (batch_size, 1)},
                   choices={"kind": (kind, KINDS), "norm": (norm, NORMS)})
        self.kind = kind
        self.norm = norm
        self.source_rois = list(source_rois) if source_rois else None
        self.random_draws = random_draws
        self.batch_size = batch_size
        self.results_dir = results_dir

    def run_batch(self, encoder: torch.nn.Module, ctx: ProbeContext, images: torch.Tensor,
                  ids: np.ndarray) -> pd.DataFrame:
        # The store root holding this run: <root>/runs/<key>.
        root = Path(self.results_dir) if self.results_dir else ctx.store.dir.parent.parent
        # `ids` are this rank's images; whether a source shares images at all is a question
        # about the whole selection, answered the same on every rank.
        all_ids = ctx.image_ids[: self.n_selected(ctx)]
        stimuli = _stimulus_signature(ctx.store.identity)
        generator = ctx.generator(offset=1)
        frames, considered = [], []
        for roi in self.selected_rois():
            for source_roi in self.source_rois or [roi]:
                for source in self.find_sources(root, source_roi, stimuli):
                    considered.append((source_roi, source.key))
                    frame = self._transfer(encoder, roi, source_roi, source, images, ids, all_ids,
                                           generator)
                    if frame is None:
                        continue
                    frame["target_model"] = ctx.meta.get("model")
                    frame["target_subject"] = ctx.meta.get("subject")
                    frames.append(frame)
        # Every source weighed, applied or not (no shared image): what `stale` compares against.
        # Saved by every rank alike, also by one whose images no source shares.
        pairs = sorted(set(considered))
        ctx.store.save_array(SOURCES_ARRAY, {"source_roi": np.array([r for r, _ in pairs], dtype=str),
                                             "source_run": np.array([k for _, k in pairs], dtype=str)})
        if not frames:
            return pd.DataFrame()
        records = pd.concat(frames, ignore_index=True)
        records["kind"] = self.kind
        records["norm_type"] = self.norm
        return records

    def no_records(self) -> str:
        return ("no stored perturbation of the chosen sources applies to this run's test images "
                "(effect-matched sources whose images never reached the effect?)")

    def stale(self, store: RunStore) -> bool:
        """True where the store has gained source runs since this run's transfer was computed."""
        if not store.has_records(self.name) or not store.has_array(SOURCES_ARRAY):
            return False
        root = Path(self.results_dir) if self.results_dir else store.dir.parent.parent
        stimuli = _stimulus_signature(store.identity)
        used = store.load_array(SOURCES_ARRAY)
        seen = set(zip(used["source_roi"].tolist(), used["source_run"].tolist(), strict=True))
        for source_roi in sorted({roi for roi, _ in seen}):
            try:
                now = {(source_roi, s.key) for s in self.find_sources(root, source_roi, stimuli)}
            except DataError:  # sources gone or broken: the next full run says so
                continue
            if now - seen:
                log.info("probe transfer: %d source run(s) of %s added since run %s computed it; "
                         "redoing it", len(now - seen), source_roi, store.key)
                return True
        return False

    # ---- sources -------------------------------------------------------------------------

    def find_sources(self, root: Path, roi: str, stimuli: dict[str, Any] | None) -> list[RunStore]:
        """The runs under `root` whose stored perturbations for `roi` this probe applies."""
        source_kind = KINDS[self.kind]
        array = f"{source_kind.array}_{roi}_{self.norm}"
        store = ResultsStore(root)
        runs = store.runs()
        chosen: dict[str, dict[str, Any]] = {}
        for selector in self.selectors:
            matched = [r for r in runs if _matches(r, selector)]
            usable = [r for r in matched if store.open(r).has_array(array)]
            other_data = [r for r in usable if stimuli is not None
                          and _stimulus_signature(r.get("identity")) != stimuli]
            usable = [r for r in usable if r not in other_data]
            if not usable:
                raise DataError(_missing_message(selector, matched, other_data, roi, self.norm,
                                                 array, root, source_kind.probe))
            for r in usable:
                if source_kind.probe not in r["probes"]:
                    raise DataError(
                        f"run {r['key']} ({_describe(r['columns'])}) holds {array} but no "
                        f"{source_kind.probe} records (interrupted?); rerun it: "
                        f"`{_command(r['columns'], roi, self.norm, source_kind.probe)}`"
                    )
                chosen[r["key"]] = r
        _refuse_duplicates(list(chosen.values()), array)
        return [store.open(r) for _, r in sorted(chosen.items())]

    # ---- one source ----------------------------------------------------------------------

    def _transfer(self, encoder: torch.nn.Module, roi: str, source_roi: str, source: RunStore,
                  images: torch.Tensor, ids: np.ndarray, all_ids: np.ndarray,
                  generator: torch.Generator) -> pd.DataFrame | None:
        """Records of one source's perturbations applied to `images`; None when none applies."""
        source_kind = KINDS[self.kind]
        arrays = source.load_array(f"{source_kind.array}_{source_roi}_{self.norm}")
        delta = arrays["delta"]
        if delta.shape[-2:] != images.shape[-2:]:
            raise ConfigError(
                f"perturbations of run {source.key} are {delta.shape[-2]}x{delta.shape[-1]} but this "
                f"run's images are {images.shape[-2]}x{images.shape[-1]}: perturbations live at the "
                f"dataset's canonical stimulus size, so source and target must use the same "
                f"data.image_size (rerun one of them with data.image_size={images.shape[-1]})"
            )
        pairs = self._pairs(source, source_roi, arrays, ids, all_ids)
        if pairs.empty:
            return None
        columns = self._apply(encoder, roi, delta, pairs, images, generator)
        wide = pd.DataFrame(columns)
        for name in ("image_id", "eps"):
            wide[name] = pairs[name].to_numpy()
        for name in SOURCE_SETTINGS:
            if name in pairs:
                wide[name] = pairs[name].to_numpy()
        id_vars = [c for c in wide.columns if c not in METRICS]
        records = wide.melt(id_vars=id_vars, value_vars=list(METRICS), var_name="metric",
                            value_name="value")
        records["roi"] = roi
        records["source_roi"] = source_roi
        records["source_model"] = source.columns.get("model")
        records["source_layer"] = source.columns.get("layer")
        records["source_subject"] = source.columns.get("subject")
        records["source_run"] = source.key
        return records

    def _pairs(self, source: RunStore, roi: str, arrays: dict[str, np.ndarray],
               ids: np.ndarray, all_ids: np.ndarray) -> pd.DataFrame:
        """One row per applied perturbation: where its delta and target image are, and s.

        Columns: slot (first axis of delta), src_pos (image axis of delta), tgt_pos (this run's
        image index), image_id, eps (exact, from the source's records), source_change.
        """
        source_ids = arrays["image_id"]
        if len(np.intersect1d(all_ids, source_ids)) == 0:
            raise DataError(
                f"run {source.key} ({_describe(source.columns)}) shares no test image ids with this "
                f"run; transfer needs the same stimuli (e.g. the NSD shared images)"
            )
        common, tgt_pos, src_pos = np.intersect1d(ids, source_ids, return_indices=True)
        images = pd.DataFrame({"image_id": common, "tgt_pos": tgt_pos, "src_pos": src_pos})
        table = _source_changes(source, KINDS[self.kind].probe, roi)
        if self.kind == "fixed_eps":
            ladder = np.sort(table.eps.unique())
            slots = pd.DataFrame({"slot": np.arange(len(arrays["eps"])),
                                  "eps": [_match_eps(e, ladder, source) for e in arrays["eps"]]})
            pairs = images.merge(slots, how="cross").merge(table, on=["image_id", "eps"], how="left")
        else:
            # Unreached images (eps NaN) have no records row with a finite eps: nothing to apply.
            pairs = images.assign(slot=0).merge(table, on="image_id", how="inner")
            stored = arrays["eps"][pairs.src_pos.to_numpy()].astype(np.float64)
            if not np.allclose(stored, pairs.eps.to_numpy(), rtol=1e-2):
                raise DataError(f"run {source.key}: stored effect-matched eps disagree with its records "
                                f"(edited or mixed files); rerun that run with force=true")
            dropped = len(images) - len(pairs)
            if dropped:
                log.info("transfer: %d image(s) of run %s never reached the effect; skipped",
                         dropped, source.key)
        if pairs.source_change.isna().any():
            missing = pairs[pairs.source_change.isna()].iloc[0]
            raise DataError(
                f"run {source.key}: {KINDS[self.kind].probe} records lack image {missing.image_id} at "
                f"eps={missing.eps:g} for roi={roi}; rerun that run with force=true"
            )
        return pairs.reset_index(drop=True)

    def _apply(self, encoder: torch.nn.Module, roi: str, delta: np.ndarray, pairs: pd.DataFrame,
               images: torch.Tensor, generator: torch.Generator) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
        bar = self.progress(len(pairs), "img", roi, leave=False)
        slot, src_pos, tgt_pos = (pairs[c].to_numpy() for c in ("slot", "src_pos", "tgt_pos"))
        source_change = torch.tensor(pairs.source_change.to_numpy(), dtype=torch.float64)
        for start in range(0, len(pairs), self.batch_size):
            rows = slice(start, start + self.batch_size)
            x = images[torch.tensor(tgt_pos[rows], device=images.device)]
            d = torch.from_numpy(delta[slot[rows], src_pos[rows]].astype(np.float32)).to(x.device)
            # Pixels stay in [0, 1] as on the source; the norm of what was really applied counts.
            x_adv = (x + d).clamp(0.0, 1.0)
            applied = norm_of(x_adv - x, self.norm)
            with torch.no_grad():
                r_clean = encoder.roi_response(x, roi)
                t = r_clean - encoder.roi_response(x_adv, roi)
                # Noise of the applied norm, itself kept in [0, 1] at that norm.
                random_effects = torch.stack([
                    (encoder.roi_response(x + random_perturbation(
                        x, applied, self.norm, generator, match_norm=applied), roi) - r_clean).abs()
                    for _ in range(self.random_draws)
                ])
            s = source_change[rows].abs()
            t = t.double().cpu()
            random_mean = random_effects.mean(0).double().cpu()
            for name, value in (("target_change", t), ("abs_target_change", t.abs()),
                                ("source_change", source_change[rows]), ("abs_source_change", s),
                                ("ratio", _safe_ratio(t.abs(), s)), ("delta_norm", applied),
                                ("random_abs_change", random_mean),
                                ("random_abs_change_max", random_effects.amax(0)),
                                ("random_ratio", _safe_ratio(random_mean, s))):
                parts[name].append(value.detach().double().cpu().numpy())
            bar.update(len(x))
        bar.close()
        return {k: np.concatenate(v) for k, v in parts.items()}


# ---- helpers -------------------------------------------------------------------------------

def _parse_sources(sources: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if sources == "all":
        return [{}]
    if isinstance(sources, str) or not isinstance(sources, Sequence) or not sources \
            or not all(isinstance(s, Mapping) for s in sources):
        raise ConfigError(
            f"transfer.sources must be 'all' or a list of selectors such as "
            f"[{{model: resnet50, subject: 1}}], got {sources!r}"
        )
    return [dict(s) for s in sources]


def _stimulus_signature(identity: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not identity or "data" not in identity:
        return None
    return {k: identity["data"].get(k) for k in STIMULUS_KEYS}


def _lookup(identity: Mapping[str, Any], dotted: str) -> Any:
    node: Any = identity
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _matches(run: Mapping[str, Any], selector: Mapping[str, Any]) -> bool:
    """A selector key names a run.json column (model, subject, ...), `key`, or a dotted
    identity path (`experiment_name`, `attack.steps`); values compare as text (1 == "1")."""
    for name, want in selector.items():
        if name == "key":
            have = run["key"]
        elif name in run.get("columns", {}):
            have = run["columns"][name]
        else:
            have = _lookup(run.get("identity", {}), name)
        if have is _MISSING or str(have) != str(want):
            return False
    return True


def _refuse_duplicates(runs: list[dict[str, Any]], array: str) -> None:
    """Two matched runs of the same encoder would be averaged into one matrix cell silently."""
    seen: dict[tuple, str] = {}
    for r in runs:
        cols = r["columns"]
        ident = tuple(str(cols.get(k)) for k in ("model", "layer", "subject", "seed"))
        if ident in seen:
            raise ConfigError(
                f"runs {seen[ident]} and {r['key']} both hold {array} for {_describe(cols)}; "
                f"narrow probe.transfer.sources, e.g. [{{key: {r['key']}}}] or "
                f"[{{experiment_name: sensitivity}}]"
            )
        seen[ident] = r["key"]


def _describe(selector: Mapping[str, Any]) -> str:
    shown = {k: selector[k] for k in ("model", "subject", "layer", "key") if k in selector} or selector
    return " ".join(f"{k}={v}" for k, v in shown.items()) or "any run"


def _command(selector: Mapping[str, Any], roi: str, norm: str, probe: str) -> str:
    args = [f"{k}={selector[k]}" for k in ("model", "subject") if k in selector]
    args.append(f"roi={roi}")
    if norm != "l2":
        args.append(f"epsilon={norm}")
    args.append(f"probe=[{probe}]")
    return "python run.py " + " ".join(args)


def _missing_message(selector: Mapping[str, Any], matched: list[dict[str, Any]],
                     other_data: list[dict[str, Any]], roi: str, norm: str, array: str,
                     root: Path, probe: str) -> str:
    what = " ".join(f"{k}={v}" for k, v in selector.items())
    runs = ", ".join(r["key"] for r in matched[:5]) or "none"
    note = (f"; {len(other_data)} run(s) hold it for other stimuli (data.layout/root/synthetic)"
            if other_data else "")
    return (f"no stored perturbations for {what + ' ' if what else ''}roi={roi} norm={norm} in {root} "
            f"(matching runs: {runs}; none holds {array}{note}); "
            f"run `{_command(selector, roi, norm, probe)}` first")


def _source_changes(source: RunStore, probe: str, roi: str) -> pd.DataFrame:
    """s = r_clean - r_adv per (image_id, eps) from the source's own records, with its settings."""
    records = source.read_records(probe)
    rows = records[(records.roi == roi) & records.metric.isin(["r_clean", "r_adv"])
                   & np.isfinite(records.eps)]
    if rows.empty:
        raise DataError(f"run {source.key}: {probe} records hold no r_clean/r_adv for roi={roi}; "
                        f"rerun that run with force=true")
    wide = rows.pivot(index=["image_id", "eps"], columns="metric", values="value")
    table = (wide["r_clean"] - wide["r_adv"]).rename("source_change").reset_index()
    settings = [c for c in SOURCE_SETTINGS if c in rows.columns]
    if settings:
        table = table.merge(rows[["image_id", "eps", *settings]].drop_duplicates(["image_id", "eps"]),
                            on=["image_id", "eps"])
    return table


def _match_eps(stored: float, ladder: np.ndarray, source: RunStore) -> float:
    """The records' exact eps for an eps read back from an fp16 array."""
    nearest = ladder[np.argmin(np.abs(ladder - stored))]
    if not np.isclose(nearest, stored, rtol=1e-2):
        raise DataError(f"run {source.key}: stored eps {stored:g} has no records "
                        f"(ladder {ladder.tolist()}); rerun that run with force=true")
    return float(nearest)


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    num, den = num.double().cpu(), den.double().cpu()
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))
