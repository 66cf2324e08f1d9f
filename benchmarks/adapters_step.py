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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from bench_support import build_model, engine_session, read_status, timed_session_steps

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


def worker(args: argparse.Namespace) -> dict:
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
    method, model = prepare_variant(args.worker, model, ctx)
    model.to(device)
    bf16 = device.type == "cuda" and args.precision != "fp32"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    precision = "bf16" if bf16 else "fp32"
    session = engine_session(method, model, images, labels, device, precision, total_steps=args.warmup + args.steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rss_before = read_status("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    times = timed_session_steps(session, args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else read_status("VmHWM")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    predictor = method.finalize(model, ctx) if args.worker != "lora_peft" else model
    predictor.eval()
    infer = []
    with torch.no_grad(), autocast():
        for index in range(args.warmup + args.steps):
            start = time.perf_counter()
            predictor(images)
            sync()
            if index >= args.warmup:
                infer.append(time.perf_counter() - start)
    return {
        "step_seconds_median": statistics.median(times),
        "step_seconds_mean": statistics.mean(times),
        "infer_seconds_median": statistics.median(infer),
        "peak_memory_bytes": peak,
        "rss_before_steps": rss_before,
        "step_peak_extra": peak - rss_before if device.type == "cpu" else None,
        "trainable_params": trainable,
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss",
    }


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
        "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": "attn.qkv, attn.proj"},
        "notes": notes,
        "variants": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: {r: round(v[r], 3) for r in v if "ratio_to_ft" in r} for k, v in results.items()}))


if __name__ == "__main__":
    main()
