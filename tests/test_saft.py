"""SAFT (Nguyen et al., ECCV 2024): exact top-k by |mean gradient|, only selected entries move (weight decay on)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.demo import demo_config
from robustft.errors import ConfigError
from robustft.methods.saft import SAFT, SELECTION_FILE, SAFTConfig, load_selection, top_k_selection
from robustft.runner import FINAL_CHECKPOINT, fit


def quiet(message: str) -> None:
    pass


def saft_config(tmp_path, name: str, **method):
    config = demo_config("saft", 0, tmp_path, steps=4, progress=False)
    config.method = config.method.model_copy(update=method)
    config.optim.lr, config.optim.weight_decay = 1e-2, 0.1
    return config.model_copy(update={"name": name})


@pytest.fixture(scope="module")
def saft_run(digits_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("saft")
    results = fit(saft_config(out, "run", fraction=0.002), log=quiet, prepared=digits_prepared)
    return out / "run", results["methods"]["saft"]


def test_top_k_selection_is_global_across_tensors():
    scores = {"a": torch.tensor([[0.1, 0.9], [0.3, 0.0]]), "b": torch.tensor([0.8, 0.2, 0.95]), "c": torch.zeros(2)}
    selection = top_k_selection(scores, 3)
    assert set(selection) == {"a", "b"}
    assert selection["a"].tolist() == [1] and selection["b"].tolist() == [0, 2]


def test_selection_is_the_brute_force_top_k_of_mean_gradient(digits_prepared, saft_run):
    run_dir, entry = saft_run
    model = copy.deepcopy(digits_prepared.model).eval()
    images, labels = map(torch.cat, zip(*digits_prepared.ctx.iterate("train"), strict=True))
    parameters = dict(model.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(images), labels), list(parameters.values()))
    flat = torch.cat([g.abs().reshape(-1) for g in grads])
    k = round(0.002 * flat.numel())
    expected = set(torch.topk(flat, k).indices.tolist())
    offsets = dict(
        zip(parameters, torch.tensor([0] + [p.numel() for p in parameters.values()]).cumsum(0).tolist(), strict=False)
    )
    selection = load_selection(run_dir / SELECTION_FILE, model)
    chosen = {offsets[name] + i for name, index in selection.items() for i in index.tolist()}
    assert entry["active_params"] == entry["trainable_params"] == k == len(chosen)
    assert len(chosen & expected) >= k - 2  # float summation order may swap a near-tie at the boundary


def test_unselected_entries_stay_bit_identical_with_weight_decay_on(digits_prepared, saft_run):
    run_dir, entry = saft_run
    final = load_state_dict_file(run_dir / FINAL_CHECKPOINT)
    pretrained = digits_prepared.model.state_dict()
    selection = load_selection(run_dir / SELECTION_FILE, digits_prepared.model)
    changed_total = 0
    for name, before in pretrained.items():
        changed = set((final[name] != before).reshape(-1).nonzero().flatten().tolist())
        assert changed <= set(selection.get(name, torch.tensor([])).tolist()), name
        changed_total += len(changed)
    assert 0 < changed_total <= entry["active_params"]
    fresh = copy.deepcopy(digits_prepared.model)
    fresh.load_state_dict(final, strict=True)


def test_saved_selection_is_reused(digits_prepared, saft_run, tmp_path):
    run_dir, _ = saft_run
    path = run_dir / SELECTION_FILE
    method = SAFT(SAFTConfig(selection_path=path, fraction=0.5))
    ctx = digits_prepared.ctx.for_run(tmp_path, 0, quiet)
    model = method.prepare(copy.deepcopy(digits_prepared.model), ctx)
    reused = load_selection(tmp_path / SELECTION_FILE, digits_prepared.model)
    original = load_selection(path, digits_prepared.model)
    assert reused.keys() == original.keys() and all(torch.equal(reused[k], original[k]) for k in original)
    assert ctx.extras["active_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ctx.extras["active_params"] == sum(i.numel() for i in original.values())


def test_bad_selection_file_is_a_config_error(digits_prepared, tmp_path):
    from safetensors.torch import save_file

    save_file({"backbone.nope.weight": torch.tensor([0])}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="lacks"):
        load_selection(tmp_path / "bad.safetensors", digits_prepared.model)
    assert SAFTConfig().fraction == 0.001
