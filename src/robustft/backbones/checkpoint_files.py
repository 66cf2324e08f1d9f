"""Reading and writing weight files without executing code from them.

Checkpoints arrive from many places (timm and open_clip releases, DDP training scripts, other
people's runs). A pickle can run arbitrary code when loaded, so pickles are only read through
``torch.load(weights_only=True)``, and robustft writes safetensors only. Every failure becomes a
one-line ``CheckpointError`` that names the file, because the CLI prints exactly that line.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from robustft.errors import CheckpointError, ConfigError
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
    return load_torch_file(path)


def load_torch_file(path: Path) -> object:
    """``torch.load(weights_only=True)`` on the CPU; any failure one CheckpointError, and no warning lines
    (torch warns about a pickle protocol it does not expect before it refuses the file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise load_failure(path, error) from None


def load_failure(path: Path, error: Exception) -> CheckpointError:
    """One line for a failed ``torch.load(weights_only=True)``: *unsafe* only when the file asks for a Python
    object (a pickle GLOBAL that weights_only refused); a truncated or damaged file is *corrupt*.

    torch wraps every failure of its weights-only unpickler in one UnpicklingError, torn files included,
    so the kind is read from the message.
    """
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and ("GLOBAL" in text or "Unsupported global" in text):
        refused = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "global" in line), "")
        return CheckpointError(
            f"{path}: refusing to load: the file is a pickle that needs code execution, unsafe ({refused}; "
            "weights_only=True rejected it); convert it to safetensors in a trusted session"
        )
    if "TorchScript" in text:
        return CheckpointError(
            f"{path}: is a TorchScript archive (e.g. OpenAI's original CLIP .pt); save its "
            "state_dict() as safetensors in a trusted session, or use the safetensors release"
        )
    detail = text.split("compatible with your use case: ")[-1].split("Check the documentation of torch.load")[0]
    first_line = " ".join(detail.split()) or type(error).__name__  # the unpickler's own reason, on one line
    return CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(error).__name__}: {first_line[:200]})")


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


def save_state_dict_file(
    state: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``state`` as safetensors atomically: a crash mid-write never leaves a half file at ``path``.

    ``metadata`` (strings) goes into the header beside ``format: pt`` (``robustft.run_metadata``).

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
    header = {**(metadata or {}), "format": "pt"}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


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
    kinds = [
        f"{key} {state[key].dtype} vs {value.dtype}"
        for key, value in expected.items()
        if key in state and state[key].dtype.is_floating_point != value.dtype.is_floating_point
    ]
    problems = [
        _describe(name, keys)
        for name, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (checkpoint vs model)", mismatched),
            ("dtype mismatches, floating vs integer (checkpoint vs model)", kinds),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(f"{path}: does not match {what}: " + "; ".join(problems) + " (incompatible checkpoint)")
    check_finite(state, [name for name, _ in module.named_parameters()], path)
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as error:  # a module's own load hooks can still object
        raise CheckpointError(
            f"{path}: does not match {what}: {str(error).splitlines()[0]} (incompatible checkpoint)"
        ) from error


def check_finite(state: Mapping[str, Tensor], names: list[str], path: str | Path) -> None:
    """Refuse weights holding NaN or inf: a model loaded from them predicts nothing (one reduction per tensor,
    one host sync for all)."""
    floating = [name for name in names if name in state and state[name].is_floating_point()]
    if not floating:
        return
    finite = torch.stack([torch.isfinite(state[name]).all() for name in floating]).tolist()
    bad = [name for name, ok in zip(floating, finite, strict=True) if not ok]
    if bad:
        raise CheckpointError(f"{path}: corrupt: {_describe('weight tensors hold NaN or inf', bad)}")


def load_index_file(path: str | Path, sizes: Mapping[str, int], key: str) -> dict[str, Tensor]:
    """A file of index tensors (a SAFT selection): ``{name: 1-D integer indices into a tensor of sizes[name]}``.

    Each must be integer (not float or bool), one-dimensional, in ``[0, size)`` and without repeats: a
    negative index would address the tensor from its end, and a float one cannot index at all.

    Raises:
        ConfigError: naming ``key`` (the config key that points at the file), the file and the bad tensor.
    """
    try:
        indices = load_state_dict_file(path)
    except CheckpointError as error:
        raise ConfigError(f"{key}: {error}") from None
    for name, index in indices.items():
        where = f"{key}: {path}: indices of {name!r}"
        if name not in sizes:
            raise ConfigError(f"{key}: {path} selects from {name!r}, which this model lacks")
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise ConfigError(f"{where} are {index.dtype}, expected integers")
        if index.ndim != 1:
            raise ConfigError(f"{where} have shape {tuple(index.shape)}, expected one dimension")
        if index.numel() == 0:
            continue
        low, high = index.aminmax()
        if int(low) < 0 or int(high) >= sizes[name]:
            raise ConfigError(f"{where} out of range: {int(low)}..{int(high)}, the tensor has {sizes[name]} entries")
        if index.unique().numel() != index.numel():
            raise ConfigError(f"{where} repeat an index ({index.numel() - index.unique().numel()} duplicates)")
    return indices


def _describe(name: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS]) + (", ..." if len(keys) > _SHOWN_KEYS else "")
    return f"{len(keys)} {name} ({shown})"
