"""Training checkpoints: atomic writes, and loading that never executes code.

A training checkpoint holds tensors and plain Python values only (model, optimiser and scheduler
state, RNG states, data position, method state), saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``. Writes go to a temporary file in the same directory, are
fsynced and then renamed over the old file, so a run killed at any moment leaves either the old
or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from robustft.errors import CheckpointError
from robustft.files import atomic_write


def save_training_state(state: dict[str, Any], path: Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete temporary files a killed writer left beside ``path`` (``atomic_write``'s ``.<name>.tmp-<pid>``).

    Called when a run resumes, when no writer of this run is alive; returns what was removed.
    """
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.tmp-*"))
    for leftover in stale:
        leftover.unlink(missing_ok=True)
    return stale


def load_training_state(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).splitlines()[0] if str(error) else "unsafe pickle"
        raise CheckpointError(f"{path}: refusing to load: not a plain-tensor checkpoint ({first})") from None
    except Exception as error:  # zip, EOF and key errors of a torn or foreign file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first})") from None
