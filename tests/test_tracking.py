"""Experiment tracking: TensorBoard/MLflow/W&B mirror metrics.jsonl, are off by default, and fail in one line."""

from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from robustft.config import OptimConfig, TrainConfig
from robustft.engine import Engine
from robustft.errors import ConfigError
from robustft.methods.base import Method, RunContext
from robustft.tracking import MLFLOW_DATABASE, MLFLOW_RUN_ID_FILE, TENSORBOARD_DIR, open_tracker, scalars


def _tiny_fit(run_dir: Path, steps: int = 3, resume: bool = False, stop_after: int | None = None, **flags) -> None:
    """A 3-step fit of a linear model on 32 random samples: the real engine loop, no benchmark needed."""
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator))
    ctx = RunContext(
        run_dir=run_dir,
        device=torch.device("cpu"),
        seed=0,
        splits={"train": data},
        class_names=["a", "b", "c"],
        log=lambda message: None,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    train = TrainConfig(steps=steps, log_every=1, progress=False, stop_after=stop_after, checkpoint_every=1, **flags)
    Engine(train, OptimConfig(lr=0.1), batch_size=8).fit(Method(), model, ctx, resume=resume)


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_tracking_is_off_by_default(tmp_path: Path) -> None:
    assert TrainConfig().tensorboard is False and TrainConfig().mlflow is False
    _tiny_fit(tmp_path / "run")
    assert len(_jsonl(tmp_path / "run")) == 3
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()
    assert not (tmp_path / "run" / "mlruns").exists() and not (tmp_path / "run" / MLFLOW_DATABASE).exists()


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    _tiny_fit(tmp_path / "run", tensorboard=True)
    logged = _jsonl(tmp_path / "run")
    events = _tensorboard_scalars(tmp_path / "run", "train/loss")
    assert [step for step, _ in events] == [record["step"] for record in logged] == [1, 2, 3]
    assert [value for _, value in events] == pytest.approx([record["loss"] for record in logged], rel=1e-6)
    learning_rates = _tensorboard_scalars(tmp_path / "run", "train/lr")
    assert [value for _, value in learning_rates] == pytest.approx([record["lr"] for record in logged], rel=1e-6)


def test_tensorboard_resume_does_not_repeat_steps(tmp_path: Path) -> None:
    """Resuming purges the events written after the checkpoint, as the engine truncates metrics.jsonl."""
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    _tiny_fit(run_dir, steps=4, stop_after=2, tensorboard=True)
    _tiny_fit(run_dir, steps=4, resume=True, tensorboard=True)
    steps = [step for step, _ in _tensorboard_scalars(run_dir, "train/loss")]
    assert steps == [record["step"] for record in _jsonl(run_dir)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("flag", "package"), [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")]
)
def test_missing_package_is_a_one_line_config_error(tmp_path, monkeypatch, flag, package) -> None:
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, package, raising=False)
    monkeypatch.setattr(builtins, "__import__", refuse)
    with pytest.raises(ConfigError) as info:
        _tiny_fit(tmp_path / "run", **{flag: True})
    message = str(info.value)
    assert message.startswith(f"train.{flag}:") and "robustft[tracking]" in message and "\n" not in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step


def test_mlflow_logs_metrics_params_and_resumes_same_run(tmp_path, monkeypatch) -> None:
    """The real MLflow on its default SQLite backend, in the run directory (MLflow 3 refuses ./mlruns)."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    _tiny_fit(run_dir, steps=4, stop_after=2, mlflow=True)
    run_id = (run_dir / MLFLOW_RUN_ID_FILE).read_text().strip()
    _tiny_fit(run_dir, steps=4, resume=True, mlflow=True)
    assert (run_dir / MLFLOW_RUN_ID_FILE).read_text().strip() == run_id  # the same MLflow run continued
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{(run_dir / MLFLOW_DATABASE).resolve()}")
    history = client.get_metric_history(run_id, "train/loss")
    assert [metric.step for metric in history] == [1, 2, 3, 4]
    assert [metric.value for metric in history] == pytest.approx([r["loss"] for r in _jsonl(run_dir)], rel=1e-6)
    run = client.get_run(run_id)
    assert run.data.params["train.steps"] == "4" and run.data.params["optim.lr"] == "0.1"
    assert run.info.run_name == "run" and "step" not in run.data.metrics


def test_tracking_only_on_the_main_process(tmp_path: Path) -> None:
    tracker = open_tracker(TrainConfig(tensorboard=True, mlflow=True), tmp_path, enabled=False)
    tracker.log_metrics(1, {"loss": 1.0})
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_scalars_keep_finite_numbers_only() -> None:
    record = {"step": 3, "loss": 0.5, "lr": 1e-3, "flag": True, "note": "x", "bad": float("nan")}
    assert scalars(record) == {"loss": 0.5, "lr": 1e-3}
