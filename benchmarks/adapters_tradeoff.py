"""ID / OOD of LoRA and mixture of adapters (both expert types) vs FT on digits-shift, in the demo recipe.

Usage:
    python benchmarks/adapters_tradeoff.py --seeds 0 --lrs 3e-4 1e-3

Every run uses ``robustft.demo.demo_config`` (AdamW, wd 0.1, batch 64, 8 epochs = 88 steps, cosine with
10% warm-up) and differs only in the method and the learning rate. Writes
``benchmarks/results/adapters_tradeoff.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

RUNS = {
    "finetune": ("finetune", {}),
    "lora": ("lora", {}),
    "moa_kadaptation": ("mixture_of_adapters", {"experts": "kadaptation"}),
    "moa_lora": ("mixture_of_adapters", {"experts": "lora"}),
}


def main() -> None:
    from robustft.demo import demo_config
    from robustft.runner import fit, prepare_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3])
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adapters_tradeoff.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            prepared = prepare_run(demo_config("zeroshot", seed, Path(tmp)), log=lambda message: None)
            for lr in args.lrs:
                for label in args.runs:
                    method, options = RUNS[label]
                    name = f"{label}_lr{lr:g}_s{seed}"
                    config = demo_config(method, seed, Path(tmp), name=name, method_options=options,
                                         optim={"lr": lr}, progress=False)  # fmt: skip
                    start = time.perf_counter()
                    entry = fit(config, log=lambda message: None, prepared=prepared)["methods"][method]
                    row = {"run": label, "lr": lr, "seed": seed, "seconds": time.perf_counter() - start}
                    row |= {key: entry.get(key) for key in ("id", "ood_avg", "trainable_params", "router_last_step")}
                    row["ood"] = entry["ood"]
                    results.append(row)
                    print(json.dumps({k: row[k] for k in ("run", "lr", "id", "ood_avg", "seconds")}), flush=True)
    report = {"torch": torch.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
