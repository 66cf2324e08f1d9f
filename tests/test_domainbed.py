"""DomainBed protocol: leave-one-domain-out splits (no held-out image in train or selection), the built-in
multi-domain benchmark, domain folders, the runner's layout, selection, table and resume, the command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from posthoc_support import quiet
from robustft.cli import app
from robustft.config import DataConfig, parse_config
from robustft.data import load_splits, resolve_class_names
from robustft.data.digits_domains import DOMAINS, IMAGES_PER_DOMAIN, build_domains
from robustft.data.domainbed import holdout_split, leave_one_domain_out, list_domains
from robustft.domainbed import Candidate, Cell, aggregate, parse_method_entry, plan_domainbed, run_domainbed
from robustft.errors import ConfigError, DataError
from robustft.methods import register_method
from robustft.methods.zeroshot import ZeroShot

runner = CliRunner()


def image_hashes(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images}


def builtin_data(test_domain: str, trial: int = 0, fraction: float = 0.2) -> DataConfig:
    domains = {"test_domain": test_domain, "trial": trial, "holdout_fraction": fraction}
    return DataConfig(benchmark="digits_domains", domains=domains)


# ------------------------------------------------------------------------------------- split indices


def test_holdout_split_partitions_each_domain_as_domainbed():
    kept, held_out = holdout_split(103, 0.2, seed=7)
    assert len(held_out) == int(103 * 0.2) == 20 and len(kept) == 83
    assert sorted(torch.cat([kept, held_out]).tolist()) == list(range(103))
    again_kept, _ = holdout_split(103, 0.2, seed=7)
    other_kept, _ = holdout_split(103, 0.2, seed=8)
    assert torch.equal(kept, again_kept) and not torch.equal(kept, other_kept)


def test_leave_one_domain_out_never_puts_the_held_out_domain_in_train_or_id_val():
    sizes = {"a": 50, "b": 40, "c": 30}
    split = leave_one_domain_out(sizes, "b", trial=0)
    assert split.training_domains == ["a", "c"]
    assert "b" not in split.train and "b" not in split.id_val
    for domain in ("a", "c"):
        together = torch.cat([split.train[domain], split.id_val[domain]]).tolist()
        assert sorted(together) == list(range(sizes[domain]))  # a partition, nothing lost or repeated
    # A domain's split depends on (trial, domain) only, not on which domain is held out.
    assert torch.equal(leave_one_domain_out(sizes, "c", 0).train["a"], split.train["a"])
    assert not torch.equal(leave_one_domain_out(sizes, "b", 1).train["a"], split.train["a"])
    with pytest.raises(DataError, match="unknown domain 'z'.*a, b, c"):
        leave_one_domain_out(sizes, "z", 0)
    with pytest.raises(DataError, match="domain 'a': 3 images cannot be split"):
        leave_one_domain_out({"a": 3, "b": 5}, "b", 0, holdout_fraction=0.2)


# ----------------------------------------------------------------------------- built-in digits_domains


def test_builtin_domains_are_distinct_balanced_and_deterministic():
    domains = build_domains()
    assert list(domains) == list(DOMAINS) == ["handwritten", "printed_a", "printed_b", "coloured"]
    hashes = {}
    for name, (images, labels) in domains.items():
        assert images.shape == (IMAGES_PER_DOMAIN, 3, 32, 32) and images.dtype == torch.uint8
        assert set(labels.tolist()) == set(range(10))
        hashes[name] = image_hashes(images)
    for first in DOMAINS:  # no image is shared between domains, so the hash test below is meaningful
        for second in DOMAINS:
            assert first == second or not hashes[first] & hashes[second]
    build_domains.cache_clear()
    assert all(torch.equal(build_domains()[d][0], domains[d][0]) for d in DOMAINS)


@pytest.mark.parametrize("test_domain", DOMAINS)
def test_no_image_of_the_held_out_domain_is_seen_in_training_or_selection(test_domain):
    splits, class_names = load_splits(builtin_data(test_domain, trial=1), {})
    held_out = f"ood_{test_domain}"
    assert set(splits) == {"train", "id_val", "id_test", held_out}
    held_out_hashes = image_hashes(build_domains()[test_domain][0])
    assert image_hashes(splits[held_out].images) == held_out_hashes  # the whole held-out domain is the test
    for name in ("train", "id_val"):
        assert not image_hashes(splits[name].images) & held_out_hashes
    training = [d for d in DOMAINS if d != test_domain]
    assert len(splits["train"]) == 3 * 560 and len(splits["id_val"]) == 3 * 140
    assert image_hashes(splits["train"].images) | image_hashes(splits["id_val"].images) == set().union(
        *(image_hashes(build_domains()[d][0]) for d in training)
    )
    assert not image_hashes(splits["train"].images) & image_hashes(splits["id_val"].images)
    assert splits["id_test"] is splits["id_val"]  # DomainBed has no ID test set: an alias, documented
    assert class_names == resolve_class_names(builtin_data(test_domain))


def test_domains_config_is_validated_and_digits_shift_is_unchanged(tmp_path):
    assert DataConfig().benchmark == "digits_shift" and DataConfig().domains is None
    cases = [
        ({"benchmark": "digits_domains"}, "needs data.domains.test_domain"),
        ({"domains": {"test_domain": "a"}}, "needs benchmark digits_domains"),
        ({"benchmark": None, "domains": {"test_domain": "a"}}, "set data.root"),
        ({"benchmark": None, "root": str(tmp_path), "splits": {"train": "x"}, "domains": {"test_domain": "a"}},
         "exclusive"),
        ({"benchmark": "digits_domains", "domains": {"test_domain": "a", "holdout_fraction": 1.0}},
         "data.domains.holdout_fraction"),
    ]  # fmt: skip
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_config({"data": data})
    with pytest.raises(DataError, match="unknown domain 'sketch'"):
        load_splits(builtin_data("sketch"), {})


# -------------------------------------------------------------------------------------- domain folders


def write_domain_folders(root: Path, domains: dict[str, int], classes=("circle", "square"), count: int = 5) -> Path:
    """``root/<domain>/<class>/<i>.png``: each domain its own brightness, every image distinct."""
    rng = np.random.default_rng(0)
    for domain, brightness in domains.items():
        for label, name in enumerate(classes):
            folder = root / domain / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = np.full((32, 32, 3), 255 - brightness, np.uint8)
                image[4 + i : 20 + i, 4 + 8 * label : 20 + 8 * label] = brightness
                image[0, 0] = rng.integers(256, size=3)
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


def test_domain_folders_are_discovered_and_held_out_by_path(tmp_path):
    root = write_domain_folders(tmp_path / "data", {"bright": 230, "dark": 30, "mid": 130})
    (root / ".cache").mkdir()  # hidden folders are not domains
    data = DataConfig(benchmark=None, root=root, domains={"test_domain": "dark", "holdout_fraction": 0.4})
    assert list_domains(data) == ["bright", "dark", "mid"]
    splits, class_names = load_splits(data, {"input_size": (3, 32, 32)})
    assert class_names == ["circle", "square"]
    dark_files = set((root / "dark").rglob("*.png"))
    assert set(splits["ood_dark"].paths) == dark_files
    for name in ("train", "id_val"):
        assert not set(splits[name].paths) & dark_files
        assert set(splits[name].domains) == {"bright", "mid"}
    assert len(splits["id_val"]) == 2 * int(10 * 0.4) and len(splits["train"]) == 2 * 6
    image, label = splits["ood_dark"][0]
    assert image.shape == (3, 32, 32) and label == 0


def test_domain_folders_must_share_their_classes_and_name_splits(tmp_path):
    root = write_domain_folders(tmp_path / "data", {"a": 200, "b": 50})
    (root / "b" / "triangle").mkdir()
    data = DataConfig(benchmark=None, root=root, domains={"test_domain": "a"})
    with pytest.raises(DataError, match=r"/b: domain 'b' has other classes than 'a' \(extra triangle\)"):
        load_splits(data, {})
    lonely = write_domain_folders(tmp_path / "one", {"only": 100})
    with pytest.raises(DataError, match="found 1 domain folder"):
        list_domains(DataConfig(benchmark=None, root=lonely, domains={"test_domain": "only"}))
    spaced = write_domain_folders(tmp_path / "spaced", {"real world": 100, "art": 10})
    with pytest.raises(DataError, match="domain name 'real world'"):
        list_domains(DataConfig(benchmark=None, root=spaced, domains={"test_domain": "art"}))


# ----------------------------------------------------------------------------------- runner: planning


@register_method
class HeldOutProbe(ZeroShot):
    """A method registered by the test: the protocol runs any registered method by name."""

    name = "domainbed_probe"


def test_method_entries_parse_names_options_labels_and_overrides():
    assert parse_method_entry("finetune").label == "finetune"
    entry = parse_method_entry("linear_probe(c_grid=[0.1, 1.0], max_iter=50)")
    assert (entry.name, entry.options) == ("linear_probe", {"c_grid": [0.1, 1.0], "max_iter": 50})
    assert entry.label == "linear_probe-c_grid=[0.1,1.0],max_iter=50"
    mapping = parse_method_entry({"name": "finetune", "label": "ft_fast", "set": {"optim.lr": 1e-3}})
    assert (mapping.label, mapping.options, mapping.overrides) == ("ft_fast", {}, {"optim.lr": 1e-3})
    for bad in ("Fine Tune", "finetune(lr)", {"label": "x"}):
        with pytest.raises(ConfigError, match="domainbed.methods"):
            parse_method_entry(bad)


def test_plan_lays_out_one_run_per_method_domain_trial_and_candidate(tmp_path):
    raw = {
        "name": "db",
        "output_dir": str(tmp_path),
        "seed": 10,
        "domainbed": {
            "methods": [
                "finetune",
                "domainbed_probe",
                {"name": "finetune", "label": "ft_hi", "set": {"optim.lr": 0.1}},
            ],
            "trials": 2,
            "test_domains": ["printed_b", "coloured"],
            "holdout_fraction": 0.25,
            "grid": {"train.steps": [3, 5]},
        },
    }  # fmt: skip
    plan = plan_domainbed(raw)
    assert plan.domains == list(DOMAINS) and plan.test_domains == ["printed_b", "coloured"]
    assert len(plan.cells) == 2 * 2 * 3
    assert [len(cell.candidates) for cell in plan.cells[:3]] == [2, 1, 2]  # no grid for methods that do not train
    ft = plan.cells[0].candidates[1]
    assert ft.run_dir == tmp_path / "db" / "finetune" / "printed_b" / "trial0" / "steps=5"
    assert plan.cells[1].candidates[0].run_dir == tmp_path / "db" / "domainbed_probe" / "printed_b" / "trial0"
    assert ft.config.train.steps == 5 and ft.config.seed == 10
    domains = ft.config.data.domains
    assert (domains.test_domain, domains.trial, domains.holdout_fraction) == ("printed_b", 0, 0.25)
    second_trial = plan.cells[3].candidates[0].config
    assert second_trial.seed == 11 and second_trial.data.domains.trial == 1
    assert plan.cells[2].candidates[0].config.optim.lr == 0.1
    assert not tmp_path.joinpath("db").exists()  # planning writes nothing


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"test_domains": ["sketch"]}, "unknown domain 'sketch'"),
        ({"methods": ["wise_ft"]}, "'wise_ft' combines finished runs"),
        ({"methods": ["no_such_method"]}, "unknown method 'no_such_method'"),
        ({"methods": ["finetune", "finetune"]}, "distinct labels"),
        ({"grid": {"data.domains.trial": [0, 1]}}, "set by the protocol"),
        ({"grid": {"seed": [0, 1]}}, "set by the protocol"),
        ({"trials": 0}, "domainbed.trials"),
        ({"holdout": 0.2}, "unknown key 'domainbed.holdout'"),
    ],
)
def test_plan_errors_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        plan_domainbed({"domainbed": section})


def test_plan_refuses_data_domains_in_the_base_config():
    with pytest.raises(ConfigError, match="data.domains is set per run"):
        plan_domainbed({"data": {"benchmark": "digits_domains", "domains": {"test_domain": "coloured"}}})


# ----------------------------------------------------------------------------- selection and the table


def fake_candidate(id_val: float | None, test: float, domain: str = "coloured") -> Candidate:
    results = None if id_val is None else {"methods": {"m": {"id_val": id_val, "ood": {f"ood_{domain}": test}}}}
    return Candidate("c", {}, SimpleNamespace(run_dir=Path(f"run-{test}")), results=results)


def test_selection_is_by_training_domain_validation_not_by_the_held_out_domain():
    cell = Cell("m", "coloured", 0, [fake_candidate(80.0, 90.0), fake_candidate(85.0, 60.0), fake_candidate(None, 99)])
    record = cell.record()
    assert (record["id_val"], record["test"]) == (85.0, 60.0)  # best id_val wins, whatever its test score
    assert Cell("m", "coloured", 0, [fake_candidate(None, 1.0)]).record()["test"] is None


def test_aggregate_is_mean_and_standard_error_over_trials_and_avg_over_complete_trials():
    records = [
        {"method": "m", "test_domain": "a", "trial": 0, "test": 60.0},
        {"method": "m", "test_domain": "a", "trial": 1, "test": 70.0},
        {"method": "m", "test_domain": "b", "trial": 0, "test": 80.0},
        {"method": "m", "test_domain": "b", "trial": 1, "test": None},
    ]
    table = aggregate(records, ["m", "n"], ["a", "b"])
    assert table["m"]["a"] == {"mean": 65.0, "stderr": pytest.approx(5.0 / 2**0.5), "trials": 2}
    assert table["m"]["b"]["trials"] == 1
    assert table["m"]["avg"] == {"mean": 70.0, "stderr": 0.0, "trials": 1}  # only trial 0 finished everywhere
    assert table["n"]["avg"]["mean"] is None and table["n"]["a"]["mean"] is None


# ----------------------------------------------------------------------------------------- real runs


def test_protocol_runs_selects_writes_the_table_and_resumes(tmp_path):
    root = write_domain_folders(tmp_path / "data", {"bright": 230, "dark": 30, "mid": 130})
    raw = {
        "name": "db",
        "output_dir": str(tmp_path),
        "data": {"benchmark": None, "root": str(root), "batch_size": 4},
        "train": {"steps": 2, "progress": False, "checkpoint_every": 100},
        "domainbed": {"methods": ["finetune", "zeroshot"], "trials": 1, "test_domains": ["dark"],
                      "grid": {"optim.lr": [1e-5, 3e-3]}},
    }  # fmt: skip
    summary = run_domainbed(plan_domainbed(raw), log=quiet)
    finetune, zeroshot = summary["runs"]
    assert [c["status"] for c in finetune["candidates"]] == ["trained", "trained"]
    best = max(finetune["candidates"], key=lambda c: c["id_val"])
    assert finetune["selected"] == best["run_dir"] and finetune["test"] == best["test"]
    run_config = yaml.safe_load((Path(best["run_dir"]) / "config.yaml").read_text())
    assert run_config["data"]["domains"] == {"test_domain": "dark", "trial": 0, "holdout_fraction": 0.2}
    results = json.loads((Path(zeroshot["selected"]) / "results.json").read_text())["methods"]["zeroshot"]
    assert list(results["ood"]) == ["ood_dark"] and results["id"] == results["id_val"]
    assert summary["table"]["zeroshot"]["dark"]["mean"] == zeroshot["test"]
    assert summary["table"]["zeroshot"]["avg"]["mean"] == zeroshot["test"]
    written = json.loads((tmp_path / "db" / "domainbed.json").read_text())
    assert written["table"] == summary["table"]
    table = (tmp_path / "db" / "domainbed.md").read_text()
    assert "| method | dark | Avg |" in table and f"| zeroshot | {zeroshot['test']:.1f} ± 0.0 |" in table

    logs: list[str] = []
    again = run_domainbed(plan_domainbed(raw), log=logs.append)
    assert [c["status"] for run in again["runs"] for c in run["candidates"]] == ["skipped"] * 3
    assert again["table"] == summary["table"] and not any("running" in line for line in logs)


def test_command_runs_domain_folders_and_reports_errors(tmp_path):
    root = write_domain_folders(tmp_path / "data", {"bright": 230, "dark": 30, "mid": 130})
    config = tmp_path / "db.yaml"
    raw = {"name": "db", "output_dir": str(tmp_path / "runs"), "data": {"root": str(root), "batch_size": 8},
           "domainbed": {"methods": ["finetune"]}}  # fmt: skip
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["domainbed", str(config), "--methods", "zeroshot,domainbed_probe", "--trials", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "db" / "domainbed.json").read_text())
    assert summary["test_domains"] == ["bright", "dark", "mid"] and summary["trials"] == 2
    assert [m["label"] for m in summary["methods"]] == ["zeroshot", "domainbed_probe"]
    assert len(summary["runs"]) == 3 * 2 * 2 and all(run["test"] is not None for run in summary["runs"])
    assert summary["table"]["zeroshot"] == summary["table"]["domainbed_probe"]  # the same predictor
    bad = runner.invoke(app, ["domainbed", str(config), "--test-domains", "sketch"])
    assert bad.exit_code != 0 and isinstance(bad.exception, ConfigError) and "sketch" in str(bad.exception)
