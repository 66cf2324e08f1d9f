"""``robustft demo`` wall time: this checkout against an earlier commit, run alternately, and 2 seeds against 1.

Usage (from the repository root; minutes to hours, run it in the background with one thread):
    OMP_NUM_THREADS=1 python benchmarks/demo_speed.py --before 3f3bb91 --epochs 1 --rounds 1
    OMP_NUM_THREADS=1 python benchmarks/demo_speed.py --only after,after_2_seeds,after_all_cores --seed-workers 2

With ``--seed-workers N`` the two-seed run is ``demo --seeds 0,1 --seed-workers N``: its N worker processes get
``--threads`` torch threads each (the command ``--threads`` x N), and one more run, ``after_all_cores``, is one
seed with those ``--threads`` x N threads in one process. Two seeds are then measured against both one-seed
baselines: ``after`` (the same threads per process) and ``after_all_cores`` (the same cores); and
``after_2_seeds_one_process`` runs the two seeds one after another in one process on the same cores (no workers),
the alternative the workers have to beat.

Both commits' packages are extracted with ``git archive`` into a temporary folder; each demo runs
as its own ``python -m robustft demo`` process with ``PYTHONPATH`` pointing at one tree or the other, one
at a time, alternating (before, after, after with two seeds, then again for every round), so a change of
machine load affects both sides alike; the load averages before and after every run are recorded. The
demo runs into a fresh temporary directory each time (nothing reused). Writes
``benchmarks/results/demo_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_support import machine_load

ROOT = Path(__file__).resolve().parent.parent
RUN_NAMES = ("before", "after", "after_2_seeds", "after_all_cores", "after_2_seeds_one_process")


def extract(commit: str, into: Path) -> Path:
    """``src/`` of ``commit`` into ``into`` (``git archive``: no worktree, no checkout of this one)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def run_demo(
    source: Path,
    epochs: int | None,
    seeds: str | None,
    threads: int,
    methods: str | None,
    model: str | None = None,
    seed_workers: int = 1,
) -> dict:
    with tempfile.TemporaryDirectory(prefix="robustft_demo_speed_") as out:
        command = [sys.executable, "-m", "robustft", "demo", "--out", out]
        command += ["--model", model] if model else []
        command += ["--seed-workers", str(seed_workers)] if seed_workers > 1 else []
        command += ["--epochs", str(epochs)] if epochs else []
        command += ["--methods", methods] if methods else []
        command += ["--seeds", seeds] if seeds else []
        env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
        load_before = machine_load()
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        lines = (done.stdout + done.stderr).strip().splitlines()
        tail = lines[-3:]
        phases = [line for line in lines if " batches in " in line or " finished in " in line]
        return {
            "seconds": seconds,
            "returncode": done.returncode,
            "seeds": seeds or "0",
            "threads": threads,
            "seed_workers": seed_workers,
            "model": model or "demo default",
            "load_before": load_before,
            "load_after": machine_load(),
            "tail": tail,
            "phases": phases,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="3f3bb91", help="the earlier commit")
    parser.add_argument("--after", default="HEAD", help="the later commit")
    parser.add_argument("--epochs", type=int, default=None, help="demo budget (default: the recipe's)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--methods", default=None, help="a subset of methods (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--after-model",
        default=None,
        help="the later commit's demo model (digits_vit: the earlier commit's only demo model, like with like)",
    )
    parser.add_argument("--no-seeds", action="store_true", help="skip the two-seed run")
    parser.add_argument(
        "--seed-workers",
        type=int,
        default=1,
        help="the two-seed run's --seed-workers (N > 1 adds after_all_cores, after_2_seeds_one_process)",
    )
    parser.add_argument("--only", default=None, help=f"run only these of {','.join(RUN_NAMES)} (a rerun)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/demo_speed.json")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in RUN_NAMES}
    args.after_commit = subprocess.run(  # resolved now: later commits while it runs are not what was measured
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.after], capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="robustft_trees_") as folder:
        (Path(folder) / "before").mkdir()
        (Path(folder) / "after").mkdir()
        before = extract(args.before, Path(folder) / "before")
        after = extract(args.after, Path(folder) / "after")  # frozen: edits made while it runs do not leak in
        for _ in range(args.rounds):
            for name, source, seeds, threads, workers in round_plan(args, before, after):
                runs[name].append(
                    run_demo(source, args.epochs, seeds, threads, args.methods, model_of(args, name), workers)
                )
                print(name, json.dumps(runs[name][-1]), flush=True)
                write(args, runs)


def seed_processes(args: argparse.Namespace) -> int:
    """The two-seed run's worker processes: ``--seed-workers``, at most one per seed."""
    return min(args.seed_workers, 2)


def round_plan(args: argparse.Namespace, before: Path, after: Path) -> list[tuple[str, Path, str | None, int, int]]:
    """One round: ``(name, source, seeds, threads of the command, seed workers)`` per demo, in the order run."""
    processes = seed_processes(args)
    plan = [("before", before, None, args.threads, 1), ("after", after, None, args.threads, 1)]
    if not args.no_seeds:  # each of the two-seed run's processes gets --threads threads
        plan.append(("after_2_seeds", after, "0,1", args.threads * processes, args.seed_workers))
        if processes > 1:  # one seed, and the two seeds in one process, on the cores the two-seed run uses
            plan.append(("after_all_cores", after, None, args.threads * processes, 1))
            plan.append(("after_2_seeds_one_process", after, "0,1", args.threads * processes, 1))
    return [step for step in plan if args.only is None or step[0] in args.only.split(",")]


def model_of(args: argparse.Namespace, name: str) -> str | None:
    return None if name == "before" else args.after_model


def write(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    def median(name: str) -> float | None:
        values = [run["seconds"] for run in runs[name] if run["returncode"] == 0]
        return statistics.median(values) if values else None

    before, after, two = median("before"), median("after"), median("after_2_seeds")
    all_cores, one_process = median("after_all_cores"), median("after_2_seeds_one_process")
    report = {
        "benchmark": "demo_speed",
        "command": " ".join(["python", *sys.argv]),
        "before_commit": args.before,
        "after_commit": args.after_commit,
        "epochs": args.epochs or "recipe default",
        "methods": args.methods or "all",
        "threads": args.threads,
        "seed_workers": args.seed_workers,
        "after_model": args.after_model or "demo default",
        "median_seconds": {name: median(name) for name in RUN_NAMES},
        "after_over_before": after / before if before and after else None,
        "two_seeds_over_one": two / after if two and after else None,  # the same threads per process
        "two_seeds_over_one_all_cores": two / all_cores if two and all_cores else None,  # the same cores
        "two_seeds_one_process_over_one_all_cores": one_process / all_cores if one_process and all_cores else None,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
