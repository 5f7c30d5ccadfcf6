"""brainrobust: adversarial probes of ANN-based fMRI encoding models."""

from brainrobust.errors import BrainRobustError, ConfigError, DataError, WeightsError, CacheError

__version__ = "0.1.0"
__all__ = ["BrainRobustError", "ConfigError", "DataError", "WeightsError", "CacheError", "__version__"]
