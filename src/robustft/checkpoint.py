"""Training checkpoints: atomic writes, and loading that never executes code.

A training checkpoint holds tensors and plain Python values only (model, optimiser and scheduler
state, RNG states, data position, method state), saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``. Writes go to a temporary file in the same directory, are
fsynced and then renamed over the old file, so a run killed at any moment leaves either the old
or the new checkpoint, never a torn one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from robustft.backbones.checkpoint_files import load_torch_file
from robustft.errors import CheckpointError
from robustft.files import atomic_write


def save_training_state(state: dict[str, Any], path: Path) -> Path:
    """Atomic ``torch.save``; a full disk is one OutOfSpaceError naming the checkpoint and its size."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp), size_hint=tensor_bytes(state))


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a nested state (what a checkpoint of it needs on disk, to within its headers)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(item) for item in value)
    return 0


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
    state = load_torch_file(path)  # unsafe pickles refused; zip, EOF and key errors of a torn file: corrupt
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: corrupt: not a robustft training checkpoint (a {type(state).__name__})")
    return state
