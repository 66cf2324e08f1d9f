"""``compare --seed-workers 2``: the seeds side by side in two worker processes, each with half the threads, give the
leaderboard of the one-process comparison bit for bit; the same command again reuses every run; bad options are one
``robustft: error:`` line.

The comparison is test_launchers.py's (zero-shot, fine-tune, WiSE-FT x 2 seeds on glyphs-shift with the tiny CLIP,
48-image splits) with 4 SGD steps per fine-tune: each worker is mostly interpreter start-up.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posthoc_support import quiet
from robustft.cli import main
from robustft.compare import execute_comparison, load_compare_config
from robustft.demo import run_demo
from robustft.errors import ConfigError, FileContentError
from robustft.launchers import SeedWorkersLauncher
from robustft.runner import RESULTS_FILE
from test_launchers import METHODS, SEEDS, job_environment, write_config

STEPS = 4
# Measured again in every run (timings) or naming the run's own directory: not results of the method.
NOT_RESULTS = ("train_seconds", "inference_cost", "runs")
WORKER_LINE = re.compile(r"^seed (\d+): worker pid (\d+), (\d+) torch thread\(s\)", re.MULTILINE)


def with_threads(threads: int, call):
    """``call()`` with ``threads`` torch threads in this process (the test's own count restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return call()
    finally:
        torch.set_num_threads(before)


def seed_workers_command(config: Path, out: Path, *options: str) -> list[str]:
    return [
        *(sys.executable, "-m", "robustft", "compare", str(config), "--out", str(out)),
        *("--methods", ",".join(METHODS), "--seeds", ",".join(map(str, SEEDS)), *options),
    ]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """The comparison in one process with one thread, then through the CLI with two seed workers and two threads
    (so one each), then the same again in this process."""
    root = tmp_path_factory.mktemp("seed_workers")
    config = write_config(root, steps=STEPS)
    base, settings = load_compare_config(config)
    sequential = with_threads(
        1, lambda: execute_comparison(base, METHODS, SEEDS, root / "one", log=quiet, settings=settings)
    )
    out = root / "workers"
    environment = job_environment() | {"OMP_NUM_THREADS": "2"}  # the command's threads: split in two
    command = subprocess.Popen(
        seed_workers_command(config, out, "--seed-workers", "2"), env=environment, stdout=subprocess.PIPE, text=True
    )
    output, _ = command.communicate(timeout=600)
    manifest = json.loads((out / "compare_runs.json").read_text())["runs"]  # before the call again
    logged: list[str] = []
    workers = SeedWorkersLauncher(2)
    again = execute_comparison(base, METHODS, SEEDS, out, log=logged.append, settings=settings, launcher=workers)
    return sequential, out, command, output, manifest, again, "\n".join(logged)


def results_of(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in NOT_RESULTS}


def test_two_seed_workers_give_the_one_process_leaderboard_bit_for_bit(compared):
    sequential, out, command, output, _, _, _ = compared
    assert command.returncode == 0, output
    leaderboard = json.loads((out / "leaderboard.json").read_text())
    assert list(leaderboard["methods"]) == METHODS and leaderboard["seeds"] == SEEDS
    expected = sequential.leaderboard["methods"]
    for method in METHODS:
        assert results_of(leaderboard["methods"][method]) == results_of(expected[method]), method
    for seed in SEEDS:
        for method in ("finetune", "wise_ft"):
            got = json.loads((out / f"seed{seed}" / method / RESULTS_FILE).read_text())["methods"][method]
            want = sequential.per_seed[seed]["methods"][method]
            assert (got["id"], got["ood"]) == (want["id"], want["ood"]), (seed, method)


def test_the_zero_shot_run_is_run_once_and_reported_for_both_seeds(compared):
    _, out, _, _, manifest, _, _ = compared
    zero_shot = json.loads((out / "leaderboard.json").read_text())["methods"]["zeroshot"]
    assert zero_shot["seed_independent"] is True
    assert zero_shot["runs"] == [str(out / "seed0" / "zeroshot")] * 2
    assert not (out / "seed1" / "zeroshot").exists()
    statuses = [(entry["seed"], entry["method"], entry["status"], entry.get("job_id")) for entry in manifest]
    assert statuses == [
        (0, "zeroshot", "fitted", "seed0"),
        (0, "finetune", "fitted", "seed0"),
        (0, "wise_ft", "fitted", "seed0"),
        (1, "zeroshot", "shared", None),
        (1, "finetune", "fitted", "seed1"),
        (1, "wise_ft", "fitted", "seed1"),
    ]


def test_each_seed_ran_in_its_own_worker_process_with_half_the_threads(compared):
    _, _, command, output, _, _, _ = compared
    workers = {int(seed): (int(pid), int(threads)) for seed, pid, threads in WORKER_LINE.findall(output)}
    assert sorted(workers) == SEEDS, output
    pids = {pid for pid, _ in workers.values()}
    assert len(pids) == 2 and command.pid not in pids
    assert {threads for _, threads in workers.values()} == {2 // 2}
    assert "running 2 seed(s) in 2 worker process(es), 1 torch thread(s) each" in output
    assert re.search(r"^seed 1: finetune \(trained, seed 1\): running into", output, re.MULTILINE)


def test_the_same_command_again_reuses_every_run_and_starts_no_worker(compared):
    sequential, out, _, _, _, again, logged = compared
    assert [status["status"] for status in again.statuses] == ["reused"] * 3 + ["shared"] + ["reused"] * 2
    assert "worker process" not in logged
    for method in METHODS:
        assert results_of(again.leaderboard["methods"][method]) == results_of(sequential.leaderboard["methods"][method])


def test_an_error_in_a_worker_is_raised_as_itself_and_no_further_seed_starts(tmp_path):
    """A torn config.yaml met by seed 0's worker (1 worker, 3 seeds): the command gets its FileContentError."""
    from robustft.compare import plan_seed

    base, settings = load_compare_config(write_config(tmp_path, steps=STEPS))
    plans = [plan for seed in (0, 1, 2) for plan in plan_seed(base, ["finetune"], seed, tmp_path / str(seed), settings)]
    workers = SeedWorkersLauncher(1)
    tasks = workers.comparison_tasks(plans)
    torn = plans[0].run_dir / "config.yaml"
    torn.parent.mkdir(parents=True)
    torn.write_text("name: finetune\nseed: [0, ")
    logged: list[str] = []
    with pytest.raises(FileContentError, match="config.yaml"):
        workers.execute(tasks, tmp_path, logged.append)
    assert "seed 0 failed; seed(s) 1, 2 not started" in logged
    assert not any(plan.run_dir.exists() for plan in plans[1:])


@pytest.mark.parametrize(
    ("options", "named"),
    [(["--seed-workers", "2", "--launcher", "submitit"], ("--seed-workers 2", "--launcher submitit")),
     (["--seed-workers", "0"], ("--seed-workers 0",))],
)  # fmt: skip
def test_bad_seed_worker_options_are_one_error_line(tmp_path, monkeypatch, capsys, options, named):
    config = write_config(tmp_path)
    monkeypatch.setattr(sys, "argv", ["robustft", *seed_workers_command(config, tmp_path / "out", *options)[3:]])
    with pytest.raises(SystemExit) as exited:
        main()
    error = capsys.readouterr().err
    assert exited.value.code == 2 and error.count("\n") == 1 and error.startswith("robustft: error: ")
    assert all(name in error for name in named), error
    assert not (tmp_path / "out").exists()


def test_the_demo_checks_its_seed_workers_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="--seed-workers 0: must be at least 1"):
        run_demo(tmp_path / "demo", seeds=[0, 1], seed_workers=0, log=quiet)
    assert not (tmp_path / "demo").exists()


def test_the_seed_workers_need_no_submitit():
    """The CLI and compare load no launcher until one is asked for; submitit is the cluster extra: without it the
    seed workers still load and --launcher submitit says what to install."""
    script = (
        "import sys\n"
        "import robustft.cli, robustft.compare, robustft.demo\n"
        "assert 'robustft.launchers' not in sys.modules and 'submitit' not in sys.modules\n"
        "sys.modules['submitit'] = None\n"
        "from robustft.errors import ConfigError\n"
        "from robustft.launchers import SeedWorkersLauncher, make_launcher\n"
        "assert SeedWorkersLauncher(2).workers == 2\n"
        "try:\n    make_launcher('submitit')\nexcept ConfigError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=job_environment(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "pip install 'robustft[cluster]'" in done.stdout
