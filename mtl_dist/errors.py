"""Error types: each carries one line that names the culprit (file:line, key, value)."""

import re

# A message about one config key starts by naming it: "config key 'train.lr': ...",
# "train.device: ..." or "model.pretrained (/its/path): ...".
_KEY_NAMED_FIRST = re.compile(r"config key '([^']+)'|([A-Za-z_]\w*(?:\.\w+|\[\d+\])+)(?::| \()")


class MtlDistError(Exception):
    """Base class; the CLI prints its message on one line and exits with status 2."""


class ConfigError(MtlDistError):
    """A config key, type or value is wrong. `key`: the one at fault (found in the message
    when not given), for the CLI to add where it was set; `located`: the message already
    says where (a load-time error's file line or override)."""

    def __init__(self, message: str, key: str | None = None, *, located: bool = False) -> None:
        super().__init__(message)
        named = None if key or located else _KEY_NAMED_FIRST.match(message)
        self.key = key or (named and (named[1] or named[2])) or None
        self.located = located


class DataError(MtlDistError):
    """A data file or row is malformed. `key`: the config key the problem turns on (a task's
    `labels`, `pair` or a column name), for the CLI to add where the config set it."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class CheckpointError(MtlDistError):
    """A checkpoint is missing, incomplete, corrupt or does not match this run. `key`: the
    config key that named it (train.resume), for the CLI to add where it was set."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.located = False


class MtlDistWarning(UserWarning):
    """A warning of mtl_dist's own; the CLI prints it as one line (`warning: ...`)."""


def fresh_line() -> str:
    """'\n' while a progress bar is on the console: a one-line message printed then would
    start after the bar's text (in a log file, `grep '^warning'` missed it)."""
    from tqdm import tqdm

    return "\n" if getattr(tqdm, "_instances", None) else ""
