"""Shared fixtures: tests use the real built-in benchmark and the committed tiny ViT, on CPU."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory):
    """The zero-shot digits-shift classifier and its data, loaded once per session."""
    from robustft.demo import demo_config
    from robustft.runner import prepare_run

    out = tmp_path_factory.mktemp("prepared")
    return prepare_run(demo_config("zeroshot", 0, out), log=lambda message: None)
