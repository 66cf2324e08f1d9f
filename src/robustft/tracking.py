"""Experiment tracking: ``metrics.jsonl`` and the evaluation, mirrored to TensorBoard, MLflow and W&B.

``metrics.jsonl`` and ``results.json`` stay the source of truth (reports read them, resume truncates the
first); trackers are views of them for people who already live in TensorBoard, MLflow or Weights & Biases.
During training the engine logs the train scalars (``train/<key>``); after the evaluation the runner logs the
run's whole config as parameters and its results (accuracy per split, OOD average, ECE) as ``eval/...``
metrics, into the same tracker run, named after the run directory and tagged with the method
(:func:`log_evaluation`); ``robustft compare`` adds ``eval/effective_robustness`` once the seed's zero-shot and
fine-tune runs are in (:func:`log_effective_robustness`). Each tracker is off by default and one flag
(``train.tensorboard``, ``train.mlflow``, ``train.wandb``), so a plain install needs none of the packages; a
missing package is a one-line :class:`~robustft.errors.ConfigError` naming the extra to install.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

from robustft.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DATABASE = "mlflow.db"
MLFLOW_RUN_ID_FILE = "mlflow_run_id.txt"
WANDB_RUN_ID_FILE = "wandb_run_id.txt"
WANDB_PROJECT = "robustft"
# MLflow refuses longer parameter values; a long list (class names) is cut there.
_MLFLOW_PARAM_LIMIT = 6000
INSTALL_HINT = "pip install 'robustft[tracking]'"
_RUN_DIRECTORY_URIS: set[str] = set()  # the run-directory stores this process pointed MLflow at
TRACKER_FLAGS = ("tensorboard", "mlflow", "wandb")
EFFECTIVE_ROBUSTNESS_METRIC = "eval/effective_robustness"


class Tracker(Protocol):
    """Where one run's scalars go besides metrics.jsonl."""

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_evaluation(
        self, step: int, params: Mapping[str, Any], metrics: Mapping[str, float], method: str
    ) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Tracking off (the default, and every rank but 0): every call does nothing."""

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_evaluation(self, step: int, params: Mapping[str, Any], metrics: Mapping[str, float], method: str) -> None:
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
            self._writer.add_scalar(_tag(key), value, global_step=step)
        self._writer.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        text = "\n".join(f"    {key}: {value}" for key, value in sorted(params.items()))
        self._writer.add_text("config", text)  # indented: TensorBoard renders it as a code block

    def log_evaluation(self, step: int, params: Mapping[str, Any], metrics: Mapping[str, float], method: str) -> None:
        """The config and the evaluation in TensorBoard's HParams view (this run's row), and as scalars."""
        from torch.utils.tensorboard.summary import hparams

        hparam_values = {key: _hparam_value(value) for key, value in params.items()} | {"method": method}
        for summary in hparams(hparam_values, dict(metrics)):  # into this run's own event file, not a sub-run
            self._writer.file_writer.add_summary(summary)
        self.log_metrics(step, metrics)

    def close(self) -> None:
        self._writer.close()


def _hparam_value(value: Any) -> bool | int | float | str:
    """TensorBoard's HParams take numbers, booleans and strings; anything else (lists, None) as its text."""
    return value if isinstance(value, bool | int | float | str) else str(value)


class MLflowTracker:
    """Metrics and params in an MLflow run named after the run directory, tagged with the method.

    The store is ``$MLFLOW_TRACKING_URI`` when set, else a SQLite database in the run directory
    (``<run_dir>/mlflow.db``, ``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db``): MLflow 3
    refuses its old ``./mlruns`` file store by default, and SQLite is the backend it now defaults to. The
    MLflow run id is kept in ``<run_dir>/mlflow_run_id.txt`` so that ``--resume`` and the evaluation continue
    the same MLflow run instead of starting another.
    """

    def __init__(self, run_dir: Path, resume: bool = False) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError(f"train.mlflow: the mlflow package is not installed; {INSTALL_HINT}") from None
        self._mlflow = mlflow
        run_dir = Path(run_dir)
        if os.environ.get("MLFLOW_TRACKING_URI") in (None, "", *_RUN_DIRECTORY_URIS):
            # MLflow 3's set_tracking_uri also sets $MLFLOW_TRACKING_URI: ours is not the user's choice for the next run
            uri = f"sqlite:///{(run_dir / MLFLOW_DATABASE).resolve()}"
            _RUN_DIRECTORY_URIS.add(uri)
            mlflow.set_tracking_uri(uri)
        id_file = run_dir / MLFLOW_RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self._run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name)
        id_file.write_text(self._run.info.run_id + "\n")

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._mlflow.log_metrics({_tag(key): value for key, value in scalars(metrics).items()}, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters not yet logged (an MLflow parameter is written once: the evaluation adds, never rewrites)."""
        logged = self._mlflow.get_run(self._run.info.run_id).data.params
        fresh = {key: str(value)[:_MLFLOW_PARAM_LIMIT] for key, value in params.items() if key not in logged}
        if fresh:
            self._mlflow.log_params(fresh)

    def log_evaluation(self, step: int, params: Mapping[str, Any], metrics: Mapping[str, float], method: str) -> None:
        self.log_params(params)
        self._mlflow.set_tags({"method": method, "run": self._run.info.run_name})
        self.log_metrics(step, metrics)

    def close(self) -> None:
        self._mlflow.end_run()


class WandbTracker:
    """Metrics and config in a Weights & Biases run named after the run directory, grouped by method.

    ``wandb`` decides where the run goes (``WANDB_MODE=offline`` keeps it in ``<run_dir>/wandb/`` for a later
    ``wandb sync``; ``WANDB_PROJECT`` overrides the project ``robustft``). The W&B run id is kept in
    ``<run_dir>/wandb_run_id.txt`` so that ``--resume`` and the evaluation continue the same W&B run.
    """

    def __init__(self, run_dir: Path, resume: bool = False, method: str | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"train.wandb: the wandb package is not installed; {INSTALL_HINT}") from None
        run_dir = Path(run_dir)
        id_file = run_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(4)
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
            name=run_dir.name,
            id=run_id,
            dir=str(run_dir),
            resume="allow",
            group=method,
            reinit="create_new",
        )
        id_file.write_text(run_id + "\n")

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._run.log({_tag(key): value for key, value in scalars(metrics).items()}, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._run.config.update(dict(params), allow_val_change=True)

    def log_evaluation(self, step: int, params: Mapping[str, Any], metrics: Mapping[str, float], method: str) -> None:
        self.log_params(dict(params) | {"method": method})
        self._run.tags = tuple({*self._run.tags, method})
        self.log_metrics(step, metrics)
        self._run.summary.update(dict(metrics))

    def close(self) -> None:
        self._run.finish()


def _tag(key: str) -> str:
    """A train scalar ``loss`` becomes ``train/loss``; an evaluation metric keeps its ``eval/...`` name."""
    return key if key.startswith("eval/") else f"train/{key}"


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

    def log_evaluation(self, step: int, params: Mapping[str, Any], metrics: Mapping[str, float], method: str) -> None:
        for tracker in self.trackers:
            tracker.log_evaluation(step, params, metrics, method)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_tracker(
    train: Any,
    run_dir: Path,
    enabled: bool = True,
    resumed_from: int | None = None,
    continued: bool = False,
    method: str | None = None,
) -> Tracker:
    """The trackers ``train.tensorboard`` / ``train.mlflow`` / ``train.wandb`` ask for; a :class:`NullTracker`
    when none is on.

    ``enabled`` is False on every rank but 0 (only the main process writes the run directory).
    ``resumed_from`` is the step of the checkpoint a resumed run restarts from; ``continued`` reopens the
    tracker runs of a run directory without purging anything (the evaluation after training).
    """
    if not enabled:
        return NullTracker()
    trackers: list[Tracker] = []
    reopen = continued or resumed_from is not None
    if getattr(train, "tensorboard", False):
        purge = None if continued or resumed_from is None else resumed_from + 1
        trackers.append(TensorBoardTracker(run_dir, purge_step=purge))
    if getattr(train, "mlflow", False):
        trackers.append(MLflowTracker(run_dir, resume=reopen))
    if getattr(train, "wandb", False):
        trackers.append(WandbTracker(run_dir, resume=reopen, method=method))
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


def evaluation_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """A results.json entry as flat ``eval/...`` metrics: ``eval/accuracy/<split>`` (id_test, id_val, each OOD
    split), ``eval/ood_avg``, ``eval/ece/<split>`` and the other per-split numbers, ``eval/effective_robustness``
    when the entry has it; timings, counts and text are left out."""
    metrics: dict[str, float] = {}
    accuracies = {"id_test": entry.get("id"), "id_val": entry.get("id_val"), **dict(entry.get("ood") or {})}
    metrics |= {f"eval/accuracy/{split}": value for split, value in accuracies.items() if value is not None}
    skipped = {"id", "id_val", "ood", "train_seconds", "trainable_params", "steps"}
    for key, value in flat_params({k: v for k, v in entry.items() if k not in skipped}).items():
        metrics[f"eval/{key.replace('.', '/')}"] = value
    return scalars(metrics)


def log_evaluation(
    train: Any,
    run_dir: Path,
    params: Mapping[str, Any],
    entry: Mapping[str, Any],
    method: str,
    step: int,
    log: Callable[[str], None] = print,
) -> None:
    """Reopen the run's trackers and log its config (``params``) and evaluation (``entry`` of results.json).

    Called once results.json is written: a tracker that fails now (a W&B server out of reach) costs one log
    line, not the finished run.
    """
    if not any(getattr(train, flag, False) for flag in TRACKER_FLAGS):
        return
    try:
        tracker = open_tracker(train, run_dir, continued=True, method=method)
        try:
            tracker.log_evaluation(step, params, evaluation_metrics(entry), method)
        finally:
            tracker.close()
    except Exception as error:  # any backend's own error type; results.json already holds the evaluation
        log(f"tracking: the evaluation was not logged ({type(error).__name__}: {str(error).splitlines()[0][:200]})")


def log_effective_robustness(
    run_dir: Path, value: float, step: int, method: str, log: Callable[[str], None] = print
) -> None:
    """Add ``eval/effective_robustness`` to the tracker runs of a finished run (the trackers its ``config.yaml``
    turns on), at the evaluation's ``step``.

    Effective robustness needs the zero-shot and fine-tune runs of the same seed (Taori et al., NeurIPS 2020,
    arXiv:2007.00644; ``robustft.robustness``), so a run's own evaluation cannot know it: ``robustft compare``
    sends it once it has every run. Like :func:`log_evaluation`, a failing tracker costs one log line.
    """
    from robustft.safe_io import read_yaml_mapping

    run_dir = Path(run_dir)
    try:
        section = read_yaml_mapping(run_dir / "config.yaml").get("train") or {}
        train = SimpleNamespace(**{flag: bool(section.get(flag, False)) for flag in TRACKER_FLAGS})
        if not any(vars(train).values()) or not math.isfinite(value):
            return
        tracker = open_tracker(train, run_dir, continued=True, method=method)
        try:
            tracker.log_metrics(step, {EFFECTIVE_ROBUSTNESS_METRIC: value})
        finally:
            tracker.close()
    except Exception as error:  # any backend's own error type; the leaderboard already holds the number
        log(f"tracking: {run_dir}: effective robustness not logged ({type(error).__name__}: {str(error)[:200]})")
