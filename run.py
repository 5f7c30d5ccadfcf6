"""brainrobust's entry point: `python run.py model=robust_resnet50_eps3 roi=FFA subject=2`.

The command itself lives in brainrobust/entry.py, so an installed package runs it from any
directory as `brainrobust-run ...`; the configs it composes are conf/.
"""

from brainrobust.entry import main, preflight, start

__all__ = ["main", "preflight"]

if __name__ == "__main__":
    start()
