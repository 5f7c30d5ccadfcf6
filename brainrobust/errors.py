"""Project exceptions.

Every error a user can cause is raised as a subclass of BrainRobustError with a one-line
message that names the fix; run.py prints that line and exits non-zero instead of a traceback.
"""


class BrainRobustError(Exception):
    """Base class: a user-correctable problem, reported as one line."""


class ConfigError(BrainRobustError, ValueError):
    """A config value is missing, of the wrong type or out of range."""


class DataError(BrainRobustError):
    """A dataset file is missing, truncated or not in the expected layout."""


class WeightsError(BrainRobustError):
    """A checkpoint is missing, of another architecture, or not what it claims."""


class CacheError(BrainRobustError):
    """A cache entry is damaged or belongs to another key (it is rebuilt, never trusted)."""


class StorageError(BrainRobustError, OSError):
    """A file or folder cannot be written (read-only, full, no permission)."""


class Interrupted(BrainRobustError):
    """The run was stopped by a signal (SIGTERM, preemption) at a safe point; rerun to resume."""
