"""Step time of masked-counterfactual fine-tuning relative to plain FT, measured in the same process.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/masked_counterfactual_step.py            # tiny digits ViT, CPU
    python benchmarks/masked_counterfactual_step.py --model vit_base_patch16_224 --batch 64 --device cuda

The method adds a CAM forward and a backward to the attention maps (student, eval mode), a second
student forward/backward on the counterfactual images and a teacher forward. Each timed step is
what the engine does: loss, backward, grad clipping, AdamW step. FT and the method alternate
step by step on the same batches (``bench_support.interleaved_times``), so machine noise hits both;
median, minimum and mean step times are reported (the minimum is the least disturbed on a shared
machine), the ratio as the median of the per-round ratios, with the machine's load before and after.
``--model vit_base_patch16_224`` builds a randomly initialised ViT-B/16 (nothing downloaded), so
the same script measures the GPU case. Results are merged into the JSON under a key per setting.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
from pathlib import Path

import torch
from bench_support import engine_session, interleaved_times, machine_load, ratio_summary, time_summary
from torch import nn

from robustft.backbones.classifier import ImageClassifier
from robustft.methods import RunContext, get_method
from robustft.methods.base import Method


def digits_setup(batch: int) -> tuple[ImageClassifier, torch.Tensor, torch.Tensor]:
    from robustft.demo import demo_config
    from robustft.runner import prepare_run

    prepared = prepare_run(demo_config("finetune", 0, Path("/tmp/robustft-bench")), log=lambda message: None)
    images, labels = prepared.ctx.splits["train"][list(range(4 * batch))]
    return prepared.model, images, labels


def timm_setup(name: str, batch: int, num_classes: int = 1000) -> tuple[ImageClassifier, torch.Tensor, torch.Tensor]:
    import timm

    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    model = ImageClassifier(backbone, nn.Linear(backbone.num_features, num_classes))
    size = backbone.patch_embed.img_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4 * batch, 3, *size, generator=generator)
    return model, images, torch.randint(num_classes, (4 * batch,), generator=generator)


def timed_steps(method: Method, model: nn.Module, batches: list, device: torch.device, precision: str) -> callable:
    """A closure doing one engine step (``Engine.start(...).step()``) on the next batch."""
    ctx = RunContext(run_dir=Path("/tmp/robustft-bench"), device=device, seed=0, splits={}, class_names=[])
    model = method.prepare(model, ctx)
    session = engine_session(method, model, *batches[0], device, precision, lr=1e-5)
    session.batches = ((images, labels, 1.0) for images, labels in itertools.cycle(batches))
    return session.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_vit", help="digits_vit (pretrained, real data) or a timm ViT name")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU")
    parser.add_argument("--preset", default="obj_mask_single_fill")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/masked_counterfactual_step.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(0)
    if args.model == "digits_vit":
        model, images, labels = digits_setup(args.batch)
    else:
        model, images, labels = timm_setup(args.model, args.batch)
    model = model.to(device)
    batches = [
        (images[i : i + args.batch].to(device), labels[i : i + args.batch].to(device))
        for i in range(0, len(labels), args.batch)
    ]
    ft = timed_steps(get_method("finetune")(), copy.deepcopy(model), batches, device, precision)
    method_cls = get_method("masked_counterfactual")
    mc = timed_steps(
        method_cls(method_cls.config_cls(preset=args.preset)), copy.deepcopy(model), batches, device, precision
    )
    load_before = machine_load()
    times = interleaved_times({"finetune": ft, "masked_counterfactual": mc}, args.warmup, args.steps, device)
    ft_times, mc_times = times["finetune"], times["masked_counterfactual"]
    ft_median, mc_median = statistics.median(ft_times), statistics.median(mc_times)
    ft_min, mc_min = min(ft_times), min(mc_times)
    ratios = ratio_summary(ft_times, mc_times)  # method over FT: per round (median), of the minima, of the means
    key = f"{args.model}/{device.type}/{precision}/batch{args.batch}/{args.preset}"
    entry = {
        "model": args.model, "device": device.type, "precision": precision, "batch": args.batch,
        "preset": args.preset, "steps": args.steps,
        "ft_step_seconds_median": ft_median, "method_step_seconds_median": mc_median,
        "ft_step_seconds_min": ft_min, "method_step_seconds_min": mc_min,
        "ft_step_seconds": time_summary(ft_times), "method_step_seconds": time_summary(mc_times),
        "ratio": ratios["median"], "ratio_of_min": ratios["of_min"], "ratio_of_mean": ratios["of_mean"],
        "ratio_of_medians": mc_median / ft_median, "under_3x": ratios["median"] < 3.0,
        "load_before": load_before, "load_after": machine_load(),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }  # fmt: skip
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[key] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
