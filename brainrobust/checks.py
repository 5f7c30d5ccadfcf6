"""Tests of values a user sets, shared by every config object, so each key reads the same way:
`<key> must be an integer >= 1, got 2.5`. Booleans are never numbers here (YAML's `true` would
otherwise pass as 1)."""

from __future__ import annotations

import math

from brainrobust.errors import ConfigError


def is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_bool(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


def require_folder(key: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a folder, got {value!r}")


def require_integer(key: str, value: object, minimum: int) -> None:
    if not is_integer(value) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
