"""After a run is evaluated, TensorBoard, MLflow and W&B (offline) hold its config and its evaluation.

Each backend is read back with its own reader: TensorBoard's event accumulator, an MLflow client on the
SQLite store, and the protobuf records of W&B's offline ``.wandb`` file (read with wandb's own message
classes; W&B no longer ships a Python reader of the file, so the record framing is read here).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from posthoc_support import write_shapes_dataset
from robustft.config import parse_config
from robustft.runner import fit
from robustft.tracking import MLFLOW_DATABASE, MLFLOW_RUN_ID_FILE, TENSORBOARD_DIR, WANDB_RUN_ID_FILE

_BLOCK, _HEADER = 32768, 7  # W&B's offline file: LevelDB log framing, 32 KiB blocks, 7-byte record headers


def tiny_finetune(root: Path, name: str, **train: bool) -> dict:
    """A two-step fine-tune of the shapes data, trackers as ``train`` sets them."""
    return {
        "name": name,
        "output_dir": str(root / "runs"),
        "data": write_shapes_dataset(root / "data"),
        "method": {"name": "finetune"},
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "train": {"steps": 2, "log_every": 1, "progress": False, "checkpoint_every": 10, **train},
    }


def tiny_run(root: Path, **train: bool) -> Path:
    fit(parse_config(tiny_finetune(root, "tracked", **train)), log=lambda message: None)
    return root / "runs" / "tracked"


def wandb_records(path: Path) -> list:
    """Every record of a ``.wandb`` file, as wandb's ``Record`` protobuf messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()[_HEADER:]  # ":W&B", magic, version
    records, pending, position = [], b"", 0
    offset = _HEADER
    while position + _HEADER <= len(data):
        room = _BLOCK - (offset + position) % _BLOCK
        if room < _HEADER:  # block trailer padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        chunk = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first start a record; middle, last extend
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def expected_metrics(run_dir: Path) -> dict[str, float]:
    entry = json.loads((run_dir / "results.json").read_text())["methods"]["finetune"]
    expected = {"eval/accuracy/id_test": entry["id"], "eval/accuracy/ood_dark": entry["ood"]["ood_dark"]}
    return expected | {"eval/ood_avg": entry["ood_avg"], "eval/ece/id_test": entry["ece"]["id_test"]}


def test_evaluation_and_config_reach_tensorboard_and_wandb(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tiny_run(tmp_path, tensorboard=True, wandb=True)
    expected = expected_metrics(run_dir)

    accumulator = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    accumulator.Reload()
    for tag, value in expected.items():
        assert [(event.step, event.value) for event in accumulator.Scalars(tag)] == [(2, pytest.approx(value))]
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2]
    hparams = accumulator.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    assert b"finetune" in hparams and b"optim.lr" in hparams  # the HParams row: method and config

    wandb_id = (run_dir / WANDB_RUN_ID_FILE).read_text().strip()
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))
    assert len(files) == 2  # training, then the evaluation: one W&B run id, synced together
    records = [record for path in files for record in wandb_records(path)]
    runs = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    assert {run.display_name for run in runs} == {"tracked"} and {run.run_id for run in runs} == {wandb_id}
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            history |= {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
            }
    assert {key: history[key] for key in expected} == pytest.approx(expected)
    assert "train/loss" in history
    config = {}
    updates = [
        item for record in records if record.WhichOneof("record_type") == "config" for item in record.config.update
    ]
    for item in [*updates, *(item for run in runs for item in run.config.update)]:
        value = json.loads(item.value_json)
        config[item.key] = value["value"] if isinstance(value, dict) and "value" in value else value
    assert config["method"] == "finetune" and config["optim.lr"] == pytest.approx(1e-3)
    assert config["model.source"] == "builtin"


@pytest.mark.slow  # MLflow's import and SQLite schema creation: ~20-60 s on 2 shared cores
def test_evaluation_and_config_reach_mlflow(tmp_path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tiny_run(tmp_path, mlflow=True)
    expected = expected_metrics(run_dir)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{(run_dir / MLFLOW_DATABASE).resolve()}")
    run = client.get_run((run_dir / MLFLOW_RUN_ID_FILE).read_text().strip())
    assert run.info.run_name == "tracked" and run.data.tags["method"] == "finetune"
    assert {key: run.data.metrics[key] for key in expected} == pytest.approx(expected)
    assert run.data.params["method.name"] == "finetune" and run.data.params["data.batch_size"] == "8"
    assert run.data.params["model.source"] == "builtin" and run.data.params["train.steps"] == "2"


def tracked_comparison(root: Path, **train: bool) -> tuple[Path, dict]:
    """``robustft compare`` of zero-shot, fine-tune and linear probe on the shapes data, trackers on."""
    from robustft.compare import execute_comparison

    raw = tiny_finetune(root, "finetune", **train)
    out = root / "compare"
    comparison = execute_comparison(
        parse_config(raw), ["zeroshot", "finetune", "linear_probe"], [0], out, log=lambda message: None
    )
    rows = comparison.leaderboard["methods"]
    return out, {name: row["effective_robustness"]["mean"] for name, row in rows.items()}


@pytest.mark.slow  # a three-run comparison on the builtin ViT: ~120 s on 2 loaded cores
def test_compare_sends_each_runs_effective_robustness_to_tensorboard(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, robustness = tracked_comparison(tmp_path, tensorboard=True)
    assert robustness["linear_probe"] != 0.0  # off the zero-shot / fine-tune line: a number that can be wrong
    for name, value in robustness.items():
        run_dir = out / "seed0" / name
        accumulator = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
        accumulator.Reload()
        events = accumulator.Scalars("eval/effective_robustness")
        assert [(event.step, event.value) for event in events] == [
            (evaluated_step(run_dir, name), pytest.approx(value))
        ]
        assert accumulator.Scalars("eval/ood_avg")  # beside the run's own evaluation


def evaluated_step(run_dir: Path, name: str) -> int:
    return json.loads((run_dir / "results.json").read_text())["methods"][name].get("steps") or 0


@pytest.mark.slow  # W&B offline runs and MLflow's SQLite stores, reopened per run: ~150 s on 2 shared cores
def test_compare_sends_each_runs_effective_robustness_to_wandb_and_mlflow(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, robustness = tracked_comparison(tmp_path, wandb=True, mlflow=True)
    assert robustness["linear_probe"] != 0.0
    for name, value in robustness.items():
        run_dir = out / "seed0" / name
        wandb_id = (run_dir / WANDB_RUN_ID_FILE).read_text().strip()
        records = [
            record
            for path in sorted((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))
            for record in wandb_records(path)
        ]
        history = [
            json.loads(item.value_json)
            for record in records
            if record.WhichOneof("record_type") == "history"
            for item in record.history.item
            if (item.key or "/".join(item.nested_key)) == "eval/effective_robustness"
        ]
        assert history == [pytest.approx(value)]
        runs = [record.run for record in records if record.WhichOneof("record_type") == "run"]
        assert {run.display_name for run in runs} == {name} and name in {run.run_group for run in runs}
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{(run_dir / MLFLOW_DATABASE).resolve()}")
        run = client.get_run((run_dir / MLFLOW_RUN_ID_FILE).read_text().strip())
        assert run.info.run_name == name and run.data.tags["method"] == name
        assert run.data.metrics["eval/effective_robustness"] == pytest.approx(value)
        assert "eval/ood_avg" in run.data.metrics  # the same MLflow run as the evaluation


def test_effective_robustness_joins_the_runs_tensorboard_run_and_a_failure_is_one_log_line(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from robustft.tracking import log_effective_robustness

    run_dir = tiny_run(tmp_path, tensorboard=True)
    messages: list[str] = []
    log_effective_robustness(run_dir, 1.25, 2, "finetune", messages.append)
    accumulator = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    accumulator.Reload()
    assert [(event.step, event.value) for event in accumulator.Scalars("eval/effective_robustness")] == [(2, 1.25)]
    assert accumulator.Scalars("eval/ood_avg") and messages == []
    (run_dir / "config.yaml").unlink()
    log_effective_robustness(run_dir, 1.0, 2, "finetune", messages.append)
    assert len(messages) == 1 and str(run_dir) in messages[0] and "not logged" in messages[0]
