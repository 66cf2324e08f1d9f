from pathlib import Path

import pytest
import yaml

from robustft.config import load_config, parse_config, write_resolved_config
from robustft.errors import ConfigError
from robustft.methods import checked, method_options


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, {"name": "x", "optim": {"lr": 1e-3}})
    config = load_config(path, ["optim.lr=3e-5", "train.epochs=2", "method.name=lp_ft", "method.c_grid=[1.0]"])
    assert config.optim.lr == pytest.approx(3e-5)
    assert config.train.epochs == 2
    assert config.method.name == "lp_ft"
    assert method_options(config).c_grid == [1.0]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"optim": {"lrr": 1}}, "unknown key 'optim.lrr'"),
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"train": {"precision": "fp8"}}, "train.precision"),
        ({"method": {"name": "nope"}}, "unknown method 'nope'"),
        ({"method": {"name": "finetune", "label_smothing": 0.1}}, "unknown key 'method.label_smothing'"),
        ({"method": {"name": "finetune", "label_smoothing": 2}}, "method.label_smoothing"),
        ({"data": {"benchmark": None}}, "set data.benchmark or data.splits"),
        ({"bogus": 1}, "unknown key 'bogus'"),
    ],
)
def test_errors_name_the_key(tmp_path, data, fragment):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as error:
        checked(load_config(path), str(path))
    assert fragment in str(error.value)
    assert str(tmp_path / "run.yaml") in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = parse_config({"name": "r", "method": {"name": "lp_ft"}, "optim": {"lr": 2e-4}})
    path = write_resolved_config(config, tmp_path / "config.yaml", method_options(config))
    written = yaml.safe_load(path.read_text())
    assert written["method"]["c_grid"] == [0.01, 0.1, 1.0, 10.0, 100.0]  # defaults are filled in
    again = load_config(path)
    assert again.model_dump(exclude={"method"}) == config.model_dump(exclude={"method"})
    assert method_options(again) == method_options(config)


def test_validating_a_config_imports_no_method_and_no_torch(tmp_path):
    """The config layer keeps method options raw: a config error never waits for torch or the methods."""
    import subprocess
    import sys

    path = write(tmp_path, {"optim": {"lrr": 1}, "method": {"name": "vrf", "k": 3}})
    code = (
        "import sys\n"
        "from robustft.config import load_config\n"
        "from robustft.methods import list_methods\n"
        "assert len(list_methods()) >= 17\n"
        f"try:\n    load_config({str(path)!r})\nexcept Exception as error:\n    print(type(error).__name__)\n"
        "heavy = [m for m in ('torch', 'robustft.methods.vrf', 'robustft.methods.base') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.split() == ["ConfigError", "[]"]


def test_changing_the_method_drops_the_old_methods_options(tmp_path):
    path = write(tmp_path, {"method": {"name": "lp_ft", "c_grid": [1.0], "max_iter": 30}})
    config = load_config(path, ["method.name=l2_sp", "method.alpha=0.5"])
    assert config.method.name == "l2_sp" and config.method.options() == {"alpha": 0.5}
    assert method_options(config).alpha == 0.5
    same = load_config(path, ["method.name=lp_ft"])  # the same method keeps its options
    assert same.method.options() == {"c_grid": [1.0], "max_iter": 30}
