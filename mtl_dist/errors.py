"""Error types: each carries one line that names the culprit (file:line, key, value)."""


class MtlDistError(Exception):
    """Base class; the CLI prints its message on one line and exits with status 2."""


class ConfigError(MtlDistError):
    """A config key, type or value is wrong."""


class DataError(MtlDistError):
    """A data file or row is malformed."""


class CheckpointError(MtlDistError):
    """A checkpoint is missing, incomplete, corrupt or does not match this run."""
