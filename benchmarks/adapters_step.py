"""Training-step cost of LoRA (robustft's fused layer and peft's), mixture of adapters and full FT, as ratios to FT.

Usage:
    python benchmarks/adapters_step.py                                   # digits ViT, CPU
    python benchmarks/adapters_step.py --model vit_base_patch16_224 --device cuda --batch 64 --steps 20 \\
        --out benchmarks/results/adapters_step_vit_base.json

Each variant runs in its own child process (so one variant's freed memory cannot hide another's peak) on
the same random-init model (the tiny digits ViT, or ``timm.create_model(name, pretrained=False)``) as the
backbone of an ``ImageClassifier``:

- ``finetune``: every weight trains.
- ``lora``: robustft's ``LoRALinear`` (rank 8, alpha 16) on every ``attn.qkv`` and ``attn.proj``, head trains.
- ``lora_peft``: the same adapters through ``peft.inject_adapter_in_model`` (skipped with a note without peft).
- ``moa_lora`` / ``moa_kadaptation``: the mixture-of-adapters method (routed experts of ranks 1, 2, 4, 8 on
  qkv of blocks 0, 2, 4, ...), including its balancing loss and router statistics.

A step is the engine's sequence: forward under the engine's autocast (bf16 on CUDA, fp32 on CPU), the
method's loss, backward, clip 1.0, AdamW step, zero_grad, and the logs converted to floats. ``steps``
timed steps follow ``warmup`` steps; the median is reported. ``infer_seconds_median`` times an eval
forward of the predictor (LoRA after merging; peft unmerged; MoA keeps its routed adapters).
Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed window; on CPU the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs before the first step), which includes
~0.8 GB of libraries, so CPU memory ratios understate the differences (see ``step_peak_extra``).

Step times to compare (unless ``--no-interleaved``): after the per-variant processes, every variant's session is
built again in this process and the sessions are stepped in turn, the order rotated each round
(``bench_support.interleaved_times``), so a change of machine load slows all alike; then the finalised predictors'
eval forwards are timed the same way. Per variant: ``step_seconds_interleaved`` / ``infer_seconds_interleaved``
(median, min, mean: ``bench_support.time_summary``) and ``throughput_ratio_to_ft`` /
``infer_throughput_ratio_to_ft`` (FT's time over the variant's: per round then the median, of the minima, of
the means: ``bench_support.ratio_summary``); ``machine_load`` holds the load averages before and after. The
per-process ``time_ratio_to_ft`` / ``infer_ratio_to_ft`` (medians of runs made one after another) are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from bench_support import (
    build_model,
    engine_session,
    interleaved_times,
    interleaved_with_load,
    ratio_summary,
    read_status,
    time_summary,
)

VARIANTS = ("finetune", "lora", "lora_peft", "moa_lora", "moa_kadaptation")
LORA_RANK, LORA_ALPHA = 8, 16.0


def prepare_variant(variant: str, model, ctx):
    """(method, model) for a variant; peft's adapters go on the backbone, the head trains."""
    from robustft.methods import get_method

    if variant == "lora_peft":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=r".*attn\.(qkv|proj)$")
        model.backbone = inject_adapter_in_model(config, model.backbone)  # freezes all but the adapters
        model.head.requires_grad_(True)
        return get_method("finetune")(), model
    if variant.startswith("moa_"):
        cls = get_method("mixture_of_adapters")
        method = cls(cls.config_cls(experts=variant.removeprefix("moa_")))
    elif variant == "lora":
        cls = get_method("lora")
        method = cls(cls.config_cls(rank=LORA_RANK, alpha=LORA_ALPHA, save_adapter=False))
    else:
        method = get_method("finetune")()
    return method, method.prepare(model, ctx)


def build_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """The variant's method, prepared model, engine session (``warmup + steps`` long) and batch, on the device."""
    from torch.utils.data import TensorDataset

    from robustft.methods.base import RunContext

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, size = build_model(args.model)
    model.to(device)
    images = torch.randn(args.batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    ctx = RunContext(Path(args.tmp), device, 0, {"train": TensorDataset(images.cpu(), labels.cpu())},
                     [str(i) for i in range(10)], eval_batch_size=args.batch, log=lambda message: None)  # fmt: skip
    method, model = prepare_variant(variant, model, ctx)
    model.to(device)
    precision = "bf16" if bf16(args) else "fp32"
    session = engine_session(method, model, images, labels, device, precision, total_steps=args.warmup + args.steps)
    return {"method": method, "model": model, "ctx": ctx, "session": session, "images": images}


def bf16(args: argparse.Namespace) -> bool:
    return args.device == "cuda" and args.precision != "fp32"


def predictor_forward(variant: str, built: dict[str, Any], args: argparse.Namespace) -> Callable[[], object]:
    """One eval forward of the variant's predictor (``finalize``; peft's model as it is), no grad, engine autocast."""
    model = built["model"]
    predictor = built["method"].finalize(model, built["ctx"]) if variant != "lora_peft" else model
    predictor.eval()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16(args) else nullcontext

    def forward() -> object:
        with torch.no_grad(), autocast():
            return predictor(built["images"])

    return forward


def worker(args: argparse.Namespace) -> dict:
    """One variant alone in this process: peak memory over its steps, and its step and inference times."""
    built = build_variant(args.worker, args)
    device, model, session = torch.device(args.device), built["model"], built["session"]
    rss_before = read_status("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    times = interleaved_times({args.worker: session.step}, args.warmup, args.steps, device)[args.worker]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else read_status("VmHWM")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    forward = predictor_forward(args.worker, built, args)
    infer = interleaved_times({args.worker: forward}, args.warmup, args.steps, device)[args.worker]
    return {
        "step_seconds_median": statistics.median(times),
        "step_seconds_mean": statistics.mean(times),
        "step_seconds_min": min(times),
        "infer_seconds_median": statistics.median(infer),
        "peak_memory_bytes": peak,
        "rss_before_steps": rss_before,
        "step_peak_extra": peak - rss_before if device.type == "cpu" else None,
        "trainable_params": trainable,
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss",
    }


def interleaved_pass(names: list[str], args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], dict]:
    """Every variant's steps, then its predictor's forwards, timed interleaved in this process (module docs)."""
    device = torch.device(args.device)
    built = {name: build_variant(name, args) for name in names}
    steps = {name: parts["session"].step for name, parts in built.items()}
    step_times, load = interleaved_with_load(steps, args.warmup, args.steps, device)
    forwards = {name: predictor_forward(name, parts, args) for name, parts in built.items()}
    infer_times, infer_load = interleaved_with_load(forwards, args.warmup, args.steps, device)
    results = {}
    for name in names:
        entry: dict[str, Any] = {
            "step_seconds_interleaved": time_summary(step_times[name]),
            "infer_seconds_interleaved": time_summary(infer_times[name]),
        }
        if "finetune" in step_times:
            entry["throughput_ratio_to_ft"] = ratio_summary(step_times[name], step_times["finetune"])
            entry["infer_throughput_ratio_to_ft"] = ratio_summary(infer_times[name], infer_times["finetune"])
        results[name] = entry
    return results, {"steps": load, "inference": infer_load}


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", help="digits or a timm ViT name (random init)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32"], help="auto: bf16 on CUDA")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adapters_step.json"))
    parser.add_argument("--no-interleaved", action="store_true", help="skip the interleaved timing in one process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="/tmp/robustft_adapters_step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results, notes = {}, []
    for name in args.variants.split(","):
        if name == "lora_peft" and not peft_available():
            notes.append("lora_peft skipped: peft is not installed (pip install 'robustft[adapters]')")
            continue
        command = [sys.executable, __file__, "--worker", name, "--model", args.model, "--device", args.device,
                   "--precision", args.precision, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]  # fmt: skip
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
        print(name, json.dumps(results[name]), flush=True)
    load = None
    if not args.no_interleaved:
        interleaved, load = interleaved_pass(list(results), args)
        for name, entry in interleaved.items():
            results[name].update(entry)
    ft = results["finetune"]
    for entry in results.values():
        entry["time_ratio_to_ft"] = entry["step_seconds_median"] / ft["step_seconds_median"]
        entry["infer_ratio_to_ft"] = entry["infer_seconds_median"] / ft["infer_seconds_median"]
        entry["peak_memory_ratio_to_ft"] = entry["peak_memory_bytes"] / ft["peak_memory_bytes"]
        if entry["step_peak_extra"] is not None:
            entry["step_peak_extra_ratio_to_ft"] = entry["step_peak_extra"] / max(1, ft["step_peak_extra"])
    report = {
        "model": args.model,
        "batch": args.batch,
        "steps": args.steps,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "precision": "bf16" if args.device == "cuda" and args.precision == "auto" else "fp32",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "step_timing": "per-variant processes; interleaved in one process" if load else "per-variant processes",
        "machine_load": load,
        "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": "attn.qkv, attn.proj"},
        "notes": notes,
        "variants": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: {r: v[r] for r in v if "ratio_to_ft" in r} for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
