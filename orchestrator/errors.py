"""The error every avlab command turns into one line and exit code 2. It lives apart from
``orchestrator.config`` so that commands that need no config (``--help``, ``status``,
``report``, ``ui``) start without importing torch, torchvision and scikit-learn."""


class ConfigError(ValueError):
    """Bad user input in a config, run file or override; the message names the field."""


class RunFailed(RuntimeError):
    """A run stopped by an error that a retry would raise again; the message is its one line."""


class Interrupted(RuntimeError):
    """Stopped by the user (Ctrl-C) with its state saved; the message says how to continue."""
