"""Calibration: ECE, NLL, temperature scaling fitted on id_val only, and where they are reported."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from robustft.calibration import expected_calibration_error, fit_temperature, negative_log_likelihood
from robustft.demo import demo_config
from robustft.evaluate import evaluate_splits, summarize
from robustft.report import markdown_table, write_report
from robustft.runner import fit


def synthetic_predictor(n: int, classes: int, sharpen: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose top-class probability ``p`` is right with probability exactly ``p`` (when ``sharpen`` = 1).

    ``sharpen`` > 1 multiplies the logits: same predictions and correctness, inflated confidence.
    """
    generator = torch.Generator().manual_seed(seed)
    confidence = 0.2 + 0.8 * torch.rand(n, generator=generator, dtype=torch.float64)
    predicted = torch.randint(classes, (n,), generator=generator)
    probabilities = ((1 - confidence) / (classes - 1)).unsqueeze(1).repeat(1, classes)
    probabilities[torch.arange(n), predicted] = confidence
    correct = torch.rand(n, generator=generator, dtype=torch.float64) < confidence
    other = (predicted + torch.randint(1, classes, (n,), generator=generator)) % classes
    labels = torch.where(correct, predicted, other)
    return sharpen * probabilities.log(), labels


def test_ece_is_zero_when_calibrated_and_large_when_over_confident() -> None:
    logits, labels = synthetic_predictor(100_000, 10, sharpen=1.0, seed=0)
    assert expected_calibration_error(logits, labels) < 0.01  # sampling noise only
    over_confident = expected_calibration_error(logits * 4, labels)
    assert over_confident > 0.2
    # ECE by hand: confidences 0.9 (right), 0.9 (wrong) fall in bin (14/15, 1]; 0.6 (right) in (8/15, 9/15].
    hand_logits = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]]).log()
    hand_labels = torch.tensor([0, 1, 0])
    expected = 2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1.0 - 0.6)
    assert expected_calibration_error(hand_logits, hand_labels) == pytest.approx(expected)
    # NLL by hand: -mean(log 0.9, log 0.1, log 0.6).
    nll = -(math.log(0.9) + math.log(0.1) + math.log(0.6)) / 3
    assert negative_log_likelihood(hand_logits, hand_labels) == pytest.approx(nll)


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(20_000, 5, generator=generator)
    for true_temperature in (0.5, 2.5):
        labels = torch.multinomial(torch.softmax(logits / true_temperature, 1), 1, generator=generator).squeeze(1)
        fitted = fit_temperature(logits, labels)
        assert fitted == pytest.approx(true_temperature, rel=0.05)
        assert negative_log_likelihood(logits / fitted, labels) <= negative_log_likelihood(logits, labels)


def splits_and_predictor() -> tuple[nn.Module, dict[str, TensorDataset]]:
    generator = torch.Generator().manual_seed(2)
    predictor = nn.Linear(6, 4)
    with torch.no_grad():
        predictor.weight.copy_(4 * torch.randn(4, 6, generator=generator))  # over-confident on purpose
    splits = {}
    for name in ("train", "id_val", "id_test", "ood_shift"):
        inputs = torch.randn(300, 6, generator=generator)
        noisy = predictor(inputs).detach() + 3 * torch.randn(300, 4, generator=generator)
        splits[name] = TensorDataset(inputs, noisy.argmax(1))
    return predictor, splits


def test_temperature_is_fitted_on_id_val_and_never_reads_test_labels() -> None:
    predictor, splits = splits_and_predictor()
    device = torch.device("cpu")
    metrics = evaluate_splits(predictor, splits, device, batch_size=128)
    assert list(metrics) == ["id_val", "id_test", "ood_shift"]
    temperature = metrics["id_val"]["temperature"]
    assert temperature > 1.5  # the predictor is over-confident, so T > 1 softens it
    assert metrics["id_test"]["ece_ts"] < metrics["id_test"]["ece"]
    assert metrics["id_test"]["accuracy"] == metrics["id_test"]["accuracy"]  # T never changes the arg-max

    permuted = dict(splits)
    for name in ("id_test", "ood_shift"):
        inputs, labels = splits[name].tensors
        permuted[name] = TensorDataset(inputs, labels[torch.randperm(len(labels))])
    again = evaluate_splits(predictor, permuted, device, batch_size=128)
    assert again["id_val"]["temperature"] == temperature  # bit-identical: test labels did not enter the fit
    assert again["ood_shift"]["temperature"] == temperature
    assert again["ood_shift"]["ece_ts"] != metrics["ood_shift"]["ece_ts"]  # the labels were really changed

    changed_val = dict(splits)
    inputs, labels = splits["id_val"].tensors
    changed_val["id_val"] = TensorDataset(inputs, labels.roll(1))
    assert evaluate_splits(predictor, changed_val, device)["id_val"]["temperature"] != temperature

    plain = evaluate_splits(predictor, splits, device, temperature_scaling=False)
    assert "ece_ts" not in plain["id_test"] and plain["id_test"]["ece"] == metrics["id_test"]["ece"]
    entry = summarize(metrics)
    assert entry["temperature"] == temperature
    assert set(entry["ece"]) == set(entry["nll"]) == set(entry["ece_ts"]) == {"id_val", "id_test", "ood_shift"}


def test_results_json_and_report_carry_calibration(digits_prepared, tmp_path) -> None:
    config = demo_config("zeroshot", 0, tmp_path, progress=False)
    entry = fit(config, log=lambda message: None, prepared=digits_prepared)["methods"]["zeroshot"]
    splits = {"id_val", "id_test", "ood_fonts", "ood_corruption", "ood_color", "ood_rotation"}
    assert set(entry["ece"]) == set(entry["nll"]) == set(entry["ece_ts"]) == splits
    assert all(0 <= value <= 100 for value in entry["ece"].values())
    assert entry["temperature"] > 0
    off = demo_config("zeroshot", 0, tmp_path, name="zeroshot_plain", progress=False)
    off = off.model_copy(update={"evaluate": off.evaluate.model_copy(update={"temperature_scaling": False})})
    plain = fit(off, log=lambda message: None, prepared=digits_prepared)["methods"]["zeroshot"]
    assert "ece_ts" not in plain and "temperature" not in plain and plain["ece"] == entry["ece"]

    results = {"benchmark": "digits_shift", "seed": 0, "methods": {"zeroshot": entry}}
    table = markdown_table(results)
    assert "ECE ID" in table and "ECE OOD avg" in table
    ood_ece = sum(entry["ece"][s] for s in splits if s.startswith("ood_")) / 4
    assert f"{ood_ece:.2f}" in table
    report = write_report(results, tmp_path / "report").read_text()
    assert "## Calibration" in report and f"{entry['temperature']:.3g}" in report


def test_vrf_fits_its_temperatures_with_the_one_calibration_fit() -> None:
    """VRF's NLL temperature is calibration.fit_temperature within VRF's bounds, not a second implementation."""
    from robustft import calibration
    from robustft.methods import vrf

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 5, generator=generator) * 4
    labels = torch.distributions.Categorical(logits=logits / 2.5).sample()
    fitted = vrf.fit_temperature(logits, labels)
    assert fitted == calibration.fit_temperature(logits, labels, bounds=vrf.TEMPERATURE_BOUNDS)
    assert fitted == pytest.approx(fit_temperature(logits, labels), rel=1e-6)  # optimum inside both ranges
    assert vrf.fit_temperature(logits * 1e3, labels) <= vrf.TEMPERATURE_BOUNDS[1] * (1 + 1e-9)  # VRF's range kept


@pytest.mark.slow  # importing torchmetrics takes 10-45 s here; robustft's ECE stays its own for that reason
def test_ece_equals_torchmetrics_calibration_error() -> None:
    classification = pytest.importorskip("torchmetrics.functional.classification")
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(500, 7, generator=generator) * 3
    labels = torch.randint(0, 7, (500,), generator=generator)
    reference = classification.multiclass_calibration_error(logits.softmax(1), labels, 7, n_bins=15, norm="l1")
    assert expected_calibration_error(logits, labels, bins=15) == pytest.approx(float(reference), abs=1e-6)
