"""The protocol registry, its config section, and class spaces applied to hand-made logits."""

from __future__ import annotations

import pytest
import torch

from robustft.class_spaces import ClassSpace, bucket_accuracy, declare, max_over_groups, subset
from robustft.config import parse_config
from robustft.data import load_splits
from robustft.data.protocols import list_protocols
from robustft.errors import ConfigError, DataError
from robustft.evaluate import declared_metrics, summarize

LOGITS = torch.tensor([[0.0, 5.0, 1.0, 2.0, 9.0], [3.0, 0.0, 7.0, 1.0, 2.0]])


def test_subset_keeps_the_named_columns_in_order():
    assert torch.equal(subset([3, 1]).apply(LOGITS), torch.tensor([[2.0, 5.0], [1.0, 0.0]]))
    assert ClassSpace().apply(LOGITS) is LOGITS


def test_max_over_groups_takes_the_max_of_each_group_whatever_its_size():
    space = max_over_groups([[0, 2], [4], [1, 3, 0]])
    expected = torch.tensor([[1.0, 9.0, 5.0], [7.0, 2.0, 3.0]])
    assert torch.equal(space.apply(LOGITS), expected)
    assert space.num_classes == 3 and space.model_classes() == [0, 1, 2, 3, 4]


def test_class_space_beyond_the_models_outputs_is_a_data_error():
    with pytest.raises(DataError, match="model class 7 is outside the model's 5 outputs"):
        subset([1, 7]).apply(LOGITS)
    with pytest.raises(DataError, match="at least one model class"):
        max_over_groups([[0], []])


def test_bucket_accuracy_counts_only_each_buckets_classes():
    logits = torch.eye(4)[[0, 1, 1, 3, 2]]  # predictions 0, 1, 1, 3, 2
    labels = torch.tensor([0, 1, 2, 3, 3])
    result = bucket_accuracy(logits, labels, {"many": [0, 1], "few": [2, 3], "none": [9]})
    assert result["many"] == 100.0 and result["few"] == pytest.approx(100 / 3)
    assert result["none"] != result["none"]  # NaN: no test image in the bucket


def test_summary_reports_buckets_primary_metric_and_base_to_new():
    class Split:
        pass

    logits, labels = torch.eye(3), torch.tensor([0, 1, 1])
    test = declare(Split(), buckets={"many": [0], "few": [1, 2]}, primary_metric="macro_f1_present")
    test.report_as = "base"
    new = declare(Split(), primary_metric="macro_f1_present")
    new.report_as = "new"
    base_metrics = {"accuracy": 80.0, "macro_f1": 1.0} | declared_metrics(test, logits, labels)
    new_metrics = {"accuracy": 40.0, "macro_f1": 1.0} | declared_metrics(new, logits, labels)
    entry = summarize({"id_test": base_metrics, "ood_new": new_metrics})
    assert entry["buckets"] == {"id_test": {"many": 100.0, "few": 50.0}}
    # predictions 0, 1, 2 vs labels 0, 1, 1: F1 1 and 2/3 over the present classes 0 and 1 (class 2 is absent)
    assert entry["primary"]["metric"] == "macro_f1_present"
    assert entry["primary"]["ood"] == {"ood_new": pytest.approx(100 * (1 + 2 / 3) / 2)}
    assert entry["base_to_new"] == {"base": 80.0, "new": 40.0, "hm": pytest.approx(2 * 80 * 40 / 120)}


def run_config(data: dict) -> dict:
    return {"data": data}


def test_protocol_config_is_exclusive_with_other_sources(tmp_path):
    with pytest.raises(ConfigError, match="remove data.benchmark"):
        parse_config(run_config({"protocol": {"name": "imagenet", "root": str(tmp_path)}}))
    with pytest.raises(ConfigError, match="remove data.splits"):
        parse_config(
            run_config({"benchmark": None, "splits": {"train": "x"}, "protocol": {"name": "imagenet", "root": "r"}})
        )
    config = parse_config(run_config({"benchmark": None, "protocol": {"name": "cifar10", "root": str(tmp_path)}}))
    assert config.data.protocol.name == "cifar10" and config.data.protocol.options == {}


def test_unknown_protocol_option_or_root_are_one_line_errors(tmp_path):
    def data(name, root, **options):
        raw = {"benchmark": None, "protocol": {"name": name, "root": str(root), "options": options}}
        return parse_config(run_config(raw)).data

    with pytest.raises(ConfigError, match="unknown protocol 'imagenett'.*imagenet"):
        load_splits(data("imagenett", tmp_path), {})
    with pytest.raises(ConfigError, match="unknown key 'data.protocol.options.shfits'"):
        load_splits(data("imagenet", tmp_path, shfits=[]), {})
    with pytest.raises(DataError, match="data.protocol.root: '.*missing' is not a folder"):
        load_splits(data("imagenet", tmp_path / "missing"), {})


def test_every_suite_of_the_issue_is_registered():
    assert set(list_protocols()) == {
        "imagenet", "cifar10", "cifar100", "image_folder", "imagenet_lt", "domainnet", "iwildcam", "coop"
    }  # fmt: skip


def test_declared_primary_metric_is_computed_or_refused():
    class Split:
        pass

    logits, labels = torch.eye(3)[[0, 1, 2, 2]], torch.tensor([0, 1, 1, 2])
    assert declared_metrics(declare(Split(), primary_metric="accuracy"), logits, labels)["primary"] == 75.0
    with pytest.raises(DataError, match="primary_metric 'top5'"):
        declared_metrics(declare(Split(), primary_metric="top5"), logits, labels)
