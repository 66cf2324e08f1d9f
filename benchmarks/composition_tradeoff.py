"""Composition on digits-shift: post-hoc methods (WiSE-FT, OSE, VRF) on top of each trained method.

Usage: python benchmarks/composition_tradeoff.py --seeds 0 --out benchmarks/results/composition_tradeoff.json

Each seed trains every base method with the demo's recipe (data loaded once), then runs every post-hoc
method over each base run (``robustft vrf runs/gmixout`` and friends). A composition "beats both parts" when
it is at least as good as the base run and as the post-hoc method over plain fine-tuning on ID and on OOD
average, and strictly better on one of them (it is Pareto-better than both). Methods this installation does
not register are skipped and listed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from robustft.demo import demo_config
from robustft.methods import list_methods
from robustft.posthoc import composed_name
from robustft.runner import fit, prepare_run

BASES = ("finetune", "mixout", "gmixout", "saft", "masked_counterfactual", "lora", "mixture_of_adapters", "l2_sp")
POSTHOC = ("wise_ft", "output_ensemble", "vrf")


def quiet(message: str) -> None:
    pass


def run_seed(out: Path, seed: int, bases: list[str], posthoc: list[str]) -> dict[str, dict[str, Any]]:
    prepared = prepare_run(demo_config("zeroshot", seed, out), quiet)
    scores: dict[str, dict[str, Any]] = {}
    for base in ["zeroshot", *bases]:
        started = time.perf_counter()
        entry = fit(demo_config(base, seed, out, progress=False), log=quiet, prepared=prepared)["methods"][base]
        scores[base] = {"id": entry["id"], "ood_avg": entry["ood_avg"], "seconds": time.perf_counter() - started}
        print(f"seed {seed} {base}: ID {entry['id']:.2f} OOD {entry['ood_avg']:.2f}", flush=True)
    for base in bases:
        for method in posthoc:
            options = {"finetuned_run": str(out / base)}
            config = demo_config(method, seed, out, name=f"{base}+{method}", method_options=options, progress=False)
            try:
                entry = next(iter(fit(config, log=quiet, prepared=prepared)["methods"].values()))
            except Exception as error:  # a pair that cannot be composed (WiSE-FT over routed adapters)
                scores[composed_name(method, base)] = {"error": str(error).splitlines()[0]}
                print(f"seed {seed} {base}+{method}: {error}", flush=True)
                continue
            scores[composed_name(method, base)] = {"id": entry["id"], "ood_avg": entry["ood_avg"]}
            print(f"seed {seed} {base}+{method}: ID {entry['id']:.2f} OOD {entry['ood_avg']:.2f}", flush=True)
    return scores


def pareto_better(candidate: dict[str, float], other: dict[str, float]) -> bool:
    at_least = candidate["id"] >= other["id"] and candidate["ood_avg"] >= other["ood_avg"]
    return at_least and (candidate["id"] > other["id"] or candidate["ood_avg"] > other["ood_avg"])


def summarize(per_seed: dict[int, dict[str, dict[str, Any]]], bases: list[str], posthoc: list[str]) -> dict[str, Any]:
    names = [name for name in per_seed[next(iter(per_seed))] if "error" not in per_seed[next(iter(per_seed))][name]]
    mean = {
        name: {key: statistics.mean(per_seed[s][name][key] for s in per_seed) for key in ("id", "ood_avg")}
        for name in names
    }
    std = {
        name: {key: statistics.pstdev(per_seed[s][name][key] for s in per_seed) for key in ("id", "ood_avg")}
        for name in names
    }
    compositions = {}
    for base in bases:
        if base == "finetune":
            continue
        for method in posthoc:
            pair = composed_name(method, base)
            if pair not in mean or method not in mean:
                continue
            compositions[pair] = {
                "beats_base": pareto_better(mean[pair], mean[base]),
                "beats_posthoc_over_finetune": pareto_better(mean[pair], mean[method]),
            }
            compositions[pair]["beats_both_parts"] = all(compositions[pair].values())
    return {"mean": mean, "std": std, "compositions": compositions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--bases", nargs="+", default=list(BASES))
    parser.add_argument("--posthoc", nargs="+", default=list(POSTHOC))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/composition_tradeoff.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    known = set(list_methods())
    bases = [name for name in args.bases if name in known]
    posthoc = [name for name in args.posthoc if name in known]
    skipped = sorted(set(args.bases + args.posthoc) - known)
    started = time.perf_counter()
    per_seed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            per_seed[seed] = run_seed(Path(tmp) / f"seed{seed}", seed, bases, posthoc)
    report = {
        "benchmark": "digits_shift",
        "command": "python benchmarks/composition_tradeoff.py "
        + " ".join([f"--seeds {' '.join(map(str, args.seeds))}", f"--threads {args.threads}"]),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "skipped_unregistered": skipped,
        "per_seed": per_seed,
        "summary": summarize(per_seed, bases, posthoc),
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for pair, verdict in report["summary"]["compositions"].items():
        scores = report["summary"]["mean"][pair]
        print(
            f"{pair:40s} ID {scores['id']:6.2f} OOD {scores['ood_avg']:6.2f}  beats both parts: "
            f"{verdict['beats_both_parts']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
