"""Zero-shot accuracy of the committed tiny CLIP on every glyphs-shift split (full size), and its evaluation cost.

Usage: python benchmarks/glyph_clip_zero_shot.py --out benchmarks/results/glyph_clip_zero_shot.json

Loads the asset through the user's path (``load_open_clip('glyph-clip', checkpoint)``), builds the text
zero-shot head from the benchmark's templates, and scores each split; base-to-new's new-class accuracy too.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from robustft.backbones.builtin import GLYPH_CLIP, glyph_clip_checkpoint
from robustft.backbones.open_clip_backbone import load_open_clip, open_clip_classifier, text_zero_shot_head
from robustft.data import glyphs_shift
from robustft.data.tensor_split import TensorSplit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/glyph_clip_zero_shot.json"))
    parser.add_argument("--templates", choices=["benchmark", "simple"], default="benchmark")
    args = parser.parse_args()
    start = time.perf_counter()
    parts = load_open_clip(GLYPH_CLIP, glyph_clip_checkpoint())
    templates = glyphs_shift.TEMPLATES if args.templates == "benchmark" else ("a photo of the {}.",)
    head = text_zero_shot_head(parts, glyphs_shift.CLASS_NAMES, templates)
    classifier = open_clip_classifier(parts, head).eval()
    generated = time.perf_counter()
    splits = glyphs_shift.build_splits()
    generation_seconds = time.perf_counter() - generated
    accuracy, counts, eval_seconds, id_test = {}, {}, 0.0, None
    with torch.no_grad():
        for name, (images, labels) in splits.items():
            dataset = TensorSplit(images, labels, parts.data_config, name)
            began = time.perf_counter()
            logits = torch.cat(
                [
                    classifier(dataset[list(range(begin, min(begin + 512, len(dataset))))][0])
                    for begin in range(0, len(dataset), 512)
                ]
            )
            eval_seconds += time.perf_counter() - began
            accuracy[name], counts[name] = 100.0 * float(logits.argmax(1).eq(labels).float().mean()), len(dataset)
            if name == "id_test":
                id_test = (logits, labels)
    base_to_new = {}
    logits, labels = id_test
    for half, classes in (("base", glyphs_shift.BASE_CLASSES), ("new", glyphs_shift.NEW_CLASSES)):
        inside = torch.isin(labels, torch.tensor(classes))
        columns = torch.tensor(classes)
        predicted = columns[logits[inside][:, columns].argmax(1)]
        base_to_new[half] = 100.0 * float(predicted.eq(labels[inside]).float().mean())
    base_to_new["hm"] = 2 * base_to_new["base"] * base_to_new["new"] / (base_to_new["base"] + base_to_new["new"])
    ood = [value for name, value in accuracy.items() if name.startswith("ood_")]
    report = {
        "model": GLYPH_CLIP,
        "checkpoint_bytes": glyph_clip_checkpoint().stat().st_size,
        "templates": list(templates),
        "accuracy": accuracy,
        "ood_avg": sum(ood) / len(ood),
        "base_to_new_zero_shot": base_to_new,
        "images": counts,
        "generation_seconds": generation_seconds,
        "eval_seconds": eval_seconds,
        "eval_images_per_second": sum(counts.values()) / eval_seconds,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
