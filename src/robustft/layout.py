"""The names of the files in a run directory, in one place for every layer that reads or writes them."""

from __future__ import annotations

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
FINAL_CHECKPOINT = "checkpoints/final.safetensors"
