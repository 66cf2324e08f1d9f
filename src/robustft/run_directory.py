"""A run directory that later commands cannot damage: an advisory lock, the finished-run check, and
the comparison of a run's saved config with the one a command would run.

``fit`` validates its whole config and data first, then takes the directory's lock (``fcntl.flock``
on ``<run_dir>/.lock``: the kernel drops it when the holder dies, so a killed run never leaves a
stale lock), then refuses a finished run unless told to overwrite it, and only then writes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from robustft.errors import RunDirectoryError
from robustft.layout import RESULTS_FILE

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per run directory is then the user's job
    fcntl = None

LOCK_FILE = ".lock"
# Keys whose change does not make a finished run another run: where it lives and how it reports progress.
IGNORED_KEYS = frozenset({"name", "output_dir", "train.progress", "train.stop_after"})
# Config keys holding file paths, compared after resolving (a relative and an absolute path to one file are equal).
PATH_KEYS = frozenset(
    {
        "output_dir",
        "model.checkpoint",
        "data.root",
        "data.protocol.root",
        "method.selection_path",
        "method.finetuned_run",
    }
)
PATH_PREFIXES = ("data.splits.", "data.expected.", "method.ingredients")


def is_finished(run_dir: Path) -> bool:
    """A finished run has its results.json (written last, atomically, after the final checkpoint)."""
    return (Path(run_dir) / RESULTS_FILE).is_file()


def check_writable_location(run_dir: Path) -> None:
    """Refuse, before anything is written, a run directory under a file or on a read-only filesystem."""
    run_dir = Path(run_dir)
    existing = run_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise RunDirectoryError(f"{run_dir}: cannot create the run directory: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only_filesystem(existing):
        raise RunDirectoryError(f"{run_dir}: cannot write the run directory: {existing} is read-only")


def _read_only_filesystem(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):
        return False


def make_run_directory(run_dir: Path) -> Path | None:
    """Create ``run_dir`` (and its missing parents); the topmost folder created now, None if it existed.

    An OSError becomes one line naming the directory.
    """
    run_dir = Path(run_dir)
    top = None
    for folder in (run_dir, *run_dir.parents):
        if folder.is_dir():
            break
        top = folder
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirectoryError(f"{run_dir}: cannot create the run directory ({error.strerror or error})") from None
    return top


@contextmanager
def removed_on_failure(created: Path | None) -> Iterator[None]:
    """Remove the folders ``make_run_directory`` created when the run fails before it starts: a bad input
    (a selection file, a method option checked in setup) leaves nothing behind."""
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


class RunLock:
    """Exclusive advisory lock on a run directory; a second holder fails at once, naming the first.

    The holder's pid, host, command and start time are written into the lock file after it is
    taken, so the refusal can say who holds it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.descriptor: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        if fcntl is None:
            return
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirectoryError(f"{self.path}: cannot open the run's lock file ({error.strerror})") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirectoryError(f"{self.path}: cannot lock the run directory ({error.strerror})") from None
            raise RunDirectoryError(
                f"{self.run_dir}: in use by another robustft process ({self.holder()}); wait for it to end, "
                "or write this run under another name"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
        holder["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
        self.descriptor = descriptor

    def holder(self) -> str:
        """Who holds the lock, from its file: ``pid 123 on host h (command: robustft fit ...)``."""
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on host {info['host']}, since {info['started']} (command: {info['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder not yet recorded"

    def release(self) -> None:
        if self.descriptor is not None:
            fcntl.flock(self.descriptor, fcntl.LOCK_UN)
            os.close(self.descriptor)
            self.descriptor = None


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat |= flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _is_path_key(key: str) -> bool:
    return key in PATH_KEYS or key.startswith(PATH_PREFIXES)


def _resolved(value: Any) -> Any:
    if isinstance(value, str) and value:
        return str(Path(value).expanduser().resolve())
    if isinstance(value, list):
        return [_resolved(item) for item in value]
    return value


def normalised_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A config as flat dotted keys with every path resolved: two spellings of one run compare equal."""
    return {key: _resolved(value) if _is_path_key(key) else value for key, value in flatten(raw).items()}


def config_differences(
    planned: dict[str, Any], saved: dict[str, Any], ignored: frozenset[str] = IGNORED_KEYS
) -> list[str]:
    """``key: saved there, planned here`` for each key both configs set to different values (paths resolved).

    Keys only one side has are skipped: options added to robustft after the run was made.
    """
    ours, theirs = normalised_config(planned), normalised_config(saved)
    return [
        f"{key}: {theirs[key]!r} there, {ours[key]!r} now"
        for key in ours
        if key in theirs and key not in ignored and ours[key] != theirs[key]
    ]
