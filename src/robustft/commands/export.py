"""``robustft export RUN --to timm|open_clip|peft DIR``: a finished run in the field's own formats."""

from __future__ import annotations

from pathlib import Path

from robustft.export import export_run


def run_export(run_dir: Path, target: str, out: Path) -> list[Path]:
    """Write the export and return the files it holds (what the command lists)."""
    written = export_run(run_dir, target, out)
    return sorted(path for path in written.rglob("*") if path.is_file())
