"""Reading and writing weight files without executing code from them.

Checkpoints arrive from many places (timm and open_clip releases, DDP training scripts, other
people's runs). A pickle can run arbitrary code when loaded, so pickles are only read through
``torch.load(weights_only=True)``, and robustft writes safetensors only. Every failure becomes a
one-line ``CheckpointError`` that names the file, because the CLI prints exactly that line.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from robustft.errors import CheckpointError
from robustft.files import atomic_write

# Keys under which training scripts nest the weights ({"epoch": 3, "state_dict": {...}, ...}).
_CONTAINER_KEYS = ("state_dict", "model", "module")
# Prefixes added by DistributedDataParallel and torch.compile wrappers.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# How many offending keys a mismatch message lists before "...".
_SHOWN_KEYS = 5


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Load a weights file as a flat ``{name: tensor}`` dict on the CPU.

    ``.safetensors`` files are read directly; anything else goes through
    ``torch.load(weights_only=True)``, which refuses pickles that would need code execution.
    Training-script containers (``{"state_dict": ...}``, ``{"model": ...}``, ``{"module": ...}``)
    are unwrapped and a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix is stripped,
    so checkpoints from common training loops load as-is.

    Raises:
        CheckpointError: the file is missing, unsafe, truncated/corrupt, or not a mapping of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    raw = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)
    return _strip_wrapper_prefix(_as_state_dict(_unwrap(raw), path))


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path, device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: cannot read safetensors file, truncated or corrupt ({error})") from error


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise CheckpointError(
                f"{path}: refusing to load: the file is a pickle that needs code execution "
                "(weights_only=True rejected it); convert it to safetensors"
            ) from error
        raise CheckpointError(f"{path}: cannot read checkpoint, truncated or corrupt ({error})") from error
    except Exception as error:  # zip/EOF/key errors from a damaged file, TorchScript archives
        if "TorchScript" in str(error):
            raise CheckpointError(
                f"{path}: is a TorchScript archive (e.g. OpenAI's original CLIP .pt); save its "
                "state_dict() as safetensors in a trusted session, or use the safetensors release"
            ) from error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"{path}: cannot read checkpoint, truncated or corrupt ({type(error).__name__}: {first_line})"
        ) from error


def _unwrap(obj: object) -> object:
    """Descend through container dicts until reaching something that is not one."""
    for _ in range(4):  # containers nest at most a few levels ({"model": {"module": ...}})
        if not isinstance(obj, Mapping) or all(isinstance(v, Tensor) for v in obj.values()):
            return obj
        inner = next((obj[key] for key in _CONTAINER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _as_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: not a state dict: expected a mapping of names to tensors, got a {type(obj).__name__}"
        )
    if not obj:
        raise CheckpointError(f"{path}: not a state dict: it holds no tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"{path}: not a state dict: entry {key!r} is a {type(value).__name__} value, not a tensor"
            )
    return dict(obj)


def _strip_wrapper_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def save_state_dict_file(state: Mapping[str, Tensor], path: str | Path) -> None:
    """Write ``state`` as safetensors atomically: a crash mid-write never leaves a half file at ``path``.

    The data goes to ``<path>.tmp`` in the same directory, is fsynced, then ``os.replace``-d over
    ``path`` (atomic on POSIX and Windows within one filesystem). safetensors rejects
    non-contiguous tensors and tensors that share storage (tied weights, views of a fused qkv),
    so those are packed or cloned first.

    Raises:
        CheckpointError: ``path`` does not end in ``.safetensors`` (the loader picks the format by suffix).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: checkpoints are written as safetensors; use a .safetensors file name")
    tensors = _packed_tensors(state)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def _packed_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors, each owning its storage (safetensors' requirements)."""
    packed: dict[str, Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"save_state_dict_file: entry {key!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen_storages:
            tensor = tensor.clone()
            pointer = tensor.untyped_storage().data_ptr()
        seen_storages.add(pointer)
        packed[key] = tensor
    return packed


def load_state_dict_strict(module: nn.Module, state: Mapping[str, Tensor], path: str | Path, what: str) -> None:
    """Load ``state`` into ``module`` only if every key and shape matches; the module is untouched otherwise.

    ``nn.Module.load_state_dict`` reports every mismatch in one multi-kilobyte message; this names
    the file, the model (``what``) and the first few missing/unexpected keys and shape mismatches,
    which is what tells a user they picked the wrong architecture or checkpoint.

    Raises:
        CheckpointError: the checkpoint does not match the module.
    """
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = [
        _describe(name, keys)
        for name, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (checkpoint vs model)", mismatched),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(f"{path}: does not match {what}: " + "; ".join(problems))
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as error:  # a module's own load hooks can still object
        raise CheckpointError(f"{path}: does not match {what}: {str(error).splitlines()[0]}") from error


def _describe(name: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS]) + (", ..." if len(keys) > _SHOWN_KEYS else "")
    return f"{len(keys)} {name} ({shown})"
