"""``--launcher submitit``: one real submitit job per run (the local executor's subprocesses) on the built-in
benchmark, a pre-empted job requeued through submitit's checkpointing and a killed one resubmitted, both resuming
to the uninterrupted result; running the command again reuses every finished run and submits nothing.

The comparison is 3 methods (zero-shot, fine-tune, WiSE-FT over the fine-tune) x 2 seeds on glyphs-shift with the
tiny CLIP (the demo's default model), with 48-image splits so each job is mostly interpreter start-up.
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

from posthoc_support import quiet
from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.compare import load_compare_config
from robustft.data.generated_cache import CACHE_ENVIRONMENT
from robustft.demo import builtin_model_sections
from robustft.errors import ConfigError
from robustft.launchers import JOBS_FILE, ClusterOptions, SubmititLauncher, make_launcher, torchrun_command
from robustft.runner import FINAL_CHECKPOINT, RESULTS_FILE, fit

METHODS = ["zeroshot", "finetune", "wise_ft"]
SEEDS = [0, 1]
STEPS = 16  # long enough that a job is caught between its first checkpoint and its end
SOURCE = Path(__file__).resolve().parents[1] / "src"
SPLIT_SIZES = {"train": 96, "id_val": 48, "id_test": 48, "ood_fonts": 48, "ood_corruption": 48, "ood_color": 48}
SPLIT_SIZES |= {"ood_rotation": 48}


def write_config(root: Path, steps: int = STEPS) -> Path:
    """The comparison's config: glyphs-shift with small splits and the tiny CLIP, a few SGD steps."""
    model, data = builtin_model_sections("glyph_clip")
    raw = {
        "name": "cmp",
        "output_dir": str(root / "runs"),
        "model": model,
        "data": {**data, "split_sizes": SPLIT_SIZES, "batch_size": 16},
        "method": {"name": "finetune"},
        "optim": {"name": "sgd", "lr": 1e-3},
        "train": {"steps": steps, "progress": False, "checkpoint_every": 4, "log_every": 4, "device": "cpu"},
        "compare": {"options": {"wise_ft": {"alphas": [0.0, 0.5, 1.0]}}},
    }
    path = root / "cmp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def compare_command(config: Path, out: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "robustft", "compare", str(config), "--out", str(out)),
        *("--methods", ",".join(METHODS), "--seeds", ",".join(map(str, SEEDS))),
        *("--launcher", "submitit", "--cluster", "local", "--array-parallelism", "2", "--max-retries", "1"),
    ]


def job_environment(cache: Path | None = None) -> dict[str, str]:
    """The jobs' environment: this checkout's package, one thread (the in-process reference's float reductions)
    and, given ``cache``, the generated-data cache the jobs share."""
    environment = {
        **os.environ,
        "PYTHONPATH": f"{SOURCE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    return environment | ({CACHE_ENVIRONMENT: str(cache)} if cache is not None else {})


def task_process(out: Path, run_dir: Path, timeout: float = 900) -> int:
    """The pid of the training process of ``run_dir``'s job (the child of submitit's local job controller),
    once the run has written its first checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert not (run_dir / RESULTS_FILE).is_file(), f"{run_dir} finished before it could be interrupted"
        if (run_dir / "checkpoints" / "last.pt").is_file() and (out / JOBS_FILE).is_file():
            job = json.loads((out / JOBS_FILE).read_text())["runs"][str(run_dir)]["job_id"]
            children = Path(f"/proc/{job}/task/{job}/children").read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.02)
    raise AssertionError(f"{run_dir}: no checkpoint within {timeout} s")


def job_logs(out: Path) -> str:
    return "\n".join(path.read_text() for path in sorted((out / "jobs").rglob("*_log.*")))


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("launch"))


def launch(root: Path):
    """The comparison through the CLI with two jobs interrupted mid-run; then the same command again."""
    root.mkdir(parents=True, exist_ok=True)
    config, out = write_config(root), root / "cmp"
    environment = job_environment(root / "cache")
    started = time.monotonic()
    command = subprocess.Popen(compare_command(config, out), env=environment, stdout=subprocess.PIPE, text=True)
    os.kill(task_process(out, out / "seed0" / "finetune"), signal.SIGUSR2)  # pre-emption: submitit requeues
    os.kill(task_process(out, out / "seed1" / "finetune"), signal.SIGKILL)  # node failure: robustft resubmits
    first_output, _ = command.communicate(timeout=1200)
    first_seconds = time.monotonic() - started
    registry = json.loads((out / JOBS_FILE).read_text())
    registry["manifest"] = json.loads((out / "compare_runs.json").read_text())["runs"]  # before the second call
    again = subprocess.run(compare_command(config, out), env=environment, capture_output=True, text=True)
    return config, out, command.returncode, first_output, first_seconds, registry, again


def uninterrupted(config: Path, out: Path, seed: int) -> Path:
    base, _ = load_compare_config(config, [f"seed={seed}", f"output_dir={out}", "name=finetune"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the jobs' OMP_NUM_THREADS=1: the same float reductions
    try:
        fit(base, log=quiet)
    finally:
        torch.set_num_threads(threads)
    return out / "finetune"


def job_runs() -> list[tuple[int, str]]:
    """Every (seed, method) but the zero-shot run of later seeds: it does not depend on the seed, so it is shared."""
    return [(seed, method) for seed in SEEDS for method in METHODS if method != "zeroshot" or seed == SEEDS[0]]


def statuses(status: str) -> list[str]:
    """The manifest's statuses in run order when every run that has a job has ``status``."""
    return [status if (seed, method) in job_runs() else "shared" for seed in SEEDS for method in METHODS]


def test_every_run_is_one_job_and_the_leaderboard_has_every_method_and_seed(launched):
    _, out, returncode, output, seconds, registry, _ = launched
    assert returncode == 0, output
    leaderboard = json.loads((out / "leaderboard.json").read_text())
    assert list(leaderboard["methods"]) == METHODS and leaderboard["seeds"] == SEEDS
    runs = registry["runs"]
    assert sorted(runs) == sorted(str(out / f"seed{seed}" / method) for seed, method in job_runs())
    assert {entry["state"] for entry in runs.values()} == {"fitted"}
    manifest = registry["manifest"]
    assert [entry["status"] for entry in manifest] == statuses("fitted")
    jobs = {entry["run_dir"]: entry["job_id"] for entry in manifest if entry["status"] != "shared"}
    assert jobs == {k: v["job_id"] for k, v in runs.items()}
    print(f"first call: {seconds:.1f} s")


def test_a_preempted_job_is_requeued_and_resumes_to_the_uninterrupted_weights(launched, tmp_path):
    config, out, _, _, _, registry, _ = launched
    logs = job_logs(out)
    assert "pre-empted or timed out; requeued" in logs  # RunJob.checkpoint, called by submitit on USR2
    assert registry["runs"][str(out / "seed0" / "finetune")]["attempts"] == 1  # the same job, requeued
    resumed = [line for line in logs.splitlines() if "resumed from" in line and "seed0/finetune" in line]
    step = int(resumed[0].rsplit(" ", 1)[-1])
    assert 0 < step < STEPS  # caught mid-run, not after it
    reference = uninterrupted(config, tmp_path, 0)
    got = load_state_dict_file(out / "seed0" / "finetune" / FINAL_CHECKPOINT)
    expected = load_state_dict_file(reference / FINAL_CHECKPOINT)
    assert max((got[key] - expected[key]).abs().max().item() for key in expected) == 0.0


def test_a_killed_job_is_resubmitted_and_resumes_to_the_uninterrupted_results(launched, tmp_path):
    config, out, _, output, _, registry, _ = launched
    assert registry["runs"][str(out / "seed1" / "finetune")]["attempts"] == 2
    assert "died" in output and "resubmitting" in output
    reference = uninterrupted(config, tmp_path, 1)
    got = json.loads((out / "seed1" / "finetune" / RESULTS_FILE).read_text())["methods"]["finetune"]
    expected = json.loads((reference / RESULTS_FILE).read_text())["methods"]["finetune"]
    assert (got["id"], got["ood"]) == (expected["id"], expected["ood"])
    weights = load_state_dict_file(out / "seed1" / "finetune" / FINAL_CHECKPOINT)
    reference_weights = load_state_dict_file(reference / FINAL_CHECKPOINT)
    assert all(torch.equal(weights[key], reference_weights[key]) for key in reference_weights)


def test_the_same_command_again_submits_nothing_and_gives_the_same_leaderboard(launched):
    _, out, _, _, _, registry, again = launched
    assert again.returncode == 0, again.stdout + again.stderr
    assert "submitted as job" not in again.stdout
    assert json.loads((out / JOBS_FILE).read_text())["runs"] == registry["runs"]  # no job recorded or resubmitted
    manifest = json.loads((out / "compare_runs.json").read_text())["runs"]
    assert [entry["status"] for entry in manifest] == statuses("reused")


@pytest.mark.slow
def test_a_running_job_of_an_earlier_call_is_waited_for_not_submitted_again(tmp_path):
    """The first command is stopped while its jobs run; the second attaches to them by job id."""
    config, out = write_config(tmp_path, steps=400), tmp_path / "cmp"  # still running when the second call starts
    command = compare_command(config, out)
    command[command.index("--methods") + 1] = "finetune"
    command[command.index("--seeds") + 1] = "0"
    first = subprocess.Popen(command, env=job_environment(), stdout=subprocess.DEVNULL)
    task_process(out, out / "seed0" / "finetune")
    first.kill()  # the waiting command dies; its job (its own process group's child) keeps running
    first.wait()
    job_id = json.loads((out / JOBS_FILE).read_text())["runs"][str(out / "seed0" / "finetune")]["job_id"]
    second = subprocess.run(command, env=job_environment(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"job {job_id} is still running; waiting for it" in second.stdout
    runs = json.loads((out / JOBS_FILE).read_text())["runs"]
    assert runs[str(out / "seed0" / "finetune")]["job_id"] == job_id
    assert (out / "leaderboard.json").is_file()


def test_cluster_options_are_checked_and_reach_submitit(tmp_path):
    with pytest.raises(ConfigError, match="--cluster pbs: expected slurm or local"):
        ClusterOptions(cluster="pbs")
    with pytest.raises(ConfigError, match="--launcher ray: expected local or submitit"):
        make_launcher("ray")
    options = ClusterOptions("slurm", partition="gpu", account="lab", gpus_per_job=4, time_minutes=240)
    parameters = SubmititLauncher(options).executor_parameters()
    assert parameters["slurm_partition"] == "gpu" and parameters["slurm_account"] == "lab"
    assert parameters["gpus_per_node"] == 4 and parameters["timeout_min"] == 240
    local = SubmititLauncher(ClusterOptions("local", time_minutes=5)).executor(tmp_path)
    assert type(local._executor).__name__ == "LocalExecutor" and local._executor.parameters["timeout_min"] == 5


def planned_runs(root: Path, *overrides: str):
    from robustft.compare import plan_seed

    base, settings = load_compare_config(write_config(root), list(overrides))
    return plan_seed(base, METHODS, 0, root / "cmp" / "seed0", settings)


def test_a_job_with_several_gpus_asks_for_them_and_runs_its_fit_under_torchrun(tmp_path):
    options = ClusterOptions("slurm", partition="gpu", gpus_per_job=4)
    launcher = SubmititLauncher(options)
    parameters = launcher.executor_parameters()
    assert parameters["gpus_per_node"] == 4 and parameters["tasks_per_node"] == 1  # one torchrun per job
    tasks = {task.run_dir.name: task for task in launcher.comparison_tasks(planned_runs(tmp_path))}
    assert {name: task.job.gpus for name, task in tasks.items()} == {name: 4 for name in METHODS}
    config_file = tmp_path / "finetune.yaml"
    assert torchrun_command(config_file, 4) == [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"),
        *("-m", "robustft", "fit", str(config_file)),
    ]
    assert torchrun_command(config_file, 4, resume=True)[-1] == "--resume"


@pytest.mark.slow
def test_a_job_with_two_processes_trains_under_torchrun_on_the_cpu(tmp_path, capfd):
    """The job callable submitit runs, with 2 processes per job: 2 gloo ranks on the CPU, the 1-process weights."""
    plans = {plan.method: plan for plan in planned_runs(tmp_path, "train.steps=6")}
    job = SubmititLauncher(ClusterOptions("local", gpus_per_job=2)).comparison_tasks([plans["finetune"]])[0].job
    environment = job_environment()
    previous = {key: os.environ.get(key) for key in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ.update({key: environment[key] for key in previous})
    try:
        results, status, error = job()
    finally:
        for key, value in previous.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert (status, error) == ("fitted", None) and "finetune" in results["methods"]
    assert "--nproc_per_node=2" in capfd.readouterr().out
    one_process = plans["finetune"].config.model_copy(update={"output_dir": tmp_path / "one_process"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(one_process, log=quiet)
    finally:
        torch.set_num_threads(threads)
    got = load_state_dict_file(plans["finetune"].run_dir / FINAL_CHECKPOINT)
    expected = load_state_dict_file(one_process.run_dir / FINAL_CHECKPOINT)
    assert max((got[key] - expected[key]).abs().max().item() for key in expected) < 1e-5
