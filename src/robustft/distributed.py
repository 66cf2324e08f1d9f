"""Data-parallel runs over ``torch.distributed``: the launcher is ``torchrun``, the maths is DDP's.

``torchrun --nproc_per_node N -m robustft fit CONFIG`` starts N copies of the same run; each reads
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` from its environment and
joins one process group (NCCL on GPUs, gloo on CPUs). Every rank holds the whole model. The engine
splits each *global* batch of ``data.batch_size`` samples into contiguous per-rank slices, and torch's
``DistributedDataParallel``, wrapped around the method's loss (:class:`MethodLoss`, so a loss may call
the model however it likes), averages the gradients bucket by bucket during the backward; every rank
then takes the same optimiser step on the same weights. ``train.strategy=allreduce`` averages them
after the backward instead (``all_reduce_mean_``), and ``fsdp`` shards the model (:class:`ShardedModel`);
docs/distributed.md says which method takes which path.

Every helper here is a no-op (or the identity) in a single process, so methods may call them freely:
``is_main_process``, ``rank``, ``world_size``, ``barrier``, ``broadcast_object``, ``broadcast_module``,
``all_reduce_sum_``, ``shard_range``, ``ShardView``, ``gather_shards`` and ``gather_with_grad``.
"""

from __future__ import annotations

import atexit
import os
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from robustft.errors import ConfigError

# Gradients are reduced in buckets of at most this many elements (DDP's default bucket is 25 MB),
# so the flat copy never needs a second model-sized buffer.
BUCKET_NUMEL = 2**23


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``), 1 when not launched by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0 writes checkpoints, metrics, results and logs; the other ranks only compute."""
    return rank() == 0


def device_for_rank(device: torch.device) -> torch.device:
    """``cuda`` without an index becomes this process's GPU (``cuda:LOCAL_RANK``) under torchrun."""
    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun described in the environment; a no-op in a single process.

    NCCL when the run's device is a GPU, gloo otherwise. Idempotent, so a sweep under torchrun runs
    many fits in one group. Returns whether the run is distributed.
    """
    if launched_world_size() <= 1:
        return False
    if is_initialized():
        return True
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device_for_rank(device))
    dist.init_process_group(backend=backend)
    atexit.register(_shutdown)
    return True


def relaunch(processes: int, arguments: list[str]) -> int:
    """``robustft ARGUMENTS`` under ``torchrun --standalone --nproc_per_node PROCESSES``; its exit code.

    ``robustft fit --devices N`` is this: torchrun (``torch.distributed.run``) starts the N ranks and
    tears all of them down when one fails.
    """
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.call([*command, "-m", "robustft", *arguments])


def _shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives need their tensors: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Rank ``source``'s ``value`` on every rank (picklable values; for selections computed once)."""
    if world_size() <= 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source, device=_comm_device())
    return holder[0]


def _buckets(tensors: Sequence[Tensor], limit: int = BUCKET_NUMEL) -> list[list[Tensor]]:
    """Consecutive runs of same-dtype, same-device tensors of at most ``limit`` elements (one tensor may exceed it)."""
    buckets: list[list[Tensor]] = []
    size = 0
    for tensor in tensors:
        last = buckets[-1] if buckets else None
        fits = last is not None and size + tensor.numel() <= limit
        if fits and last[0].dtype == tensor.dtype and last[0].device == tensor.device:
            last.append(tensor)
            size += tensor.numel()
        else:
            buckets.append([tensor])
            size = tensor.numel()
    return buckets


def _reduce_bucket(bucket: list[Tensor], op: Any, divide: int) -> None:
    flat = torch.cat([tensor.reshape(-1) for tensor in bucket])
    communicated = flat.to(_comm_device())
    dist.all_reduce(communicated, op=op)
    if divide > 1:
        communicated /= divide
    pieces = communicated.to(flat.device).split([tensor.numel() for tensor in bucket])
    torch._foreach_copy_(bucket, [piece.view_as(tensor) for piece, tensor in zip(pieces, bucket, strict=True)])


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum each tensor over the ranks, in place (bucketed: one collective per bucket, not per tensor)."""
    if world_size() <= 1 or not tensors:
        return
    for bucket in _buckets(tensors):
        _reduce_bucket(bucket, dist.ReduceOp.SUM, 1)


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Average each tensor over the ranks, in place: DDP's gradient averaging, done once per optimiser step."""
    if world_size() <= 1 or not tensors:
        return
    for bucket in _buckets(tensors):
        _reduce_bucket(bucket, dist.ReduceOp.SUM, world_size())


@torch.no_grad()
def broadcast_module(module: nn.Module, source: int = 0) -> None:
    """Copy rank ``source``'s parameters and buffers to every rank (what DDP does when it wraps a model).

    After each rank has built and prepared its own copy, this makes the starting point identical
    even where a method's setup is not bit-reproducible across devices (a probe fitted per rank).
    """
    if world_size() <= 1:
        return
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.numel()]
    for bucket in _buckets(tensors):
        flat = torch.cat([tensor.reshape(-1) for tensor in bucket]).to(_comm_device())
        dist.broadcast(flat, src=source)
        pieces = flat.to(bucket[0].device).split([tensor.numel() for tensor in bucket])
        torch._foreach_copy_(bucket, [piece.view_as(tensor) for piece, tensor in zip(pieces, bucket, strict=True)])


def check_batch_size(batch_size: int, size: int | None = None) -> None:
    """``data.batch_size`` is the global batch; it must split evenly over the ranks."""
    size = world_size() if size is None else size
    if batch_size % size:
        raise ConfigError(
            f"data.batch_size={batch_size} is the global batch and must be divisible by the number of "
            f"processes ({size}); use e.g. data.batch_size={max(size, batch_size // size * size)}"
        )


def shard_range(num_items: int, shard: int | None = None, shards: int | None = None) -> range:
    """The contiguous slice of ``range(num_items)`` that rank ``shard`` of ``shards`` owns.

    Sizes differ by at most one, the first ``num_items % shards`` slices taking the extra item
    (``torch.tensor_split``'s rule); a slice may be empty when there are fewer items than ranks.
    """
    shard = rank() if shard is None else shard
    shards = world_size() if shards is None else shards
    base, extra = divmod(num_items, shards)
    start = shard * base + min(shard, extra)
    return range(start, start + base + (1 if shard < extra else 0))


def shard_batches(order: Sequence[int], batch_size: int, shard: int, shards: int) -> list[list[int]]:
    """Rank ``shard``'s part of each global batch of ``order``.

    A rank whose part of a (last, short) batch is empty gets the batch's first index as padding; the
    engine gives that sample weight zero (``batch_weight``), so every rank still runs a forward and
    backward and the collectives stay in step.
    """
    batches = []
    for begin in range(0, len(order), batch_size):
        batch = list(order[begin : begin + batch_size])
        part = shard_range(len(batch), shard, shards)
        batches.append(batch[part.start : part.stop] or batch[:1])
    return batches


def batch_weight(global_size: int, shard: int, shards: int) -> float:
    """Factor on a rank's mean loss so that averaging over ranks gives the mean over the global batch.

    A rank holding ``n_r`` of the batch's ``N`` samples contributes ``n_r / N`` of the global mean
    loss; averaging divides by the number of ranks, hence ``n_r * shards / N`` (1 when the batch
    splits evenly, 0 for a padding sample).
    """
    return len(shard_range(global_size, shard, shards)) * shards / global_size


class ShardView(Dataset):
    """Rank ``shard``'s contiguous part of a dataset, keeping whole-batch indexing when the dataset has it."""

    def __init__(self, dataset: Dataset, shard: int | None = None, shards: int | None = None) -> None:
        self.dataset = dataset
        self.indices = shard_range(len(dataset), shard, shards)
        self.supports_batch_indexing = getattr(dataset, "supports_batch_indexing", False)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int):
            return self.dataset[self.indices[index]]
        return self.dataset[[self.indices[i] for i in index]]


def gather_shards(tensor: Tensor) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order, on every rank (CPU result).

    Shards may differ in length (and be empty, with any trailing shape); they are padded to the
    longest for one ``all_gather`` and trimmed after.
    """
    if world_size() <= 1:
        return tensor
    shapes: list[Any] = [None] * world_size()
    dist.all_gather_object(shapes, tuple(tensor.shape))
    trailing = next((shape[1:] for shape in shapes if shape[0] > 0), tuple(tensor.shape[1:]))
    longest = max(shape[0] for shape in shapes)
    padded = torch.zeros((longest, *trailing), dtype=tensor.dtype, device=_comm_device())
    if tensor.shape[0]:
        padded[: tensor.shape[0]] = tensor.to(padded.device)
    gathered = [torch.empty_like(padded) for _ in shapes]
    dist.all_gather(gathered, padded)
    return torch.cat([part[: shape[0]] for part, shape in zip(gathered, shapes, strict=True)]).cpu()


def shard_sizes(count: int) -> list[int]:
    """Every rank's ``count`` (rows of its part of a batch), in rank order, on every rank: one small all-gather
    (a host sync on GPUs); ``[count]`` in one process."""
    if world_size() <= 1:
        return [count]
    local = torch.tensor([count], device=_comm_device())
    counts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(counts, local)
    return torch.cat(counts).tolist()


def gather_with_grad(tensor: Tensor, rows: list[int] | None = None) -> tuple[Tensor, int]:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, differentiable, and where this rank's rows
    start in it (``(tensor, 0)`` in one process).

    A loss over a global batch (CLIP's contrastive loss, whose negatives are the batch's other pairs) needs every
    rank's embeddings. The gather is torch's differentiable ``all_gather``, the one open_clip's
    ``gather_features(gather_with_grad=True)`` calls: its backward hands each rank the sum over ranks of the
    gradients with respect to that rank's rows, so with each rank's loss over its own rows against all rows
    (open_clip's ``local_loss=True``) and DDP's mean, the gradients are those of the 1-process global batch.
    open_clip's gather itself assumes equally long shards; the engine's last global batch may split unevenly, so
    the shards are padded to the longest and trimmed after. ``rows`` are the ranks' row counts
    (:func:`shard_sizes`), exchanged here when not given.
    """
    if world_size() <= 1:
        return tensor, 0
    from torch.distributed.nn.functional import all_gather

    rows = shard_sizes(tensor.shape[0]) if rows is None else rows
    longest = max(rows)
    padded = torch.nn.functional.pad(tensor, (0, 0) * (tensor.ndim - 1) + (0, longest - tensor.shape[0]))
    with warnings.catch_warnings():  # deprecated for a private successor; open_clip's gather calls it too
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(padded)
    return torch.cat([part[:length] for part, length in zip(parts, rows, strict=True)]), sum(rows[: rank()])


# ---------------------------------------------------------------------------- gradient averaging

# Methods that keep the hand-written all-reduce under ``train.strategy=ddp``, and why torch's DDP cannot serve
# them. Every training method runs under DDP today (2-process gloo runs equal 1-process runs, tests/test_ddp.py).
ALLREDUCE_METHODS: dict[str, str] = {}
# Methods whose loss may leave some trainable parameters without a gradient in a step: DDP must look for them
# (``find_unused_parameters=True``), or the reducer waits for gradients that never come.
UNUSED_PARAMETER_METHODS = {
    "mixture_of_adapters": "top-k routing leaves the experts no token chose without a gradient",
}


def _no_buffer_sync(ddp_class: type) -> dict[str, bool]:
    """DDP's keyword for "do not broadcast buffers before every forward" (renamed in newer torch releases)."""
    import inspect

    keyword = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp_class).parameters else None
    return {keyword or "broadcast_buffers": False}


class MethodLoss(nn.Module):
    """A method's loss as one module's ``forward``, so torch's DDP can wrap it whatever the loss calls.

    DDP synchronises the gradients of the parameters its module's forward used; wrapping the loss instead of
    the model lets a method call ``model.features``, a frozen teacher, the text tower or several forwards in
    one loss, and still get DDP's bucketed all-reduce launched from the backward as each bucket fills.
    """

    def __init__(self, method: Any, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.method = method  # a plain object, not a submodule: its parameters are the model's

    def forward(self, images: Tensor, labels: Tensor, step: int) -> tuple[Tensor, dict[str, Any]]:
        return self.method.loss(self.model, (images, labels), step)


def gradient_path(method: str, strategy: str, processes: int) -> str:
    """``none`` (one process), ``allreduce`` (asked for, or a method DDP cannot serve) or ``ddp``."""
    if processes <= 1:
        return "none"
    return "allreduce" if strategy == "allreduce" or method in ALLREDUCE_METHODS else "ddp"


class GradientSync:
    """How the gradients of one optimiser step are averaged over the ranks under ``train.strategy=ddp``.

    ``ddp``: the method's loss runs inside ``torch.nn.parallel.DistributedDataParallel`` (:class:`MethodLoss`),
    which all-reduces each gradient bucket while the rest of the backward runs; with gradient accumulation the
    micro-batches before the last run under ``no_sync``, so one exchange per optimiser step, as before.
    ``allreduce``: the hand-written bucketed all-reduce after the backward (``all_reduce_mean_``), for the
    methods in ``ALLREDUCE_METHODS`` or when asked for (``train.strategy=allreduce``). ``none``: one process.
    """

    def __init__(self, method: Any, model: nn.Module, device: torch.device, strategy: str = "ddp") -> None:
        self.wrapped: nn.Module | None = None
        self.mode = gradient_path(method.name, strategy, world_size())
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(
                MethodLoss(method, model),
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=method.name in UNUSED_PARAMETER_METHODS,
                **_no_buffer_sync(DistributedDataParallel),  # buffers are broadcast once before training
            )
        self.method = method

    @property
    def reduces_in_backward(self) -> bool:
        """True when DDP has averaged the gradients by the end of the backward (the engine must not again)."""
        return self.mode == "ddp"

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], step: int) -> tuple[Tensor, dict[str, Any]]:
        if self.wrapped is None:
            return self.method.loss(model, batch, step)
        return self.wrapped(*batch, step)

    def micro_batch(self, last: bool):
        """The context of one micro-batch's forward and backward: DDP's ``no_sync`` except on the step's last."""
        if self.wrapped is None or last:
            return nullcontext()
        return self.wrapped.no_sync()


# ------------------------------------------------------------------------------------------ FSDP2

# Methods whose training touches the model only through ``model(images)`` and the optimiser, which is what
# FSDP's all-gather-in-forward / reduce-scatter-in-backward hooks serve. The others, and why not:
SHARDABLE_METHODS = frozenset({"finetune", "lp_ft", "linear_probe", "lora"})
UNSHARDABLE_REASONS = {
    "flyp": "its loss calls the image and text towers' embeddings outside model(images)",
    "masked_counterfactual": "its CAM rollout and frozen teacher call the model outside model(images)",
    "l2_sp": "its penalty compares every whole weight tensor with its pre-trained copy",
    "gmixout": "its after_step mixes whole weight tensors with an EMA anchor under masks",
    "mixout": "it masks whole weight tensors against the pre-trained ones",
    "saft": "it masks gradient entries by their index in the whole tensor",
    "mixture_of_adapters": "its router statistics are read from the blocks outside model(images)",
}


def check_strategy(strategy: str, method: str) -> None:
    """``train.strategy=fsdp`` with a method it cannot shard is one ``ConfigError`` naming why."""
    if strategy == "fsdp" and method not in SHARDABLE_METHODS:
        reason = UNSHARDABLE_REASONS.get(method, "it has not been checked under sharding")
        raise ConfigError(
            f"train.strategy=fsdp: method {method} cannot train sharded ({reason}); use train.strategy=ddp "
            f"(shardable: {', '.join(sorted(SHARDABLE_METHODS))})"
        )


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model`` (children of a ModuleList / Sequential of one class with parameters).

    Each becomes one FSDP unit, so only one block's full weights exist at a time in the forward and
    backward (the ``transformer_auto_wrap_policy`` of FSDP1, without naming a block class per backbone).
    """
    units = []
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            children = list(module.children())
            same = len(children) >= 2 and len({type(child) for child in children}) == 1
            if same and any(True for _ in children[0].parameters()):
                units.extend(children)
    return units


class ShardedModel:
    """A copy of the model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) for training.

    The engine trains the copy and writes the consolidated weights back into the original at the end, so
    evaluation, post-hoc methods and ``final.safetensors`` see an ordinary module (a consolidated safetensors
    at the end). The original's parameters are moved to the CPU while the copy trains, so the device holds
    only the shards. Checkpoints hold the full (consolidated) model and optimiser state keyed by parameter
    name (``torch.distributed.checkpoint.state_dict``), so they load on any number of processes, under
    either strategy.
    """

    def __init__(self, model: nn.Module, device: torch.device, param_dtype: torch.dtype | None) -> None:
        import copy

        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.original, self.module, self.device, self.units = model, model, device, 0
        self.is_sharded = world_size() > 1  # one process trains the model itself, with the same checkpoints
        if not self.is_sharded:
            return
        self.module = copy.deepcopy(model)
        model.to("cpu")
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        units = sharding_units(self.module)
        for unit in reversed(units):  # inner units first, as fully_shard requires
            fully_shard(unit, mp_policy=policy)
        self.units = len(units)
        fully_shard(self.module, mp_policy=policy)

    def _options(self, **kwargs: Any):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kwargs)

    def model_state(self, every_rank: bool = False) -> dict[str, Tensor]:
        """The full model state dict, on the CPU of rank 0 (or of ``every_rank``); every rank must call it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module, options=self._options(cpu_offload=not every_rank))

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, optimizer, options=self._options(cpu_offload=True))

    def load(self, model_state: dict[str, Tensor], optimizer_state: dict[str, Any], optimizer) -> None:
        """Scatter a full checkpoint's model and optimiser state into the shards (any world size)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.module, model_state, options=self._options())
        set_optimizer_state_dict(self.module, optimizer, optimizer_state, options=self._options())

    def write_back(self) -> nn.Module:
        """The original module, on its device again, holding the trained (consolidated) weights."""
        if not self.is_sharded:
            return self.original
        state = self.model_state(every_rank=True)
        self.original.to(self.device)
        self.original.load_state_dict(state)
        return self.original
