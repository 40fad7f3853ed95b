"""The library's own error types: every bad input ends in one of these, with a one-line message."""

import math
import numbers


class AsbnnError(Exception):
    """Base class: the CLI prints these as a single line, without a traceback."""


class ConfigError(AsbnnError, ValueError):
    """A configuration value or command-line flag is invalid."""


class DataError(AsbnnError):
    """A data set is missing, corrupt or not in the expected format."""


class CheckpointError(AsbnnError):
    """A checkpoint is missing, truncated, corrupt or unsafe to load."""


def check_number(name: str, value: object, *, positive: bool = False) -> None:
    """Refuse anything but a finite real number >= 0 (> 0 with `positive`).

    inf passes a plain `x >= 0` test and NaN fails it with an unclear message; a tensor would need
    a device sync to test, so the Python API takes plain numbers only.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value > 0 if positive else value >= 0)):
        raise ConfigError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value!r}")


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type name if it has none), for one-line reports."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
