"""The command `python run.py ...` (or `brainrobust-run ...` where the package is installed).

Composes the Hydra configs in CONF_DIR, then config -> data -> encoder -> probes -> results store.
With no arguments it runs the embedded default offline: the synthetic NSD twin, a small
random-init model, the sensitivity probe, local results.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from brainrobust import CONF_DIR

log = logging.getLogger("brainrobust")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from lightning.pytorch.utilities import rank_zero_only
    from omegaconf.errors import OmegaConfBaseException

    from brainrobust.errors import BrainRobustError, Interrupted
    from brainrobust.pipeline import multirun_job, run, show_results
    from brainrobust.sweep import record_outcome

    try:
        store = run(cfg)
    except Interrupted as err:
        # Preempted or stopped: not a mistake. The exit code a SIGTERM'd process has.
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(143)
    except (BrainRobustError, OmegaConfBaseException) as err:
        # A user-correctable problem: one line that names the fix, no traceback.
        message = str(err).splitlines()[0]
        log.error("%s", message)  # the console shows it as `error: ...`
        record_outcome(cfg.paths.results_dir, None, message)
        if multirun_job() is not None:
            return  # the sweep goes on and lists this failure at its end
        sys.exit(2)
    record_outcome(cfg.paths.results_dir, store.key)
    # Other DDP ranks end here: rank 0 writes the records and reports them.
    if not cfg.dry_run and rank_zero_only.rank == 0:
        show_results(cfg, store)


def preflight(argv: list[str]) -> bool:
    """Every value of every override composed before Hydra starts a job: one line, exit 2.
    Returns whether the command line is a --multirun."""
    from hydra._internal.utils import get_args_parser

    from brainrobust.errors import ConfigError
    from brainrobust.preflight import check_overrides

    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.shell_completion or args.info:
        return False
    try:
        check_overrides(args.overrides, CONF_DIR, multirun=bool(args.multirun), make_log_dir=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return bool(args.multirun)


def start() -> None:
    """Preflight, then Hydra; a local sweep's SIGTERM also ends its workers."""
    if preflight(sys.argv[1:]):
        from brainrobust.sweep import end_workers_with_sweep

        end_workers_with_sweep()
    main()
