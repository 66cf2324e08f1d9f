"""Atomic file writes: a run killed at any moment leaves the old file or the new one, never a torn one.

A write that runs out of disk space becomes one ``OutOfSpaceError`` naming the file, the space it
needs and the space left, and leaves the old file in place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustft.errors import OutOfSpaceError

# errno values of a full disk, an exhausted quota, and a file-size limit (RLIMIT_FSIZE, ulimit -f).
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# What torch.save's zip writer (PyTorchStreamWriter, inline_container.cc) raises when a write fails.
_TORCH_WRITE_FAILURES = ("inline_container", "file write failed", "PytorchStreamWriter failed writing")


def is_out_of_space(error: BaseException) -> bool:
    """Whether ``error`` is a failed write for lack of space (an OSError, or torch's zip-writer RuntimeError)."""
    if isinstance(error, OSError):
        return error.errno in _NO_SPACE_ERRNOS
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _TORCH_WRITE_FAILURES)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def out_of_space_error(path: Path, needed: int | None, error: BaseException) -> OutOfSpaceError:
    """One line: the file, the bytes it needs (when known) and the bytes free on its filesystem."""
    try:
        free = human_bytes(shutil.disk_usage(path.parent).free)
    except OSError:
        free = "unknown"
    need = f"needs about {human_bytes(needed)}" if needed else "needs more space"
    reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else str(error).splitlines()[0]
    return OutOfSpaceError(
        f"{path}: out of space: writing it {need}, {free} free on its filesystem ({reason}); "
        "free some space and run the command again (the previous file, if any, is unchanged)"
    )


def atomic_write(path: str | Path, write: Callable[[Path], None], size_hint: int | None = None) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The rename is atomic within one filesystem (POSIX and Windows); fsyncing the directory makes
    the rename itself durable. ``size_hint`` (bytes) is what an out-of-space message says is needed.

    Raises:
        OutOfSpaceError: the disk (or quota, or file-size limit) ran out; ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        if is_out_of_space(error):
            tmp.unlink(missing_ok=True)  # first: the free space reported is what the user has without it
            raise out_of_space_error(path, size_hint, error) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    if os.name == "posix":
        descriptor = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) written atomically to ``path``."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), size_hint=len(data))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    """``value`` as indented JSON, written atomically."""
    return atomic_write_text(path, json.dumps(value, indent=2))
