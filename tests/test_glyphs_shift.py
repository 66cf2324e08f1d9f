"""glyphs-shift and the tiny CLIP: the data, base-to-new, the committed asset through the open_clip path."""

from __future__ import annotations

import pytest
import torch
import yaml

from bad_input_support import cli_error, tree_bytes
from robustft.backbones.builtin import GLYPH_CLIP, glyph_clip_checkpoint
from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.backbones.open_clip_backbone import load_open_clip, open_clip_classifier, text_zero_shot_head
from robustft.config import parse_config
from robustft.data import glyphs_shift, load_splits, resolve_class_names
from robustft.demo import demo_config
from robustft.errors import ConfigError, DataError
from robustft.pretrain import pretrain_glyph_clip

SMALL = {"train": 200, "id_val": 100, "id_test": 400, **{name: 200 for name in glyphs_shift.OOD_LOOKS}}


@pytest.fixture(scope="module")
def small_splits():
    return glyphs_shift.build_splits(sizes=SMALL)


def test_splits_are_deterministic_balanced_and_default_to_thousands(small_splits):
    again = glyphs_shift.build_splits(sizes=SMALL)
    for name, (images, labels) in small_splits.items():
        assert images.dtype == torch.uint8 and images.shape == (SMALL[name], 3, 32, 32)
        assert torch.equal(images, again[name][0]) and torch.equal(labels, again[name][1])
        assert torch.bincount(labels, minlength=20).tolist() == [SMALL[name] // 20] * 20
    other_seed = glyphs_shift.build_splits(seed=1, sizes={name: 20 for name in SMALL})
    assert not torch.equal(other_seed["id_test"][0], small_splits["id_test"][0][:20])
    assert min(glyphs_shift.SPLIT_SIZES["id_val"], glyphs_shift.OOD_SIZE) >= 2000


def test_id_images_are_blocky_scans_and_ood_colour_is_coloured(small_splits):
    images = small_splits["id_test"][0].float()
    blocks = images.unflatten(2, (8, 4)).unflatten(4, (8, 4))  # [N, 3, 8, 4, 8, 4]
    assert torch.equal(blocks.amax(dim=(3, 5)), blocks.amin(dim=(3, 5)))  # 4x4 blocks are flat
    assert torch.equal(images[:, 0], images[:, 1])  # grey
    colour = small_splits["ood_color"][0].float()
    assert (colour[:, 0] - colour[:, 2]).abs().mean() > 10


def test_captions_name_class_font_colour_and_rotation():
    images, labels, captions = glyphs_shift.pretrain_batch(64, torch.Generator().manual_seed(0))
    assert images.shape == (64, 3, 32, 32) and len(captions) == 64
    for label, caption in zip(labels.tolist(), captions, strict=True):
        assert glyphs_shift.CLASS_NAMES[label] in caption
    assert any("handwritten digit" in caption for caption in captions)
    assert any(" font" in caption for caption in captions)
    assert any(" on " in caption for caption in captions)
    assert any("rotated" in caption for caption in captions)


def test_base_to_new_splits_keep_the_base_classes_first():
    names = glyphs_shift.benchmark_class_names(True)
    assert names[:10] == [glyphs_shift.CLASS_NAMES[i] for i in glyphs_shift.BASE_CLASSES]
    raw = glyphs_shift.build_splits(sizes={name: 40 for name in SMALL})
    splits, num_base, num_classes = glyphs_shift.base_to_new_splits(raw)
    assert (num_base, num_classes) == (10, 20)
    assert set(splits) == {"train", "id_val", "id_test", "ood_new"}
    assert splits["train"][1].max() < 10 and len(splits["train"][1]) == 20
    assert splits["ood_new"][1].tolist() == list(range(10)) + list(range(10))
    # an ood_new image of label k is the id_test image of the k-th new class
    new_class = glyphs_shift.CLASS_NAMES.index(names[10])
    first = (raw["id_test"][1] == new_class).nonzero()[0, 0]
    assert torch.equal(splits["ood_new"][0][0], raw["id_test"][0][first])


def _glyph_config(tmp_path, **data):
    raw = demo_config("zeroshot", 0, tmp_path, model="glyph_clip", progress=False).model_dump(mode="json")
    raw["data"].update({"split_sizes": dict(SMALL), **data})
    return parse_config(raw, source="test")


def test_base_to_new_through_the_data_layer_declares_class_spaces(tmp_path):
    config = _glyph_config(tmp_path, base_to_new=True, base_classes=["digit zero", "letter a"])
    names = resolve_class_names(config.data)
    splits, class_names = load_splits(config.data, {"input_size": (3, 32, 32)})
    assert class_names == names and names[:2] == ["digit zero", "letter a"]
    assert splits["train"].class_space.indices == (0, 1)
    assert splits["ood_new"].class_space.indices == tuple(range(2, 20))
    assert (splits["id_test"].report_as, splits["ood_new"].report_as) == ("base", "new")


def test_base_class_list_that_does_not_match_is_refused(tmp_path):
    with pytest.raises(DataError, match="data.base_classes: 'letter z' is not a class of benchmark glyphs_shift"):
        resolve_class_names(_glyph_config(tmp_path, base_to_new=True, base_classes=["letter z"]).data)
    with pytest.raises(DataError, match="every class is a base class"):
        resolve_class_names(_glyph_config(tmp_path, base_to_new=True, base_classes=glyphs_shift.CLASS_NAMES).data)
    with pytest.raises(ConfigError, match="only benchmark glyphs_shift has a base/new split"):
        parse_config({"data": {"benchmark": "digits_shift", "base_to_new": True}}, source="test")
    with pytest.raises(ConfigError, match="data.split_sizes: unknown split 'ood_snow'"):
        parse_config({"data": {"benchmark": "glyphs_shift", "split_sizes": {"ood_snow": 5}}}, source="test")


def test_cli_refuses_a_bad_base_class_before_training(tmp_path, monkeypatch, capsys):
    raw = _glyph_config(tmp_path, base_to_new=True, base_classes=["digit ten"]).model_dump(mode="json")
    raw["method"] = {"name": "finetune"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    before = tree_bytes(tmp_path)
    line = cli_error(monkeypatch, capsys, "fit", str(path))
    assert "data.base_classes: 'digit ten' is not a class" in line
    assert tree_bytes(tmp_path) == before


@pytest.fixture(scope="module")
def glyph_clip():
    return load_open_clip(GLYPH_CLIP, glyph_clip_checkpoint())


def test_committed_clip_loads_through_the_user_path_within_budget(glyph_clip):
    assert glyph_clip_checkpoint().stat().st_size < 25 * 2**20
    state = load_state_dict_file(glyph_clip_checkpoint())
    assert all(value.dtype == torch.float16 for value in state.values())
    assert glyph_clip.data_config["input_size"] == (3, 32, 32)
    assert glyph_clip.logit_scale > 10
    assert hasattr(glyph_clip.model, "transformer")  # the text tower FLYP and base-to-new need


def test_committed_clip_zero_shot_is_far_above_chance_on_every_split(glyph_clip, small_splits):
    from robustft.data.tensor_split import TensorSplit

    head = text_zero_shot_head(glyph_clip, glyphs_shift.CLASS_NAMES, glyphs_shift.TEMPLATES)
    classifier = open_clip_classifier(glyph_clip, head).eval()
    accuracy = {}
    with torch.no_grad():
        for name, (images, labels) in small_splits.items():
            inputs, targets = TensorSplit(images, labels, glyph_clip.data_config)[list(range(len(labels)))]
            accuracy[name] = classifier(inputs).argmax(1).eq(targets).float().mean().item() * 100
    assert all(value > 3 * 100 / 20 for value in accuracy.values()), accuracy  # chance is 5%


def test_pretraining_is_deterministic_and_matches_the_asset_layout(tmp_path):
    torch.set_num_threads(1)
    first = load_state_dict_file(pretrain_glyph_clip(tmp_path / "a.safetensors", steps=2, log=lambda m: None))
    second = load_state_dict_file(pretrain_glyph_clip(tmp_path / "b.safetensors", steps=2, log=lambda m: None))
    assert all(torch.equal(first[key], second[key]) for key in first)
    committed = load_state_dict_file(glyph_clip_checkpoint())
    assert first.keys() == committed.keys()
    assert all(first[key].shape == committed[key].shape for key in first)


@pytest.mark.slow
def test_pretrain_clip_reproduces_the_committed_asset(tmp_path):
    """Re-runs the full recipe (160 steps, 791 s on one busy CPU thread) and compares bit for bit."""
    torch.set_num_threads(1)  # the committed asset was made with one thread
    produced = load_state_dict_file(pretrain_glyph_clip(tmp_path / "clip.safetensors", log=lambda m: None))
    committed = load_state_dict_file(glyph_clip_checkpoint())
    assert produced.keys() == committed.keys()
    for key in produced:
        assert torch.equal(produced[key], committed[key]), key


def test_base_to_new_fit_reports_base_new_and_harmonic_mean(tmp_path):
    from robustft.report import results_table
    from robustft.runner import fit

    raw = _glyph_config(tmp_path, base_to_new=True).model_dump(mode="json")
    raw["method"] = {"name": "finetune"}
    raw["train"].update(steps=2, progress=False)
    results = fit(parse_config(raw, source="test"), log=lambda message: None)
    entry = results["methods"]["finetune"]
    base, new = entry["base_to_new"]["base"], entry["base_to_new"]["new"]
    assert base == entry["id"] and new == entry["ood"]["ood_new"]
    assert entry["base_to_new"]["hm"] == pytest.approx(2 * base * new / (base + new))
    header, rows = results_table(results)
    assert {"base", "new", "HM"} <= set(header)
    assert f"{entry['base_to_new']['hm']:.2f}" in rows[0]


def test_digits_vit_weights_become_the_same_open_clip_image_tower():
    import open_clip

    from robustft.backbones.builtin import digits_vit, packaged_checkpoint, register_glyph_clip
    from robustft.pretrain import digits_vit_as_open_clip_visual

    model = open_clip.create_model(register_glyph_clip(), pretrained=None).eval()
    preprocess = open_clip.get_model_preprocess_cfg(model)
    mean, std = torch.tensor(preprocess["mean"]), torch.tensor(preprocess["std"])
    state = load_state_dict_file(packaged_checkpoint())
    result = model.load_state_dict(digits_vit_as_open_clip_visual(state, mean, std), strict=False)
    assert not result.unexpected_keys
    assert [key for key in result.missing_keys if key.startswith("visual.")] == ["visual.proj"]
    vit = digits_vit()
    vit.load_state_dict(state)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vit.forward_head(vit.eval().forward_features((images - 0.5) / 0.5), pre_logits=True)
        model.visual.proj = None
        produced = model.visual((images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    torch.testing.assert_close(produced, expected, atol=2e-3, rtol=1e-3)
