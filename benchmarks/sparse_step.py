"""Cost of one training step of FT, Mixout, GMixout and SAFT at equal batch, as ratios to FT in the same run.

Usage:
    python benchmarks/sparse_step.py --out benchmarks/results/sparse_step.json            # the tiny digits ViT
    python benchmarks/sparse_step.py --model vit_base_patch16_224 --batch-size 8 --steps 10

Each method runs in its own child process (so one method's freed memory cannot hide another's peak):
the model (random init, a timm ViT as the backbone of an ``ImageClassifier``) is built, the method's
``prepare`` applied (SAFT's phase 1 runs on two random batches), AdamW built from the method's
``parameter_groups``; then ``warmup`` steps and ``steps`` timed steps run the engine's step sequence
(forward, CE, backward, after_backward, clip 1.0, optimiser step, zero_grad, after_step), so GMixout's
resampling every k steps is included in its mean step time (``steps`` should be a multiple of k).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the step window. On CPU, the process's
peak resident set (``VmHWM`` in /proc/self/status) over the step window, after resetting it by
writing 5 to /proc/self/clear_refs; ``rss_before_steps`` is the resident set of the prepared model
(with Mixout's anchors and GMixout's dense weights) before the first step, ``step_peak_extra`` the
peak above it (gradients, activations, optimiser state). Optimiser-state bytes are the tensors in
``optimizer.state``; index bytes the sparse methods' int64 index buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from bench_support import build_model, engine_session, read_status, timed_session_steps

METHODS = ("finetune", "mixout", "gmixout", "saft")


def worker(args: argparse.Namespace) -> dict:
    from torch.utils.data import TensorDataset

    from robustft.methods import get_method
    from robustft.methods.base import RunContext
    from robustft.sparse import optimizer_state_bytes, sparse_updates

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, size = build_model(args.model)
    model.to(device)
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    train = TensorDataset(images.cpu().repeat(2, 1, 1, 1), labels.cpu().repeat(2))
    ctx = RunContext(
        Path(args.tmp),
        device,
        0,
        {"train": train},
        [str(i) for i in range(10)],
        eval_batch_size=args.batch_size,
        log=lambda message: None,
    )
    method = get_method(args.worker)()
    model = method.prepare(model, ctx)
    method.setup(model, ctx)
    session = engine_session(method, model, images, labels, device, total_steps=args.warmup + args.steps)
    optimizer = session.optimizer
    rss_before = read_status("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    times = timed_session_steps(session, args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else read_status("VmHWM")
    updates = sparse_updates(model)
    return {
        "step_seconds_mean": statistics.mean(times),
        "step_seconds_median": statistics.median(times),
        "peak_memory_bytes": peak,
        "rss_before_steps": rss_before,
        "step_peak_extra": peak - rss_before if device.type == "cpu" else None,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "index_bytes": sum(u.indices.numel() * u.indices.element_size() for u in updates.values()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in build_model(args.model)[0].parameters()),
        "active_params": ctx.extras.get("active_params"),
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_vit", help="digits_vit or a timm name (random init)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (a multiple of GMixout's k=10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sparse_step.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="/tmp/robustft_sparse_step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {}
    for name in args.methods.split(","):
        command = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--model",
            args.model,
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
        print(name, json.dumps(results[name]))
    ft = results["finetune"]
    for entry in results.values():
        entry["time_ratio_to_ft"] = entry["step_seconds_median"] / ft["step_seconds_median"]
        entry["peak_memory_ratio_to_ft"] = entry["peak_memory_bytes"] / ft["peak_memory_bytes"]
        entry["optimizer_state_ratio_to_ft"] = entry["optimizer_state_bytes"] / ft["optimizer_state_bytes"]
    report = {
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "methods": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: {r: round(v[r], 3) for r in v if r.endswith("ratio_to_ft")} for k, v in results.items()}))


if __name__ == "__main__":
    main()
