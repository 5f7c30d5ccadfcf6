"""brainrobust: adversarial probes of ANN-based fMRI encoding models."""

from brainrobust.errors import BrainRobustError, CacheError, ConfigError, DataError, WeightsError

__version__ = "0.1.0"
__all__ = ["BrainRobustError", "CacheError", "ConfigError", "DataError", "WeightsError", "__version__"]
