"""VRF inference throughput against one fine-tuned forward on the same batch (target: at most 2.3x its time).

Usage:
    python benchmarks/vrf_inference.py --out benchmarks/results/vrf_inference.json               # tiny digits ViT
    python benchmarks/vrf_inference.py --model vit_base_patch16_224 --batch-size 32 --zsf-sizes 10000 100000 \\
        --out benchmarks/results/vrf_inference_vit_base.json
    python benchmarks/vrf_inference.py --device cuda --model vit_base_patch16_224 --batch-size 256 ...

The model is a randomly initialised timm ViT as the backbone of an ``ImageClassifier`` (the zero-shot and
the fine-tuned models are two copies: VRF's two models share no weights, so it needs two forwards); the
ZSF set is random unit vectors (an exact flat search costs the same whatever the data). Per ZSF size, in
interleaved rounds on one batch: one plain forward of the fine-tuned model (``ft_forward``), the VRF
predictor's whole forward (zero-shot forward, fine-tuned forward giving embedding and logits at once,
one kNN search for the batch, the mixture; ``vrf``) and the kNN search alone (``knn``), alternating call by
call (``bench_support.interleaved_times``). Medians of the rounds; ``vrf_over_ft`` is the ratio of the
medians, ``vrf_over_ft_rounds`` the per-round ratios' median and the ratio of the minima; the machine's load
is recorded before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_support import build_model, interleaved_times, machine_load, ratio_summary, time_summary

from robustft.methods.vrf import VrfPredictor, normalised_embedding_and_logits


@torch.no_grad()
def measure(model, images, zsf_size: int, rounds: int, warmup: int, device: torch.device) -> dict[str, float]:
    generator = torch.Generator().manual_seed(zsf_size)
    members = F.normalize(torch.randn(zsf_size, model.embed_dim, generator=generator), dim=-1).to(device)
    predictor = VrfPredictor(model, copy.deepcopy(model), members, k=max(1, zsf_size // 1000), a=1.5, b=0.6)
    predictor = predictor.to(device).eval()
    embedding = normalised_embedding_and_logits(predictor.finetuned, images)[0]
    runs = {
        "ft_forward": lambda: predictor.finetuned(images),
        "vrf": lambda: predictor(images),
        "knn": lambda: predictor.distance(embedding),
    }
    times = interleaved_times(runs, warmup, rounds, device)
    medians = {f"{name}_seconds": statistics.median(values) for name, values in times.items()}
    summaries = {name: time_summary(values) for name, values in times.items()}
    batch = len(images)
    return {
        "zsf_size": zsf_size,
        "k": int(predictor.k),
        **medians,
        "ft_images_per_second": batch / medians["ft_forward_seconds"],
        "vrf_images_per_second": batch / medians["vrf_seconds"],
        "vrf_over_ft": medians["vrf_seconds"] / medians["ft_forward_seconds"],
        "knn_over_ft": medians["knn_seconds"] / medians["ft_forward_seconds"],
        "vrf_over_ft_rounds": ratio_summary(times["ft_forward"], times["vrf"]),  # VRF time over FT time
        "seconds": summaries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_vit", help="digits_vit or a timm model name (random init)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--zsf-sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vrf_inference.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import faiss

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, size = build_model(args.model, args.num_classes)
    model = model.to(device).eval()
    images = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    rows = []
    load_before = machine_load()
    for zsf_size in args.zsf_sizes:
        rows.append(measure(model, images, zsf_size, args.rounds, args.warmup, device))
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    report = {
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "embed_dim": model.embed_dim,
        "batch_size": args.batch_size,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "faiss": f"{faiss.__version__} ({'GPU' if hasattr(faiss, 'StandardGpuResources') else 'CPU'} build)",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "load_before": load_before,
        "load_after": machine_load(),
        "results": rows,
        "target_vrf_over_ft": 2.3,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
