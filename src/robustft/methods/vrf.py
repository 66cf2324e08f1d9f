"""VRF, variance-reduction fine-tuning: a sample-wise ensemble of the zero-shot and fine-tuned models.

Zhu, Cui and Zhang, "Robust fine-tuning of zero-shot models via variance reduction", NeurIPS 2024
(code: BeierZhu/VRF); docs/methods.md, `vrf`, lists every difference from that code.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from robustft import calibration
from robustft.backbones.checkpoint_files import load_state_dict_file, load_state_dict_strict
from robustft.class_spaces import IDENTITY, ClassSpace, class_space_of
from robustft.errors import CheckpointError, ConfigError, UnsupportedModelError
from robustft.evaluate import backbone_features
from robustft.feature_cache import apply_in_batches, feature_extractors
from robustft.methods.base import OneRunInputs, PosthocMethod, RunContext, register_method
from robustft.posthoc import LoadedRun, composed_name, finetuned_structure, load_run_predictor
from robustft.weight_references import load_final_state

Distance = Literal["squared_l2", "l2"]
# Temperatures are searched on log T within these bounds (NLL may keep falling as T -> 0 on a split the
# model gets entirely right; the bound keeps T finite).
TEMPERATURE_BOUNDS = (0.05, 20.0)
# Smallest sigmoid width: a ZSF set too small to measure a spread would otherwise give b = 0.
MIN_WIDTH = 1e-6
PREDICTOR_KEYS = ("zsf_embeddings", "k", "a", "b", "temperature_finetuned", "temperature_zero_shot", "squared")


class VrfWarning(UserWarning):
    """VRF runs, but degenerately (an empty zero-shot-failure set makes it the zero-shot model)."""


# ------------------------------------------------------------------------------------------- the maths


def zero_shot_failures(finetuned_logits: Tensor, zero_shot_logits: Tensor, labels: Tensor) -> Tensor:
    """Mask of the zero-shot-failure (ZSF) set: what the fine-tuned model gets right and the zero-shot model wrong."""
    return (finetuned_logits.argmax(-1) == labels) & (zero_shot_logits.argmax(-1) != labels)


def resolve_k(k: float | str, set_size: int, train_size: int | None = None) -> int:
    """The neighbour rank: ``k >= 1`` is a count, ``0 < k < 1`` a fraction of the ZSF set, ``"official"`` the
    reference's ``round(1000 * |ZSF| / |train|)``; clamped to [1, set_size].

    The reference's rule is 0.08% of the ZSF set on ImageNet but more than the whole set on small training
    sets, and can round to 0 (guarded here); a fraction of the set is the scale-free version.
    Returns 0 only for an empty set.
    """
    if set_size == 0:
        return 0
    if k == "official":
        if not train_size:
            raise ValueError("k='official' needs the training-set size")
        count = round(1000 * set_size / train_size)
    else:
        count = int(k) if k >= 1 else round(k * set_size)
    return min(max(count, 1), set_size)


def sample_weight(distance: Tensor, a: Tensor | float, b: Tensor | float) -> Tensor:
    """``w(x) = sigmoid(-(d(x) - a) / b)``: 1/2 at ``d = a``, towards 1 near the ZSF set, towards 0 far from it."""
    return torch.sigmoid(-(distance - a) / b)


def vrf_log_probs(
    finetuned_logits: Tensor,
    zero_shot_logits: Tensor,
    distance: Tensor,
    a: Tensor | float,
    b: Tensor | float,
    temperature_finetuned: Tensor | float = 1.0,
    temperature_zero_shot: Tensor | float = 1.0,
) -> Tensor:
    """``log(w softmax(z_ft / T_ft) + (1 - w) softmax(z_zs / T_zs))`` with ``w = sample_weight(d, a, b)``.

    Computed with ``logsigmoid`` and ``logsumexp``, so an infinite distance (an empty ZSF set) gives exactly
    the zero-shot model's calibrated log-probabilities and nothing overflows. Log-probabilities are valid
    logits (same argmax), so the ensemble is scored like any model.
    """
    weight_logit = (-(distance.float() - a) / b).unsqueeze(-1)
    finetuned = F.logsigmoid(weight_logit) + F.log_softmax(finetuned_logits.float() / temperature_finetuned, dim=-1)
    zero_shot = F.logsigmoid(-weight_logit) + F.log_softmax(zero_shot_logits.float() / temperature_zero_shot, dim=-1)
    return torch.logaddexp(finetuned, zero_shot)


def to_distance(squared_distances: Tensor, distance: Distance) -> Tensor:
    """FAISS's flat-L2 index returns squared L2 distances; ``l2`` takes their square root."""
    squared_distances = squared_distances.clamp_min(0)
    return squared_distances if distance == "squared_l2" else squared_distances.sqrt()


def kth_distance_brute_force(queries: Tensor, members: Tensor, k: int, distance: Distance = "squared_l2") -> Tensor:
    """Distance of each query to its ``k``-th nearest member by a dense torch computation (the kNN reference)."""
    squared = torch.cdist(queries.double(), members.double()).square()
    return to_distance(squared.topk(k, dim=1, largest=False).values[:, -1].float(), distance)


def fit_temperature(logits: Tensor, labels: Tensor, iterations: int = 60) -> float:
    """The ``T`` minimising the NLL of ``softmax(logits / T)`` on held-out labels, within ``TEMPERATURE_BOUNDS``:
    robustft's one temperature fit (``robustft.calibration.fit_temperature``, Guo et al. 2017, sec. 4.2)."""
    return calibration.fit_temperature(logits, labels, iterations, bounds=TEMPERATURE_BOUNDS)


def fit_temperature_to_accuracy(logits: Tensor, labels: Tensor, iterations: int = 60) -> float:
    """The ``T`` at which the mean max-probability of ``softmax(logits / T)`` equals the accuracy (BeierZhu/VRF).

    The official VRF code calibrates each model this way: confidence matches accuracy on average. The mean
    max-probability falls monotonically as ``T`` grows (each ``exp((z_i - z_max) / T)`` grows towards 1),
    and the accuracy does not depend on ``T``, so bisection on log T finds the crossing; when it lies
    outside ``TEMPERATURE_BOUNDS`` the nearer bound is returned.
    """
    logits, labels = logits.float(), labels.long()
    accuracy = float((logits.argmax(-1) == labels).float().mean())

    def confidence(log_t: float) -> float:
        return float(F.softmax(logits / math.exp(log_t), dim=-1).amax(-1).mean())

    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    for _ in range(iterations):
        middle = (low + high) / 2
        if confidence(middle) > accuracy:
            low = middle
        else:
            high = middle
    return math.exp((low + high) / 2)


TEMPERATURE_FITS = {"nll": fit_temperature, "confidence_matches_accuracy": fit_temperature_to_accuracy}


class ExactKnn:
    """Exact nearest neighbours over fixed members, in squared L2 (what FAISS's ``IndexFlatL2`` returns).

    On the CPU, and on a CUDA device with a FAISS build that has GPU support, a FAISS flat index does the
    search. ``faiss-cpu`` on a CUDA device would copy every batch of queries to the host and back (measured
    2.5x a ViT-B/16 forward for 100k members on an H100), so there the search is one batched matrix product
    and ``topk`` on the device instead (``backend="torch"``); both are exact.
    """

    def __init__(self, members: Tensor, device: torch.device, backend: str = "auto") -> None:
        import faiss

        self.size, dim = members.shape
        gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if backend == "auto":
            backend = "torch" if device.type == "cuda" and not gpu_faiss else "faiss"
        self.backend = backend
        if backend == "torch":
            self.members = members.detach().float().to(device)
            self.member_norms = self.members.square().sum(dim=1)
            return
        index = faiss.IndexFlatL2(dim)
        if self.size:
            index.add(np.ascontiguousarray(members.detach().float().cpu().numpy()))
        if device.type == "cuda" and gpu_faiss:
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, device.index or 0, index)
        self.index = index

    def squared_distances(self, queries: Tensor, k: int) -> Tensor:
        """Squared L2 distances ``[B, k]`` to the ``k`` nearest members, ascending, on the queries' device."""
        if self.size == 0 or k == 0:
            return torch.full((len(queries), max(k, 1)), math.inf, device=queries.device)
        if self.backend == "torch":
            queries = queries.detach().float().to(self.members.device)
            squared = queries.square().sum(dim=1, keepdim=True) + self.member_norms - 2 * queries @ self.members.T
            return squared.clamp_min(0).topk(k, dim=1, largest=False).values
        found, _ = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        return torch.from_numpy(found).to(queries.device, non_blocking=True)


def normalised_embedding_and_logits(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The L2-normalised pre-head embedding and the logits of an ``ImageClassifier``, from ONE backbone pass."""
    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if backbone is None or head is None:
        raise UnsupportedModelError(
            f"vrf: the fine-tuned model ({type(model).__name__}) must be an ImageClassifier with .backbone and .head"
        )
    return embedding_and_logits(model, backbone(images))


def embedding_and_logits(model: nn.Module, embedding: Tensor) -> tuple[Tensor, Tensor]:
    """``normalised_embedding_and_logits`` given the backbone's output (a cached one, ``robustft.feature_cache``)."""
    normalised = embedding / embedding.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    logits = model.head(normalised if getattr(model, "normalize_features", False) else embedding)
    return normalised, logits


def shares_features(zero_shot: nn.Module, finetuned: nn.Module) -> bool:
    """Whether both models' backbone outputs can come from the feature cache: the zero-shot model declares one
    extractor (``robustft.feature_cache``) and the fine-tuned one has the ``.backbone`` and ``.head`` VRF uses."""
    return len(feature_extractors(zero_shot)) == 1 and all(
        getattr(finetuned, part, None) is not None for part in ("backbone", "head")
    )


# ------------------------------------------------------------------------------------------ predictor


class VrfPredictor(nn.Module):
    """Zero-shot model + fine-tuned model + ZSF embeddings; returns log-probabilities ``[B, C]``.

    The ZSF embeddings, ``k``, ``a``, ``b``, both temperatures and the distance kind are buffers, so the
    saved state dict is the whole predictor; the FAISS index is rebuilt from the embeddings after a load
    (and on first use on a new device).

    Scored on a split with a class space (ImageNet-A / -R's 200 classes, ObjectNet's groups), the evaluator
    sets it with ``set_class_space`` (``robustft.class_spaces.predicting_in``): each model's logits are
    mapped to the split's classes *before* its softmax, then mixed, as the official code does; the output
    is then ``[B, C_split]``. Mixing over every class and restricting afterwards gives other predictions.
    """

    def __init__(
        self,
        zero_shot: nn.Module,
        finetuned: nn.Module,
        zsf_embeddings: Tensor,
        k: int,
        a: float,
        b: float,
        temperature_finetuned: float = 1.0,
        temperature_zero_shot: float = 1.0,
        distance: Distance = "squared_l2",
    ) -> None:
        super().__init__()
        self.zero_shot = zero_shot
        self.finetuned = finetuned
        self.register_buffer("zsf_embeddings", zsf_embeddings.detach().float().clone())
        self.register_buffer("k", torch.tensor(int(k)))
        self.register_buffer("a", torch.tensor(float(a)))
        self.register_buffer("b", torch.tensor(float(b)))
        self.register_buffer("temperature_finetuned", torch.tensor(float(temperature_finetuned)))
        self.register_buffer("temperature_zero_shot", torch.tensor(float(temperature_zero_shot)))
        self.register_buffer("squared", torch.tensor(distance == "squared_l2"))
        self._index: ExactKnn | None = None
        self.class_space: ClassSpace = IDENTITY
        self.register_load_state_dict_post_hook(_index_is_stale)

    def set_class_space(self, space: ClassSpace) -> ClassSpace:
        """Score in ``space`` from now on (see the class docstring); returns the previous space."""
        previous, self.class_space = self.class_space, space
        return previous

    @property
    def distance_kind(self) -> Distance:
        return "squared_l2" if bool(self.squared) else "l2"

    def reset_index(self) -> None:
        self._index = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_index"] = None  # a FAISS index is not copyable; it is rebuilt on use
        return state

    def _knn(self) -> tuple[ExactKnn, int, Distance]:
        if self._index is None:
            self._index = ExactKnn(self.zsf_embeddings, self.zsf_embeddings.device)
            self._k, self._distance = int(self.k), self.distance_kind  # host values read once, not per batch
        return self._index, self._k, self._distance

    def distance(self, normalised_embeddings: Tensor) -> Tensor:
        """``d(x)``: distance to the k-th nearest ZSF member (infinite when the set is empty); one search per batch."""
        index, k, distance = self._knn()
        return to_distance(index.squared_distances(normalised_embeddings, k)[:, -1], distance)

    def forward(self, images: Tensor) -> Tensor:
        zero_shot = self.class_space.apply(self.zero_shot(images))
        if self.zsf_embeddings.shape[0] == 0:
            return F.log_softmax(zero_shot.float() / self.temperature_zero_shot, dim=-1)
        return self._mix(zero_shot, *normalised_embedding_and_logits(self.finetuned, images))

    def _mix(self, zero_shot: Tensor, embedding: Tensor, finetuned: Tensor) -> Tensor:
        return vrf_log_probs(
            self.class_space.apply(finetuned),
            zero_shot,
            self.distance(embedding),
            self.a,
            self.b,
            self.temperature_finetuned,
            self.temperature_zero_shot,
        )

    def feature_extractors(self) -> list[nn.Module]:
        """The zero-shot model's backbone and, unless the ZSF set is empty, the fine-tuned one's: the evaluator
        caches their features (``robustft.feature_cache``), so a VRF predictor scored after the zero-shot and
        fine-tuned models costs only its kNN searches. Empty while forward hooks are set."""
        if self._forward_hooks or self._forward_pre_hooks or not shares_features(self.zero_shot, self.finetuned):
            return []
        zero_shot = feature_extractors(self.zero_shot)
        return zero_shot if self.zsf_embeddings.shape[0] == 0 else [*zero_shot, self.finetuned.backbone]

    def logits_from_features(self, features: list[Tensor]) -> Tensor:
        """``forward`` given the extractors' outputs on one batch (the kNN search runs on this batch, as there)."""
        zero_shot = self.class_space.apply(self.zero_shot.logits_from_features(features[:1]))
        if self.zsf_embeddings.shape[0] == 0:
            return F.log_softmax(zero_shot.float() / self.temperature_zero_shot, dim=-1)
        return self._mix(zero_shot, *embedding_and_logits(self.finetuned, features[1]))


def _index_is_stale(module: VrfPredictor, incompatible_keys: Any) -> None:
    """After ``load_state_dict`` the ZSF buffer holds new members: rebuild the index on next use."""
    module.reset_index()


# ------------------------------------------------------------------------------------------- method


class VrfConfig(OneRunInputs):
    """Options of VRF (and the run it combines); every distance-valued option is in the units of ``distance``."""

    k: float | Literal["official"] = Field(
        0.001,
        description="k-th nearest ZSF neighbour: a count if >= 1, else a fraction of the ZSF set (at least 1); "
        "official: round(1000 * |ZSF| / |train|)",
    )
    distance: Distance = Field(
        "squared_l2", description="squared_l2 (the reference's FAISS distances, what the paper's a, b assume) or l2"
    )
    a: float | None = Field(
        None, description="w = 1/2 at d = a; None: the a_quantile of the ZSF members' own kNN distances"
    )
    b: float | None = Field(None, gt=0, description="sigmoid width; None: b_ratio * a")
    a_quantile: float = Field(0.9, gt=0, le=1, description="quantile of ZSF self-distances that sets a default a")
    b_ratio: float = Field(0.4, gt=0, description="default b = b_ratio * a (the paper's 0.6 / 1.5)")
    fit_temperatures: bool = Field(True, description="fit T_ft and T_zs on id_val (else both 1)")
    temperature_fit: Literal["nll", "confidence_matches_accuracy"] = Field(
        "nll", description="nll: minimise id_val NLL; confidence_matches_accuracy: the official procedure"
    )
    pick_on_id_val: bool = Field(False, description="choose a, b on id_val accuracy over the grids below")
    a_quantiles: list[float] = Field(
        [0.5, 0.75, 0.9, 0.95, 1.0], description="pick_on_id_val: a candidates as quantiles of ZSF self-distances"
    )
    b_ratios: list[float] = Field([0.1, 0.25, 0.4, 1.0], description="pick_on_id_val: b candidates as b / a")

    paper_preset: ClassVar[dict[str, Any]] = {
        "k": "official",
        "a": 1.5,
        "b": 0.6,
        "distance": "squared_l2",
        "fit_temperatures": True,
        "temperature_fit": "confidence_matches_accuracy",
        "pick_on_id_val": False,
    }

    @field_validator("k")
    @classmethod
    def _whole_count(cls, k: float | str) -> float | str:
        if isinstance(k, str):
            return k
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if k >= 1 and k != int(k):
            raise ValueError(f"k >= 1 is a neighbour count and must be a whole number, got {k}")
        return k

    @field_validator("a_quantiles")
    @classmethod
    def _quantiles(cls, values: list[float]) -> list[float]:
        if not values or any(not 0 < q <= 1 for q in values):
            raise ValueError(f"give quantiles in (0, 1], got {values}")
        return sorted(set(values))

    @field_validator("b_ratios")
    @classmethod
    def _ratios(cls, values: list[float]) -> list[float]:
        if not values or any(r <= 0 for r in values):
            raise ValueError(f"give positive ratios, got {values}")
        return sorted(set(values))


def _load_finetuned(model: nn.Module, run_dir: Path, ctx: RunContext) -> LoadedRun:
    """The predictor of ``run_dir``, rebuilt by that run's own method from a copy of this run's model.

    Any trained method's run works (LoRA runs are merged plain models, mixture-of-adapters runs keep
    their routed adapters); VRF needs its ``.backbone`` and ``.head`` for the embedding.
    """
    loaded = load_run_predictor(copy.deepcopy(model), run_dir, ctx)
    loaded.predictor.requires_grad_(False)
    return loaded


def cached_backbone_features(extractor: nn.Module, ctx: RunContext, split: str) -> tuple[Tensor, Tensor]:
    """``extractor``'s outputs (and labels) on a split through the run's feature cache, in fp32 as the passes over
    ``ctx.iterate`` are."""
    dataset = ctx.splits[split]
    return backbone_features(
        extractor, dataset, ctx.device, ctx.eval_batch_size, ctx.num_workers, cache=ctx.logit_cache
    )


@torch.no_grad()
def split_outputs(zero_shot: nn.Module, finetuned: nn.Module, ctx: RunContext, split: str) -> dict[str, Tensor]:
    """Normalised FT embeddings, FT and ZS logits (in the split's class space) and labels of a whole split (CPU).

    With the run's feature cache the two backbones' outputs are read from it (the zero-shot and fine-tuned runs
    of a comparison, or a linear probe on the train split, computed them) and only the heads run here.
    """
    zero_shot.eval()
    finetuned.eval()
    space = class_space_of(ctx.splits[split])
    cache = ctx.logit_cache
    if cache is not None and cache.features is not None and shares_features(zero_shot, finetuned):
        zero_shot_features, labels = cached_backbone_features(feature_extractors(zero_shot)[0], ctx, split)
        finetuned_features, _ = cached_backbone_features(finetuned.backbone, ctx, split)

        def heads(features: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
            embedding, logits = embedding_and_logits(finetuned, features[1])
            return embedding, space.apply(logits), space.apply(zero_shot.logits_from_features(features[:1]))

        features = [zero_shot_features, finetuned_features]
        embeddings, tuned, zero = apply_in_batches(heads, features, ctx.eval_batch_size, ctx.device)
        return {"embeddings": embeddings, "finetuned": tuned, "zero_shot": zero, "labels": labels}
    parts: dict[str, list[Tensor]] = {"embeddings": [], "finetuned": [], "zero_shot": [], "labels": []}
    for images, labels in ctx.iterate(split):
        embedding, logits = normalised_embedding_and_logits(finetuned, images)
        for key, value in (
            ("embeddings", embedding),
            ("finetuned", space.apply(logits)),
            ("zero_shot", space.apply(zero_shot(images))),
            ("labels", labels),
        ):
            parts[key].append(value.float().cpu() if value.is_floating_point() else value.cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def self_distances(index: ExactKnn, members: Tensor, k: int, distance: Distance) -> Tensor:
    """Each ZSF member's distance to its k-th nearest *other* member (itself is its own nearest, at 0)."""
    ranks = min(k + 1, len(members))
    return to_distance(index.squared_distances(members, ranks)[:, -1], distance)


@register_method
class Vrf(PosthocMethod):
    """VRF: ``P = w(x) softmax(z_ft / T_ft) + (1 - w(x)) softmax(z_zs / T_zs)``, ``w = sigmoid(-(d(x) - a) / b)``.

    Zhu et al. (NeurIPS 2024) observe that output ensembles reach their best ID and best OOD accuracy at
    different mixing coefficients. VRF instead weights the fine-tuned model per sample: it is trusted where
    the zero-shot model is known to fail. The zero-shot-failure (ZSF) set holds the fine-tuned model's
    L2-normalised embeddings of the training images it classifies right and the zero-shot model wrong; a
    test image close to that set (small ``d``, the distance to its k-th nearest ZSF member) gets a large
    ``w``. The paper argues this lowers the variance of the ensemble's prediction and with it its error.

    Decisions (docs/methods.md, `vrf`):
    - ``distance`` defaults to ``squared_l2``, the reference's FAISS flat-L2 values (0-4 on unit vectors),
      for which the paper's a=1.5, b=0.6 were tuned. ``l2`` is its square root; kNN ranks are identical.
    - ``a``, ``b`` default to values derived from the ZSF set itself, because the paper's are tuned for CLIP
      features on ImageNet and on other features put every sample on one side of the sigmoid (on
      digits-shift ``w`` is 0.87-0.90 on every split with them, i.e. VRF is nearly FT): ``a`` is the
      ``a_quantile`` quantile of the ZSF members' own k-th-neighbour distances (a test image at least as
      close to the set as 90% of its members are to each other gets ``w >= 1/2``), ``b = b_ratio * a``
      (the paper's ratio). Set ``a``, ``b`` to use fixed values, or ``pick_on_id_val`` to grid-search them
      on id_val accuracy; id_val is ID data only, so that pick favours the fine-tuned model.
    - ``k`` defaults to 0.1% of the ZSF set (at least 1), about the reference's k on ImageNet.
    - Temperatures divide the logits and are fitted by NLL on ``id_val``, a proper scoring rule
      (``temperature_fit: confidence_matches_accuracy`` is the reference's procedure, also on id_val: the
      reference fits on the evaluation split, a leak). ``preset: paper`` sets k, a, b and the temperature
      procedure to the reference's. The ZSF set comes from the train split as loaded: un-augmented unless
      ``data.augment`` is set, as the reference (which embeds un-augmented training images) assumes.

    Inference costs two forwards (the models share no backbone), the FT one giving embedding and logits
    at once, plus one exact kNN search per batch. Within a comparison both backbones' features come from the
    feature cache (``robustft.feature_cache``): the zero-shot and fine-tuned runs computed them.
    """

    name = "vrf"
    config_cls = VrfConfig

    def check_inputs(self, ctx: RunContext) -> list[Path]:
        config = self.config
        if "train" not in ctx.splits:
            raise ConfigError("data.splits.train: vrf builds its zero-shot-failure set from the train split")
        if (config.fit_temperatures or config.pick_on_id_val) and "id_val" not in ctx.splits:
            raise ConfigError(
                "data.splits.id_val: vrf fits its temperatures (and picks a, b) on id_val, never on a test split; "
                "add an id_val split or set method.fit_temperatures: false"
            )
        return super().check_inputs(ctx)

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        config = self.config
        model.eval()
        loaded = _load_finetuned(model, Path(config.finetuned_run), ctx)
        finetuned = loaded.predictor
        self.result_name = composed_name(self.name, loaded.method)
        train = split_outputs(model, finetuned, ctx, "train")
        failures = zero_shot_failures(train["finetuned"], train["zero_shot"], train["labels"])
        members = train["embeddings"][failures]
        report: dict[str, Any] = {
            "finetuned_run": str(config.finetuned_run),
            "zsf_size": len(members),
            "train_size": len(failures),
            "distance": config.distance,
            "temperature_fit": config.temperature_fit if config.fit_temperatures else "none",
        }
        if len(members) == 0:
            message = (
                "vrf: the zero-shot-failure set is empty (the fine-tuned model fixes no training image the "
                "zero-shot model gets wrong), so VRF is the zero-shot model"
            )
            warnings.warn(message, VrfWarning, stacklevel=2)
            ctx.log(f"warning: {message}")
            report["warning"] = message
        k = resolve_k(config.k, len(members), len(failures))
        index = ExactKnn(members, torch.device("cpu"))
        own = self_distances(index, members, k, config.distance)
        id_val = split_outputs(model, finetuned, ctx, "id_val") if "id_val" in ctx.splits else None
        t_ft, t_zs = 1.0, 1.0
        if config.fit_temperatures:
            fit = TEMPERATURE_FITS[config.temperature_fit]
            t_ft = fit(id_val["finetuned"], id_val["labels"])
            t_zs = fit(id_val["zero_shot"], id_val["labels"])
        a, b, chosen_by = self._choose_a_b(own, index, k, id_val, t_ft, t_zs, report)
        predictor = VrfPredictor(model, finetuned, members.to(ctx.device), k, a, b, t_ft, t_zs, config.distance)
        report |= {
            "k": k,
            "a": a,
            "b": b,
            "a_b_chosen_by": chosen_by,
            "temperature_finetuned": t_ft,
            "temperature_zero_shot": t_zs,
            "zsf_self_distance_quantiles": _quantiles(own),
            "mean_weight": self._mean_weights(predictor, ctx) if len(members) else {},
        }
        ctx.extras.update(report)
        ctx.log(
            f"vrf: ZSF set {len(members)} of {len(failures)} training images, k={k}, a={a:.4g}, b={b:.4g} "
            f"({chosen_by}), T_ft={t_ft:.3g}, T_zs={t_zs:.3g}, {config.distance}"
        )
        return predictor

    def _choose_a_b(
        self,
        own: Tensor,
        index: ExactKnn,
        k: int,
        id_val: dict[str, Tensor] | None,
        t_ft: float,
        t_zs: float,
        report: dict[str, Any],
    ) -> tuple[float, float, str]:
        """(a, b, how): fixed from the config, derived from the ZSF self-distances, or picked on id_val."""
        config = self.config
        if not config.pick_on_id_val:
            a = config.a if config.a is not None else order_statistic(own, config.a_quantile)
            b = config.b if config.b is not None else max(config.b_ratio * a, MIN_WIDTH)
            how = "config" if config.a is not None and config.b is not None else "zsf_self_distances"
            return a, b, how
        distance = to_distance(index.squared_distances(id_val["embeddings"], k)[:, -1], config.distance)
        grid = []
        for quantile in config.a_quantiles:
            a = order_statistic(own, quantile)
            for ratio in config.b_ratios:
                b = max(ratio * a, MIN_WIDTH)
                log_probs = vrf_log_probs(id_val["finetuned"], id_val["zero_shot"], distance, a, b, t_ft, t_zs)
                accuracy = float((log_probs.argmax(-1) == id_val["labels"]).float().mean() * 100)
                grid.append({"a_quantile": quantile, "b_ratio": ratio, "a": a, "b": b, "id_val": accuracy})
        # Ties go to the smaller a, i.e. closer to the zero-shot model, the robust side.
        best = max(grid, key=lambda point: (point["id_val"], -point["a"], point["b"]))
        report["a_b_grid"] = grid
        return best["a"], best["b"], "id_val"

    @torch.no_grad()
    def _mean_weights(self, predictor: VrfPredictor, ctx: RunContext) -> dict[str, float]:
        """Mean ``w`` per evaluation split: how much each split leans on the fine-tuned model (from the feature
        cache when the run has one: the final evaluation then reads the same features)."""
        finetuned = predictor.finetuned
        means = {}
        cache = ctx.logit_cache
        cached = cache is not None and cache.features is not None and shares_features(predictor.zero_shot, finetuned)
        for split in ctx.splits:
            if split == "train":
                continue
            if cached:
                features, _ = cached_backbone_features(finetuned.backbone, ctx, split)
                weights = apply_in_batches(
                    lambda batch: sample_weight(
                        predictor.distance(embedding_and_logits(finetuned, batch[0])[0]), predictor.a, predictor.b
                    ),
                    [features],
                    ctx.eval_batch_size,
                    ctx.device,
                )
                means[split] = float(weights.mean())
                continue
            weights = [
                sample_weight(
                    predictor.distance(normalised_embedding_and_logits(predictor.finetuned, images)[0]),
                    predictor.a,
                    predictor.b,
                )
                for images, _ in ctx.iterate(split)
            ]
            means[split] = float(torch.cat(weights).mean())
        return means

    def load_predictor(self, model: nn.Module, checkpoint: Path, what: str) -> nn.Module:
        state = load_state_dict_file(checkpoint)
        missing = [key for key in PREDICTOR_KEYS if key not in state]
        if missing:
            raise CheckpointError(f"{checkpoint}: not a VRF predictor (missing {', '.join(missing)})")
        device = next(model.parameters()).device
        members = torch.zeros(state["zsf_embeddings"].shape, device=device)
        finetuned = finetuned_structure(model, self.config.finetuned_run)
        predictor = VrfPredictor(model, finetuned, members, k=1, a=0.0, b=1.0).to(device)
        state = load_final_state(checkpoint, predictor, own=state)  # the two models are references
        load_state_dict_strict(predictor, state, checkpoint, f"a VRF predictor of {what}")
        return predictor


def order_statistic(values: Tensor, quantile: float) -> float:
    """An order statistic ("nearest"), so it commutes with monotone maps: l2 values are sqrt of squared ones."""
    if len(values) == 0:
        return 0.0
    return float(torch.quantile(values.double(), quantile, interpolation="nearest"))


def _quantiles(values: Tensor) -> dict[str, float]:
    return {f"q{round(q * 100)}": order_statistic(values, q) for q in (0.1, 0.5, 0.9)}
