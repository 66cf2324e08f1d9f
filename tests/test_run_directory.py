"""A run directory cannot be damaged by a later command: the advisory lock (two real processes), the
finished-run refusal, metrics.jsonl after a kill during the very first checkpoint write (a real SIGKILL),
train time across resumes, and writes that run out of space (a tiny tmpfs, or RLIMIT_FSIZE)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bad_input_support import cli_error, metric_steps, tree_bytes, write_config
from robustft.checkpoint import load_training_state
from robustft.config import load_config
from robustft.errors import OutOfSpaceError, RunDirectoryError
from robustft.files import atomic_write_json
from robustft.run_directory import LOCK_FILE, RunLock, config_differences
from robustft.runner import fit


def quiet(message: str) -> None:
    pass


def subprocess_environment() -> dict[str, str]:
    threads = str(torch.get_num_threads())  # same thread count as this process: same float reductions
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def wait_for(condition, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    config = write_config(tmp_path, "run", steps=100_000, checkpoint_every=100_000)
    lock = tmp_path / "run" / LOCK_FILE
    command = [sys.executable, "-m", "robustft", "fit", str(config)]
    first = subprocess.Popen(command, env=subprocess_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: lock.is_file() and f'"pid": {first.pid}' in lock.read_text(), first)
        wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").is_file(), first)
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        second = subprocess.run(command, env=subprocess_environment(), capture_output=True, text=True, timeout=300)
        assert first.poll() is None  # the holder ran on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"run: in use by another robustft process (pid {first.pid} on host " in lines[0]
    assert f"fit {config})" in lines[0]  # the holder's command
    steps = metric_steps(tmp_path / "run")
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved [1, 2, 1, 3, ...]
    with RunLock(tmp_path / "run"):  # the kernel dropped the killed holder's lock
        pass


def test_the_lock_refuses_a_second_holder_in_one_process(tmp_path):
    holder = f"in use by another robustft process \\(pid {os.getpid()} "
    with RunLock(tmp_path), pytest.raises(RunDirectoryError, match=holder):
        RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released on exit
        pass


DYING_SAVE = """
import os, signal, sys, torch
def dies_in_the_write(state, file):
    with open(file, "wb") as handle:
        handle.write(b"PK\\x03\\x04")  # the first bytes of the zip, then the process is killed
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dies_in_the_write
sys.argv = ["robustft", "fit", sys.argv[1]]
from robustft.cli import main
main()
"""


def test_kill_during_the_first_checkpoint_write_then_resume(tmp_path, digits_prepared):
    """SIGKILL inside the first checkpoint write: no last.pt, a torn temporary and metric lines past any
    checkpoint. --resume starts over, removes the temporary, and metrics.jsonl holds each step once."""
    path = write_config(tmp_path, "killed", steps=7, stop_after=6, checkpoint_every=3)
    command = [sys.executable, "-c", DYING_SAVE, str(path)]
    process = subprocess.run(command, env=subprocess_environment(), capture_output=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    checkpoints = tmp_path / "killed" / "checkpoints"
    leftovers = list(checkpoints.glob(".last.pt.tmp-*"))
    assert len(leftovers) == 1 and not (checkpoints / "last.pt").exists()
    assert metric_steps(tmp_path / "killed") == [1, 2, 3]
    config = load_config(path)
    fit(config, resume=True, log=quiet, prepared=digits_prepared)
    assert metric_steps(tmp_path / "killed") == [1, 2, 3, 4, 5, 6]
    assert list(checkpoints.glob(".last.pt.tmp-*")) == []
    reference = config.model_copy(update={"name": "reference"})
    fit(reference, log=quiet, prepared=digits_prepared)
    resumed, uninterrupted = (
        load_training_state(checkpoints / "last.pt"),
        load_training_state(tmp_path / "reference" / "checkpoints" / "last.pt"),
    )
    assert resumed["step"] == uninterrupted["step"] == 6
    assert all(torch.equal(value, uninterrupted["model"][key]) for key, value in resumed["model"].items())


def test_a_finished_run_is_never_changed_by_fit(tmp_path, digits_prepared, monkeypatch, capsys):
    """Stop, resume over a torn metrics line (train time adds up), then every later fit: refused, a no-op
    resume, a refused resume with another config naming its keys; --overwrite starts metrics afresh."""
    path = write_config(tmp_path, "run", steps=3, checkpoint_every=1)
    config = load_config(path)
    run_dir = config.run_dir
    stopped = config.model_copy(update={"train": config.train.model_copy(update={"stop_after": 2})})
    assert fit(stopped, log=quiet, prepared=digits_prepared) == {}
    first_segment = load_training_state(run_dir / "checkpoints" / "last.pt")["train_seconds"]
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"loss": 0.5, "st')  # a kill in the middle of an append
    time.sleep(0.2)
    results = fit(config, resume=True, log=quiet, prepared=digits_prepared)
    assert metric_steps(run_dir) == [1, 2, 3]
    seconds = results["methods"]["finetune"]["train_seconds"]
    assert seconds > first_segment > 0  # the first segment is counted, not only the last
    assert json.loads((run_dir / "results.json").read_text()) == results

    finished = tree_bytes(run_dir)
    line = cli_error(monkeypatch, capsys, "fit", str(path))
    assert line == (
        f"robustft: error: {run_dir}: holds a finished run (results.json); refusing to overwrite it: use another "
        "name (--set name=...), or --overwrite to replace it"
    )
    line = cli_error(monkeypatch, capsys, "fit", str(path), "--resume", "--set", "optim.lr=1e6")
    assert (
        f"{run_dir}: --resume of a finished run with a different config (optim.lr: 0.0003 there, 1000000.0 now)" in line
    )
    assert fit(config, resume=True, log=quiet, prepared=digits_prepared) == results
    relative = config.model_copy(update={"output_dir": Path(os.path.relpath(tmp_path))})
    assert fit(relative, resume=True, log=quiet, prepared=digits_prepared) == results  # paths compared resolved
    assert tree_bytes(run_dir) == finished

    fit(config, overwrite=True, log=quiet, prepared=digits_prepared)
    assert metric_steps(run_dir) == [1, 2, 3]  # not [1, 2, 3, 1, 2, 3]


def test_config_differences_resolve_paths_and_name_every_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = {"output_dir": str(tmp_path / "runs"), "seed": 0, "optim": {"lr": 1e-4}, "data": {"splits": {}}}
    planned = {"output_dir": "runs", "seed": 1, "optim": {"lr": 1e-3}, "data": {"splits": {}}}
    assert config_differences(planned, saved, ignored=frozenset()) == [
        "seed: 0 there, 1 now",
        "optim.lr: 0.0001 there, 0.001 now",
    ]
    splits = {"data": {"splits": {"train": "data/train"}}}
    assert config_differences(splits, {"data": {"splits": {"train": str(tmp_path / "data" / "train")}}}) == []


def mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); the RLIMIT_FSIZE test covers it")


def test_disk_full_during_a_checkpoint_write_is_one_line(tmp_path, monkeypatch, capsys):
    """A 4 MiB tmpfs: the first checkpoint (9.4 MiB) fails inside torch.save (``enforce fail at
    inline_container``); one line names last.pt and the space it needs, no temporary is left."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "4m")
    try:
        config = write_config(disk, "run", steps=3, checkpoint_every=1)
        line = cli_error(monkeypatch, capsys, "fit", str(config))
        left = sorted(path.name for path in (disk / "run" / "checkpoints").iterdir())
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)
    assert f"{disk / 'run' / 'checkpoints' / 'last.pt'}: out of space: writing it needs about 9." in line
    assert "free on its filesystem" in line and "inline_container" in line, line
    assert left == []


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG


def test_a_file_size_limit_during_a_checkpoint_write_is_one_line(tmp_path):
    """The same without mounting anything: RLIMIT_FSIZE (1 MiB) in a real subprocess."""
    config = write_config(tmp_path, "run", steps=3, checkpoint_every=1)
    command = [sys.executable, "-m", "robustft", "fit", str(config)]
    result = subprocess.run(
        command, env=subprocess_environment(), capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert f"{tmp_path / 'run' / 'checkpoints' / 'last.pt'}: out of space: writing it needs about 9." in lines[0]
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_results_written_out_of_space_keep_the_old_file(tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "64k")
    try:
        atomic_write_json(disk / "results.json", {"methods": {"old": 1}})
        with pytest.raises(OSError, match="No space left"), open(disk / "filler", "wb") as handle:  # fill the disk
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
        with pytest.raises(
            OutOfSpaceError, match=r"results.json: out of space: writing it needs about 22\.\d KiB, 0 B free"
        ):
            atomic_write_json(disk / "results.json", {"methods": {"new": list(range(2000))}})
        assert json.loads((disk / "results.json").read_text()) == {"methods": {"old": 1}}
        assert sorted(path.name for path in disk.iterdir()) == ["filler", "results.json"]
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_yaml_of_a_run_config_holds_no_python_objects(tmp_path):
    """config.yaml is written atomically and reads back with the safe loader."""
    config = load_config(write_config(tmp_path, "run"))
    from robustft.config import write_resolved_config

    path = write_resolved_config(config, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["name"] == "run"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]
