"""Helpers of the bad-input and run-directory tests: configs on the built-in benchmark, the CLI's one error
line, and a byte snapshot of a directory tree (what "nothing on disk changed" is checked against)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from robustft.cli import main
from robustft.demo import demo_config


def write_config(directory: Path, name: str, method: str = "finetune", **train) -> Path:
    """A run config of ``method`` on digits-shift (3 steps, CPU, no progress bar) at ``<directory>/<name>.yaml``."""
    settings = {"steps": 3, "checkpoint_every": 2, "log_every": 1, "progress": False, "device": "cpu", **train}
    raw = demo_config(method, 0, directory, name=name, **settings).model_dump(mode="json")
    raw["method"] = {"name": method}
    raw["data"]["batch_size"] = 16
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cli_error(monkeypatch, capsys, *arguments: str) -> str:
    """Run ``robustft ARGUMENTS`` in-process; its error, checked to be one line with exit code 2."""
    monkeypatch.setattr(sys, "argv", ["robustft", *arguments])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustft: error: "), stderr
    return lines[0]


def tree_bytes(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {
        str(path.relative_to(root)): None if path.is_dir() else path.read_bytes() for path in sorted(root.rglob("*"))
    }


def metric_steps(run_dir: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
