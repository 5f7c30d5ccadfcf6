"""Small command line over the results store and the model zoo.

    python -m brainrobust list [--root results]     runs in the store, with their probes
    python -m brainrobust models                    the model zoo and the state of its weights
    python -m brainrobust fetch weights MODEL ... | --all    checkpoints into the weights folder
    python -m brainrobust fetch nsd --root DIR --subjects 1 ... --accept-terms    NSD files
    python -m brainrobust export RUN_OR_SWEEP --out DIR    stimuli as PNGs + manifest (docs/export.md)
"""

from __future__ import annotations

import argparse
import sys

from brainrobust.errors import BrainRobustError


def _list_runs(args: argparse.Namespace) -> None:
    from brainrobust.results.store import ResultsStore

    runs = ResultsStore(args.root).runs()
    if not runs:
        print(f"no runs under {args.root}")
        return
    for r in runs:
        cols = " ".join(f"{k}={v}" for k, v in r["columns"].items())
        state = "done" if r["complete"] else "partial"
        print(f"{r['key']}  {state:7s}  {cols}  probes={','.join(r['probes']) or '-'}")


def _list_models(args: argparse.Namespace) -> None:
    from brainrobust.models.weights import default_weights_dir, weights_status
    from brainrobust.models.zoo import get_spec, list_models

    folder = args.weights_dir or default_weights_dir()
    for name in list_models():
        spec = get_spec(name)
        source = spec.hub_id or spec.url or "random init (offline)"
        status = weights_status(spec, folder)
        print(f"{name:28s} {spec.family:8s} {status:11s} layer={spec.layer:24s} {source}")
    print(f"weights: {folder}; python -m brainrobust fetch weights MODEL ... (or --all) fetches "
          "missing ones")


def _fetch_weights(args: argparse.Namespace) -> None:
    from brainrobust.fetch.weights import fetch_weights

    fetch_weights(args.models, args.all, args.weights_dir, args.base_url)


def _fetch_nsd(args: argparse.Namespace) -> None:
    from brainrobust.fetch.nsd import fetch_nsd

    fetch_nsd(args.root, args.subjects, args.sessions, args.base_url, args.accept_terms,
              args.roi_only, args.jobs)


def _export(args: argparse.Namespace) -> None:
    from brainrobust.export.encoders import Place
    from brainrobust.export.stimulus_set import export_stimulus_set

    manifest = export_stimulus_set(
        args.source, args.out, root=args.root, place=Place(args.data_root, args.cache_dir),
        seed=args.seed, repetitions=args.repetitions, force=args.force)
    files = manifest["files"]
    stimuli = {f["stimulus"] for f in files}
    print(f"{len(stimuli)} images ({len(files)} files) written to {args.out}; see its README.md")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """A command-line mistake is one line, like every other user error."""
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="brainrobust")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="runs in the results store")
    p.add_argument("--root", default="results")
    p.set_defaults(func=_list_runs)
    p = sub.add_parser("models", help="the model zoo and the state of its weights")
    p.add_argument("--weights-dir", help="default: where runs read them (paths.weights_dir)")
    p.set_defaults(func=_list_models)
    fetch = sub.add_parser("fetch", help="download what offline runs need").add_subparsers(
        dest="what", metavar="{weights,nsd}", required=True)
    p = fetch.add_parser("weights", help="checkpoints of zoo models, sha256-locked")
    p.add_argument("models", nargs="*", metavar="MODEL")
    p.add_argument("--all", action="store_true", help="every model with weights")
    p.add_argument("--weights-dir", help="default: where runs read them (paths.weights_dir)")
    p.add_argument("--base-url", help="a mirror of huggingface.co (default: $HF_ENDPOINT)")
    p.set_defaults(func=_fetch_weights)
    p = fetch.add_parser("nsd", help="the NSD files the loader reads, for some subjects")
    p.add_argument("--root", required=True, help="the data.root runs will use")
    p.add_argument("--subjects", type=int, nargs="+", required=True, metavar="S")
    p.add_argument("--sessions", type=int, metavar="N", help="the first N sessions (default all)")
    p.add_argument("--base-url", default=None, help="default: the natural-scenes-dataset bucket")
    p.add_argument("--accept-terms", action="store_true", help="agree to NSD's terms of use")
    p.add_argument("--roi-only", nargs="+", metavar="ROI",
                   help="only these ROIs' voxels and the subjects' images (partial copies)")
    p.add_argument("--jobs", type=int, default=8, help="parallel requests (default 8)")
    p.set_defaults(func=_fetch_nsd)
    p = sub.add_parser("export", help="a run's stimuli as PNGs, manifest and conditions file")
    p.add_argument("source", metavar="RUN_OR_SWEEP",
                   help="run key (or prefix), run folder, results folder or --multirun folder")
    p.add_argument("--out", required=True, metavar="DIR", help="an empty or new folder")
    p.add_argument("--root", default="results", help="the results store of a run key")
    p.add_argument("--force", action="store_true", help="replace what DIR holds")
    p.add_argument("--seed", type=int, default=0, help="of the conditions file's order")
    p.add_argument("--repetitions", type=int, default=1, help="presentations of each image")
    p.add_argument("--data-root", help="the runs' data.root (default: the config's)")
    p.add_argument("--cache-dir", help="the runs' paths.cache_dir (default: the config's)")
    p.set_defaults(func=_export)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BrainRobustError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
