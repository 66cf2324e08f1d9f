"""Shared fixtures: tests use the real built-in benchmark and the committed tiny ViT, on CPU."""

from __future__ import annotations

import os

# The suite checks exact CPU numerics (fp32, bit-equal resumes); on a GPU host it would run bf16 on the GPU
# by default. ROBUSTFT_TEST_DEVICE=cuda keeps the GPU visible.
if os.environ.get("ROBUSTFT_TEST_DEVICE", "cpu") == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

# CI has 2 cores. Under pytest-xdist (``-n 2``, one worker per core) each worker and every process it starts
# runs one thread: two multi-threaded torch processes on 2 cores slow each other 10-20x. Otherwise
# ROBUSTFT_TEST_THREADS (default 2) sets the threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["ROBUSTFT_TEST_THREADS"] = "1"
torch.set_num_threads(int(os.environ.get("ROBUSTFT_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory):
    """The zero-shot digits-shift classifier and its data, loaded once per session."""
    from robustft.demo import demo_config
    from robustft.runner import prepare_run

    out = tmp_path_factory.mktemp("prepared")
    return prepare_run(demo_config("zeroshot", 0, out), log=lambda message: None)


# Files that take minutes go first, so that under ``-n 2 --dist loadfile`` neither worker is left alone with one
# of them at the end (order within a file is kept).
LONG_FILES = ("test_launchers.py", "test_fsdp.py", "test_user_path.py", "test_distributed.py", "test_compare.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
