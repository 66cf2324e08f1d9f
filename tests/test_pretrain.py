"""The committed tiny ViT is what the pretraining script produces."""

from __future__ import annotations

import pytest
import torch

from robustft.backbones.builtin import packaged_checkpoint
from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.pretrain import pretrain_digits_vit


def test_pretraining_is_deterministic(tmp_path):
    first = load_state_dict_file(pretrain_digits_vit(tmp_path / "a.safetensors", steps=2, log=lambda m: None))
    second = load_state_dict_file(pretrain_digits_vit(tmp_path / "b.safetensors", steps=2, log=lambda m: None))
    assert all(torch.equal(first[k], second[k]) for k in first)
    committed = load_state_dict_file(packaged_checkpoint())
    assert first.keys() == committed.keys()
    assert all(first[k].shape == committed[k].shape for k in first)


@pytest.mark.slow
def test_script_reproduces_the_committed_checkpoint(tmp_path):
    """Re-runs the full pretraining (about 15 minutes on 2 CPU threads) and compares bit for bit."""
    torch.set_num_threads(2)  # the committed checkpoint was made with 2 threads
    produced = load_state_dict_file(pretrain_digits_vit(tmp_path / "vit.safetensors", log=lambda m: None))
    committed = load_state_dict_file(packaged_checkpoint())
    assert produced.keys() == committed.keys()
    for key in produced:
        assert torch.equal(produced[key], committed[key]), key
