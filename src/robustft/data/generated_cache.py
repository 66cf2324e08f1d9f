"""An on-disk cache for generated data sets: a generator's tensors, regenerated only when its code changes.

A built-in benchmark is drawn by code (fonts, strokes, styles), which costs seconds in every process that
loads it: each job of a ``--launcher submitit`` comparison, each rank under torchrun. ``cached_tensors``
stores the tensors a generator returns as one safetensors file (loading it executes no code) keyed by the
generator's qualified name, its arguments, a hash of the source file that defines it and the versions of torch
and of the packages it draws from, so editing the generator (a new version of the benchmark) or upgrading a font
or data package misses the cache instead of serving stale data; no version number has to be kept in step by hand.

Where: ``$ROBUSTFT_CACHE_DIR/generated`` (default ``$XDG_CACHE_HOME/robustft`` or ``~/.cache/robustft``);
``ROBUSTFT_CACHE_DIR=off`` turns caching off. A file that cannot be read back (torn, truncated, another
format) is regenerated and rewritten; writes are atomic, so concurrent jobs at worst generate twice.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from robustft.errors import RobustftError
from robustft.files import atomic_write

CACHE_ENVIRONMENT = "ROBUSTFT_CACHE_DIR"
# The structure of the returned value, as stored next to the tensors.
_NESTED = "robustft.generated_cache.layout"


def cache_directory() -> Path | None:
    """Where generated data is cached, or None when ``ROBUSTFT_CACHE_DIR=off``."""
    configured = os.environ.get(CACHE_ENVIRONMENT)
    if configured is not None:
        return None if configured.strip().lower() in ("off", "none", "0", "") else Path(configured) / "generated"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "robustft" / "generated"


def cache_key(
    generator: Callable[..., Any], args: tuple, kwargs: dict[str, Any], packages: tuple[str, ...] = ()
) -> str:
    """``<qualified name>-<hash>`` of the generator's source file, its arguments and the package versions: a new
    key whenever any of them changes."""
    import torch

    source = Path(inspect.getsourcefile(generator) or "").read_bytes()
    digest = hashlib.sha256(source)
    versions = [torch.__version__, *(_version(package) for package in packages)]
    digest.update(json.dumps([list(args), sorted(kwargs.items()), versions], default=repr).encode())
    return f"{generator.__module__}.{generator.__qualname__}-{digest.hexdigest()[:16]}"


def cached_tensors(generator: Callable[..., Any], packages: tuple[str, ...] = ()) -> Callable[..., Any]:
    """Wrap a generator returning a dict of tensors or of tuples of tensors with the disk cache.

    ``cached_tensors(build_splits, ("scikit-learn",))(seed)`` returns what ``build_splits(seed)`` returns, equal
    bit for bit, from the cache when the same generator ran with the same arguments and package versions before.
    ``packages`` are distribution names whose data or rendering the generator uses.
    """

    @functools.wraps(generator)
    def cached(*args: Any, **kwargs: Any) -> Any:
        directory = cache_directory()
        if directory is None:
            return generator(*args, **kwargs)
        path = directory / f"{cache_key(generator, args, kwargs, packages)}.safetensors"
        stored = _read(path)
        if stored is not None:
            return stored
        value = generator(*args, **kwargs)
        with contextlib.suppress(OSError, RobustftError):  # a read-only or full cache costs the time, not the run
            _write(path, value)
        return value

    return cached


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{package}=={version(package)}"
    except PackageNotFoundError:
        return f"{package} absent"


def _flatten(value: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, int]]:
    tensors, layout = {}, {}
    for name, item in value.items():
        if isinstance(item, Tensor):
            tensors[name], layout[name] = item.contiguous(), -1
        else:
            layout[name] = len(item)
            tensors |= {f"{name}/{index}": part.contiguous() for index, part in enumerate(item)}
    return tensors, layout


def _write(path: Path, value: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors, layout = _flatten(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={_NESTED: json.dumps(layout)}))


def _read(path: Path) -> dict[str, Any] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            layout = json.loads((handle.metadata() or {})[_NESTED])
            return {
                name: handle.get_tensor(name)
                if count == -1
                else tuple(handle.get_tensor(f"{name}/{index}") for index in range(count))
                for name, count in layout.items()
            }
    except Exception:  # torn or foreign file: regenerate (safetensors raises its own error types)
        return None
