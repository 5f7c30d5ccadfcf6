"""brainrobust's entry point: `python run.py model=robust_resnet50_eps3 roi=FFA subject=2`.

Composes conf/ with Hydra, then config -> data -> encoder -> probes -> results store.
With no arguments it runs the embedded default offline: the synthetic NSD twin, a small
random-init model, the sensitivity probe, local results.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("brainrobust")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    from brainrobust.errors import BrainRobustError
    from brainrobust.pipeline import run, summary_table

    try:
        store = run(cfg)
    except BrainRobustError as err:
        # A user-correctable problem: one line that names the fix, no traceback.
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # Other DDP ranks end here: rank 0 writes the records and reports them.
    if cfg.dry_run or rank_zero_only.rank != 0:
        return
    if cfg.print_table:
        print(summary_table(store).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"records: {store.records_dir}")


if __name__ == "__main__":
    main()
