"""Experiment tracking: the metrics the engine writes to ``metrics.jsonl``, mirrored to TensorBoard and MLflow.

``metrics.jsonl`` stays the source of truth (reports read it, resume truncates it); trackers are views of it
for people who already live in TensorBoard or MLflow. Both are off by default and each is one flag
(``train.tensorboard``, ``train.mlflow``), so a plain install needs neither package; a missing package is a
one-line :class:`~robustft.errors.ConfigError` naming the extra to install.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from robustft.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MLFLOW_RUN_ID_FILE = "mlflow_run_id.txt"
INSTALL_HINT = "pip install 'robustft[tracking]'"


class Tracker(Protocol):
    """Where one run's scalars go besides metrics.jsonl."""

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Tracking off (the default, and every rank but 0): every call does nothing."""

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics.jsonl record, without ``step`` (it is the x axis, not a metric)."""
    out = {}
    for key, value in metrics.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardTracker:
    """Scalars as ``train/<key>`` in ``<run_dir>/tensorboard/`` event files (``tensorboard --logdir runs``).

    On resume, ``purge_step`` makes TensorBoard hide the events an interrupted run wrote after its last
    checkpoint, exactly as the engine truncates metrics.jsonl, so the curves never show a step twice.
    Each log is flushed: a run that crashes keeps every scalar it logged.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(f"train.tensorboard: the tensorboard package is not installed; {INSTALL_HINT}") from None
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in scalars(metrics).items():
            self._writer.add_scalar(f"train/{key}", value, global_step=step)
        self._writer.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        text = "\n".join(f"    {key}: {value}" for key, value in sorted(params.items()))
        self._writer.add_text("config", text)  # indented: TensorBoard renders it as a code block

    def close(self) -> None:
        self._writer.close()


class MLflowTracker:
    """Metrics and params in an MLflow run; the store is ``$MLFLOW_TRACKING_URI`` or ``<run_dir>/mlruns``.

    The MLflow run id is kept in ``<run_dir>/mlflow_run_id.txt`` so that ``--resume`` continues the same
    MLflow run instead of starting a second one.
    """

    def __init__(self, run_dir: Path, resume: bool = False) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError(f"train.mlflow: the mlflow package is not installed; {INSTALL_HINT}") from None
        self._mlflow = mlflow
        run_dir = Path(run_dir)
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((run_dir / MLFLOW_DIR).resolve().as_uri())
        id_file = run_dir / MLFLOW_RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self._run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name)
        id_file.write_text(self._run.info.run_id + "\n")

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._mlflow.log_metrics(scalars(metrics), step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._mlflow.log_params({key: str(value) for key, value in params.items()})

    def close(self) -> None:
        self._mlflow.end_run()


class Trackers:
    """Several trackers behind one :class:`Tracker` interface (TensorBoard and MLflow may both be on)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(step, metrics)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_params(params)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_tracker(train: Any, run_dir: Path, enabled: bool = True, resumed_from: int | None = None) -> Tracker:
    """The trackers ``train.tensorboard`` / ``train.mlflow`` ask for; a :class:`NullTracker` when none is on.

    ``enabled`` is False on every rank but 0 (only the main process writes the run directory).
    ``resumed_from`` is the step of the checkpoint a resumed run restarts from.
    """
    if not enabled:
        return NullTracker()
    trackers: list[Tracker] = []
    if getattr(train, "tensorboard", False):
        trackers.append(TensorBoardTracker(run_dir, purge_step=None if resumed_from is None else resumed_from + 1))
    if getattr(train, "mlflow", False):
        trackers.append(MLflowTracker(run_dir, resume=resumed_from is not None))
    if not trackers:
        return NullTracker()
    return trackers[0] if len(trackers) == 1 else Trackers(trackers)


def flat_params(sections: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train": {"steps": 3}}`` -> ``{"train.steps": 3}``: config sections as flat tracker params."""
    out: dict[str, Any] = {}
    for prefix, section in sections.items():
        if isinstance(section, Mapping):
            out.update({f"{prefix}.{key}": value for key, value in flat_params(section).items()})
        else:
            out[prefix] = section
    return out
