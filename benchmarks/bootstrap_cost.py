"""What the confidence intervals and paired tests cost a leaderboard row, by test-split size and seed count.

    python benchmarks/bootstrap_cost.py [--repeats 3] [--out benchmarks/results/bootstrap_cost.json]

Synthetic correctness (80% ID, three OOD splits) of a method and a baseline, sizes from digits-shift's 400
images to ImageNet's 50,000 per split; times :func:`robustft.statistics.accuracy_intervals` (one row's ``ci``)
and :func:`robustft.statistics.paired_test` (one baseline), 1000 resamples, median over ``--repeats``.
The machine's load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from robustft.statistics import RESAMPLES, accuracy_intervals, paired_test

SIZES = (400, 2_000, 10_000, 50_000)
SEEDS = (1, 3)
SPLITS = ("id_test", "ood_a", "ood_b", "ood_c")


def correctness(images: int, seeds: int, probability: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {split: torch.rand(seeds, images, generator=generator) < probability for split in SPLITS}


def timed(function, *arguments) -> float:
    start = time.perf_counter()
    function(*arguments)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bootstrap_cost.json"))
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    cases = []
    loads = []
    for images in SIZES:
        for seeds in SEEDS:
            method, baseline = correctness(images, seeds, 0.8, generator), correctness(images, seeds, 0.78, generator)
            interval, paired = [], []
            for _ in range(args.repeats):
                loads.append(os.getloadavg()[0])
                interval.append(timed(accuracy_intervals, method))
                paired.append(timed(paired_test, method, baseline))
            cases.append(
                {
                    "images_per_split": images,
                    "splits": len(SPLITS),
                    "seeds": seeds,
                    "intervals_seconds_median": statistics.median(interval),
                    "paired_test_seconds_median": statistics.median(paired),
                }
            )
            print(json.dumps(cases[-1]))
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_1min": loads},
        "torch_threads": torch.get_num_threads(),
        "resamples": RESAMPLES,
        "repeats": args.repeats,
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
