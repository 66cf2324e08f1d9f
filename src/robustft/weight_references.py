"""Lean final checkpoints: a run that trains nothing references the weights it was built from instead of copying them.

A zero-shot run's predictor is its freshly built model; an output ensemble or VRF predictor holds that model
and a finished fine-tuning run's predictor. Writing those tensors again would copy whole models into every such
run directory. ``save_final_checkpoint`` writes only the tensors no source holds, and a sidecar
``final.references.json`` saying where the others come from, with a content hash of each part:

- ``initial``: the run's freshly built model (``model:`` section), rebuilt by whoever loads the run;
- ``run``: another run's final checkpoint, by its path relative to this run directory (a comparison folder
  can be moved as a whole).

``load_final_state`` puts them back together; a missing or changed source is one ``CheckpointError`` naming it.
A tensor is referenced only when it is bit-equal to its source, so what is loaded is what was evaluated.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustft.backbones.checkpoint_files import load_state_dict_file, save_state_dict_file
from robustft.errors import CheckpointError
from robustft.files import atomic_write
from robustft.layout import FINAL_CHECKPOINT

REFERENCES_SUFFIX = ".references.json"
INITIAL = "initial"
# A post-hoc run over a post-hoc run over ...: deeper chains than this are a loop.
_MAX_DEPTH = 8


def references_path(checkpoint: Path) -> Path:
    """``checkpoints/final.safetensors`` -> ``checkpoints/final.references.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + REFERENCES_SUFFIX)


def content_hash(state: Mapping[str, Tensor], keys: Sequence[str]) -> str:
    """SHA-256 over ``keys`` (in order) with each tensor's dtype, shape and bytes."""
    digest = hashlib.sha256()
    for key in keys:
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _equal_under(
    state: Mapping[str, Tensor], prefix: str, source: Mapping[str, Tensor], source_prefix: str = ""
) -> list[str] | None:
    """The keys of ``state`` under ``prefix`` if they are exactly ``source``'s keys under ``source_prefix``
    (prefixes swapped), with bit-equal tensors."""
    keys = [key for key in state if key.startswith(prefix)]
    theirs_keys = [key for key in source if key.startswith(source_prefix)]
    if not keys or len(keys) != len(theirs_keys):
        return None
    for key in keys:
        theirs = source.get(source_prefix + key[len(prefix) :])
        mine = state[key]
        if theirs is None or theirs.dtype != mine.dtype or theirs.shape != mine.shape:
            return None
        if not torch.equal(theirs.detach().cpu(), mine.detach().cpu()):
            return None
    return keys


def save_final_checkpoint(
    state: Mapping[str, Tensor],
    checkpoint: Path,
    initial: Mapping[str, Tensor] | None = None,
    input_runs: Sequence[Path] = (),
    metadata: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Write ``state`` to ``checkpoint``, referencing the parts equal to ``initial`` or an input run's final weights.

    An input run's final weights may be referenced whole or as a top-level module (``finetuned.``); input runs
    that are lean themselves are not, so references never chain. Of ``initial`` only backbones are
    referenced (``backbone.``, ``zero_shot.backbone.``): they are read from files and come back bit-equal,
    whereas a zero-shot head is computed by forward passes, whose last bits may differ on another device, so
    heads (a few KiB) are always written. Input runs are loaded one at a time. Returns the bytes written
    and the bytes referenced.
    """
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent
    modules = ["", *dict.fromkeys(key.split(".", 1)[0] + "." for key in state if "." in key)]
    backbones = list(dict.fromkeys(key[: key.index("backbone.") + 9] for key in state if "backbone." in key))
    references: list[dict[str, Any]] = []
    covered: set[str] = set()

    def reference(description: dict[str, Any], source: Mapping[str, Tensor], pairs: list[tuple[str, str]]) -> None:
        for prefix, source_prefix in pairs:
            if any(key.startswith(prefix) or prefix.startswith(key) for key in covered):
                continue
            keys = _equal_under(state, prefix, source, source_prefix)
            if keys is not None:
                digest = content_hash(state, sorted(keys))
                references.append({**description, "prefix": prefix, "source_prefix": source_prefix, "sha256": digest})
                covered.update(keys)

    for run in input_runs:
        source_checkpoint = Path(run) / FINAL_CHECKPOINT
        if references_path(source_checkpoint).is_file():
            continue
        where = os.path.relpath(Path(run).resolve(), run_dir.resolve())
        reference({"source": "run", "run": where}, load_state_dict_file(source_checkpoint), [(m, "") for m in modules])
    if initial is not None:
        reference({"source": INITIAL}, initial, [(prefix, "backbone.") for prefix in backbones])
    own = {key: tensor for key, tensor in state.items() if key not in covered}
    sidecar = references_path(checkpoint)
    if references:
        text = json.dumps({"references": references}, indent=2) + "\n"
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(text))
    else:
        sidecar.unlink(missing_ok=True)
    save_state_dict_file(own, checkpoint, metadata)
    sizes = {key: state[key].numel() * state[key].element_size() for key in state}
    return {"written": sum(sizes[key] for key in own), "referenced": sum(sizes[key] for key in covered)}


def load_final_state(
    checkpoint: Path,
    structure: nn.Module | None = None,
    initial_state: Mapping[str, Tensor] | None = None,
    own: Mapping[str, Tensor] | None = None,
    depth: int = 0,
) -> dict[str, Tensor]:
    """The whole state of a final checkpoint: its own tensors plus every part it references, hash-checked.

    ``structure`` is the module the state will be loaded into, freshly built from the run's config: an
    ``initial`` part at prefix ``p`` is read from its tensors under ``p`` (for a plain model, all of it).
    ``initial_state`` gives those tensors directly (without prefix) where no structure exists yet.
    ``own`` is the checkpoint's tensors when the caller has read them already.

    Raises:
        CheckpointError: a referenced run or checkpoint is missing, its weights changed since this run
            was written, or the run's model is needed and not given.
    """
    checkpoint = Path(checkpoint)
    sidecar = references_path(checkpoint)
    if not sidecar.is_file():
        return dict(own) if own is not None else load_state_dict_file(checkpoint)
    state = dict(own) if own is not None else _own_tensors(checkpoint)
    if depth > _MAX_DEPTH:
        raise CheckpointError(f"{checkpoint}: references form a loop (more than {_MAX_DEPTH} runs deep)")
    from robustft.safe_io import read_json_object

    run_dir = checkpoint.parent.parent
    structure_state = structure.state_dict() if structure is not None else None
    for reference in read_json_object(sidecar).get("references", []):
        prefix, expected = reference.get("prefix", ""), reference.get("sha256")
        if reference.get("source") == "run":
            source_dir = (run_dir / reference["run"]).resolve()
            source_checkpoint = source_dir / FINAL_CHECKPOINT
            if not source_checkpoint.is_file():
                raise CheckpointError(
                    f"{checkpoint}: its weights under '{prefix or '(all)'}' are those of the run {source_dir}, "
                    f"whose {FINAL_CHECKPOINT} is missing (moved or deleted?); restore it or re-run this run "
                    "with --overwrite"
                )
            part = load_final_state(source_checkpoint, initial_state=initial_state, depth=depth + 1)
            what = f"the run {source_dir}"
        else:
            part = _initial_part(checkpoint, prefix, reference.get("source_prefix", ""), structure_state, initial_state)
            what = "this run's model (model: section; its checkpoint file)"
        source_prefix = reference.get("source_prefix", "")
        mapped = {
            prefix + key[len(source_prefix) :]: tensor for key, tensor in part.items() if key.startswith(source_prefix)
        }
        if content_hash(mapped, sorted(mapped)) != expected:
            raise CheckpointError(
                f"{checkpoint}: the weights it references under '{prefix or '(all)'}' in {what} changed since "
                "this run was written (content hash differs); restore them or re-run this run with --overwrite"
            )
        state.update(mapped)
    return state


def _own_tensors(checkpoint: Path) -> dict[str, Tensor]:
    """The tensors a lean checkpoint holds itself (none for a zero-shot run), read as safetensors (no code runs)."""
    from safetensors.torch import load_file

    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    try:
        return load_file(str(checkpoint))
    except Exception as error:  # noqa: BLE001  (safetensors raises its own errors for a torn header)
        raise CheckpointError(f"{checkpoint}: corrupt or truncated checkpoint ({error})") from None


def _initial_part(
    checkpoint: Path,
    prefix: str,
    source_prefix: str,
    structure_state: Mapping[str, Tensor] | None,
    initial_state: Mapping[str, Tensor] | None,
) -> dict[str, Tensor]:
    """The freshly built model's tensors for ``prefix`` (keyed under ``source_prefix``, as the model names them)."""
    if structure_state is not None:
        part = {
            source_prefix + key[len(prefix) :]: value
            for key, value in structure_state.items()
            if key.startswith(prefix)
        }
        if part:
            return part
    if initial_state is not None:
        return dict(initial_state)
    raise CheckpointError(
        f"{checkpoint}: references the run's model, which was not given; load it with robustft evaluate "
        "or the run's method (load_predictor)"
    )
