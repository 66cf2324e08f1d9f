"""Model Soups: exact means, the greedy rule, and soups of real fine-tuned runs from one initialisation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from posthoc_support import bits_equal, finetune, posthoc_run, small_prepared
from robustft.backbones.checkpoint_files import load_state_dict_file, save_state_dict_file
from robustft.config import parse_config
from robustft.errors import ConfigError
from robustft.methods import build_method
from robustft.posthoc import WeightSpaceError, find_runs, greedy_soup, uniform_soup
from robustft.runner import FINAL_CHECKPOINT
from robustft.weight_references import load_final_state


@pytest.fixture(scope="module")
def small(digits_prepared):
    return small_prepared(digits_prepared)


@pytest.fixture(scope="module")
def ingredients(small, tmp_path_factory):
    """Three real fine-tunes from the zero-shot model at different learning rates."""
    out = tmp_path_factory.mktemp("soup")
    return [finetune(small, out / "sweep", name=f"lr={lr}", lr=lr, steps=3) for lr in (1e-4, 3e-4, 1e-3)]


def _state(run):
    return load_state_dict_file(run / FINAL_CHECKPOINT)


# ------------------------------------------------------------------------------------------- the maths


def test_uniform_soup_of_identical_ingredients_is_the_ingredient(ingredients):
    state = _state(ingredients[1])
    soup = uniform_soup([state, state, state])
    assert list(soup) == list(state) and all(bits_equal(soup[key], state[key]) for key in state)


def test_uniform_soup_is_the_mean_tensor_by_tensor(ingredients):
    states = [_state(run) for run in ingredients]
    soup = uniform_soup(iter(states))  # any iterable: ingredients are streamed
    for key in states[0]:
        torch.testing.assert_close(soup[key], torch.stack([s[key] for s in states]).mean(0), rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(soup[key], states[0][key]) for key in soup)


def test_soups_refuse_other_architectures_and_empty_lists():
    with pytest.raises(WeightSpaceError, match=r"head.weight \(10, 4\) vs \(3, 4\)"):
        uniform_soup([{"head.weight": torch.zeros(10, 4)}, {"head.weight": torch.zeros(3, 4)}])
    with pytest.raises(WeightSpaceError, match="at least one"):
        uniform_soup([])


def test_greedy_soup_adds_best_first_and_keeps_only_what_does_not_hurt():
    def accuracy(state):  # held-out accuracy peaks at w == 2
        return 100.0 - abs(float(state["w"]) - 2.0)

    weights = [1.0, 3.0, 100.0, 2.5]
    ingredients = [{"w": torch.tensor([w])} for w in weights]
    result = greedy_soup(ingredients, [accuracy(s) for s in ingredients], accuracy)
    assert result.order == [3, 0, 1, 2]  # by own held-out accuracy, ties in list order
    assert result.kept == [3, 0, 1]  # 2.5 -> mean 1.75 (better) -> mean 2.17 (better) -> 26.6 (worse, dropped)
    assert float(result.state_dict["w"]) == pytest.approx(6.5 / 3)
    assert [step["kept"] for step in result.steps] == [True, True, True, False]
    assert result.val_accuracy == pytest.approx(accuracy({"w": torch.tensor(6.5 / 3)}))
    same = [{"w": torch.tensor([2.0])}, {"w": torch.tensor([2.0])}]
    assert greedy_soup(same, [100.0, 100.0], accuracy).kept == [0, 1]  # an equal score is not a drop


# ----------------------------------------------------------------------------------- soups of real runs


def test_greedy_soup_is_never_below_its_best_ingredient(small, ingredients, tmp_path):
    entry = posthoc_run(small, tmp_path, "greedy_soup", ingredients=ingredients)
    individual = entry["ingredient_id_val"]
    best = max(individual, key=individual.get)
    assert entry["id_val"] >= individual[best]
    assert entry["soup_id_val"] == entry["id_val"]  # the runner's evaluation agrees with the greedy search
    assert entry["kept"][0] == best and set(entry["kept"]) <= set(map(str, ingredients))
    kept_steps = [step["val_accuracy"] for step in entry["greedy_steps"] if step["kept"]]
    assert kept_steps == sorted(kept_steps)
    saved = load_final_state(tmp_path / "greedy_soup" / FINAL_CHECKPOINT, initial_state=small.model.state_dict())
    expected = uniform_soup([_state(Path(run)) for run in entry["kept"]])
    assert all(bits_equal(saved[key], expected[key]) for key in expected)


def test_greedy_soup_rejects_a_broken_ingredient_that_the_uniform_soup_takes(small, ingredients, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ingredients[0], broken)
    generator = torch.Generator().manual_seed(0)
    state = {
        key: value + torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in _state(ingredients[0]).items()
    }
    save_state_dict_file(state, broken / FINAL_CHECKPOINT)
    runs = [*ingredients, broken]
    greedy = posthoc_run(small, tmp_path, "greedy_soup", ingredients=runs)
    uniform = posthoc_run(small, tmp_path, "uniform_soup", ingredients=runs)
    assert str(broken) not in greedy["kept"] and greedy["ingredient_id_val"][str(broken)] < 30
    assert greedy["id_val"] > uniform["id_val"]
    assert uniform["ingredients"] == [str(run) for run in runs]


def test_uniform_soup_run_of_identical_runs_is_that_run(small, ingredients, tmp_path):
    copies = [tmp_path / "copy_a", tmp_path / "copy_b"]
    for copy in copies:
        shutil.copytree(ingredients[1], copy)
    entry = posthoc_run(small, tmp_path, "uniform_soup", ingredients=[ingredients[1], *copies])
    saved = load_final_state(tmp_path / "uniform_soup" / FINAL_CHECKPOINT, initial_state=small.model.state_dict())
    original = _state(ingredients[1])
    assert all(bits_equal(saved[key], original[key]) for key in original)
    assert entry["trainable_params"] == 0 and len(entry["ingredients"]) == 3


def test_ingredient_folders_expand_to_their_finished_non_posthoc_runs(small, ingredients, tmp_path):
    sweep = ingredients[0].parent
    assert find_runs(sweep) == sorted(ingredients)
    assert find_runs(ingredients[0]) == [ingredients[0]]
    posthoc_run(small, sweep, "uniform_soup", ingredients=[sweep])  # a soup written into the sweep directory
    (sweep / "unfinished").mkdir()
    assert find_runs(sweep) == sorted(ingredients)
    with pytest.raises(ConfigError, match="no finished runs"):
        find_runs(tmp_path)
    config = parse_config({"method": {"name": "greedy_soup", "ingredients": [str(sweep), str(ingredients[0])]}})
    assert build_method(config).input_runs() == sorted(ingredients)  # each run once
    with pytest.raises(ConfigError, match="method.ingredients"):
        posthoc_run(small, tmp_path, "uniform_soup")
