"""Cost of one training step of FT, Mixout, GMixout and SAFT at equal batch, as ratios to FT in the same run.

Usage:
    python benchmarks/sparse_step.py --out benchmarks/results/sparse_step.json            # the tiny digits ViT
    python benchmarks/sparse_step.py --model vit_base_patch16_224 --batch-size 8 --steps 10
    python benchmarks/sparse_step.py --interleaved --methods finetune,gmixout --steps 40  # one process, alternating
    python benchmarks/sparse_step.py --resample --model vit_small_patch16_224 --steps 5   # GMixout's resample alone

``--interleaved`` builds every method's session in one process and alternates them step by step, so a
change of machine load hits all alike; it reports per method the mean over whole GMixout episodes (every
step, the k-th with its resample included), the median and the min, and ``os.getloadavg()`` before and
after. ``--resample`` times GMixout's ``resample`` (write back, EMA, new masks, optimiser remap) against
the former per-tensor ``randperm`` + sort draw, alternating the two.

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
from bench_support import build_model, engine_session, read_status, synchronize, timed_session_steps

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


def legacy_draw(shape: torch.Size, p: float, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """The former per-tensor draw (element granularity): a permutation's first entries, sorted."""
    numel = shape.numel()
    return torch.randperm(numel, device=device, generator=generator)[: max(1, round((1 - p) * numel))].sort().values


def resample_costs(args: argparse.Namespace) -> dict:
    """Seconds of GMixout's ``resample`` with the one-draw sampler vs the per-tensor permutation, alternated."""
    import time

    from robustft.methods.gmixout import GMixout, base_of, sample_active_sets
    from robustft.sparse import sparse_updates

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = build_model(args.model)
    model.to(device)
    method = GMixout()
    ctx = _context(args, device, {})
    model = method.prepare(model, ctx)
    names = list(sparse_updates(model))
    shapes = [base_of(model, name).shape for name in names]
    generator = torch.Generator(device=device).manual_seed(1)
    seconds: dict[str, list[float]] = {"resample": [], "draw_one_for_all": [], "draw_per_tensor_randperm": []}
    load_before = os.getloadavg()
    for _ in range(args.steps):
        for kind in seconds:
            synchronize(device)
            start = time.perf_counter()
            if kind == "resample":
                method.resample(model)
            elif kind == "draw_one_for_all":
                sample_active_sets(shapes, method.config.p, "element", device, generator)
            else:
                [legacy_draw(shape, method.config.p, device, generator) for shape in shapes]
            synchronize(device)
            seconds[kind].append(time.perf_counter() - start)
    return {
        "model": args.model,
        "mixed_tensors": len(names),
        "mixed_params": ctx.extras["mixed_params"],
        "repeats": args.steps,
        "seconds": {kind: _summary(values) for kind, values in seconds.items()},
        "draw_speedup_median": statistics.median(seconds["draw_per_tensor_randperm"])
        / statistics.median(seconds["draw_one_for_all"]),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def interleaved(args: argparse.Namespace) -> dict:
    """Every method's engine session in one process, stepped in turn; whole-episode means, medians, mins."""
    import time

    from robustft.methods import get_method

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sessions = {}
    for name in args.methods.split(","):
        torch.manual_seed(0)
        model, size = build_model(args.model)
        model.to(device)
        images = torch.randn(args.batch_size, 3, size, size, device=device)
        labels = torch.randint(0, 10, (args.batch_size,), device=device)
        ctx = _context(args, device, {"train": _train_set(images, labels)})
        method = get_method(name)()
        model = method.prepare(model, ctx)
        method.setup(model, ctx)
        sessions[name] = engine_session(method, model, images, labels, device, total_steps=args.warmup + args.steps)
    for session in sessions.values():
        for _ in range(args.warmup):
            session.step()
    seconds: dict[str, list[float]] = {name: [] for name in sessions}
    load_before = os.getloadavg()
    for _ in range(args.steps):
        for name, session in sessions.items():
            synchronize(device)
            start = time.perf_counter()
            session.step()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    summaries = {name: _summary(values) for name, values in seconds.items()}
    reference = summaries[next(iter(summaries))]
    for summary in summaries.values():
        for key in ("mean", "median", "min"):
            summary[f"{key}_ratio_to_first"] = summary[key] / reference[key]
    return {
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "first_method": next(iter(sessions)),
        "methods": summaries,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "median": statistics.median(values), "min": min(values)}


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
        "methods": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: {r: round(v[r], 3) for r in v if r.endswith("ratio_to_ft")} for k, v in results.items()}))


if __name__ == "__main__":
    main()
