"""Every bad input the CLI can meet ends in ONE ``robustft: error:`` line, exit code 2, that names the file and
says what is wrong (torn, corrupt, unsafe, incompatible, ...), and leaves every byte on disk as it was.

One row per case: how to make the input, the command, and a fragment the line must hold. The tree under the
test's directory (a finished run, the configs, the bad files) is snapshotted before and compared after.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from bad_input_support import cli_error, tree_bytes, write_config
from robustft.backbones.builtin import DIGITS_VIT_CHECKPOINT
from robustft.demo import demo_config
from robustft.runner import fit

PYTHON_TAG = "!!python/object/apply:os.system [touch pwned]"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_prepared) -> Path:
    out = tmp_path_factory.mktemp("finished")
    config = demo_config("zeroshot", 0, out, name="zs", progress=False, device="cpu")
    fit(config, log=lambda message: None, prepared=digits_prepared)
    return out / "zs"


class Case:
    """A row: ``make(tmp_path, run_dir)`` writes the bad input and returns the command's arguments."""

    def __init__(self, make: Callable[[Path, Path], list[str]], fragment: str, needs: str | None = None) -> None:
        self.make, self.fragment, self.needs = make, fragment, needs


def config(tmp: Path, **train) -> str:
    return str(write_config(tmp, "run", **train))


def folders(tmp: Path, classes: dict[str, int]) -> dict[str, str]:
    from PIL import Image

    splits = {}
    for split in ("train", "id_val", "id_test", "ood_test"):
        for name, count in classes.items():
            folder = tmp / "data" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count if split == "train" else 2):
                Image.new("RGB", (8, 8), (60 * index, 0, 0)).save(folder / f"{index}.png")
        splits[split] = str(tmp / "data" / split)
    return splits


def folder_config(tmp: Path, class_names: list[str], classes: dict[str, int]) -> str:
    raw = yaml.safe_load(Path(config(tmp)).read_text())
    raw["data"] |= {"benchmark": None, "splits": folders(tmp, classes), "class_names": class_names}
    raw["model"]["zero_shot_head"] = "prototypes"
    (tmp / "folders.yaml").write_text(yaml.safe_dump(raw))
    return str(tmp / "folders.yaml")


def saft_config(tmp: Path, selection: Path) -> str:
    raw = yaml.safe_load(Path(config(tmp)).read_text())
    raw["method"] = {"name": "saft", "selection_path": str(selection)}
    (tmp / "saft.yaml").write_text(yaml.safe_dump(raw))
    return str(tmp / "saft.yaml")


def selection(tmp: Path, index: torch.Tensor, name: str = "head.weight") -> Path:
    save_file({name: index}, tmp / "selection.safetensors")
    return tmp / "selection.safetensors"


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def unsafe_pickle(tmp: Path) -> Path:
    path = tmp / "selection.pt"
    path.write_bytes(pickle.dumps({"head.weight": Payload()}, protocol=2))  # torch.save's protocol
    return path


def truncated(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def torn_inside_a_key(path: Path) -> Path:
    """What a write killed mid-way leaves: the text stops inside a key (a half key is not YAML)."""
    text = path.read_text()
    path.write_text(text[: text.index("log_every") + 5])
    return path


def typo_splits(tmp: Path) -> list[str]:
    return [f"{split}: {tmp / 'typo' / split}" for split in ("train", "id_val", "id_test")]


def tagged_run(run_dir: Path) -> Path:
    path = run_dir / "config.yaml"
    path.write_text(path.read_text().replace("name: zs", f"name: {PYTHON_TAG}"))
    return run_dir


def backbone(tmp: Path, change: Callable[[torch.Tensor], torch.Tensor]) -> str:
    import robustft.backbones.builtin as builtin

    weights = load_file(Path(builtin.__file__).parents[1] / "assets" / DIGITS_VIT_CHECKPOINT)
    save_file({key: change(value) for key, value in weights.items()}, tmp / "backbone.safetensors")
    return str(tmp / "backbone.safetensors")


def with_nan(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = float("nan")
    return tensor


def unfinished(tmp: Path, run_dir: Path) -> str:
    """``run_dir`` turned into an interrupted finetune run of ``tmp/run.yaml`` (no results.json)."""
    path = config(tmp, steps=3)
    target = tmp / "run"
    shutil.copytree(run_dir, target, dirs_exist_ok=True)
    (target / "results.json").unlink()
    return path


def torn_checkpoint(tmp: Path, run_dir: Path) -> list[str]:
    path = unfinished(tmp, run_dir)
    checkpoint = tmp / "run" / "checkpoints" / "last.pt"
    torch.save({"step": 2, "weights": torch.zeros(1000)}, checkpoint)
    truncated(checkpoint)
    return ["fit", path, "--resume"]


def corrupt_metrics(tmp: Path, run_dir: Path) -> list[str]:
    path = unfinished(tmp, run_dir)
    (tmp / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    return ["fit", path, "--resume"]


def torn_compare_config(tmp: Path, run_dir: Path) -> list[str]:
    path = config(tmp)
    seed_dir = tmp / "comparison" / "seed0" / "zeroshot"
    seed_dir.mkdir(parents=True)
    torn_inside_a_key(Path(shutil.copy(run_dir / "config.yaml", seed_dir / "config.yaml")))
    return ["compare", path, "--methods", "zeroshot", "--out", str(tmp / "comparison")]


def read_only_output(tmp: Path) -> str:
    folder = tmp / "read_only"
    folder.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: a read-only filesystem instead
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], check=False)
        if mounted.returncode != 0:
            pytest.skip("root, and mounting a read-only tmpfs is not allowed here")
    else:
        folder.chmod(0o555)
    return str(folder)


CASES = {
    "set-invalid-yaml": Case(lambda t, r: ["fit", config(t), "--set", "optim.lr=[1"], "not valid YAML, torn or"),
    "set-python-tag": Case(lambda t, r: ["fit", config(t), "--set", f"name={PYTHON_TAG}"], "unsafe YAML: tag !!python"),
    "config-python-tag": Case(
        lambda t, r: ["fit", str(Path(config(t)).write_text(f"name: {PYTHON_TAG}\n") and t / "run.yaml")],
        "run.yaml: unsafe YAML",
    ),
    "config-not-utf8": Case(
        lambda t, r: ["fit", str(Path(config(t)).write_bytes(b"name: caf\xe9\n") and t / "run.yaml")],
        "run.yaml: corrupt or not UTF-8 text (byte 0xe9 at offset 9)",
    ),
    "config-torn": Case(lambda t, r: ["fit", str(torn_inside_a_key(Path(config(t))))], "run.yaml: not valid YAML"),
    "device-tpu0": Case(lambda t, r: ["fit", config(t), "--set", "train.device=tpu0"], "unknown device 'tpu0'"),
    "device-cuda-without-gpu": Case(
        lambda t, r: ["fit", config(t), "--set", "train.device=cuda"], "no CUDA GPU is visible", "no-gpu"
    ),
    "seed-2**70": Case(lambda t, r: ["fit", config(t), "--set", f"seed={2**70}"], "seed: Input should be less than"),
    "output-under-a-file": Case(
        lambda t, r: ["fit", config(t), "--set", f"output_dir={(t / 'file').touch() or t / 'file' / 'sub'}"],
        "is a file, not a folder",
    ),
    "output-read-only": Case(
        lambda t, r: ["fit", config(t), "--set", f"output_dir={read_only_output(t)}"], "is read-only"
    ),
    "empty-class-folder": Case(
        lambda t, r: ["fit", folder_config(t, ["a", "b", "c"], {"a": 3, "b": 3, "c": 0})],
        "the train split has no example of class 'c'",
    ),
    "more-class-names-than-folders": Case(
        lambda t, r: ["fit", folder_config(t, ["a", "b", "c"], {"a": 3, "b": 3})],
        "the train split has no example of class 'c'",
    ),
    "saft-selection-unsafe-pickle": Case(
        lambda t, r: ["fit", saft_config(t, unsafe_pickle(t))], "selection.pt: refusing to load: the file is a pickle"
    ),
    "saft-selection-truncated": Case(
        lambda t, r: ["fit", saft_config(t, truncated(selection(t, torch.arange(100))))],
        "selection.safetensors: cannot read safetensors file, truncated or corrupt",
    ),
    "saft-selection-float": Case(
        lambda t, r: ["fit", saft_config(t, selection(t, torch.tensor([1.5, 2.0])))], "are torch.float32, expected int"
    ),
    "saft-selection-negative": Case(
        lambda t, r: ["fit", saft_config(t, selection(t, torch.tensor([-3, 1])))], "out of range: -3..1"
    ),
    "saft-selection-duplicate": Case(
        lambda t, r: ["fit", saft_config(t, selection(t, torch.tensor([1, 1, 2])))], "repeat an index (1 duplicates)"
    ),
    "saft-selection-2d": Case(
        lambda t, r: ["fit", saft_config(t, selection(t, torch.tensor([[1, 2]])))], "expected one dimension"
    ),
    "backbone-cast-to-int64": Case(
        lambda t, r: ["fit", config(t), "--set", f"model.checkpoint={backbone(t, lambda w: w.long())}"],
        "dtype mismatches, floating vs integer",
    ),
    "backbone-with-nan": Case(
        lambda t, r: ["fit", config(t), "--set", f"model.checkpoint={backbone(t, with_nan)}"], "hold NaN or inf"
    ),
    "wise-python-tag": Case(lambda t, r: ["wise", str(tagged_run(r)), "--out", str(t / "wise")], "unsafe YAML"),
    "soup-python-tag": Case(lambda t, r: ["soup", str(tagged_run(r).parent)], "config.yaml: unsafe YAML"),
    "evaluate-torn-results": Case(
        lambda t, r: ["evaluate", str(truncated(r / "results.json").parent)], "results.json: torn JSON"
    ),
    "evaluate-corrupt-results": Case(
        lambda t, r: ["evaluate", str((r / "results.json").write_text('{"methods": x}') and r)], "corrupt JSON"
    ),
    "resume-torn-checkpoint": Case(torn_checkpoint, "last.pt: corrupt or truncated checkpoint"),
    "resume-corrupt-metrics": Case(corrupt_metrics, "metrics.jsonl: corrupt JSON lines: line 2"),
    "compare-torn-config": Case(torn_compare_config, "zeroshot/config.yaml: not valid YAML, torn or corrupt"),
    "fit-over-a-finished-run": Case(
        lambda t, r: ["fit", config(t), "--set", f"output_dir={r.parent}", "--set", "name=zs"],
        "holds a finished run (results.json); refusing to overwrite it",
    ),
    "overwrite-with-a-typo-in-a-split-path": Case(
        lambda t, r: [
            "fit",
            config(t),
            *("--set", f"output_dir={r.parent}", "--set", "name=zs", "--overwrite"),
            *("--set", "data.benchmark=null", "--set", f"data.splits={{{', '.join(typo_splits(t))}}}"),
        ],
        "typo",
    ),
    "resume-finished-with-another-config": Case(
        lambda t, r: ["fit", str(r / "config.yaml"), "--resume", "--set", "optim.lr=1e6", "--set", "seed=3"],
        "--resume of a finished run with a different config (seed: 0 there, 3 now; optim.lr: 0.0003 there, 1000000.0",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path, finished_run, monkeypatch, capsys):
    if case.needs == "no-gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    run_dir = Path(shutil.copytree(finished_run, tmp_path / "runs" / "zs"))
    work = tmp_path / "work"
    work.mkdir()
    arguments = case.make(work, run_dir)
    monkeypatch.chdir(work)
    before = tree_bytes(tmp_path)
    try:
        line = cli_error(monkeypatch, capsys, *arguments)
    finally:
        for mount in [work / "read_only"] if (work / "read_only").is_mount() else []:
            subprocess.run(["umount", str(mount)], check=True)
    assert case.fragment in line, line
    assert tree_bytes(tmp_path) == before
    assert not (work / "pwned").exists()
