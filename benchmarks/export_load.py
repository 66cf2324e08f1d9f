"""How long ``robustft.load`` and ``robustft export`` take on a digits-shift LoRA run, and whether they agree.

    python benchmarks/export_load.py [--repeats 3] [--out benchmarks/results/export_load.json]

Trains a 2-step LoRA run on the built-in benchmark once, then times, round by round: ``robustft.load`` from the
final checkpoint's metadata (model spec only, no data) and from a copy whose checkpoint has no metadata (the
``robustft evaluate`` path: config, data, zero-shot head), the timm export and the peft export. Each round also
records the largest logit difference between robustft's predictor and what timm / peft load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_load.json"))
    args = parser.parse_args()

    import timm
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    import robustft
    from robustft.demo import demo_config
    from robustft.export import export_run
    from robustft.layout import FINAL_CHECKPOINT
    from robustft.runner import fit

    work = Path(tempfile.mkdtemp(prefix="robustft-export-bench-"))
    start = time.perf_counter()
    fit(demo_config("lora", 0, work / "runs", steps=2, progress=False), log=lambda message: None)
    fit_seconds = time.perf_counter() - start
    run_dir = work / "runs" / "lora"
    old = work / "old"
    shutil.copytree(run_dir, old)
    save_file(load_file(old / FINAL_CHECKPOINT), old / FINAL_CHECKPOINT, metadata={"format": "pt"})
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = robustft.load(run_dir).predictor(images)

    timings: dict[str, list[float]] = {
        "load_metadata": [],
        "load_without_metadata": [],
        "export_timm": [],
        "export_peft": [],
    }
    differences: dict[str, float] = {}
    for round_index in range(args.repeats):
        for case in timings:
            out = work / f"{case}-{round_index}"
            start = time.perf_counter()
            if case == "load_metadata":
                robustft.load(run_dir)
            elif case == "load_without_metadata":
                robustft.load(old)
            elif case == "export_timm":
                export_run(run_dir, "timm", out)
            else:
                export_run(run_dir, "peft", out)
            timings[case].append(time.perf_counter() - start)
            with torch.no_grad():
                if case == "export_timm":
                    logits = timm.create_model(f"local-dir:{out}", pretrained=True).eval()(images)
                    differences["timm"] = float((logits - reference).abs().max())
                if case == "export_peft":
                    base = timm.create_model(f"local-dir:{out / 'base'}", pretrained=True)
                    logits = PeftModel.from_pretrained(base, str(out)).eval()(images)
                    differences["peft"] = float((logits - reference).abs().max())
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": "python benchmarks/export_load.py " + f"--repeats {args.repeats}",
        "fit_seconds_2_steps": fit_seconds,
        "median_seconds": {case: statistics.median(values) for case, values in timings.items()},
        "seconds": timings,
        "max_abs_logit_difference": differences,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median_seconds"]), json.dumps(differences))


if __name__ == "__main__":
    main()
