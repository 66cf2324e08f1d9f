"""Crash safety: a SIGKILLed run resumes exactly, torn checkpoint writes never replace the last good one,
a NaN loss stops the run with its checkpoint intact, and pickles that would run code are refused.

Exactness: on CPU with the same thread count, a killed-then-resumed run ends with weights bit-equal
(``torch.equal``) to an uninterrupted one: model, optimiser, scheduler, RNG states, data position and
the method's state (GMixout's mask generator) all come back from the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.checkpoint import load_training_state, save_training_state
from robustft.demo import demo_config
from robustft.engine import NonFiniteLossError
from robustft.errors import CheckpointError
from robustft.methods.finetune import Finetune
from robustft.runner import fit


def quiet(message: str) -> None:
    pass


def short_config(out: Path, name: str, method: str = "finetune", steps: int = 6, **options):
    """``steps`` steps of a ``steps + 1``-step schedule: the run ends at ``train.stop_after`` with its
    complete state in ``last.pt`` and skips the final evaluation, which these tests do not need."""
    train = {"checkpoint_every": 2, "log_every": 1, "progress": False, "device": "cpu"}
    config = demo_config(method, 0, out, name=name, steps=steps + 1, stop_after=steps, **train, **options)
    config.data.batch_size = 16
    return config


def last_state(run_dir: Path) -> dict:
    return load_training_state(run_dir / "checkpoints" / "last.pt")


def assert_same_state(a: dict, b: dict) -> None:
    """Bit-equal model, optimiser moments and method state, at the same step and data position."""
    assert (a["step"], a["micro_batches"]) == (b["step"], b["micro_batches"])
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, moments in a["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    assert all(torch.equal(value, b["method"][key]) for key, value in a["method"].items())


def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tmp_path):
    options = {"p": 0.5, "k": 3}  # GMixout: the mask generator must survive the kill
    reference = short_config(tmp_path, "full", "gmixout", steps=12, method_options=options)
    fit(reference, log=quiet)  # prepared here, not the session fixture: on the CPU like the subprocess
    raw = reference.model_dump(mode="json") | {"name": "killed"}
    raw["method"] = {"name": "gmixout", **options}
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(raw))
    threads = str(torch.get_num_threads())  # same thread count as this process: same float reductions
    environment = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    command = [sys.executable, "-m", "robustft", "fit", str(config)]
    checkpoint = tmp_path / "killed" / "checkpoints" / "last.pt"
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    killed_at = load_training_state(checkpoint)["step"]  # loads: never a torn last.pt
    assert killed_at in (2, 4, 6, 8, 10)  # really killed mid-run
    resumed = subprocess.run([*command, "--resume"], env=environment, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {killed_at}" in resumed.stdout
    assert_same_state(last_state(tmp_path / "full"), last_state(tmp_path / "killed"))
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))  # redone steps logged once


class Killed(BaseException):
    """Stands in for the process dying inside torch.save."""


def test_interrupted_checkpoint_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_training_state({"step": 2, "weights": torch.arange(4.0)}, path)

    def torn_save(state, file):
        Path(file).write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # half a zip archive ...
        raise Killed  # ... then the process dies

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(Killed):
        save_training_state({"step": 4, "weights": torch.zeros(4)}, path)
    monkeypatch.undo()
    state = load_training_state(path)
    assert state["step"] == 2 and torch.equal(state["weights"], torch.arange(4.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # what a non-atomic writer would have left
    with pytest.raises(CheckpointError, match="last.pt: corrupt or truncated checkpoint"):
        load_training_state(path)


def test_run_resumes_after_a_torn_checkpoint_write(tmp_path, digits_prepared, monkeypatch):
    """The second checkpoint write dies half-way (leaving its temp file, as SIGKILL would); --resume
    starts from the first checkpoint, removes the leftover and ends where an uninterrupted run ends."""
    fit(short_config(tmp_path, "full"), log=quiet, prepared=digits_prepared)
    calls = []
    real_save = torch.save

    def dies_on_second_write(state, file):
        calls.append(file)
        if len(calls) == 2:
            Path(file).write_bytes(b"torn")
            Path(file).with_name(".last.pt.tmp-4242").write_bytes(b"torn")  # a killed writer's leftover
            raise Killed
        real_save(state, file)

    monkeypatch.setattr(torch, "save", dies_on_second_write)
    with pytest.raises(Killed):
        fit(short_config(tmp_path, "torn"), log=quiet, prepared=digits_prepared)
    monkeypatch.undo()
    checkpoints = tmp_path / "torn" / "checkpoints"
    assert load_training_state(checkpoints / "last.pt")["step"] == 2
    fit(short_config(tmp_path, "torn"), resume=True, log=quiet, prepared=digits_prepared)
    assert not (checkpoints / ".last.pt.tmp-4242").exists()
    assert_same_state(last_state(tmp_path / "full"), last_state(tmp_path / "torn"))


def test_nan_loss_stops_the_run_and_last_checkpoint_still_loads(tmp_path, digits_prepared, monkeypatch):
    real_loss = Finetune.loss

    def nan_at_step_4(self, model, batch, step):
        loss, logs = real_loss(self, model, batch, step)
        return (loss * float("nan") if step == 3 else loss), logs

    monkeypatch.setattr(Finetune, "loss", nan_at_step_4)
    with pytest.raises(NonFiniteLossError) as raised:
        fit(short_config(tmp_path, "nan"), log=quiet, prepared=digits_prepared)
    checkpoint = tmp_path / "nan" / "checkpoints" / "last.pt"
    assert str(raised.value) == (
        f"loss is nan at step 4; stopped; the last good checkpoint is {checkpoint} (step 2): "
        "lower optim.lr, then --resume"
    )
    state = load_training_state(checkpoint)
    assert state["step"] == 2
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    monkeypatch.undo()
    fit(short_config(tmp_path, "nan"), resume=True, log=quiet, prepared=digits_prepared)  # the checkpoint resumes
    assert load_training_state(checkpoint)["step"] == 6


class Payload:
    """A pickle whose loading would create ``marker``: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("nested", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, nested):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = Payload(marker)
    torch.save({"step": 1, "model": {"w": torch.ones(1)}, "hook": payload} if nested else payload, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="evil.pt: refusing to load"):
        load_training_state(evil)
    with pytest.raises(CheckpointError, match="evil.pt: refusing to load: the file is a pickle that needs code"):
        load_state_dict_file(evil)
    assert not marker.exists()  # the payload never ran
