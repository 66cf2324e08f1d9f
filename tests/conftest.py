"""Shared fixtures: tests use the real built-in benchmark and the committed tiny ViT, on CPU."""

from __future__ import annotations

import os

# The suite checks exact CPU numerics (fp32, bit-equal resumes); on a GPU host it would run bf16 on the GPU
# by default. ROBUSTFT_TEST_DEVICE=cuda keeps the GPU visible.
if os.environ.get("ROBUSTFT_TEST_DEVICE", "cpu") == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

# CI has 2 cores; ROBUSTFT_TEST_THREADS=1 lets two test processes share them without thrashing.
torch.set_num_threads(int(os.environ.get("ROBUSTFT_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory):
    """The zero-shot digits-shift classifier and its data, loaded once per session."""
    from robustft.demo import demo_config
    from robustft.runner import prepare_run

    out = tmp_path_factory.mktemp("prepared")
    return prepare_run(demo_config("zeroshot", 0, out), log=lambda message: None)
