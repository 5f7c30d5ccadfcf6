"""brainrobust: adversarial probes of ANN-based fMRI encoding models."""

from pathlib import Path

from brainrobust.errors import BrainRobustError, CacheError, ConfigError, DataError, WeightsError

__version__ = "0.1.0"
# The Hydra configs: brainrobust/conf links to the checkout's conf/, and a wheel carries a copy,
# so a run composes the same files from any directory.
CONF_DIR = Path(__file__).resolve().parent / "conf"
__all__ = ["CONF_DIR", "BrainRobustError", "CacheError", "ConfigError", "DataError", "WeightsError", "__version__"]
