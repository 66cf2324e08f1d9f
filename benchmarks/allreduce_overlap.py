"""Step time of torch's DDP (communication overlapped with the backward) vs the hand-written all-reduce after it.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/allreduce_overlap.py --out benchmarks/results/allreduce_overlap.json
    python benchmarks/allreduce_overlap.py --model digits_vit --batch-size 32        # the tiny built-in ViT

Two gloo processes on the CPU (``torch.multiprocessing.spawn``), each with one thread. Both paths run the engine's
own step (``Engine.start(...)``, the session ``robustft fit`` drives: forward, CE, backward, gradient averaging,
clipping at 1.0, AdamW) on the same fixed batch, each on its own copy of the model (DDP's hooks stay on its
copy). ``train.strategy`` decides the averaging: ``ddp`` wraps the method's loss in ``DistributedDataParallel``
(each 25 MB bucket all-reduced as soon as its gradients are ready), ``allreduce`` averages every gradient after
the whole backward. The two are interleaved: ``--rounds`` rounds, each timing ``--steps`` steps of both, the
order alternating between rounds, so a change of machine load hits both. ``allreduce_seconds`` is one bare
all-reduce of every gradient (the communication the backward could hide: at most this much can
``allreduce_minus_ddp_seconds`` be); ``load`` is ``os.getloadavg()`` before and after each round (on a shared
machine compare the difference with ``step_seconds_spread`` before reading anything into it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from bench_support import build_model, engine_session

STRATEGIES = ("ddp", "allreduce")


def worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    from robustft import distributed
    from robustft.methods.registry import get_method

    distributed.init_from_env(torch.device("cpu"))
    torch.manual_seed(0)
    model, size = build_model(args.model)
    images = torch.randn(args.batch_size // 2, 3, size, size)
    labels = torch.randint(0, 10, (args.batch_size // 2,))
    sessions = {}
    for strategy in STRATEGIES:
        method = get_method("finetune")()
        copy_of_model = copy.deepcopy(model)
        session = engine_session(method, copy_of_model, images, labels, torch.device("cpu"), precision="fp32")
        session.gradient_sync = distributed.GradientSync(method, copy_of_model, torch.device("cpu"), strategy)
        assert session.gradient_sync.mode == strategy
        session.step()  # warm-up: DDP builds its buckets in its first backward
        sessions[strategy] = session
    gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    seconds = {strategy: [] for strategy in STRATEGIES}
    loads = []
    bare = []
    for round_index in range(args.rounds):
        loads.append(os.getloadavg()[0])
        order = STRATEGIES if round_index % 2 == 0 else tuple(reversed(STRATEGIES))
        for strategy in order:
            distributed.barrier()
            for _ in range(args.steps):
                start = time.perf_counter()
                sessions[strategy].step()
                seconds[strategy].append(time.perf_counter() - start)
        distributed.barrier()
        start = time.perf_counter()
        distributed.all_reduce_mean_(gradients)
        bare.append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
    if rank == 0:
        parameters = sum(p.numel() for p in model.parameters())
        result = {"parameters": parameters, "step_seconds": seconds, "allreduce_seconds": bare, "load": loads}
        Path(out).write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="digits_vit or a timm model name")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (half per process)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each strategy per round")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/allreduce_overlap.json"))
    args = parser.parse_args()
    scratch = args.out.with_suffix(".part.json")
    started = time.perf_counter()
    mp.spawn(worker, args=(free_port(), args, str(scratch)), nprocs=2, join=True)
    measured = json.loads(scratch.read_text())
    scratch.unlink()
    medians = {strategy: statistics.median(times) for strategy, times in measured["step_seconds"].items()}
    communication = statistics.median(measured["allreduce_seconds"])
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "model": args.model,
        "parameters": measured["parameters"],
        "global_batch": args.batch_size,
        "processes": 2,
        "backend": "gloo",
        "threads_per_process": 1,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "median_step_seconds": medians,
        "ddp_over_allreduce": medians["ddp"] / medians["allreduce"],
        "allreduce_minus_ddp_seconds": medians["allreduce"] - medians["ddp"],
        "median_bare_allreduce_seconds": communication,
        "step_seconds_spread": {
            strategy: {"min": min(times), "max": max(times), "stdev": statistics.stdev(times)}
            for strategy, times in measured["step_seconds"].items()
        },
        "step_seconds": measured["step_seconds"],
        "bare_allreduce_seconds": measured["allreduce_seconds"],
        "load_before_after_rounds": measured["load"],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_step_seconds", "median_bare_allreduce_seconds")}))


if __name__ == "__main__":
    main()
