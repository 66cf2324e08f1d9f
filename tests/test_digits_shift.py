"""The built-in benchmark is deterministic, has the promised splits, and its shifts really shift."""

from __future__ import annotations

import torch

from robustft.data import digits_shift


def test_splits_are_deterministic_and_disjoint_sources():
    first, second = digits_shift.build_splits(), digits_shift.build_splits()
    assert list(first) == ["train", "id_val", "id_test", "ood_fonts", "ood_corruption", "ood_color", "ood_rotation"]
    for name in first:
        assert torch.equal(first[name][0], second[name][0]), name
        assert first[name][0].dtype == torch.uint8 and first[name][0].shape[1:] == (3, 32, 32)
    _, _, roles = digits_shift.handwritten_digits()
    used = torch.cat([roles[r] for r in ("pretrain", "train", "id_val", "id_test")])
    assert len(used) == len(set(used.tolist())) == 1797
    assert not set(digits_shift.PRETRAIN_FONTS) & set(digits_shift.HELD_OUT_FONTS)


def test_every_class_in_every_split():
    for name, (_, labels) in digits_shift.build_splits().items():
        assert torch.bincount(labels, minlength=10).min() > 0, name


def test_font_glyphs_have_ink_and_differ_between_digits():
    glyphs = digits_shift.font_glyphs(digits_shift.HELD_OUT_FONTS)
    assert glyphs.shape == (len(digits_shift.HELD_OUT_FONTS) * len(digits_shift.FONT_SIZES) * 10, 1, 32, 32)
    ink = glyphs.flatten(1).sum(1)
    assert ink.min() > 5
    per_font = glyphs.view(-1, 10, 32 * 32)
    assert (per_font[:, :, None] - per_font[:, None]).abs().sum(-1).add(torch.eye(10) * 1e9).min() > 1


def test_id_images_are_grey_and_ood_colour_is_not():
    splits = digits_shift.build_splits()
    train = splits["train"][0].float()
    assert torch.equal(train[:, 0], train[:, 1]) and torch.equal(train[:, 1], train[:, 2])
    colour = splits["ood_color"][0].float()
    assert (colour[:, 0] - colour[:, 1]).abs().mean() > 10
    assert train.mean() < colour.mean()  # inverted / coloured backgrounds are brighter


def test_pretraining_stream_is_seeded():
    a = digits_shift.pretrain_batch(32, torch.Generator().manual_seed(5))
    b = digits_shift.pretrain_batch(32, torch.Generator().manual_seed(5))
    c = digits_shift.pretrain_batch(32, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
