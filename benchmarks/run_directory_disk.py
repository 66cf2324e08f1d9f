"""Disk used by the run directories of a finished ``robustft demo`` (or any comparison), by kind of file.

    robustft demo --out /tmp/demo                      # with the version to measure on PYTHONPATH
    python benchmarks/run_directory_disk.py LABEL=/tmp/demo [LABEL=DIR ...] [--out results/run_directory_disk.json]

For each directory: ``du -sb`` of the whole tree, and the bytes of final checkpoints, their reference files,
``last.pt`` training checkpoints and everything else, per run directory (a folder holding ``config.yaml``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path


def kind(path: Path) -> str:
    if path.name == "final.safetensors":
        return "final_checkpoint"
    if path.name.endswith(".references.json"):
        return "references"
    if path.name == "last.pt":
        return "last_checkpoint"
    return "other"


def measure(directory: Path) -> dict:
    total = int(
        subprocess.run(["du", "-sb", str(directory)], capture_output=True, text=True, check=True).stdout.split()[0]
    )
    by_kind: dict[str, int] = {}
    runs: dict[str, int] = {}
    for path in directory.rglob("*"):
        if not path.is_file():
            continue
        size = path.stat().st_size
        by_kind[kind(path)] = by_kind.get(kind(path), 0) + size
        run = next((parent for parent in path.parents if (parent / "config.yaml").is_file()), None)
        if run is not None:
            name = str(run.relative_to(directory))
            runs[name] = runs.get(name, 0) + size
    return {"directory": str(directory), "du_sb": total, "by_kind": by_kind, "runs": dict(sorted(runs.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measured", nargs="+", help="LABEL=DIRECTORY of a finished demo or comparison")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/run_directory_disk.json"))
    arguments = parser.parse_args()
    results = {}
    for item in arguments.measured:
        label, _, directory = item.partition("=")
        results[label] = measure(Path(directory))
        print(f"{label}: {results[label]['du_sb'] / 2**20:.2f} MiB ({results[label]['by_kind']})")
    document = {"machine": platform.platform(), "measured": results}
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
