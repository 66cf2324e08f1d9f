"""Sparse fine-tuning on digits-shift: ID and OOD of Mixout, GMixout, SAFT vs ZS, FT and WiSE-FT over seeds.

Usage: python benchmarks/sparse_tradeoff.py --seeds 0 1 2 --out benchmarks/results/sparse_tradeoff.json

Every method runs with its defaults in the demo recipe (AdamW lr 3e-4, wd 0.1, batch 64, 8 epochs,
warm-up + cosine, clip 1.0); WiSE-FT picks alpha on id_val. Per seed and as mean/std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from robustft.demo import run_demo
from robustft.methods import list_methods

METHODS = ("zeroshot", "finetune", "wise_ft", "mixout", "gmixout", "saft")
KEYS = ("id", "id_val", "ood", "ood_avg", "train_seconds", "trainable_params", "active_params")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m in list_methods()))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sparse_tradeoff.json"))
    args = parser.parse_args()
    per_seed, start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            results = run_demo(
                Path(tmp) / f"seed{seed}",
                seed=seed,
                methods=args.methods.split(","),
                progress=False,
                log=lambda message: None,
            )
            per_seed[seed] = {name: {k: m[k] for k in KEYS if k in m} for name, m in results["methods"].items()}
            print(
                json.dumps(
                    {
                        "seed": seed,
                        "methods": {n: [round(m["id"], 2), round(m["ood_avg"], 2)] for n, m in per_seed[seed].items()},
                    }
                ),
                flush=True,
            )
    summary = {}
    for name in per_seed[args.seeds[0]]:
        ids = [per_seed[s][name]["id"] for s in args.seeds]
        oods = [per_seed[s][name]["ood_avg"] for s in args.seeds]
        summary[name] = {
            "id_mean": statistics.mean(ids),
            "id_std": statistics.pstdev(ids),
            "ood_avg_mean": statistics.mean(oods),
            "ood_avg_std": statistics.pstdev(oods),
        }
    ft = summary["finetune"]
    claims = {
        name: {
            "ood_minus_ft": s["ood_avg_mean"] - ft["ood_avg_mean"],
            "id_minus_ft": s["id_mean"] - ft["id_mean"],
            "better_ood_at_equal_or_better_id": s["ood_avg_mean"] > ft["ood_avg_mean"]
            and s["id_mean"] >= ft["id_mean"] - max(ft["id_std"], 0.1),
        }
        for name, s in summary.items()
        if name in ("mixout", "gmixout", "saft")
    }
    report = {
        "benchmark": "digits_shift",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "seeds": per_seed,
        "summary": summary,
        "claims_vs_ft": claims,
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"summary": summary, "claims_vs_ft": claims}, indent=1))


if __name__ == "__main__":
    main()
