"""A run is one YAML file, validated here; unknown keys and bad values are errors naming the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from robustft.errors import ConfigError
from robustft.files import atomic_write_text
from robustft.safe_io import parse_yaml, read_yaml_mapping


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(StrictModel):
    """Which backbone, from which local file, with which zero-shot head."""

    source: Literal["builtin", "timm", "open_clip"] = "builtin"
    name: str = Field("digits_vit", description="timm or OpenCLIP model name, or 'digits_vit' (builtin)")
    checkpoint: Path | None = Field(None, description="local weights file; builtin uses the packaged one")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra model constructor args")
    zero_shot_head: Literal["auto", "text", "classifier", "prototypes"] = Field(
        "auto", description="auto: text for OpenCLIP, the pretrained classifier for timm/builtin"
    )
    templates: str | list[str] = Field("imagenet", description="'imagenet', 'simple', a file, or a list")
    prototype_scale: float = Field(10.0, gt=0, description="logit scale of a class-prototype head")


class SplitExpectation(StrictModel):
    """What a split is declared to hold (``data.expected.<split>``); ``robustft data check`` verifies it."""

    images: int | None = Field(None, ge=0, description="number of images (checked whenever data loads)")
    classes: int | None = Field(None, ge=0, description="number of distinct labels (checked whenever data loads)")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$", description="manifest hash (robustft.data.integrity); data check only"
    )
    manifest: Path | None = Field(None, description="sha256sum-format file list; data check names changed files")


class DomainsConfig(StrictModel):
    """One leave-one-domain-out split of a multi-domain dataset (DomainBed protocol, data/domainbed.py)."""

    test_domain: str = Field(description="the held-out domain: split ood_<domain>, never in train or id_val")
    trial: int = Field(0, ge=0, description="seeds the train / id_val split of every training domain")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of each training domain kept for id_val")


class ProtocolConfig(StrictModel):
    """A named benchmark protocol over a local copy (``robustft.data.protocols``: imagenet, cifar, domainnet, ...)."""

    name: str = Field(description="protocol name; `robustft.data.protocols.list_protocols()` lists them")
    root: Path = Field(description="the local copy's top folder (layout per protocol: docs/bring_your_own.md)")
    options: dict[str, Any] = Field(default_factory=dict, description="protocol options, checked by the protocol")


GLYPHS_SHIFT_SPLITS = ("train", "id_val", "id_test", "ood_fonts", "ood_corruption", "ood_color", "ood_rotation")
"""The splits glyphs-shift generates (``data.split_sizes`` keys); the generator reads them from here."""


class DataConfig(StrictModel):
    """The built-in benchmark, or image folders / CSV manifests with named splits, or a multi-domain
    dataset (``digits_domains`` or ``root/<domain>/<class>/``) split leave-one-domain-out by ``domains``."""

    benchmark: Literal["digits_shift", "digits_domains", "glyphs_shift"] | None = "digits_shift"
    root: Path | None = None
    splits: dict[str, str] = Field(default_factory=dict, description="split name -> folder or .csv")
    class_names: list[str] | str | None = None
    batch_size: PositiveInt = 64
    eval_batch_size: PositiveInt = 256
    num_workers: int | Literal["auto"] = Field(
        "auto", description="loader worker processes; auto: 0 for in-memory splits, else the CPU count less one (max 8)"
    )
    augment: bool = False
    expected: dict[str, SplitExpectation] = Field(
        default_factory=dict, description="split name -> declared images / classes / sha256 / manifest"
    )
    allow_count_mismatch: bool = Field(False, description="evaluate splits whose counts differ from data.expected")
    on_bad_image: Literal["fail", "skip"] = Field(
        "fail", description="unreadable image: fail when read, or skip (every image is decoded at load, count logged)"
    )
    domains: DomainsConfig | None = Field(
        None, description="leave-one-domain-out split of benchmark digits_domains or of root/<domain>/<class>/"
    )
    protocol: ProtocolConfig | None = Field(
        None, description="a benchmark protocol over a local copy (imagenet, cifar, domainnet, iwildcam, ...)"
    )
    base_to_new: bool = Field(False, description="benchmark glyphs_shift: train on the base classes, test base and new")
    base_classes: list[str] | None = Field(
        None, description="base_to_new: the base classes by name (default: the benchmark's half of digits and letters)"
    )
    split_sizes: dict[str, PositiveInt] | None = Field(
        None, description="benchmark glyphs_shift: images per split (train, id_val, id_test, ood_*), e.g. smaller"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        generated = self.benchmark == "glyphs_shift" and self.protocol is None and self.domains is None
        if (self.base_to_new or self.base_classes is not None) and not generated:
            raise ValueError(
                "data.base_to_new: only benchmark glyphs_shift has a base/new split "
                "(CoOp's datasets: data.protocol coop with options.base_to_new)"
            )
        if self.base_classes is not None and not self.base_to_new:
            raise ValueError("data.base_classes: set data.base_to_new: true to use it")
        if self.split_sizes is not None:
            self._check_split_sizes()
        if self.protocol is not None:
            return self._protocol_source()
        if self.domains is not None or self.benchmark == "digits_domains":
            return self._domains_source()
        if self.benchmark is None and not self.splits:
            raise ValueError("set data.benchmark or data.splits")
        if self.benchmark is not None and self.splits:
            raise ValueError("data.benchmark and data.splits are exclusive; set benchmark: null to use splits")
        return self

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"must be auto or a count >= 0, got {value}")
        return value

    def _check_split_sizes(self) -> None:
        if self.benchmark != "glyphs_shift" or self.protocol is not None or self.domains is not None:
            raise ValueError("data.split_sizes: only benchmark glyphs_shift generates its splits")
        unknown = sorted(set(self.split_sizes or {}) - set(GLYPHS_SHIFT_SPLITS))
        if unknown:
            known = ", ".join(GLYPHS_SHIFT_SPLITS)
            raise ValueError(f"data.split_sizes: unknown split '{unknown[0]}' (splits: {known})")

    def _protocol_source(self) -> DataConfig:
        sources = {"benchmark": self.benchmark, "splits": self.splits, "domains": self.domains, "root": self.root}
        others = [key for key, value in sources.items() if value]
        if others:
            raise ValueError(f"data.protocol makes the splits; remove data.{others[0]} (set benchmark: null)")
        return self

    def _domains_source(self) -> DataConfig:
        if self.domains is None:
            raise ValueError("benchmark digits_domains needs data.domains.test_domain (or use robustft domainbed)")
        if self.splits:
            raise ValueError("data.domains and data.splits are exclusive (the domains protocol makes the splits)")
        if self.benchmark in ("digits_shift", "glyphs_shift"):
            raise ValueError("data.domains needs benchmark digits_domains, or benchmark: null and data.root")
        if self.benchmark is None and self.root is None:
            raise ValueError("data.domains: set data.root to a folder of domain folders (root/<domain>/<class>/)")
        if self.benchmark is not None and self.root is not None:
            raise ValueError("data.root is for domain folders; set benchmark: null to use it")
        return self


class OptimConfig(StrictModel):
    """AdamW (or SGD) with linear warm-up then cosine decay to zero."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: float = Field(0.1, ge=0, lt=1)


class TrainConfig(StrictModel):
    """Length, precision and bookkeeping of the training loop."""

    epochs: PositiveInt | None = 10
    steps: PositiveInt | None = Field(None, description="optimiser steps; overrides epochs")
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accumulation: PositiveInt = 1
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:<index> or mps")
    checkpoint_every: PositiveInt = 200
    strategy: Literal["ddp", "fsdp", "allreduce"] = Field(
        "ddp",
        description="several processes: ddp replicates the model (torch DDP), fsdp shards it, allreduce replicates "
        "it and averages the gradients after the backward (docs/distributed.md)",
    )
    log_every: PositiveInt = 10
    stop_after: PositiveInt | None = Field(None, description="stop after this many steps (resumable)")
    progress: bool = True
    keep_last_checkpoint: bool = Field(
        False, description="keep checkpoints/last.pt (optimiser state) once the run has finished"
    )
    tensorboard: bool = Field(
        False, description="also log metrics.jsonl's scalars to <run_dir>/tensorboard (pip install robustft[tracking])"
    )
    mlflow: bool = Field(
        False, description="also log them to MLflow: $MLFLOW_TRACKING_URI or <run_dir>/mlflow.db (robustft[tracking])"
    )
    wandb: bool = Field(
        False,
        description="also log them to Weights & Biases (WANDB_MODE=offline: <run_dir>/wandb) (robustft[tracking])",
    )
    compile: bool = Field(False, description="torch.compile the model for training (first steps are slower)")

    @field_validator("device")
    @classmethod
    def _device_name(cls, name: str) -> str:
        if name == "auto" or re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
            return name
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:<index> or mps")

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.epochs is None and self.steps is None:
            raise ValueError("set train.epochs or train.steps")
        return self


class MethodConfig(BaseModel):
    """Base of every method's options: unknown options are errors, every field has a default.

    ``preset: paper`` sets every option the user did not give to the paper's / official code's value
    (the subclass's ``paper_preset``; docs/methods.md lists them and why robustft's defaults differ);
    options given explicitly always win over the preset.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    paper_preset: ClassVar[dict[str, Any]] = {}
    """Option -> the paper's / official code's value, applied by ``preset: paper``."""

    preset: Literal["default", "paper"] = Field(
        "default", description="paper: options not set take the paper's / official code's values (docs/methods.md)"
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return cls.resolve_preset(data)

    @classmethod
    def resolve_preset(cls, data: Any) -> Any:
        """The raw options with the preset's values filled in under the user's own."""
        if not isinstance(data, dict) or data.get("preset") != "paper":
            return data
        if not cls.paper_preset:
            raise ValueError("preset 'paper': this method has no paper preset (its defaults are the paper's)")
        return {**cls.paper_preset, **data}


class MethodSpec(BaseModel):
    """``method: {name: <registry key>, <option>: <value>, ...}``.

    The options stay a raw mapping here, as a protocol's do: the method's own ``config_cls`` checks them
    (``robustft.methods.method_options``), so validating a config never imports a method or torch.
    """

    model_config = ConfigDict(extra="allow")
    name: str = "finetune"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EvaluateConfig(StrictModel):
    """How finished predictors are scored."""

    temperature_scaling: bool = Field(
        True, description="fit a temperature on id_val; report ece_ts / nll_ts per split (docs/benchmarks.md)"
    )


class RunConfig(StrictModel):
    name: str = "run"
    seed: int = Field(0, ge=0, lt=2**63, description="seeds python, numpy and torch (torch takes 64-bit seeds)")
    output_dir: Path = Path("runs")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodSpec = Field(default_factory=MethodSpec)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


def format_validation_errors(error: ValidationError, prefix: tuple = ()) -> str:
    """The pydantic errors in one line, each keyed by its dotted config path (``method.p: ...``)."""
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in (*prefix, *item["loc"]))
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            parts.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(parts)


def set_key(raw: dict[str, Any], key: str, value: Any, option: str = "--set") -> None:
    """Set dotted ``key`` (``optim.lr``) in a raw config dict, creating sections on the way."""
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{option} {key}: '{part}' is not a section")
        node = child
    node[leaf] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a raw config dict.

    ``method.name=<another method>`` drops the options the config gave the method it replaces (a
    finished run's config.yaml lists every option of its own method, which the new method would refuse);
    options set by other overrides are kept.
    """
    method = raw.get("method")
    before = dict(method) if isinstance(method, dict) else {}
    overridden: set[str] = set()
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. optim.lr=3e-5")
        set_key(raw, key, parse_yaml(value, f"--set {override!r}", ConfigError))  # a python tag: "unsafe"
        overridden.add(key.strip())
    method = raw.get("method")
    if isinstance(method, dict) and "method.name" in overridden and method.get("name") != before.get("name"):
        for option in before:
            if option != "name" and f"method.{option}" not in overridden:
                method.pop(option, None)
    return raw


def parse_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {format_validation_errors(error)}") from None
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def read_config_yaml(path: Path | str) -> dict[str, Any]:
    """The raw mapping of a YAML config file; a missing file or bad YAML is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return read_yaml_mapping(path, ConfigError)  # torn, unsafe (python tags) and non-UTF-8 files named


def load_config(path: Path | str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from defaults when ``path`` is None) and apply overrides."""
    raw = read_config_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    return parse_config(apply_overrides(raw, overrides or []), source)


def write_resolved_config(config: RunConfig, path: Path, options: MethodConfig | None = None) -> Path:
    """Write the fully resolved config: defaults filled in, and the method's options as its ``options``
    (its validated ``config_cls``) resolved them, when given."""
    data = config.model_dump(mode="json")
    resolved = options.model_dump(mode="json") if options is not None else config.method.options()
    data["method"] = {"name": config.method.name, **resolved}
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
