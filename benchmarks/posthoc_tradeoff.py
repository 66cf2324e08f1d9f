"""Weight-space and output-space baselines on digits-shift: ZS, FT, WiSE-FT, OSE and Model Soups over seeds.

Usage: python benchmarks/posthoc_tradeoff.py --seeds 0 1 2 --out benchmarks/results/posthoc_tradeoff.json

Each seed runs the demo's recipe: zero-shot, fine-tuning (lr 3e-4), WiSE-FT and OSE over that fine-tune
(alpha 0, 0.1, ..., 1, picked on id_val), and uniform / greedy soups over three fine-tunes from the same
initialisation (lr 1e-4, 3e-4, 1e-3). Writes per-seed results, the mean WiSE-FT and OSE curves, and
whether the id_val-picked WiSE-FT beats FT on ID and OOD at once (the claim of Wortsman et al., CVPR 2022).
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
from bench_support import mean_std

from robustft.demo import INGREDIENTS_DIR, SOUP_LEARNING_RATES, run_demo
from robustft.report import plot_alpha_curve

METHODS = ("zeroshot", "finetune", "wise_ft", "output_ensemble", "uniform_soup", "greedy_soup")
SWEPT = ("wise_ft", "output_ensemble")
KEPT_KEYS = (
    "id",
    "id_val",
    "ood",
    "ood_avg",
    "train_seconds",
    "alpha",
    "oracle_alpha_id",
    "oracle_alpha_ood",
    "curve",
    "kept",
    "ingredient_id_val",
)


def run_seed(out: Path, seed: int) -> dict[str, Any]:
    results = run_demo(out, seed=seed, methods=list(METHODS), progress=False, log=lambda message: None)
    methods = {name: {k: v for k, v in entry.items() if k in KEPT_KEYS} for name, entry in results["methods"].items()}
    ingredients = {}
    for path in sorted((out / INGREDIENTS_DIR).glob("*/results.json")):
        entry = json.loads(path.read_text())["methods"]["finetune"]
        ingredients[path.parent.name] = {k: entry[k] for k in ("id", "id_val", "ood_avg")}
    ft, wise = methods["finetune"], methods["wise_ft"]
    return {
        "methods": methods,
        "extra_ingredients": ingredients,
        "wise_pick_beats_ft_on_id_and_ood": wise["id"] > ft["id"] and wise["ood_avg"] > ft["ood_avg"],
        "wise_curve_alphas_beating_ft_on_both": [
            p["alpha"] for p in wise["curve"] if p["id"] > ft["id"] and p["ood_avg"] > ft["ood_avg"]
        ],
        "demo_seconds": results["total_seconds"],
    }


def summarize(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    seeds = list(per_seed)
    summary: dict[str, Any] = {"methods": {}, "curves": {}}
    for name in METHODS:
        entries = [per_seed[s]["methods"][name] for s in seeds]
        summary["methods"][name] = {
            "id": mean_std([e["id"] for e in entries]),
            "ood_avg": mean_std([e["ood_avg"] for e in entries]),
        }
        if name in SWEPT:
            summary["methods"][name]["alpha_picked"] = [e["alpha"] for e in entries]
            summary["methods"][name]["oracle_alpha_ood"] = [e["oracle_alpha_ood"] for e in entries]
            curves = [{p["alpha"]: p for p in e["curve"]} for e in entries]
            summary["curves"][name] = [
                {
                    "alpha": alpha,
                    "id": statistics.mean(c[alpha]["id"] for c in curves),
                    "ood_avg": statistics.mean(c[alpha]["ood_avg"] for c in curves),
                    "id_val": statistics.mean(c[alpha]["id_val"] for c in curves),
                }
                for alpha in curves[0]
            ]
    summary["methods"]["greedy_soup"]["kept"] = [len(per_seed[s]["methods"]["greedy_soup"]["kept"]) for s in seeds]
    return summary


def plot_mean_curves(report: dict[str, Any], out: Path) -> list[Path]:
    """``<out stem>_<method>_curve.png``: the seed-mean curves, the most common id_val pick ringed."""
    figures = []
    for name, curve in report["summary"]["curves"].items():
        picks = report["summary"]["methods"][name]["alpha_picked"]
        chosen = max(set(picks), key=picks.count)
        path = out.with_name(f"{out.stem}_{name}_curve.png")
        title = f"{name} on digits-shift, mean of {len(report['seeds'])} seeds"
        figures.append(plot_alpha_curve(curve, path, title=title, chosen=chosen))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/posthoc_tradeoff.json"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the figures from --out; train nothing")
    args = parser.parse_args()
    if args.plot_only:
        print("\n".join(map(str, plot_mean_curves(json.loads(args.out.read_text()), args.out))))
        return
    per_seed, start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            per_seed[seed] = run_seed(Path(tmp) / f"seed{seed}", seed)
            row = {name: (round(m["id"], 2), round(m["ood_avg"], 2)) for name, m in per_seed[seed]["methods"].items()}
            print(json.dumps({"seed": seed, "id_ood_avg": row, "seconds": round(per_seed[seed]["demo_seconds"], 1)}))
    report = {
        "benchmark": "digits_shift",
        "recipe": "robustft demo (AdamW lr 3e-4, wd 0.1, batch 64, 8 epochs); soups over lr "
        f"{', '.join(map(str, sorted({3e-4, *SOUP_LEARNING_RATES})))}",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seeds": per_seed,
        "summary": summarize(per_seed),
        "wise_pick_beats_ft_on_id_and_ood_every_seed": all(
            v["wise_pick_beats_ft_on_id_and_ood"] for v in per_seed.values()
        ),
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot_mean_curves(report, args.out)
    print(json.dumps(report["summary"]["methods"], indent=2))
    print(
        f"WiSE-FT (id_val pick) beats FT on ID and OOD on every seed: "
        f"{report['wise_pick_beats_ft_on_id_and_ood_every_seed']}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
