"""The two errors a user sees as one line: bad input files and a bad configuration."""


class InputError(RuntimeError):
    """Bad input data; the message names the file and the problem."""


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending key."""
