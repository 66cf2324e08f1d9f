"""Cost of one training step of FT, Mixout, GMixout and SAFT at equal batch, as ratios to FT in the same run.

Usage:
    python benchmarks/sparse_step.py --out benchmarks/results/sparse_step.json            # the tiny digits ViT
    python benchmarks/sparse_step.py --model vit_base_patch16_224 --batch-size 8 --steps 10
    python benchmarks/sparse_step.py --interleaved --methods finetune,gmixout --steps 40  # one process, alternating
    python benchmarks/sparse_step.py --resample --model vit_small_patch16_224 --steps 5   # GMixout's resample alone

``--interleaved`` builds every method's session in one process and steps them in turn, the order rotated
each round (``bench_support.interleaved_times``), so a change of machine load hits all alike; it reports per
method the mean over whole GMixout episodes (every step, the k-th with its resample included), the median and
the min (``bench_support.time_summary``), their ratios to the first method, FT-style throughput ratios to the
first method (``throughput_ratio_to_first``: ``bench_support.ratio_summary``; for GMixout read ``of_mean``, since
the per-round median skips the resampling step) and the load averages before and after. ``--resample`` times
GMixout's ``resample`` (write back, EMA, new masks, optimiser remap) against the former per-tensor ``randperm`` +
sort draw, interleaved the same way.

Each method runs in its own child process (so one method's freed memory cannot hide another's peak):
the model (random init, a timm ViT as the backbone of an ``ImageClassifier``) is built, the method's
``prepare`` applied (SAFT's phase 1 runs on two random batches), AdamW built from the method's
``parameter_groups``; then ``warmup`` steps and ``steps`` timed steps run the engine's step sequence
(forward, CE, backward, after_backward, clip 1.0, optimiser step, zero_grad, after_step), so GMixout's
resampling every k steps is included in its mean step time (``steps`` should be a multiple of k). After the
per-method processes the same interleaved pass as ``--interleaved`` runs (unless ``--no-interleaved``) and adds
``step_seconds_interleaved`` and ``throughput_ratio_to_ft`` to every method, and ``machine_load`` to the report;
``time_ratio_to_ft`` stays the ratio of the per-process means.

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

METHODS = ("finetune", "mixout", "gmixout", "saft")
GMIXOUT_K = 10  # GMixout's default resampling period: timed windows of a multiple of it hold whole episodes


def build_session(name: str, args: argparse.Namespace, device: torch.device) -> tuple[Any, torch.nn.Module, Any, Any]:
    """(method, prepared model, engine session of ``warmup + steps`` steps, run context) on a random batch;
    SAFT's phase 1 and other ``setup`` pre-passes run on two copies of that batch."""
    from robustft.methods import get_method

    torch.manual_seed(0)
    model, size = build_model(args.model)
    model.to(device)
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    ctx = _context(args, device, {"train": _train_set(images, labels)})
    method = get_method(name)()
    model = method.prepare(model, ctx)
    method.setup(model, ctx)
    session = engine_session(method, model, images, labels, device, total_steps=args.warmup + args.steps)
    return method, model, session, ctx


def worker(args: argparse.Namespace) -> dict:
    from robustft.sparse import optimizer_state_bytes, sparse_updates

    device = _device()
    method, model, session, ctx = build_session(args.worker, args, device)
    optimizer = session.optimizer
    rss_before = read_status("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    times = interleaved_times({args.worker: session.step}, args.warmup, args.steps, device)[args.worker]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else read_status("VmHWM")
    updates = sparse_updates(model)
    return {
        "step_seconds_mean": statistics.mean(times),
        "step_seconds_median": statistics.median(times),
        "step_seconds_min": min(times),
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


def legacy_draw(shape: torch.Size, p: float, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """The former per-tensor draw (element granularity): a permutation's first entries, sorted."""
    numel = shape.numel()
    return torch.randperm(numel, device=device, generator=generator)[: max(1, round((1 - p) * numel))].sort().values


def resample_costs(args: argparse.Namespace) -> dict:
    """Seconds of GMixout's ``resample`` with the one-draw sampler vs the per-tensor permutation, interleaved."""
    from robustft.methods.gmixout import GMixout, base_of, sample_active_sets
    from robustft.sparse import sparse_updates

    torch.manual_seed(0)
    device = _device()
    model, _ = build_model(args.model)
    model.to(device)
    method = GMixout()
    ctx = _context(args, device, {})
    model = method.prepare(model, ctx)
    names = list(sparse_updates(model))
    shapes = [base_of(model, name).shape for name in names]
    generator = torch.Generator(device=device).manual_seed(1)
    runs = {
        "resample": lambda: method.resample(model),
        "draw_one_for_all": lambda: sample_active_sets(shapes, method.config.p, "element", device, generator),
        "draw_per_tensor_randperm": lambda: [
            legacy_draw(shape, method.config.p, device, generator) for shape in shapes
        ],
    }
    load_before = os.getloadavg()
    seconds, load = interleaved_with_load(runs, 0, args.steps, device)
    return {
        "model": args.model,
        "mixed_tensors": len(names),
        "mixed_params": ctx.extras["mixed_params"],
        "repeats": args.steps,
        "seconds": {kind: time_summary(values) for kind, values in seconds.items()},
        "draw_speedup_median": statistics.median(seconds["draw_per_tensor_randperm"])
        / statistics.median(seconds["draw_one_for_all"]),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "machine_load": load,
    }


def interleaved_seconds(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds of every step of every method (``--methods`` order first), stepped in turn, and the load."""
    device = _device()
    steps = {name: build_session(name, args, device)[2].step for name in args.methods.split(",")}
    return interleaved_with_load(steps, args.warmup, args.steps, device)


def interleaved(args: argparse.Namespace) -> dict:
    """Every method's engine session in one process, stepped in turn; whole-episode means, medians, mins."""
    load_before = os.getloadavg()
    seconds, load = interleaved_seconds(args)
    first = next(iter(seconds))
    summaries: dict[str, dict[str, Any]] = {name: time_summary(values) for name, values in seconds.items()}
    for name, summary in summaries.items():
        for key in ("mean", "median", "min"):
            summary[f"{key}_ratio_to_first"] = summary[key] / summaries[first][key]
        summary["throughput_ratio_to_first"] = ratio_summary(seconds[name], seconds[first])
    return {
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "first_method": first,
        "methods": summaries,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "machine_load": load,
        "gmixout_whole_episodes": args.steps % GMIXOUT_K == 0,
    }


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _train_set(images: torch.Tensor, labels: torch.Tensor):
    from torch.utils.data import TensorDataset

    return TensorDataset(images.cpu().repeat(2, 1, 1, 1), labels.cpu().repeat(2))


def _context(args: argparse.Namespace, device: torch.device, splits: dict):
    from robustft.methods.base import RunContext

    names = [str(i) for i in range(10)]
    return RunContext(Path(args.tmp), device, 0, splits, names, eval_batch_size=args.batch_size, log=lambda m: None)


def _environment() -> dict:
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_vit", help="digits_vit or a timm name (random init)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (a multiple of GMixout's k=10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sparse_step.json"))
    parser.add_argument("--interleaved", action="store_true", help="all methods in one process, alternating steps")
    parser.add_argument("--resample", action="store_true", help="time GMixout's resample and its mask draw alone")
    parser.add_argument("--no-interleaved", action="store_true", help="per-method processes only (no interleaved pass)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="/tmp/robustft_sparse_step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.interleaved or args.resample:
        report = {**(resample_costs(args) if args.resample else interleaved(args)), **_environment()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
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
    load = None
    if not args.no_interleaved:
        seconds, load = interleaved_seconds(args)
        for name, values in seconds.items():
            results[name]["step_seconds_interleaved"] = time_summary(values)
            results[name]["throughput_ratio_to_ft"] = ratio_summary(values, seconds["finetune"])
    ft = results["finetune"]
    for entry in results.values():
        entry["time_ratio_to_ft"] = entry["step_seconds_mean"] / ft["step_seconds_mean"]  # whole episodes
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
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine_load": load,
        "gmixout_whole_episodes": args.steps % GMIXOUT_K == 0,
        "methods": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: {r: v[r] for r in v if r.endswith("ratio_to_ft")} for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
