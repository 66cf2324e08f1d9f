"""User-facing errors: the CLI prints ``str(error)`` as one line and exits non-zero, no traceback."""


class RobustftError(Exception):
    """Base class: a problem with the user's input, not a bug in robustft."""


class ConfigError(RobustftError):
    """A config key or value is wrong; the message names the key."""


class DataError(RobustftError):
    """A data file, split or label is wrong; the message names the file and the value."""


class CheckpointError(RobustftError):
    """A checkpoint is missing, unsafe or does not match the model; the message names the file."""


class UnsupportedModelError(ConfigError, ValueError):
    """The configured model lacks what a method needs (e.g. a CLS-token ViT for attention rollout)."""
