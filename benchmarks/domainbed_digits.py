"""DomainBed on the built-in multi-domain digits: leave-one-domain-out accuracy per held-out domain and average.

Usage: OMP_NUM_THREADS=1 python benchmarks/domainbed_digits.py --methods finetune,linear_probe,zeroshot --trials 3

Every method is run through ``robustft.domainbed`` (the same code as ``robustft domainbed``) with one
shared recipe (AdamW, batch 64, ``--steps`` steps, ``--lr``; ``--lrs`` makes a learning-rate grid
selected by training-domain validation). Runs go to ``--runs`` and are resumable: re-running with
more methods (``--methods finetune,lora,mixture_of_adapters(expert_type=lora)``) trains only the new
ones and rewrites the JSON with every method. Writes ``benchmarks/results/domainbed_digits.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from robustft.domainbed import markdown_table, plan_domainbed, run_domainbed
from robustft.sweep import split_values


def recipe(args: argparse.Namespace) -> dict:
    """The raw ``robustft domainbed`` config this benchmark runs (also written into the JSON)."""
    section = {"methods": [m.strip() for m in split_values(args.methods) if m.strip()], "trials": args.trials}
    if args.lrs:
        section["grid"] = {"optim.lr": [float(lr) for lr in args.lrs.split(",")]}
    if args.test_domains:
        section["test_domains"] = args.test_domains.split(",")
    return {
        "name": "domainbed_digits",
        "output_dir": str(args.runs),
        "data": {"benchmark": "digits_domains", "batch_size": 64, "eval_batch_size": 512},
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 0.1, "warmup_fraction": 0.1},
        "train": {
            "steps": args.steps,
            "grad_clip": 1.0,
            "checkpoint_every": 1000,
            "log_every": 50,
            "progress": False,
            "precision": args.precision,
            "device": args.device,
        },
        "domainbed": section,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="finetune,linear_probe,zeroshot", help="as robustft domainbed --methods")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps per run (batch 64)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--lrs", default=None, help="comma-separated learning-rate grid, selected on id_val")
    parser.add_argument("--test-domains", default=None, help="comma-separated (default: all four)")
    parser.add_argument("--precision", default="fp32", help="fp32 (default, as on CPU), bf16 or auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/domainbed_digits.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    raw = recipe(args)
    start = time.perf_counter()
    summary = run_domainbed(plan_domainbed(raw, source="benchmarks/domainbed_digits.py"), log=print)
    seconds: dict[str, list[float]] = {}
    for run in summary["runs"]:
        for candidate in run["candidates"]:
            results_file = Path(candidate["run_dir"]) / "results.json"
            if results_file.is_file():
                entry = next(iter(json.loads(results_file.read_text())["methods"].values()))
                seconds.setdefault(run["method"], []).append(entry["train_seconds"])
    report = {
        "benchmark": "digits_domains (DomainBed protocol, leave-one-domain-out)",
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores".strip(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "config": raw,
        "table": summary["table"],
        "markdown": markdown_table(summary),
        "mean_train_seconds_per_run": {method: statistics.mean(values) for method, values in seconds.items()},
        "runs": [
            {
                **{key: run[key] for key in ("method", "test_domain", "trial", "id_val", "test")},
                "candidates": {c["name"]: {"id_val": c["id_val"], "test": c["test"]} for c in run["candidates"]},
            }
            for run in summary["runs"]
        ],
        "seconds_this_invocation": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(report["markdown"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
