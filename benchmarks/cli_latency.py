"""How long a user waits for ``robustft --help`` and for a config error (the config layer imports no method).

    python benchmarks/cli_latency.py [--repeats 5] [--out benchmarks/results/cli_latency.json]

Each case runs the installed ``robustft`` command in a fresh process, cases alternating round by round, and
records wall and CPU (user + system of the child) seconds; the machine's load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

CASES = {
    "help": ["--help"],
    "config_error": ["fit", "{dir}/bad_key.yaml"],
    "method_option_error": ["fit", "{dir}/bad_option.yaml"],
}


def run_once(arguments: list[str]) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    completed = subprocess.run([shutil.which("robustft") or "robustft", *arguments], capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, completed.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cli_latency.json"))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    (folder / "bad_key.yaml").write_text("optim:\n  lrr: 1\n")
    (folder / "bad_option.yaml").write_text("method:\n  name: finetune\n  label_smothing: 0.1\n")
    samples: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in CASES}
    codes = {}
    loads = []
    for _ in range(args.repeats):
        for name, arguments in CASES.items():
            loads.append(os.getloadavg()[0])
            wall, cpu, code = run_once([item.format(dir=folder) for item in arguments])
            samples[name]["wall"].append(wall)
            samples[name]["cpu"].append(cpu)
            codes[name] = code
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_1min": loads},
        "repeats": args.repeats,
        "exit_codes": codes,
        "seconds": {
            name: {kind: {"median": statistics.median(v), "min": min(v)} for kind, v in values.items()}
            for name, values in samples.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["seconds"], indent=2))


if __name__ == "__main__":
    main()
