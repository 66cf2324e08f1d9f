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


class RunDirectoryError(RobustftError):
    """A run directory cannot be written: in use by another process, finished, under a file or read-only."""


class OutOfSpaceError(RobustftError):
    """A write ran out of disk space; the message names the file, the space it needs and the space left."""


class FileContentError(RobustftError):
    """A file robustft reads is torn (an interrupted write), corrupt, unsafe or not UTF-8; the message names it."""
