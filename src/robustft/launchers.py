"""Where the runs of ``compare`` / ``sweep`` / ``domainbed`` execute: in this process, one submitit job each, or
(``compare --seed-workers N``) one local worker process per seed.

``local`` (the default) is robustft's in-process behaviour: the command fits its runs one after another and
shares one loaded model and data set between them. ``seed-workers`` (:class:`SeedWorkersLauncher`) runs the
seeds of a comparison side by side, one worker process per seed with a share of the threads (or its own GPU).
``submitit`` hands every run to submitit's executors, one
job per run, on SLURM (``SlurmExecutor`` through ``AutoExecutor``, sbatch written by submitit) or as local
subprocesses (``LocalExecutor``); robustft writes no batch scripts of its own. The command waits for the jobs,
then assembles the leaderboard / table from the finished run directories exactly as the local path reads back
a resumed comparison, so both launchers give the same files.

Scheduling. A run is submitted once its inputs (the fine-tune a post-hoc method combines, a soup's
ingredients) have finished, at most ``array_parallelism`` at a time. Submitting after the inputs finish
instead of with ``--dependency=afterok`` keeps one code path for SLURM and the local executor and lets a
failed input stop its dependants with one clear message, not a job pending on ``DependencyNeverSatisfied``.

Fault tolerance. Each job is a :class:`submitit.helpers.Checkpointable`: on pre-emption or its time limit
SLURM (or the local executor's timer) sends ``USR2``, submitit calls :meth:`RunJob.checkpoint`, requeues
the job, and the requeued job resumes the run from its last ``checkpoints/last.pt`` through the engine's
own resume (``fit(resume=True)``), losing at most ``train.checkpoint_every`` steps. A job that dies without
the signal (node failure, ``SIGKILL``, out of host memory) is resubmitted ``max_retries`` times by the
waiting command, resuming the same way. ``<out>/launcher_jobs.json`` records each run's job id, so running
the same command again reuses finished runs, waits for jobs still running instead of submitting them twice,
and resubmits the failed ones.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from robustft.errors import ConfigError, RobustftError
from robustft.files import atomic_write

try:  # optional (robustft[cluster]): only --launcher submitit needs it, not the local launchers
    import submitit

    _JobBase: type = submitit.helpers.Checkpointable
except ImportError:
    submitit = None
    _JobBase = object

JOBS_FILE = "launcher_jobs.json"
JOBS_DIR = "jobs"
# How often the waiting command looks at its jobs; SLURM's own accounting is polled by submitit's watcher.
POLL_SECONDS = 0.5


class JobFailedError(RobustftError):
    """A run's job failed more often than ``max_retries``; the message names the run and the job's log."""


@dataclass
class ClusterOptions:
    """What a job asks the scheduler for (``--cluster``, ``--partition``, ``--gpus-per-job``, ...)."""

    cluster: Literal["slurm", "local"] = "local"
    partition: str | None = None
    account: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    time_minutes: int = 60
    array_parallelism: int = 2
    max_retries: int = 1
    jobs_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.cluster not in ("slurm", "local"):
            raise ConfigError(f"--cluster {self.cluster}: expected slurm or local")
        for key in ("array_parallelism", "time_minutes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} {getattr(self, key)}: must be at least 1")
        if self.gpus_per_job < 0 or self.max_retries < 0:
            raise ConfigError("--gpus-per-job and --max-retries must be at least 0")


@dataclass
class RunTask:
    """One run to execute as one job: its run directory, the job callable and the runs it waits for."""

    run_dir: Path
    job: RunJob
    after: tuple[Path, ...] = ()


@dataclass
class Outcome:
    """What a job produced for its run: ``(results, status)`` as the in-process path returns, and the job id."""

    results: dict[str, Any] | None
    status: str
    job_id: str
    error: str | None = None
    attempts: int = 1

    def point_state(self) -> tuple[dict[str, Any] | None, str, str | None]:
        """``(results, status, error)`` of a sweep / DomainBed point (``sweep.SweepPoint``'s fields)."""
        return self.results, self.status, self.error


class Launcher:
    """Executes a batch of runs; ``local`` does nothing here (the caller's own loop runs them in process)."""

    name = "local"
    gpus_per_job = 0

    def comparison_tasks(self, plans: Sequence[Any]) -> list[RunTask]:
        """The planned runs (``compare.PlannedRun``, in run order) that need running, each one job.

        A finished run with the planned config is not submitted; a post-hoc run whose input run will be
        redone is redone too (the in-process rule of ``compare.run_action``).
        """
        from robustft.compare import run_action

        will_run: set[Path] = set()
        tasks = []
        for plan in plans:
            action, _ = run_action(plan, will_run)
            if action == "reuse":
                continue
            will_run.add(plan.run_dir)
            redo = any(path in will_run for path in plan.inputs)
            tasks.append(RunTask(plan.run_dir, RunJob("compare", plan, redo, self.gpus_per_job), tuple(plan.inputs)))
        return tasks

    def point_tasks(self, points: Sequence[Any]) -> list[RunTask]:
        """Sweep / DomainBed points (``sweep.SweepPoint``) not finished yet, each one job."""
        from robustft.runner import RESULTS_FILE

        return [RunTask(p.run_dir, RunJob("point", p)) for p in points if not (p.run_dir / RESULTS_FILE).is_file()]

    def execute(self, tasks: Sequence[RunTask], out: Path, log: Callable[[str], None]) -> dict[Path, Outcome]:
        """Run ``tasks`` and return each run's outcome; runs not returned are left to the caller's loop."""
        return {}


class LocalLauncher(Launcher):
    """Today's behaviour: the command's loop fits every run in this process, one after another."""


# ------------------------------------------------------------------------------------------- jobs


class RunJob(_JobBase):
    """The callable a job runs: one run of a comparison (``role="compare"``) or one sweep/DomainBed point.

    Pickled by submitit with everything it needs (the planned run and its config), so a job depends on
    nothing but the shared filesystem the run directories live on.
    """

    def __init__(self, role: Literal["compare", "point"], plan: Any, redo_inputs: bool = False, gpus: int = 0) -> None:
        self.role, self.plan, self.redo_inputs, self.gpus = role, plan, redo_inputs, gpus

    def __call__(self) -> tuple[dict[str, Any] | None, str, str | None]:
        log = _job_log
        if self.role == "point":
            return _run_point_job(self.plan, log)
        from robustft.compare import _SeedRunner

        if self.gpus > 1:
            return _run_under_torchrun(self.plan, self.gpus, self.redo_inputs, log)
        runner = _SeedRunner(self.plan.config, None, log)
        results, status = runner.run(self.plan, set(self.plan.inputs) if self.redo_inputs else set())
        return results, status, None

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue the same run: the new job finds ``checkpoints/last.pt`` and resumes from it (the engine's
        resume is bit-exact), so the only work lost is the steps since the last periodic checkpoint."""
        _job_log(f"{self.plan.config.run_dir}: pre-empted or timed out; requeued, it resumes from its last checkpoint")
        return submitit.helpers.DelayedSubmission(self)


def _job_log(message: str) -> None:
    print(message, flush=True)


def _run_point_job(point: Any, log: Callable[[str], None]) -> tuple[dict[str, Any] | None, str, str | None]:
    from robustft.sweep import run_point

    run_point(point, {}, str(point.run_dir), log)
    return point.results, point.status, point.error


def _run_under_torchrun(
    plan: Any, gpus: int, redo_inputs: bool, log: Callable[[str], None]
) -> tuple[dict[str, Any] | None, str, str | None]:
    """A job with several GPUs: ``robustft fit`` under torchrun (one rank per GPU), then the costs in this process."""
    import subprocess

    import yaml

    from robustft.compare import _SeedRunner, run_action
    from robustft.runner import RESULTS_FILE

    action, _ = run_action(plan, set(plan.inputs) if redo_inputs else set())
    run_dir = plan.config.run_dir
    if action != "reuse":
        config_file = run_dir.parent / f".{run_dir.name}.job_config.yaml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(_fit_config(plan.config), sort_keys=False))
        command = torchrun_command(config_file, gpus, resume=action == "resume")
        log(" ".join(command))
        if subprocess.call(command) != 0:
            raise RuntimeError(f"{run_dir}: torchrun exited non-zero (see this job's log)")
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    if plan.kind != "ingredient":
        _SeedRunner(plan.config, None, log).costs(plan)
    return results, "reused" if action == "reuse" else "fitted", None


def torchrun_command(config_file: Path, processes: int, resume: bool = False) -> list[str]:
    """What a job with ``processes`` GPUs runs: ``robustft fit`` under ``torchrun --standalone`` on its node.

    submitit starts one task per node (``tasks_per_node=1``); torchrun starts one rank per GPU in it, so the
    ranks find each other on the node without SLURM's ``srun`` wiring (NCCL on GPUs, gloo with
    ``train.device: cpu``).
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*command, "-m", "robustft", "fit", str(config_file), *(["--resume"] if resume else [])]


def _fit_config(config: Any) -> dict[str, Any]:
    raw = config.model_dump(mode="json")
    raw["method"] = {"name": config.method.name, **config.method.options()}
    return raw


# --------------------------------------------------------------------------------------- submitit


@dataclass
class _Tracked:
    task: RunTask
    job: Any
    attempts: int
    attached_pid: int | None = None  # a local job of an earlier command: watched through its process id

    def done(self) -> bool:
        if self.attached_pid is not None:
            return not _local_job_alive(self.attached_pid)
        return self.job.done()


@dataclass
class SubmititLauncher(Launcher):
    """One submitit job per run (SLURM or local subprocesses); see the module docstring."""

    options: ClusterOptions = field(default_factory=ClusterOptions)
    poll_seconds: float = POLL_SECONDS
    name = "submitit"

    def __post_init__(self) -> None:
        if submitit is None:
            raise ConfigError("--launcher submitit needs the submitit package: pip install 'robustft[cluster]'")

    @property
    def gpus_per_job(self) -> int:  # type: ignore[override]
        return self.options.gpus_per_job

    def executor_parameters(self) -> dict[str, Any]:
        """``AutoExecutor.update_parameters`` keywords for ``options`` (``slurm_*`` only on SLURM)."""
        opts = self.options
        parameters: dict[str, Any] = {"timeout_min": opts.time_minutes, "nodes": 1, "tasks_per_node": 1}
        if opts.gpus_per_job:
            parameters["gpus_per_node"] = opts.gpus_per_job
        if opts.cpus_per_job:
            parameters["cpus_per_task"] = opts.cpus_per_job
        if opts.cluster == "slurm":
            parameters |= {"slurm_partition": opts.partition, "slurm_account": opts.account, "name": "robustft"}
            parameters["slurm_signal_delay_s"] = 120  # USR2 two minutes before the limit: time to requeue
        return {key: value for key, value in parameters.items() if value is not None}

    def executor(self, folder: Path) -> submitit.Executor:
        """submitit's executor for ``options``: SLURM's through ``AutoExecutor`` (sbatch by submitit), else local."""
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=self.options.cluster, slurm_max_num_timeout=3)
        executor.update_parameters(**self.executor_parameters())
        return executor

    def execute(self, tasks: Sequence[RunTask], out: Path, log: Callable[[str], None]) -> dict[Path, Outcome]:
        out = Path(out)
        folder = Path(self.options.jobs_dir or out / JOBS_DIR).resolve()
        registry = _Registry(out / JOBS_FILE)
        executor = self.executor(folder)
        waiting = list(tasks)
        keys = {task.run_dir for task in tasks}
        running: list[_Tracked] = []
        outcomes: dict[Path, Outcome] = {}
        failed: list[str] = []
        while waiting or running:
            for tracked in [t for t in running if t.done()]:
                running.remove(tracked)
                outcome = self._collect(tracked)
                run_dir = tracked.task.run_dir
                if outcome.error is None or outcome.status == "failed":  # finished (a diverged sweep point too)
                    outcomes[run_dir] = outcome
                    registry.record(run_dir, outcome.job_id, folder, outcome.status, tracked.attempts)
                    log(f"{run_dir}: job {outcome.job_id} {outcome.status}")
                elif tracked.attempts <= self.options.max_retries:
                    log(f"{run_dir}: job {outcome.job_id} died ({outcome.error}); resubmitting, it resumes")
                    running.append(self._submit(executor, tracked.task, tracked.attempts + 1, registry, folder, log))
                else:
                    registry.record(run_dir, outcome.job_id, folder, "failed", tracked.attempts)
                    failed.append(f"{run_dir} (job {outcome.job_id}, log {_log_path(tracked.job)})")
                    outcomes[run_dir] = outcome
            blocked = {task.run_dir for task in waiting} | {t.task.run_dir for t in running}
            blocked |= {path for path, outcome in outcomes.items() if outcome.error is not None}
            for task in list(waiting):
                if len(running) >= self.options.array_parallelism:
                    break
                inputs = [path for path in task.after if path in keys]
                if any(path in blocked for path in inputs):
                    if all(path in outcomes for path in inputs):  # an input failed for good: so does this run
                        waiting.remove(task)
                        outcomes[task.run_dir] = Outcome(None, "failed", "-", "an input run failed")
                        failed.append(f"{task.run_dir} (not started: an input run failed)")
                    continue
                waiting.remove(task)
                running.append(self._attach(task, registry, executor, folder, log))
            if running:
                time.sleep(self.poll_seconds)
        if failed:
            raise JobFailedError(
                f"{len(failed)} run(s) failed: {'; '.join(failed)}; run the same command again to resume them"
            )
        return outcomes

    def _attach(self, task: RunTask, registry: _Registry, executor, folder: Path, log) -> _Tracked:
        """The job already running this run (an earlier command's), else a new submission."""
        record = registry.get(task.run_dir)
        if record and record["state"] == "submitted":
            job_id = record["job_id"]
            if self.options.cluster == "local" and _local_job_alive(int(job_id)):
                log(f"{task.run_dir}: job {job_id} is still running; waiting for it")
                job = submitit.local.local.LocalJob(folder / "%j", job_id)
                return _Tracked(task, job, record.get("attempts", 1), attached_pid=int(job_id))
            if self.options.cluster == "slurm":
                job = submitit.SlurmJob(folder / "%j", job_id)
                if job.state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED"):
                    log(f"{task.run_dir}: job {job_id} is {job.state.lower()}; waiting for it")
                    return _Tracked(task, job, record.get("attempts", 1))
            log(f"{task.run_dir}: job {job_id} of an earlier call is gone; resubmitting, it resumes")
        return self._submit(executor, task, 1, registry, folder, log)

    def _submit(self, executor, task: RunTask, attempts: int, registry: _Registry, folder: Path, log) -> _Tracked:
        job = executor.submit(task.job)
        registry.record(task.run_dir, job.job_id, folder, "submitted", attempts)
        log(f"{task.run_dir}: submitted as job {job.job_id}")
        return _Tracked(task, job, attempts)

    @staticmethod
    def _collect(tracked: _Tracked) -> Outcome:
        job_id = str(tracked.job.job_id)
        try:
            results, status, error = tracked.job.result()
        except Exception as error:  # submitit's UncompletedJobError / FailedJobError: the job died or raised
            message = str(error).strip().splitlines()
            return Outcome(None, "died", job_id, message[-1] if message else type(error).__name__, tracked.attempts)
        return Outcome(results, status, job_id, error, tracked.attempts)


def _log_path(job: Any) -> str:
    try:
        return str(job.paths.stderr)
    except Exception:  # a job object without paths (never submitted)
        return "-"


def _local_job_alive(pid: int) -> bool:
    """Whether ``pid`` is still a submitit local job controller (pids are reused once it exits)."""
    try:
        os.kill(pid, 0)
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    if b"submitit" not in command:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    return status[0] != "Z"  # a zombie (exited, not yet reaped by its parent) is finished


class _Registry:
    """``launcher_jobs.json``: per run directory, its latest job id, jobs folder, state and attempts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: dict[str, dict[str, Any]] = json.loads(path.read_text())["runs"] if path.is_file() else {}

    def get(self, run_dir: Path) -> dict[str, Any] | None:
        return self.runs.get(str(run_dir))

    def record(self, run_dir: Path, job_id: str, folder: Path, state: str, attempts: int) -> None:
        self.runs[str(run_dir)] = {"job_id": str(job_id), "folder": str(folder), "state": state, "attempts": attempts}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"runs": self.runs}, indent=2) + "\n"
        atomic_write(self.path, lambda tmp: tmp.write_text(text))


# ----------------------------------------------------------------------------------- seed workers


@dataclass
class SeedWorkersLauncher(Launcher):
    """The seeds of a comparison side by side: each seed's runs in one local worker process, ``workers`` at once.

    A model that uses extra threads or a GPU poorly (a small one, a ViT-S on a large GPU) takes about twice one
    seed's time for two seeds in one process; two processes, each with half the threads (or one GPU each), can
    take much less (what DomainBed's and submitit's local sweeps do). Each worker pays a fresh interpreter and
    prepares its data and model again, so where one process already uses every core well it is the faster
    choice (docs/distributed.md has a measurement). A seed's runs stay in one process, in run order, so they
    still share one prepared data set and model, and its logit cache, through one ``compare._SeedRunner``.

    - **Threads.** Every worker runs ``torch.get_num_threads() // workers`` torch threads (at least one): each
      would otherwise take ``OMP_NUM_THREADS`` threads and the workers would oversubscribe the cores.
    - **GPUs.** With several GPUs visible, worker *i* gets GPU *i* (round-robin when there are more workers than
      GPUs) through ``CUDA_VISIBLE_DEVICES``, set before CUDA starts in the worker. With one GPU the workers
      share it: worth it for a small model that leaves the GPU idle, not for a big one that fills it.
    - **Lifetime.** A worker gets ``SIGTERM`` when the command dies (Linux ``PR_SET_PDEATHSIG``), so a killed
      command leaves no process writing into a run directory; the same command again resumes the interrupted
      runs from their checkpoints.
    - **Failures.** The first error of a worker is raised in the command with its message (a ``RobustftError``
      stays one: one ``robustft: error:`` line); seeds not started are cancelled, running ones finish first.
      A run that stops early (``train.stop_after``) ends its seed's worker; the comparison reports it as stopped.

    Workers are started with ``spawn`` (a fresh interpreter: no forked torch threads or CUDA state), at most
    one per seed that has runs to do.
    """

    workers: int = 2
    name = "seed-workers"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--seed-workers {self.workers}: must be at least 1")

    def execute(self, tasks: Sequence[RunTask], out: Path, log: Callable[[str], None]) -> dict[Path, Outcome]:
        groups = seed_groups(tasks)
        if not groups:
            return {}
        workers = min(self.workers, len(groups))
        threads = worker_threads(workers)
        devices = worker_devices(workers)
        where = f", GPUs {', '.join(devices)}" if devices else ""
        log(f"running {len(groups)} seed(s) in {workers} worker process(es), {threads} torch thread(s) each{where}")
        with seed_worker_pool(workers, threads, devices) as pool:
            return _run_groups(pool, groups, workers, log)


def _run_groups(
    pool: ProcessPoolExecutor, groups: dict[int, list[RunTask]], workers: int, log: Callable[[str], None]
) -> dict[Path, Outcome]:
    """Each group in ``pool``, at most ``workers`` submitted at once (a submitted group cannot be withdrawn).

    After the first error no further seed starts; the running ones finish (their runs stay finished or
    resumable), then the error is raised.
    """
    waiting = list(groups.items())
    running: dict[Future, int] = {}
    outcomes: dict[Path, Outcome] = {}
    error: BaseException | None = None
    while running or (waiting and error is None):
        while waiting and error is None and len(running) < workers:
            seed, group = waiting.pop(0)
            running[pool.submit(_run_seed_group, seed, group)] = seed
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            seed = running.pop(future)
            if future.exception() is None:
                outcomes |= future.result()
            elif error is None:
                error = future.exception()
                log(_failure_note(seed, list(running.values()), [other for other, _ in waiting]))
    if error is not None:
        raise _reported(error)
    return outcomes


def _failure_note(seed: int, running: list[int], not_started: list[int]) -> str:
    """What the command does after seed ``seed`` failed: wait for the running seeds, start no other."""
    note = f"seed {seed} failed"
    if running:
        note += f"; waiting for seed(s) {', '.join(map(str, running))} to finish their runs"
    if not_started:
        note += f"; seed(s) {', '.join(map(str, not_started))} not started"
    return note


def seed_worker_pool(workers: int, threads: int, devices: list[str]) -> ProcessPoolExecutor:
    """``workers`` spawned processes, each set up by ``_start_seed_worker`` with ``threads`` and one of ``devices``."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads or CUDA state
    queue = context.Queue() if devices else None
    for device in devices:
        queue.put(device)  # type: ignore[union-attr]
    initargs = (threads, queue, os.getpid())
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_start_seed_worker, initargs=initargs)


def seed_groups(tasks: Sequence[RunTask]) -> dict[int, list[RunTask]]:
    """The tasks by seed (``task.job.plan.config.seed``), in first-seen seed order and run order inside a seed."""
    groups: dict[int, list[RunTask]] = {}
    for task in tasks:
        groups.setdefault(task.job.plan.config.seed, []).append(task)
    return groups


def worker_threads(workers: int) -> int:
    """Torch threads per worker: this process's threads shared out, at least one each."""
    import torch

    return max(1, torch.get_num_threads() // workers)


def worker_devices(workers: int) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each worker (round-robin over the visible GPUs); empty below two GPUs.

    The entries are this process's own (``CUDA_VISIBLE_DEVICES=2,3`` gives the workers ``2`` and ``3``), so a
    command restricted to some GPUs stays on them.
    """
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [entry.strip() for entry in visible.split(",")] if visible else []
    entries = entries[: torch.cuda.device_count()] or [str(index) for index in range(torch.cuda.device_count())]
    return [entries[index % len(entries)] for index in range(workers)]


def _start_seed_worker(threads: int, devices: Any, parent_pid: int) -> None:
    """A worker's set-up, before any work: die with the command, take a GPU, then set the torch threads."""
    _die_with_parent(parent_pid)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices.get(timeout=60)  # before CUDA starts in this process
    import torch

    torch.set_num_threads(threads)


def _die_with_parent(parent_pid: int) -> None:
    """``SIGTERM`` when the command's process exits (Linux); a command already gone ends the worker now."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the command died before the signal was asked for
        os._exit(1)


def _run_seed_group(seed: int, tasks: list[RunTask]) -> dict[Path, Outcome]:
    """One seed's runs, in order, through one ``_SeedRunner`` (one prepared data set, model and logit cache).

    A run redone here makes its post-hoc dependants redo too (``compare.run_action``); a run that stops early
    ends the seed (the later runs may combine it). An error is raised as one the command can unpickle.
    """
    from robustft.compare import _SeedRunner

    log = _seed_log(seed)
    import torch

    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu = f", CUDA_VISIBLE_DEVICES={devices}" if devices and torch.cuda.is_available() else ""
    log(f"worker pid {os.getpid()}, {torch.get_num_threads()} torch thread(s){gpu}: {len(tasks)} run(s)")
    runner = _SeedRunner(tasks[0].job.plan.config, None, log)
    redone: set[Path] = set()
    outcomes: dict[Path, Outcome] = {}
    try:
        for task in tasks:
            plan = task.job.plan
            inputs = set(plan.inputs) if task.job.redo_inputs else set()
            results, status = runner.run(plan, redone | inputs)
            outcomes[task.run_dir] = Outcome(results or None, status, f"seed{seed}")
            if not results:
                log(f"{plan.run_dir}: stopped early (train.stop_after); the seed's later runs wait for the next call")
                break
            if status == "fitted":
                redone.add(plan.run_dir)
    except Exception as error:
        raise _transferable(error) from None
    return outcomes


def _seed_log(seed: int) -> Callable[[str], None]:
    """A worker's log: every line prefixed ``seed <k>: `` (the workers' lines interleave), flushed at once."""

    def log(message: str) -> None:
        print("\n".join(f"seed {seed}: {line}" for line in str(message).splitlines() or [""]), flush=True)

    return log


def _transferable(error: Exception) -> Exception:
    """``error`` if it survives pickling to the command, else one with its message (a ``RobustftError`` stays one).

    An exception whose constructor takes other arguments than its message would not unpickle in the command and
    would break the pool instead of being reported. A bug keeps its traceback text in the message.
    """
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        if isinstance(error, RobustftError):
            return RobustftError(str(error))
        return RuntimeError("".join(traceback.format_exception(error)).rstrip())
    return error


def _reported(error: BaseException) -> BaseException:
    """A worker's error as the command raises it; a worker that died (killed, out of memory) is one line too."""
    if isinstance(error, BrokenProcessPool):
        return RobustftError(
            f"a seed worker process died without an error (killed, or out of memory?): {error}; "
            "run the same command again to resume its runs"
        )
    return error


def make_launcher(name: str, options: ClusterOptions | None = None) -> Launcher:
    """``--launcher local|submitit``."""
    if name == "local":
        return LocalLauncher()
    if name == "submitit":
        return SubmititLauncher(options or ClusterOptions())
    raise ConfigError(f"--launcher {name}: expected local or submitit")
