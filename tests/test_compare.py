"""``robustft compare``: leaderboard numbers are the runs' numbers, shared fine-tune runs once, resume skips work."""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from collections import Counter

import pytest
import yaml
from typer.testing import CliRunner

import robustft.compare as compare
from posthoc_support import quiet, small_prepared
from robustft.cli import app
from robustft.compare import (
    CompareSection,
    execute_comparison,
    leaderboard_csv,
    load_compare_config,
    parse_seeds_option,
    plan_seed,
)
from robustft.data.tensor_split import TensorSplit
from robustft.demo import demo_config
from robustft.errors import ConfigError
from robustft.methods import method_options
from robustft.robustness import effective_robustness, ood_average, tradeoff_line
from robustft.runner import Prepared

METHODS = ["zeroshot", "finetune", "wise_ft", "output_ensemble", "vrf"]
SEEDS = [0, 1]
POSTHOC = ("wise_ft", "output_ensemble", "vrf")
SEED_INDEPENDENT = ("zeroshot",)
# Numbers that are measured again when a run is redone (timings), not results of the method.
TIMED = ("train_seconds", "inference_cost")


def base_config(out):
    return demo_config("finetune", 0, out, steps=2, progress=False)


# Three alphas instead of eleven: the sweep itself is tested in test_wise_ft.py / test_output_ensemble.py.
SETTINGS = CompareSection(options={m: {"alphas": [0.0, 0.5, 1.0]} for m in ("wise_ft", "output_ensemble")})


@pytest.fixture(scope="module")
def small(digits_prepared):
    """digits-shift with 32 images per evaluation split and 128 training images (two steps of 64)."""
    prepared = small_prepared(digits_prepared, size=32)
    train = prepared.ctx.splits["train"]
    splits = {
        **prepared.ctx.splits,
        "train": TensorSplit(train.images[:128], train.labels[:128], prepared.model.data_config, "train"),
    }
    return Prepared(prepared.model, dataclasses.replace(prepared.ctx, splits=splits), prepared.benchmark)


def run(out, small, methods=METHODS, seeds=SEEDS):
    """One comparison call with ``compare.fit`` counted: ({(method, seed, run name): fits}, comparison)."""
    fits: Counter = Counter()
    real_fit = compare.fit

    def counted(config, **kwargs):
        fits[(config.method.name, config.seed, config.name)] += 1
        return real_fit(config, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare, "fit", counted)
        comparison = execute_comparison(
            base_config(out), methods, seeds, out, log=quiet, prepared=small, settings=SETTINGS
        )
    return fits, comparison


@pytest.fixture(scope="module")
def first(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    fits, comparison = run(out, small)
    return out, fits, comparison


def without_timings(leaderboard):
    rows = {
        name: {key: value for key, value in row.items() if key not in TIMED}
        for name, row in leaderboard["methods"].items()
    }
    return {**leaderboard, "methods": rows}


def run_dir_of(out, seed, method):
    """Where a seed's run lives: a seed-independent method (zero-shot) runs once, in the first seed's folder."""
    return out / f"seed{SEEDS[0] if method in SEED_INDEPENDENT else seed}" / method


def test_one_finetune_per_seed_serves_every_posthoc_method(first):
    out, fits, comparison = first
    # every run fitted once, nothing twice; the seed-independent zero-shot run once for all seeds
    assert sum(fits.values()) == len(METHODS) * len(SEEDS) - (len(SEEDS) - 1)
    assert fits[("zeroshot", SEEDS[1], "zeroshot")] == 0
    for seed in SEEDS:
        assert fits[("finetune", seed, "finetune")] == 1
        for method in POSTHOC:
            assert fits[(method, seed, method)] == 1
            config = yaml.safe_load((out / f"seed{seed}" / method / "config.yaml").read_text())
            assert config["method"]["finetuned_run"] == str(out / f"seed{seed}" / "finetune")
    fitted = [str(out / f"seed{s}" / m) for s in SEEDS for m in METHODS if s == SEEDS[0] or m not in SEED_INDEPENDENT]
    assert sorted(comparison.fitted) == sorted(fitted)
    manifest = json.loads((out / compare.RUNS_MANIFEST).read_text())["runs"]
    shared = [(entry["seed"], entry["method"]) for entry in manifest if entry["status"] == "shared"]
    assert shared == [(SEEDS[1], "zeroshot")] and len(manifest) == len(METHODS) * len(SEEDS)
    assert not (out / f"seed{SEEDS[1]}" / "zeroshot").exists()


def test_leaderboard_numbers_are_the_mean_and_std_of_the_run_files(first):
    out, _, _ = first
    leaderboard = json.loads((out / "leaderboard.json").read_text())
    assert leaderboard["seeds"] == SEEDS and leaderboard["benchmark"] == "digits_shift"
    assert list(leaderboard["methods"]) == METHODS
    files = {
        seed: {m: json.loads((run_dir_of(out, seed, m) / "results.json").read_text())["methods"][m] for m in METHODS}
        for seed in SEEDS
    }
    lines = {
        seed: tradeoff_line(*[(files[seed][m]["id"], ood_average(files[seed][m])) for m in ("zeroshot", "finetune")])
        for seed in SEEDS
    }

    def expect(values):
        return {
            "mean": pytest.approx(statistics.fmean(values), abs=1e-12),
            "std": pytest.approx(statistics.pstdev(values), abs=1e-12),
        }

    for method, row in leaderboard["methods"].items():
        entries = [files[seed][method] for seed in SEEDS]
        assert row["kind"] == {"zeroshot": "zeroshot", "finetune": "trained"}.get(method, "posthoc")
        assert row["id"] == expect([e["id"] for e in entries])
        assert row["ood_avg"] == expect([e["ood_avg"] for e in entries])
        assert row["train_seconds"] == expect([e["train_seconds"] for e in entries])
        assert row["effective_robustness"] == expect(
            [effective_robustness(e["id"], e["ood_avg"], lines[seed]) for seed, e in zip(SEEDS, entries, strict=True)]
        )
        assert set(row["ood"]) == set(entries[0]["ood"]) and len(row["ood"]) == 4
        for split, stat in row["ood"].items():
            assert stat == expect([e["ood"][split] for e in entries])
        assert row["ece_id"] == expect([e["ece"]["id_test"] for e in entries])
        assert row["trainable_params"] == entries[0]["trainable_params"]
        assert row["runs"] == [str(run_dir_of(out, seed, method)) for seed in SEEDS]
        assert row.get("seed_independent", False) == (method in SEED_INDEPENDENT)
        costs = [json.loads((run_dir_of(out, s, method) / compare.COSTS_FILE).read_text()) for s in SEEDS]
        assert row["inference_cost"] == pytest.approx(statistics.fmean(c["inference_cost"] for c in costs))
        assert row["peak_memory_mb"] is None  # CPU: no per-run peak (documented in compare.py)
    assert leaderboard["methods"]["finetune"]["ece_id"]["std"] > 0  # the seeds trained differently
    assert leaderboard["methods"]["zeroshot"]["id"]["std"] == 0  # one run reported for both seeds
    assert "Seed-independent" in (out / "report.md").read_text()
    csv_rows = leaderboard_csv(leaderboard).splitlines()
    assert len(csv_rows) == 1 + len(METHODS) and csv_rows[0].startswith("method,kind,id_mean,id_std")
    assert "± " in (out / "leaderboard.md").read_text()  # several seeds: mean ± std cells
    assert (out / "report.md").is_file() and (out / "results.json").is_file()


def test_resume_reuses_finished_runs_and_redoes_only_what_changed(first, small):
    out, _, _ = first
    before = json.loads((out / "leaderboard.json").read_text())
    fits, again = run(out, small)
    assert sum(fits.values()) == 0
    assert again.leaderboard == before  # read back, costs included: not one number measured again
    shutil.rmtree(out / "seed1" / "wise_ft")
    fits, redone = run(out, small)
    assert dict(fits) == {("wise_ft", 1, "wise_ft"): 1}
    assert without_timings(redone.leaderboard) == without_timings(before)  # same FT run: same WiSE-FT
    shutil.rmtree(out / "seed0" / "finetune")  # its post-hoc runs combine a new fine-tune: they are redone
    fits, _ = run(out, small)
    assert dict(fits) == {(method, 0, method): 1 for method in ("finetune", *POSTHOC)}


def test_a_changed_config_reruns_instead_of_reusing(first):
    out, _, _ = first
    changed = demo_config("finetune", 0, out, steps=3, progress=False)
    plans = plan_seed(changed, ["zeroshot", "finetune"], 0, out / "seed0", SETTINGS)
    action, reason = compare.run_action(plans[1], set())
    assert action == "fresh" and "train.steps: 2 there, 3 now" in reason
    same = plan_seed(base_config(out), ["finetune"], 0, out / "seed0", SETTINGS, progress=True)
    assert compare.run_action(same[0], set())[0] == "reuse"  # progress bars do not change a result


def test_soups_get_ingredients_and_per_method_learning_rates(tmp_path):
    settings = CompareSection(optim={"lora": {"lr": 1e-3}}, soup_learning_rates=[1e-4])
    plans = plan_seed(base_config(tmp_path), ["lora", "finetune", "uniform_soup"], 3, tmp_path, settings)
    by_name = {plan.run_dir.name: plan for plan in plans}
    assert [plan.kind for plan in plans] == ["trained", "trained", "ingredient", "posthoc"]
    assert by_name["lora"].config.optim.lr == 1e-3 and by_name["finetune"].config.optim.lr == 3e-4
    ingredient = by_name["lr=0.0001"]
    assert ingredient.config.optim.lr == 1e-4 and ingredient.run_dir.parent.name == compare.INGREDIENTS_DIR
    soup = method_options(by_name["uniform_soup"].config)
    assert [str(run) for run in soup.ingredients] == [str(tmp_path / "finetune"), str(ingredient.run_dir)]
    assert all(plan.config.seed == 3 for plan in plans)
    assert compare.default_soup_learning_rates(3e-4) == [1e-4, 9e-4]


def test_compare_section_and_options_errors(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"method": {"name": "lora", "rank": 4}, "compare": {"seeds": [0, 2], "optim": {"lora": {"lr": 0.001}}}}
        )
    )
    base, settings = load_compare_config(config, ["compare.methods=[finetune,lora]"])
    assert settings.seeds == [0, 2] and settings.methods == ["finetune", "lora"]
    lora = next(p for p in plan_seed(base, ["lora"], 0, tmp_path, settings) if p.method == "lora")
    assert method_options(lora.config).rank == 4 and lora.config.optim.lr == 0.001
    config.write_text(yaml.safe_dump({"compare": {"sedes": [0]}}))
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'compare\.sedes'"):
        load_compare_config(config)
    with pytest.raises(ConfigError, match=r"--seeds '0,x'"):
        parse_seeds_option("0,x")
    config.write_text(yaml.safe_dump({"compare": {"seeds": [0]}}))
    result = CliRunner().invoke(app, ["compare", str(config), "--methods", "finetune,nope"])
    assert result.exit_code != 0 and "nope" in str(result.exception)


def test_pairs_run_a_posthoc_method_over_another_methods_run(tmp_path, small):
    from robustft.compare import parse_methods_option

    assert parse_methods_option("mixout+wise_ft,vrf") == ["mixout+wise_ft", "vrf"]
    for bad in ("mixout+uniform_soup", "finetune+vrf", "wise_ft+vrf", "mixout+nothing"):
        with pytest.raises(ConfigError):
            parse_methods_option(bad)
    plans = plan_seed(base_config(tmp_path), ["mixout", "mixout+wise_ft"], 0, tmp_path, SETTINGS)
    pair = next(plan for plan in plans if plan.run_dir.name == "mixout+wise_ft")
    assert pair.method == "wise_ft" and pair.inputs == [tmp_path / "mixout"]
    assert str(pair.config.method.options()["finetuned_run"]) == str(tmp_path / "mixout")
    fits, comparison = run(tmp_path / "pairs", small, methods=["mixout+wise_ft"], seeds=[0])
    assert {"zeroshot", "finetune", "mixout", "mixout+wise_ft"} <= set(comparison.leaderboard["methods"])
    assert comparison.leaderboard["methods"]["mixout+wise_ft"]["kind"] == "posthoc"


def test_leaderboard_carries_intervals_and_paired_tests_from_the_runs_predictions(first):
    from robustft.report import load_results, write_report
    from robustft.statistics import PREDICTIONS_FILE, correctness, load_predictions, paired_test, run_correctness

    out, _, _ = first
    leaderboard = json.loads((out / "leaderboard.json").read_text())
    rows = leaderboard["methods"]
    for method in METHODS:
        run = out / "seed0" / method
        entry = json.loads((run / "results.json").read_text())["methods"][method]
        correct = correctness(load_predictions(run / PREDICTIONS_FILE))
        assert correct["id_test"].double().mean().item() * 100 == pytest.approx(entry["id"])
        lo, hi = entry["ci"]["id"]
        assert lo <= entry["id"] <= hi and hi > lo  # one run, 32 images: a real interval
        lo, hi = rows[method]["ci"]["ood_avg"]
        assert lo <= rows[method]["ood_avg"]["mean"] <= hi
    assert set(rows["vrf"]["significance"]) == {"finetune", "wise_ft"}
    assert "finetune" not in rows["finetune"].get("significance", {})
    expected = paired_test(run_correctness(rows["vrf"]["runs"]), run_correctness(rows["finetune"]["runs"]))
    assert rows["vrf"]["significance"]["finetune"] == expected
    assert leaderboard["statistics"]["resamples"] == 1000
    markdown = (out / "leaderboard.md").read_text()
    assert "▲ft" in markdown and "[" in markdown  # the legend names the marks; cells show [lo, hi]
    merged = load_results([out / "seed0"])  # `robustft report` over one seed's run directories
    assert set(merged["methods"]["vrf"]["significance"]) == {"finetune", "wise_ft"}
    report = write_report(merged, out / "one_seed_report")
    for text in (report.read_text(), (out / "one_seed_report" / "report.html").read_text()):
        assert "± 0.00" not in text and "95% percentile bootstrap" in text
