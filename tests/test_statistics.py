"""Bootstrap intervals cover the truth at their rate; a real difference is detected and a null one is not."""

from __future__ import annotations

import pytest
import torch

from robustft.errors import DataError
from robustft.statistics import (
    PREDICTIONS_FILE,
    accuracy_intervals,
    correctness,
    leaderboard_statistics,
    load_predictions,
    paired_test,
    save_predictions,
)

TRIALS = 200
RESAMPLES = 400  # enough for a 95% interval's bounds; keeps the coverage trials a few seconds


def _bernoulli(probability: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator) < probability


def test_interval_covers_the_true_accuracy_at_about_95_percent() -> None:
    generator = torch.Generator().manual_seed(0)
    covered = 0
    for _ in range(TRIALS):
        correct = {"id_test": _bernoulli(0.8, (1, 300), generator)}
        lo, hi = accuracy_intervals(correct, RESAMPLES)["id"]
        covered += lo <= 80.0 <= hi
    assert 0.90 <= covered / TRIALS <= 0.99  # binomial spread of 200 trials around 0.95 is ±0.03


def test_ood_average_interval_covers_the_mean_of_the_splits_and_is_narrower_than_each() -> None:
    generator = torch.Generator().manual_seed(1)
    truth = {"ood_a": 0.6, "ood_b": 0.4, "ood_c": 0.7}
    covered, widths = 0, []
    for _ in range(TRIALS // 2):
        correct = {split: _bernoulli(p, (1, 300), generator) for split, p in truth.items()}
        intervals = accuracy_intervals(correct, RESAMPLES)
        lo, hi = intervals["ood_avg"]
        covered += lo <= 100 * sum(truth.values()) / 3 <= hi
        widths.append((hi - lo, min(b - a for a, b in intervals["ood"].values())))
    assert covered / (TRIALS // 2) >= 0.88
    assert all(average < single for average, single in widths)  # averaging three independent splits


def test_intervals_are_reproducible_and_one_seed_has_a_nonzero_width() -> None:
    correct = {"id_test": _bernoulli(0.8, (1, 250), torch.Generator().manual_seed(2))}
    first, second = accuracy_intervals(correct), accuracy_intervals(correct)
    assert first == second
    lo, hi = first["id"]
    assert hi - lo > 5  # 250 images: about ±5 points, never "± 0.00"
    assert lo <= correct["id_test"].double().mean() * 100 <= hi


def test_several_seeds_widen_the_interval_by_their_spread() -> None:
    generator = torch.Generator().manual_seed(3)
    same = _bernoulli(0.75, (1, 400), generator).repeat(3, 1)
    spread = torch.stack([_bernoulli(p, (400,), generator) for p in (0.6, 0.75, 0.9)])
    same_width = torch.tensor(accuracy_intervals({"id_test": same})["id"]).diff().item()
    spread_width = torch.tensor(accuracy_intervals({"id_test": spread})["id"]).diff().item()
    assert spread_width > 2 * same_width


def test_a_real_difference_is_detected_on_the_same_images() -> None:
    generator = torch.Generator().manual_seed(4)
    baseline = _bernoulli(0.8, (1, 400), generator)
    better = baseline.clone()
    wrong = torch.nonzero(~baseline[0]).flatten()
    better[0, wrong[:16]] = True  # 16 more images right out of 400: +4 points, within each interval's noise
    test = paired_test({"id_test": better}, {"id_test": baseline})["id"]
    assert test["above"] and not test["below"] and test["p_value"] < 0.025
    assert test["difference"] == pytest.approx(4.0)
    assert test["interval"][0] > 0
    intervals = accuracy_intervals({"id_test": better}), accuracy_intervals({"id_test": baseline})
    assert intervals[0]["id"][0] < intervals[1]["id"][1]  # the unpaired intervals overlap: pairing is sharper


def test_a_null_difference_is_detected_at_most_at_the_test_level() -> None:
    generator = torch.Generator().manual_seed(5)
    detected = 0
    for _ in range(TRIALS):
        difficulty = torch.rand(1, 300, generator=generator)  # shared image difficulty, as on one test set
        first = torch.rand(1, 300, generator=generator) < difficulty
        second = torch.rand(1, 300, generator=generator) < difficulty
        tests = paired_test({"id_test": first, "ood_x": second}, {"id_test": second, "ood_x": first}, RESAMPLES)
        detected += tests["id"]["above"]
    assert detected / TRIALS <= 0.06  # one-sided level 2.5%


def test_paired_test_refuses_different_images_or_seeds() -> None:
    with pytest.raises(DataError, match="same images"):
        paired_test({"id_test": torch.ones(1, 10, dtype=torch.bool)}, {"id_test": torch.ones(1, 11, dtype=torch.bool)})
    with pytest.raises(DataError, match="same seeds"):
        paired_test({"id_test": torch.ones(2, 10, dtype=torch.bool)}, {"id_test": torch.ones(1, 10, dtype=torch.bool)})


def test_predictions_file_round_trips_compactly_and_feeds_the_leaderboard(tmp_path) -> None:
    generator = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 10, (200,), generator=generator)
    runs = {}
    for name, flipped in (("finetune", 60), ("better", 20)):
        for seed in (0, 1):
            predicted = labels.clone()
            predicted[: flipped + seed] = (predicted[: flipped + seed] + 1) % 10
            run = tmp_path / f"seed{seed}" / name
            save_predictions(run / PREDICTIONS_FILE, {"id_test": (predicted, labels), "ood_x": (predicted, labels)})
            runs.setdefault(name, []).append(str(run))
    loaded = load_predictions(tmp_path / "seed0" / "better" / PREDICTIONS_FILE)
    assert set(loaded) == {"id_test", "ood_x"}
    assert (loaded["id_test"][1] == labels).all()
    assert correctness(loaded)["id_test"].sum() == 180
    from safetensors import safe_open

    with safe_open(str(tmp_path / "seed0" / "better" / PREDICTIONS_FILE), "pt") as handle:
        assert handle.get_tensor("id_test/predicted").dtype == torch.int16
    rows = leaderboard_statistics(runs)
    assert rows["better"]["significance"]["finetune"]["id"]["above"]
    assert rows["better"]["significance"]["finetune"]["ood_avg"]["above"]
    assert "significance" not in rows["finetune"]  # not tested against itself; wise_ft absent
    lo, hi = rows["better"]["ci"]["id"]
    assert lo < 89.75 < hi  # the mean over its two seeds: 180 and 179 of 200 right


def test_unreadable_predictions_name_the_file(tmp_path) -> None:
    path = tmp_path / PREDICTIONS_FILE
    path.write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=PREDICTIONS_FILE):
        load_predictions(path)


def _run(root, name: str, predicted: torch.Tensor, labels: torch.Tensor) -> None:
    """A run directory as `robustft fit` leaves it: results.json (with its intervals) and the predictions."""
    import json

    from robustft.runner import confidence_intervals

    predictions = {"id_test": (predicted, labels), "ood_x": (predicted.flip(0), labels.flip(0))}
    accuracy = float((predicted == labels).double().mean() * 100)
    entry = {"id": accuracy, "ood": {"ood_x": accuracy}, "ood_avg": accuracy} | confidence_intervals(predictions)
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps({"benchmark": "b", "seed": 0, "methods": {name: entry}}))
    save_predictions(root / name / PREDICTIONS_FILE, predictions)


def test_report_of_one_seed_shows_intervals_and_marks_never_plus_minus_zero(tmp_path) -> None:
    from robustft.report import load_results, results_table, write_report

    labels = torch.randint(0, 10, (400,), generator=torch.Generator().manual_seed(7))
    wrong = (labels + 1) % 10
    for name, (first, last) in (("finetune", (0, 80)), ("wise_ft", (40, 118)), ("better", (0, 30))):
        errors = torch.zeros(400, dtype=torch.bool)
        errors[first:last] = True
        _run(tmp_path / "runs", name, torch.where(errors, wrong, labels), labels)
    results = load_results([tmp_path / "runs"])
    assert results["methods"]["better"]["significance"]["finetune"]["id"]["above"]
    wise = results["methods"]["wise_ft"]["significance"]["finetune"]["id"]  # 40 fixed, 38 broken: noise
    assert wise["difference"] == pytest.approx(0.5) and not wise["above"] and not wise["below"]
    rows = {row[0]: row for row in results_table(results).rows}
    assert rows["better"][1].startswith("92.50 [") and rows["better"][1].endswith("▲ft▲wise")
    assert "▲" not in rows["wise_ft"][1]
    report = write_report(results, tmp_path / "report")
    for text in (report.read_text(encoding="utf-8"), (tmp_path / "report" / "report.html").read_text("utf-8")):
        assert "± 0.00" not in text and "±" not in text.split("How to read this")[0]
        assert "▲ft" in text and "95% percentile bootstrap" in text and "How to read this" in text
