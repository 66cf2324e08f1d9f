"""Every method's cost: training throughput and peak memory relative to FT, inference relative to one forward.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/method_costs.py --model digits --device cpu --threads 1 --steps 10 --warmup 2
    python benchmarks/method_costs.py --model vit_base_patch16_224 --device cuda --batch 64 --steps 20 --warmup 5 \\
        --rounds 3

Models (nothing is downloaded): ``digits`` is the built-in digits-shift run (the packaged tiny ViT, its
zero-shot head and the digits-shift splits); ``glyph-clip`` the built-in glyphs-shift run of the tiny OpenCLIP
model (what ``robustft demo`` trains by default); a timm name is that
architecture at random init (``timm.create_model(name, pretrained=False)``, classifier split off) as the
backbone of an ``ImageClassifier`` with a 10-class linear head, on random uint8 images at the model's input
size in ``TensorSplit`` splits (``train`` and ``id_val``, two batches each, for the methods' pre-passes).

Training (every registered method with ``trains``): the method's hooks in the engine's order --
``prepare``, ``setup``, then ``Engine.start`` (``parameter_groups``, the optimiser, ``bind_optimizer``); each
step is the engine's own ``TrainingSession.step()``, exactly a step of ``Engine.fit`` (loss under the run's
precision: bf16 on CUDA, fp32 on CPU; backward; ``after_backward``; clip; optimiser step; LR schedule;
``after_step``). The demo recipe's optimiser and clipping (``robustft.demo.demo_config``) are used. The batch
is one fixed batch already on the device, so data loading is not timed. ``--steps`` timed steps follow
``--warmup`` steps (CUDA synchronised around each); the median is reported.

Peak memory, from after ``setup`` to the last step (so it covers weights, frozen copies such as a teacher,
gradients, optimiser state and activations): on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (methods run one after another in this process, each on its own copy of the
model, with the previous one freed); on CPU each method runs in its own child process of this script and the
peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) is read. The CPU figure includes the
~0.5-1 GB of Python and libraries every process holds, so its ratios understate the differences;
``step_peak_extra_bytes`` (peak minus the resident set before the first step) isolates what the steps add.

Step-time ratios (``throughput_ratio_to_ft``, ``step_seconds``): every trained method's session is built in
this process, each on its own copy of the model, and their steps are timed *interleaved*: each round steps
every method once, in an order rotated round by round (``bench_support.interleaved_times``), so a change of
machine load slows all methods alike. Reported per method: the median and minimum step time, and FT's time
over the method's per round (median) and of the minima. The machine's load averages before and after are
recorded (``machine.load_before`` / ``load_after``). The memory pass above runs separately, one method
at a time, because a peak cannot be attributed to one of several interleaved methods.

Inference: the predictor ``finalize`` returns, in eval mode under the same autocast, against one forward of
the plain classifier (a fresh copy of the starting model), interleaved in the same rounds on the training
batch; ``inference_ratio_to_forward`` is the ratio of the medians. Post-hoc methods do not train: WiSE-FT,
model soups, the zero-shot model and the linear probe are one plain classifier of the same architecture, so
their ratio is 1.0 by construction (not measured); OSE (two models' forwards) and VRF (two forwards plus an
exact kNN search over a random unit-norm zero-shot-failure set of ``--zsf-size`` members, ``k`` from VRF's
default) are built over the FT predictor of the same run and measured with it. Methods that need a text
tower are skipped with a note; a method that fails on the model reports its one-line error.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_support import interleaved_times, machine_load, ratio_summary, read_status, time_summary
from torch import nn

# Non-trained methods whose predictor is one plain classifier of the starting architecture.
PLAIN_PREDICTOR = {
    "zeroshot": "the zero-shot classifier itself",
    "linear_probe": "the classifier with a refitted head",
    "wise_ft": "one model with interpolated weights (weight-space ensemble)",
    "uniform_soup": "one model with averaged weights",
    "greedy_soup": "one model with averaged weights",
}
# Non-trained methods built here over the FT predictor of the same run and measured.
MEASURED_POSTHOC = ("output_ensemble", "vrf")
NUM_CLASSES = 10
BUILTIN_RUNS = {"digits": "digits_vit", "glyph-clip": "glyph_clip"}  # --model: the built-in benchmark runs
VRF_A, VRF_B = 1.5, 0.6  # sigmoid centre and width: they change the weights, not the cost


@dataclass
class Setup:
    """The starting classifier (on the CPU), the run context and the recipe every method shares."""

    model: nn.Module
    ctx: Any
    config: Any
    images: torch.Tensor
    labels: torch.Tensor


def quiet(message: str) -> None:
    """Methods' log lines are not part of the measurement."""


def build_setup(args: argparse.Namespace, run_dir: Path) -> Setup:
    from robustft.demo import demo_config

    device = torch.device(args.device)
    builtin = BUILTIN_RUNS.get(args.model)
    config = demo_config("finetune", 0, run_dir, device=args.device, progress=False, model=builtin or "digits_vit")
    if builtin is not None:
        from robustft.runner import prepare_run

        prepared = prepare_run(config, log=quiet)
        model, ctx = prepared.model, prepared.ctx
    else:
        model, ctx = synthetic_classifier(args, run_dir, device)
    ctx.eval_batch_size = args.batch
    train = ctx.splits["train"]
    images, labels = train[(torch.arange(args.batch) % len(train)).tolist()]
    return Setup(model.cpu(), ctx, config, images.to(device), labels.to(device))


def synthetic_classifier(args: argparse.Namespace, run_dir: Path, device: torch.device):
    """A random-init timm model as the project's classifier, with random-image splits (nothing downloaded)."""
    import timm
    from timm.data import resolve_data_config

    from robustft.backbones.classifier import ImageClassifier
    from robustft.data.tensor_split import TensorSplit
    from robustft.methods.base import RunContext

    torch.manual_seed(0)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0)
    data_config = resolve_data_config(model=backbone)
    model = ImageClassifier(backbone, nn.Linear(backbone.num_features, NUM_CLASSES), data_config=data_config)
    size = data_config["input_size"][1:]
    generator = torch.Generator().manual_seed(1)

    def split(name: str) -> TensorSplit:
        count = 2 * args.batch
        images = torch.randint(0, 256, (count, 3, *size), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
        return TensorSplit(images, labels, data_config, name)

    splits = {"train": split("train"), "id_val": split("id_val")}
    ctx = RunContext(run_dir, device, 0, splits, [str(index) for index in range(NUM_CLASSES)], log=quiet)
    return model, ctx


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_freed_heap() -> None:
    """Hand memory that setup freed back to the OS (glibc ``malloc_trim``), so the resident set is what is live.

    Otherwise a pre-pass's freed buffers (SAFT's gradient scores) stay resident and the steps reuse them
    without raising the peak, which would make such a method look cheaper than it is.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak then includes freed-but-kept memory
        pass


def reset_peak_memory(device: torch.device) -> int:
    """Start a new peak window; returns the memory held now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    gc.collect()
    release_freed_heap()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    return read_status("VmRSS")


def peak_memory(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else read_status("VmHWM")


def train_method(name: str, setup: Setup, args: argparse.Namespace) -> tuple[dict[str, Any], nn.Module]:
    """Time ``--steps`` engine steps of ``name``; returns the measurements and its finalised predictor."""
    from robustft.engine import Engine, repeat_batch
    from robustft.methods import get_method
    from robustft.runner import count_trainable

    device = setup.ctx.device
    ctx = setup.ctx.for_run(setup.ctx.run_dir / name, 0, quiet)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    train, optim = setup.config.train, setup.config.optim
    torch.manual_seed(0)
    method = get_method(name)()
    model = method.prepare(copy.deepcopy(setup.model).to(device), ctx)
    trainable = count_trainable(model)
    method.setup(model, ctx)
    memory_before = reset_peak_memory(device)
    engine = Engine(train, optim, args.batch)
    total = args.warmup + args.steps
    session = engine.start(method, model, repeat_batch(setup.images, setup.labels), device, total)
    optimizer, scheduler = session.optimizer, session.scheduler
    model.train()
    seconds = []
    synchronize(device)
    for step in range(total):
        start = time.perf_counter()
        session.step()
        synchronize(device)
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    peak = peak_memory(device)
    del optimizer, scheduler, session
    predictor = method.finalize(model, ctx)
    median = statistics.median(seconds)
    entry = {
        "step_seconds_median": median,
        "images_per_second": args.batch / median,
        "peak_memory_bytes": peak,
        "memory_before_steps_bytes": memory_before,
        "step_peak_extra_bytes": peak - memory_before,
        "trainable_params": trainable,
    }
    if "active_params" in ctx.extras:
        entry["active_params"] = int(ctx.extras["active_params"])
    return entry, predictor


@torch.no_grad()
def inference_ratios(
    predictors: dict[str, nn.Module], setup: Setup, args: argparse.Namespace
) -> tuple[float, dict[str, float], dict[str, str]]:
    """(median plain forward, each predictor's median over it, errors): interleaved rounds on the same batch.

    Each call enters autocast afresh: one context around all rounds would keep the bf16 copies of weights
    that require grad (the plain model's) between calls but recast frozen ones (a merged predictor's)
    every call (the likely cause of merged LoRA / SAFT / GMixout timing 4-7% over the plain forward on an
    H100 when the context spanned all rounds).
    A predictor whose first call fails is dropped with its one-line error (VRF without FAISS, say).
    """
    from robustft.engine import Engine

    device = setup.ctx.device
    plain = copy.deepcopy(setup.model).to(device).eval()
    engine = Engine(setup.config.train, setup.config.optim, args.batch)

    def call(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with engine.autocast(device):  # per call: autocast caches bf16 weight copies until it exits
                return model(setup.images)

        return run

    runs: dict[str, Callable[[], object]] = {"plain_forward": call(plain)}
    errors: dict[str, str] = {}
    for name, predictor in predictors.items():
        try:
            call(predictor.eval())()
        except Exception as error:
            errors[name] = one_line(error)
            continue
        runs[name] = call(predictor)
    times = interleaved_times(runs, args.warmup, args.steps, device)
    forward = statistics.median(times.pop("plain_forward"))
    return forward, {name: statistics.median(values) / forward for name, values in times.items()}, errors


def interleaved_steps(names: list[str], args: argparse.Namespace, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Step times of the trained ``names``, stepped alternately in this process (see the module docstring)."""
    from robustft.engine import Engine, repeat_batch
    from robustft.methods import get_method

    setup = build_setup(args, run_dir)
    device = setup.ctx.device
    steps: dict[str, Callable[[], object]] = {}
    failed: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            ctx = setup.ctx.for_run(setup.ctx.run_dir / f"interleaved_{name}", 0, quiet)
            ctx.run_dir.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(0)
            method = get_method(name)()
            model = method.prepare(copy.deepcopy(setup.model).to(device), ctx)
            method.setup(model, ctx)
            engine = Engine(setup.config.train, setup.config.optim, args.batch)
            total = (args.warmup + args.steps) * max(args.rounds, 1)
            session = engine.start(method, model, repeat_batch(setup.images, setup.labels), device, total)
            model.train()
            steps[name] = session.step
        except Exception as error:
            failed[name] = {"error": one_line(error)}
    times = interleaved_times(steps, args.warmup, args.steps * max(args.rounds, 1), device)
    reference = times.get("finetune")
    results: dict[str, dict[str, Any]] = dict(failed)
    for name, seconds in times.items():
        entry: dict[str, Any] = {"step_seconds": time_summary(seconds)}
        if reference is not None:
            entry["throughput_ratio_to_ft"] = ratio_summary(seconds, reference)
        results[name] = entry
    return results


def posthoc_builders(finetuned: nn.Module, setup: Setup, zsf_size: int) -> dict[str, Callable[[], nn.Module]]:
    """OSE and VRF over the zero-shot (starting) model and the FT predictor of this run."""
    from robustft.methods.output_ensemble import OutputEnsemble
    from robustft.methods.vrf import VrfPredictor

    device = setup.ctx.device

    def zero_shot() -> nn.Module:
        return copy.deepcopy(setup.model).to(device)

    def vrf() -> nn.Module:
        generator = torch.Generator().manual_seed(2)
        members = torch.randn(zsf_size, setup.model.head.in_features, generator=generator)
        members = F.normalize(members, dim=-1).to(device)
        k = resolve_vrf_k(zsf_size)
        return VrfPredictor(zero_shot(), finetuned, members, k=k, a=VRF_A, b=VRF_B).to(device)

    return {"output_ensemble": lambda: OutputEnsemble(zero_shot(), finetuned, alpha=0.5), "vrf": vrf}


def measure(name: str, setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """One trained method; for ``finetune`` also the OSE and VRF predictors built over it (under ``posthoc``)."""
    try:
        entry, predictor = train_method(name, setup, args)
    except Exception as error:  # a method that cannot run on this model: its error, not a crash
        return {"error": one_line(error)}
    predictors, errors = {name: predictor}, {}
    if name == "finetune":
        for posthoc, build in posthoc_builders(predictor, setup, args.zsf_size).items():
            try:
                predictors[posthoc] = build()
            except Exception as error:
                errors[posthoc] = one_line(error)
    forward, ratios, failed = inference_ratios(predictors, setup, args)
    errors |= failed
    if name in errors:
        return entry | {"error": f"inference: {errors.pop(name)}"}
    entry["forward_seconds_median"] = forward
    entry["inference_ratio_to_forward"] = ratios.pop(name)
    if name == "finetune":
        entry["posthoc"] = {posthoc: {"inference_ratio_to_forward": ratio} for posthoc, ratio in ratios.items()}
        entry["posthoc"] |= {posthoc: {"error": error} for posthoc, error in errors.items()}
        if "vrf" in entry["posthoc"]:
            entry["posthoc"]["vrf"] |= {"zsf_size": args.zsf_size, "k": resolve_vrf_k(args.zsf_size)}
    return entry


def resolve_vrf_k(zsf_size: int) -> int:
    from robustft.methods.vrf import VrfConfig, resolve_k

    return resolve_k(VrfConfig().k, zsf_size)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``measure`` in a child process of this script: its own peak resident set, nothing inherited."""
    command = [sys.executable, __file__, "--worker", name, "--model", args.model, "--device", args.device,
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--zsf-size", str(args.zsf_size)]  # fmt: skip
    command += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"child process exited with {done.returncode}: {last}"}
    return json.loads(lines[-1])


def untrained_entry(name: str) -> dict[str, Any]:
    """A method that does not train: its inference ratio by construction, or a note (OSE/VRF come from FT's run)."""
    if name in PLAIN_PREDICTOR:
        return {"trains": False, "inference_ratio_to_forward": 1.0, "note": f"by construction: {PLAIN_PREDICTOR[name]}"}
    if name in MEASURED_POSTHOC:
        return {"trains": False, "note": "built over the FT predictor of this run and measured with it"}
    return {"trains": False, "note": "post-hoc method whose inference this benchmark does not measure"}


def memory_kind(device: torch.device, in_process: bool) -> str:
    if device.type == "cuda":
        return "cuda_max_memory_allocated"
    return "cpu_peak_rss_in_process" if in_process else "cpu_peak_rss_per_child_process"


def machine(device: torch.device) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def combine_rounds(rounds: list[dict[str, dict[str, Any]]], batch: int) -> dict[str, dict[str, Any]]:
    """Per method: medians over rounds of times and of ratios to FT taken *within* each round; peak memory's max.

    Methods run one after another, so a drift of the machine (another job, GPU clocks) between two
    methods biases a single round's ratio; each round runs FT again, and the median over rounds of the
    within-round ratio is what is reported (``throughput_ratio_to_ft_per_round`` keeps them all).
    """
    combined: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        entries = [measured[name] for measured in rounds]
        failed = [entry for entry in entries if "error" in entry]
        if failed:
            combined[name] = failed[0]
            continue
        entry = dict(entries[0])
        step = statistics.median(item["step_seconds_median"] for item in entries)
        entry |= {
            "step_seconds_median": step,
            "images_per_second": batch / step,
            "peak_memory_bytes": max(item["peak_memory_bytes"] for item in entries),
            "step_peak_extra_bytes": max(item["step_peak_extra_bytes"] for item in entries),
            "forward_seconds_median": statistics.median(item["forward_seconds_median"] for item in entries),
            "inference_ratio_to_forward": statistics.median(item["inference_ratio_to_forward"] for item in entries),
            "wall_seconds": sum(item["wall_seconds"] for item in entries),
        }
        ft_steps = [measured.get("finetune", {}).get("step_seconds_median") for measured in rounds]
        if all(ft_steps):
            per_round = [ft / item["step_seconds_median"] for ft, item in zip(ft_steps, entries, strict=True)]
            entry["throughput_ratio_to_ft"] = statistics.median(per_round)
            entry["throughput_ratio_to_ft_per_round"] = per_round
        for posthoc, measured in entry.get("posthoc", {}).items():
            if "inference_ratio_to_forward" in measured:
                ratios = [item["posthoc"][posthoc]["inference_ratio_to_forward"] for item in entries]
                measured["inference_ratio_to_forward"] = statistics.median(ratios)
        combined[name] = entry
    ft = combined.get("finetune", {})
    for entry in combined.values():
        if "peak_memory_bytes" in entry and "peak_memory_bytes" in ft:
            entry["memory_ratio_to_ft"] = entry["peak_memory_bytes"] / ft["peak_memory_bytes"]
            entry["step_peak_extra_ratio_to_ft"] = entry["step_peak_extra_bytes"] / max(1, ft["step_peak_extra_bytes"])
    return combined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="digits", help="digits or glyph-clip (built-in runs) or a timm model name (random init)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (and timed inference rounds)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every method this often (FT in each round); 0: interleaved step times only, no memory pass",
    )
    parser.add_argument("--methods", default=None, help="comma-separated registry names (default: all registered)")
    parser.add_argument("--zsf-size", type=int, default=10000, help="members of VRF's random zero-shot-failure set")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: results/method_costs_<model>_<device>.json)"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="run every method in this process (always so on CUDA)"
    )
    parser.add_argument(
        "--no-interleaved", action="store_true", help="skip the interleaved step timing (memory and inference only)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from robustft.methods import get_method, list_methods

    with tempfile.TemporaryDirectory(prefix="robustft_method_costs_") as run_dir:
        if args.worker:
            print(json.dumps(measure(args.worker, build_setup(args, Path(run_dir)), args)))
            return
        names = args.methods.split(",") if args.methods else list_methods()
        if any(name in MEASURED_POSTHOC for name in names) and "finetune" not in names:
            names.insert(0, "finetune")  # OSE and VRF are measured over FT's predictor
        if "finetune" in names:
            names.insert(0, names.pop(names.index("finetune")))
        in_process = device.type == "cuda" or args.in_process
        setup = build_setup(args, Path(run_dir)) if in_process else None
        methods: dict[str, dict[str, Any]] = {}
        for name in names:
            cls = get_method(name)
            if cls.requires_text_tower:
                methods[name] = {"skipped": "needs a CLIP-style model with a text tower; this model has none"}
            elif not cls.trains:
                methods[name] = untrained_entry(name)
            else:
                methods[name] = {}
        trained = [name for name in names if not methods[name]]
        load_before = machine_load()
        interleaved = interleaved_steps(trained, args, Path(run_dir)) if trained and not args.no_interleaved else {}
        rounds = []
        for round_index in range(args.rounds):
            measured = {}
            for name in trained:
                started = time.perf_counter()
                measured[name] = measure(name, setup, args) if setup is not None else run_child(name, args)
                measured[name]["wall_seconds"] = time.perf_counter() - started
                free_device_memory(device)
                print(f"round {round_index} {name}", json.dumps(measured[name]), flush=True)
            rounds.append(measured)
    if trained:
        if rounds:
            methods |= combine_rounds(rounds, args.batch)
        for name, measured in interleaved.items():
            if "error" in measured:
                methods[name].setdefault("error", measured["error"])
                continue
            # the step-time ratios come from the interleaved pass; the sequential pass's stay beside them
            sequential = {key: methods[name].pop(key) for key in ("throughput_ratio_to_ft",) if key in methods[name]}
            methods[name] |= {
                "step_seconds_interleaved": measured["step_seconds"],
                "throughput_ratio_to_ft": measured.get("throughput_ratio_to_ft", {}).get("median"),
                "throughput_ratio_to_ft_of_min": measured.get("throughput_ratio_to_ft", {}).get("of_min"),
                "throughput_ratio_to_ft_of_mean": measured.get("throughput_ratio_to_ft", {}).get("of_mean"),
                "images_per_second": args.batch / measured["step_seconds"]["median"],
            }
            if sequential:
                methods[name]["throughput_ratio_to_ft_sequential"] = sequential["throughput_ratio_to_ft"]
        for name, measured in methods.get("finetune", {}).get("posthoc", {}).items():
            if name in methods:
                methods[name] |= measured
    report = {
        "benchmark": "method_costs",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(device) | {"load_before": load_before, "load_after": machine_load()},
        "settings": {
            "model": args.model,
            "device": args.device,
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "threads": args.threads,
            "zsf_size": args.zsf_size,
            "memory_kind": memory_kind(device, in_process),
            "step_timing": "interleaved" if interleaved else "sequential",
        },
        "methods": methods,
    }
    out = args.out or Path(f"benchmarks/results/method_costs_{args.model}_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
