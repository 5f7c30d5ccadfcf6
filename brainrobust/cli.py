"""Small command line over the results store and the model zoo.

    python -m brainrobust list [--root results]     runs in the store, with their probes
    python -m brainrobust models                    the model zoo (reads conf/model, loads nothing)
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
    from brainrobust.models.zoo import get_spec, list_models

    for name in list_models():
        spec = get_spec(name)
        source = spec.hub_id or spec.url or "random init (offline)"
        print(f"{name:28s} {spec.family:8s} layer={spec.layer:24s} {source}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="brainrobust")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="runs in the results store")
    p.add_argument("--root", default="results")
    p.set_defaults(func=_list_runs)
    p = sub.add_parser("models", help="the model zoo")
    p.set_defaults(func=_list_models)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BrainRobustError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
