"""Bad input (model, checkpoints, config, memory) ends the command with ONE line naming what is at fault,
exit code 2 and no traceback. Data-file problems are tested with the data loaders (test_data_folders.py).
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from robustft.backbones.builtin import packaged_checkpoint
from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.cli import main
from robustft.demo import demo_config
from robustft.engine import out_of_memory_advice
from robustft.errors import ConfigError
from robustft.methods.finetune import Finetune
from robustft.runner import FINAL_CHECKPOINT, Prepared, fit
from robustft.weight_references import references_path


def quiet(message: str) -> None:
    pass


def write_config(tmp_path: Path, name: str, method: str = "finetune", **train) -> Path:
    settings = {"steps": 3, "checkpoint_every": 2, "progress": False, "device": "cpu", **train}
    raw = demo_config(method, 0, tmp_path, name=name, **settings).model_dump(mode="json")
    raw["method"] = {"name": method}
    raw["data"]["batch_size"] = 16
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error_line(monkeypatch, capsys, *arguments: str) -> str:
    """Run ``robustft ARGUMENTS`` in-process; the error it printed, checked to be one line, exit code 2."""
    monkeypatch.setattr(sys, "argv", ["robustft", *arguments])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustft: error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def zero_shot_run(tmp_path_factory, digits_prepared) -> Path:
    out = tmp_path_factory.mktemp("finished")
    fit(demo_config("zeroshot", 0, out, name="zs", progress=False, device="cpu"), log=quiet, prepared=digits_prepared)
    return out / "zs"


@pytest.fixture
def finished_run(tmp_path, zero_shot_run) -> Path:
    """A copy of a finished zero-shot run directory (config.yaml, final checkpoint) to tamper with."""
    return Path(shutil.copytree(zero_shot_run, tmp_path / "zs"))


def test_unknown_config_key(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, "run")
    line = error_line(monkeypatch, capsys, "fit", str(config), "--set", "train.bogus=1")
    assert line == f"robustft: error: {config}: unknown key 'train.bogus'"


def test_global_batch_not_divisible_by_devices(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, "run")
    line = error_line(monkeypatch, capsys, "fit", str(config), "--devices", "3")
    assert line == (
        "robustft: error: data.batch_size=16 is the global batch and must be divisible by the number of "
        "processes (3); use e.g. data.batch_size=15"
    )


def test_checkpoint_of_another_architecture_lists_the_keys(finished_run, monkeypatch, capsys):
    final = finished_run / FINAL_CHECKPOINT
    backbone = load_state_dict_file(packaged_checkpoint())  # a zero-shot run references its backbone: write it whole
    state = {f"backbone.{key}": value for key, value in backbone.items() if not key.startswith("head.")}
    state |= load_state_dict_file(final)
    references_path(final).unlink()
    del state["backbone.norm.weight"]
    state["backbone.blocks.0.mlp.fc1.weight"] = torch.zeros(64, 128)
    state["backbone.extra_token"] = torch.zeros(1)
    save_file(state, str(final))
    line = error_line(monkeypatch, capsys, "evaluate", str(finished_run))
    assert line == (
        f"robustft: error: {final}: does not match digits_vit: 1 missing keys (backbone.norm.weight); "
        "1 unexpected keys (backbone.extra_token); 1 shape mismatches (checkpoint vs model) "
        "(backbone.blocks.0.mlp.fc1.weight (64, 128) vs (256, 128)) (incompatible checkpoint)"
    )


def test_head_class_count_differs_from_the_data(finished_run, monkeypatch, capsys):
    final = finished_run / FINAL_CHECKPOINT
    state = load_state_dict_file(final)
    state["head.weight"], state["head.bias"] = state["head.weight"][:7].clone(), state["head.bias"][:7].clone()
    save_file(state, str(final))
    line = error_line(monkeypatch, capsys, "evaluate", str(finished_run))
    assert line == (
        f"robustft: error: class count mismatch: {final} has a head with 7 classes but the data has 10 "
        "(data.class_names / data.splits in the run's config.yaml)"
    )


def test_fit_refuses_a_model_whose_head_does_not_match_the_data(tmp_path, digits_prepared):
    twelve = [str(index) for index in range(12)]
    prepared = Prepared(digits_prepared.model, replace(digits_prepared.ctx, class_names=twelve), "digits_shift")
    config = demo_config("finetune", 0, tmp_path, name="run", steps=1, progress=False)
    with pytest.raises(
        ConfigError, match=r"^class count mismatch: the model's head has 10 classes but the data has 12 "
    ):
        fit(config, log=quiet, prepared=prepared)


def test_resume_from_a_checkpoint_of_another_method(tmp_path, monkeypatch, capsys, digits_prepared):
    finetune = demo_config("finetune", 0, tmp_path, name="run", steps=3, stop_after=1, progress=False)
    fit(finetune, log=quiet, prepared=digits_prepared)
    gmixout = write_config(tmp_path, "run", method="gmixout")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    line = error_line(monkeypatch, capsys, "fit", str(gmixout), "--resume")
    assert line.startswith(f"robustft: error: {checkpoint}: does not match this run's model (method gmixout): ")
    assert "missing keys (backbone.patch_embed.proj.parametrizations.weight.original" in line


def test_malicious_resume_checkpoint_is_refused_and_never_runs(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    config = write_config(tmp_path, "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"step": 1, "model": Payload()}, checkpoint)
    line = error_line(monkeypatch, capsys, "fit", str(config), "--resume")
    assert line.startswith(f"robustft: error: {checkpoint}: refusing to load: the file is a pickle that needs code")
    evil_model = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, evil_model)
    line = error_line(monkeypatch, capsys, "fit", str(config), "--set", f"model.checkpoint={evil_model}")
    assert line.startswith(f"robustft: error: {evil_model}: refusing to load: the file is a pickle that needs code")
    assert not marker.exists()


def test_out_of_gpu_memory_in_a_training_step_advises_batch_and_accumulation(tmp_path, monkeypatch, capsys):
    def out_of_memory(self, model, batch, step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Finetune, "loss", out_of_memory)
    config = write_config(tmp_path, "run")
    line = error_line(monkeypatch, capsys, "fit", str(config))
    assert line == (
        "robustft: error: out of GPU memory on cpu at data.batch_size=16 with train.grad_accumulation=1; "
        "try data.batch_size=8 with train.grad_accumulation=2 (same effective batch)"
    )


def test_out_of_memory_advice_keeps_the_global_batch_divisible():
    advice = out_of_memory_advice(96, 2, torch.device("cuda", 1), processes=4)
    assert advice == (
        "out of GPU memory on cuda:1 at data.batch_size=96 (24 per process) with train.grad_accumulation=2; "
        "try data.batch_size=48 with train.grad_accumulation=4 (same effective batch)"
    )
    smallest = out_of_memory_advice(2, 1, torch.device("cuda", 0), processes=2)
    assert smallest.endswith("already one sample per device; use train.precision=bf16, a smaller model or more GPUs")


def test_out_of_gpu_memory_in_evaluation_advises_eval_batch(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr("robustft.runner.evaluate_splits", out_of_memory)
    config = write_config(tmp_path, "run", steps=1)
    line = error_line(monkeypatch, capsys, "fit", str(config))
    assert line == (
        "robustft: error: out of GPU memory on cpu during inference at data.eval_batch_size=512; "
        "try data.eval_batch_size=256"
    )


def test_nan_loss_is_one_line(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, "run", grad_clip=None)
    line = error_line(monkeypatch, capsys, "fit", str(config), "--set", "optim.lr=1e30")
    assert re.match(r"robustft: error: loss is (nan|inf) at step \d+; stopped .*lower optim.lr", line)
