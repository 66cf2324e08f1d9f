"""``train.strategy: fsdp``: 2 gloo processes training an FSDP2-sharded model reach the 1-process weights, a
sharded run's checkpoint resumes on another number of processes, and methods that cannot shard say why.

Tolerance (measured, docs/distributed.md): with SGD the 2-process sharded weights match 1 process to within
1e-5 (the reduce-scatter adds the two ranks' gradients in another order than one process's backward does).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from posthoc_support import quiet, write_shapes_dataset
from robustft import distributed
from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.config import parse_config
from robustft.errors import ConfigError
from robustft.runner import FINAL_CHECKPOINT, fit

SOURCE = Path(__file__).resolve().parents[1] / "src"
TOLERANCE = 1e-5


def raw_config(root: Path, name: str, method: str = "finetune", **train) -> dict:
    return {
        "name": name,
        "output_dir": str(root / "runs"),
        "data": _data(root),
        "method": {"name": method},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"steps": 6, "progress": False, "checkpoint_every": 3, "log_every": 1, "device": "cpu"}
        | {"strategy": "fsdp", **train},
    }


def _data(root: Path) -> dict:
    return {
        "benchmark": None,
        "root": str(root / "data"),
        "splits": {"train": "train", "id_val": "val", "id_test": "test", "ood_dark": "dark.csv"},
        "batch_size": 8,
    }


def torchrun(config: dict, root: Path, resume: bool = False) -> None:
    path = root / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{SOURCE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = [sys.executable, "-m", "robustft", "fit", str(path), "--devices", "2", *(["--resume"] if resume else [])]
    process = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "train.strategy=fsdp: 6 blocks and the root sharded over 2" in process.stdout + process.stderr


def single(config: dict, resume: bool = False) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(parse_config(config), resume=resume, log=quiet)
    finally:
        torch.set_num_threads(threads)


def max_difference(one: Path, two: Path) -> float:
    a, b = load_state_dict_file(one / FINAL_CHECKPOINT), load_state_dict_file(two / FINAL_CHECKPOINT)
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def test_two_sharded_processes_match_one_and_resume_on_one(tmp_path):
    """2-process FSDP2 vs 1 process; then a 2-process run stopped at step 3 and resumed by 1 process."""
    write_shapes_dataset(tmp_path / "data")
    single(raw_config(tmp_path, "one"))
    torchrun(raw_config(tmp_path, "two"), tmp_path)
    runs = tmp_path / "runs"
    difference = max_difference(runs / "one", runs / "two")
    print(f"fsdp 2 vs 1 process, max abs weight difference: {difference:.3g}")
    assert difference < TOLERANCE
    start = load_state_dict_file(runs / "one" / FINAL_CHECKPOINT)
    assert any(not torch.equal(start[key], load_state_dict_file(runs / "two" / FINAL_CHECKPOINT)[key]) for key in start)
    torchrun(raw_config(tmp_path, "switch", stop_after=3), tmp_path)  # sharded over 2, checkpoint at step 3
    single(raw_config(tmp_path, "switch"), resume=True)  # consolidated checkpoint, scattered into 1 process
    switched = max_difference(runs / "one", runs / "switch")
    print(f"fsdp 2 processes to step 3, resumed on 1: max abs weight difference {switched:.3g}")
    assert switched < TOLERANCE


def test_blocks_become_sharding_units():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)]))
    units = distributed.sharding_units(model)
    assert units == list(model[1])


@pytest.mark.parametrize("method", sorted(distributed.UNSHARDABLE_REASONS))
def test_a_method_that_cannot_shard_is_refused_with_its_reason(method):
    with pytest.raises(ConfigError, match=rf"train.strategy=fsdp: method {method} cannot train sharded \(.+\); use"):
        distributed.check_strategy("fsdp", method)
    distributed.check_strategy("ddp", method)
