"""What a `--multirun` sweep reports when it ends: one table over all its runs, and its failures.

Each job leaves `outcome.json` in its Hydra output folder (its run's results key, or the one
line of its error); `SweepSummary`, a Hydra callback in the sweep's own process, reads them all
once the launcher returns. A job that fails does not end the sweep: the others run, and the
sweep exits with code 2 after listing what failed and why.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from brainrobust.files import write_json
from brainrobust.results.store import ResultsStore
from brainrobust.summary import render, summary_tables

OUTCOME = "outcome.json"


def record_outcome(results_dir: str, key: str | None, error: str | None = None) -> None:
    """This job's outcome, for the sweep's summary; nothing outside a Hydra job."""
    if not HydraConfig.initialized():
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    write_json(folder / OUTCOME, {"results_dir": str(Path(results_dir).resolve()), "key": key,
                                  "error": error, "overrides": list(HydraConfig.get().overrides.task)})


def read_outcomes(sweep_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"*/{OUTCOME}"),
                                                      key=lambda p: _job_number(p.parent.name))]


def _job_number(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


class SweepSummary(Callback):
    """Prints the combined table and the failures of a sweep; exits 2 if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        outcomes = read_outcomes(Path(config.hydra.sweep.dir))
        done = [o for o in outcomes if o["error"] is None and o["key"]]
        failed = [o for o in outcomes if o["error"] is not None]
        stores = [ResultsStore(o["results_dir"]).open_key(o["key"]) for o in done]
        stores = [s for s in stores if s is not None]
        if stores and config.get("print_table", True):
            print(f"\nsweep {config.hydra.sweep.dir}: {len(stores)} runs\n"
                  + render(summary_tables(stores)))
        if failed:
            # The overrides every job shares say nothing about which job failed.
            shared = set.intersection(*(set(o["overrides"]) for o in outcomes))
            print(f"\n{len(failed)} of {len(outcomes)} jobs failed:", file=sys.stderr)
            for o in failed:
                job = " ".join(v for v in o["overrides"] if v not in shared) or "(all settings)"
                print(f"  {job}: {o['error']}", file=sys.stderr)
            sys.exit(2)


def end_workers_with_sweep() -> None:
    """Make SIGTERM to a local sweep end its joblib workers too: they are separate processes
    that would otherwise finish their job and start the next after the sweep is gone."""
    def forward(signum: int, frame: Any) -> None:
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, forward)


def _descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc (Linux, where sweeps run)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (field 2) may hold spaces: the parent pid follows its ')'.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found
