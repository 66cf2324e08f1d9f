"""Class spaces: which of the model's outputs a split is scored over, and how they map to its labels.

One model, one head over the training classes (ImageNet's 1000), many test sets with other label
spaces: ImageNet-A and -R label 200 of the 1000 classes, ObjectNet's 113 classes each cover one or
more ImageNet classes, a base-to-new split holds only the "new" half. The data never changes the
head; a split declares its ``ClassSpace`` (``dataset.class_space``) and the evaluator maps the
logits ``[N, C_model]`` to ``[N, C_split]`` before any metric, so labels are in the split's own
space and one forward pass per split serves every metric:

- ``identity``: the split uses the model's classes as they are;
- ``subset``: column ``i`` of the split is model class ``indices[i]`` (the IN-A / IN-R 200-class
  evaluation of Hendrycks et al. 2021 and WiSE-FT: argmax over the 200 subset logits only);
- ``max_over_groups``: column ``i`` is the max over model classes ``groups[i]`` (ObjectNet, Barbu
  et al. 2019, as scored in WiSE-FT: an ObjectNet class is predicted when any of its ImageNet classes is).

A split may also declare ``primary_metric`` (``"macro_f1_present"`` for iWildCam, WILDS' metric) and
``buckets`` (name -> model classes, ImageNet-LT's many / medium / few shots); the evaluator reads both
with ``getattr``, so datasets without them need nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from robustft.errors import ConfigError, DataError

Kind = Literal["identity", "subset", "max_over_groups"]


@dataclass(frozen=True)
class ClassSpace:
    """How a split's classes sit in the model's output space (see the module docstring)."""

    kind: Kind = "identity"
    indices: tuple[int, ...] = ()
    groups: tuple[tuple[int, ...], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind == "subset" and not self.indices:
            raise DataError("class space 'subset': no class indices")
        if self.kind == "max_over_groups" and (not self.groups or any(not group for group in self.groups)):
            raise DataError("class space 'max_over_groups': every split class needs at least one model class")

    @property
    def num_classes(self) -> int | None:
        """Classes of the split (None for identity: as many as the model has)."""
        if self.kind == "subset":
            return len(self.indices)
        if self.kind == "max_over_groups":
            return len(self.groups)
        return None

    def model_classes(self) -> list[int]:
        """Every model class the split's logits are read from."""
        if self.kind == "subset":
            return list(self.indices)
        return sorted({index for group in self.groups for index in group})

    def apply(self, logits: Tensor) -> Tensor:
        """Logits ``[N, C_model]`` -> ``[N, C_split]``; one gather (and one max), no per-class loop."""
        if self.kind == "identity":
            return logits
        self._check_range(logits.shape[1])
        if self.kind == "subset":
            return logits[:, torch.as_tensor(self.indices, device=logits.device)]
        width = max(len(group) for group in self.groups)
        padded = [list(group) + [group[0]] * (width - len(group)) for group in self.groups]  # repeats keep the max
        gathered = logits[:, torch.as_tensor(padded, device=logits.device).flatten()]
        return gathered.view(logits.shape[0], len(self.groups), width).amax(dim=2)

    def _check_range(self, model_classes: int) -> None:
        largest = max(self.model_classes())
        if largest >= model_classes:
            raise DataError(
                f"class space '{self.kind}': model class {largest} is outside the model's {model_classes} outputs"
            )


IDENTITY = ClassSpace()


def subset(indices: Sequence[int]) -> ClassSpace:
    return ClassSpace("subset", indices=tuple(int(i) for i in indices))


def max_over_groups(groups: Sequence[Sequence[int]]) -> ClassSpace:
    return ClassSpace("max_over_groups", groups=tuple(tuple(int(i) for i in group) for group in groups))


def class_space_of(dataset: Any) -> ClassSpace:
    """The split's declared class space (``dataset.class_space``), identity when it declares none."""
    return getattr(dataset, "class_space", None) or IDENTITY


def declare(
    dataset: Any,
    class_space: ClassSpace | None = None,
    primary_metric: str | None = None,
    buckets: Mapping[str, Sequence[int]] | None = None,
) -> Any:
    """Attach evaluation declarations to a split (returns it, for chaining)."""
    if class_space is not None:
        dataset.class_space = class_space
    if primary_metric is not None:
        dataset.primary_metric = primary_metric
    if buckets is not None:
        dataset.buckets = {name: [int(i) for i in classes] for name, classes in buckets.items()}
    return dataset


def bucket_accuracy(logits: Tensor, labels: Tensor, buckets: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Accuracy (percent) over the samples whose label lies in each bucket of classes (ImageNet-LT's
    many / medium / few shots, Liu et al. 2019): predictions still range over every class."""
    correct = logits.argmax(1) == labels
    result = {}
    for name, classes in buckets.items():
        member = torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype))
        count = int(member.sum())
        result[name] = float(correct[member].float().mean() * 100) if count else float("nan")
    return result


@contextmanager
def training_class_space(model: nn.Module, space: ClassSpace) -> Iterator[None]:
    """While open, ``model``'s logits of the classes outside ``space`` are ``-inf``: training in a class space.

    CoOp / CoCoOp base-to-new (Zhou et al. 2022) train with a head over the base classes only, so the
    training softmax normalises over base classes: p(y | x) = exp(z_y) / sum_{b in base} exp(z_b). The head
    here keeps every class (new classes are scored through their zero-shot rows), so the train split declares
    ``subset(base)`` and the runner opens this around training: a forward hook on the trained model masks the
    other logits, ``F.cross_entropy(model(images), labels)`` then sees exactly the base-only softmax, and the
    masked logits (hence the new-class head rows) get exactly zero gradient from the loss, with no method or
    engine change. Labels stay in model space (the subset's indices must be model classes 0..k-1 in order, as
    base classes are). Weight decay still acts on every trained parameter. The hook is removed on exit,
    before ``finalize`` and evaluation, which score every class space as declared.
    """
    if space.kind == "identity":
        yield
        return
    if space.kind != "subset" or list(space.indices) != list(range(len(space.indices))):
        raise ConfigError(f"train split class space: only subset(0..k-1) can restrict training, got '{space.kind}'")
    masks: dict[tuple[torch.device, int], Tensor] = {}
    open_ = [True]  # deepcopies made while open keep the hook and share this flag

    def mask_outside(module: nn.Module, inputs: Any, logits: Any) -> Tensor:
        if not open_[0]:
            return logits
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise ConfigError("train split class space: the trained model must return logits [N, C]")
        key = (logits.device, logits.shape[1])
        if key not in masks:
            space._check_range(logits.shape[1])
            outside = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
            outside[: len(space.indices)] = False
            masks[key] = outside
        return logits.masked_fill(masks[key], float("-inf"))

    handle = model.register_forward_hook(mask_outside)
    try:
        yield
    finally:
        open_[0] = False
        handle.remove()


@contextmanager
def predicting_in(predictor: nn.Module, space: ClassSpace) -> Iterator[bool]:
    """While open, a predictor that mixes softmaxes scores in ``space`` itself; yields whether it does.

    A predictor whose output is a mixture of per-model softmaxes (VRF) must map each model's logits to
    the split's classes before its softmax (restricting a mixed distribution afterwards gives other
    predictions); it declares ``set_class_space(space) -> previous``. Others get ``False`` and their
    logits are mapped by ``space.apply`` afterwards, as before.
    """
    setter = getattr(predictor, "set_class_space", None)
    if space.kind == "identity" or setter is None:
        yield False
        return
    previous = setter(space)
    try:
        yield True
    finally:
        setter(previous)
