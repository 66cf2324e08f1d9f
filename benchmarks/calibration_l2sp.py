"""L2-SP against FT, and calibration (ECE / NLL, before and after temperature scaling) on digits-shift.

Usage: python benchmarks/calibration_l2sp.py --seed 0 --threads 1 --out benchmarks/results/calibration_l2sp.json

Every run uses the demo's recipe (AdamW lr 3e-4, wd 0.1, batch 64, 8 epochs; L2-SP replaces the weight decay
by its penalty) from one prepared zero-shot model: zero-shot, fine-tuning, L2-SP at several ``alpha``
(``beta`` 0.01), and WiSE-FT / OSE over the fine-tune (alpha picked on id_val). Calibration is what
``robustft fit`` writes to results.json: ECE (15 bins, percent) and NLL per split, raw and after one
temperature fitted on id_val (``ece_ts``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from robustft.demo import demo_config
from robustft.runner import fit, prepare_run

L2_SP_ALPHAS = (0.1, 1.0, 10.0)


def ood_mean(values: dict[str, float]) -> float:
    ood = [value for split, value in values.items() if split.startswith("ood_")]
    return sum(ood) / len(ood)


def row(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": entry["id"],
        "ood_avg": entry["ood_avg"],
        "ece_id": entry["ece"]["id_test"],
        "ece_ood_avg": ood_mean(entry["ece"]),
        "nll_id": entry["nll"]["id_test"],
        "nll_ood_avg": ood_mean(entry["nll"]),
        "temperature": entry["temperature"],
        "ece_ts_id": entry["ece_ts"]["id_test"],
        "ece_ts_ood_avg": ood_mean(entry["ece_ts"]),
        "nll_ts_ood_avg": ood_mean(entry["nll_ts"]),
        "train_seconds": entry.get("train_seconds"),
    }


def run(out: Path, seed: int) -> dict[str, Any]:
    def quiet(message: str) -> None:
        pass

    prepared = prepare_run(demo_config("zeroshot", seed, out), quiet)
    rows = {}
    for name, method, options in [
        ("zeroshot", "zeroshot", {}),
        ("finetune", "finetune", {}),
        *[(f"l2_sp_alpha{alpha:g}", "l2_sp", {"alpha": alpha}) for alpha in L2_SP_ALPHAS],
        ("wise_ft", "wise_ft", {"finetuned_run": str(out / "finetune")}),
        ("output_ensemble", "output_ensemble", {"finetuned_run": str(out / "finetune")}),
    ]:
        config = demo_config(method, seed, out, name=name, method_options=options, progress=False)
        entry = next(iter(fit(config, log=quiet, prepared=prepared)["methods"].values()))
        rows[name] = row(entry)
        print(json.dumps({name: {k: round(v, 3) for k, v in rows[name].items() if isinstance(v, float)}}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_l2sp.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(Path(tmp), args.seed)
    report = {
        "benchmark": "digits_shift",
        "recipe": "robustft demo (AdamW lr 3e-4, wd 0.1, batch 64, 8 epochs); L2-SP beta 0.01, no weight decay",
        "seed": args.seed,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "methods": rows,
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
