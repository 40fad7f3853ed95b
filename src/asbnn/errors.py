"""The library's own error types: every bad input ends in one of these, with a one-line message."""


class AsbnnError(Exception):
    """Base class: the CLI prints these as a single line, without a traceback."""


class ConfigError(AsbnnError, ValueError):
    """A configuration value or command-line flag is invalid."""


class DataError(AsbnnError):
    """A data set is missing, corrupt or not in the expected format."""


class CheckpointError(AsbnnError):
    """A checkpoint is missing, truncated, corrupt or unsafe to load."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type name if it has none), for one-line reports."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
