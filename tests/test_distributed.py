"""Data-parallel runs: 2 gloo processes on CPU give the weights of 1 process; method state agrees across ranks.

Tolerance: with SGD the 2-process weights match the 1-process weights to 1e-5 (measured: 1.2e-7 after
6 steps); the only difference is the order of float additions in the gradient all-reduce. With AdamW
a few coordinates whose gradient is near zero differ by up to the learning rate, because Adam divides
the gradient by its own magnitude (docs/distributed.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from torch import nn

from robustft import distributed
from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.data.tensor_split import TensorSplit
from robustft.demo import demo_config
from robustft.errors import ConfigError
from robustft.runner import FINAL_CHECKPOINT, fit

WORLD = 2


def quiet(message: str) -> None:
    pass


def test_shards_cover_each_global_batch_once_in_order():
    order = list(range(100, 123))  # 23 samples: batches of 8, 8 and a short one of 7
    parts = [distributed.shard_batches(order, 8, rank, WORLD) for rank in range(WORLD)]
    for batch_index, begin in enumerate(range(0, len(order), 8)):
        joined = parts[0][batch_index] + parts[1][batch_index]
        assert joined == order[begin : begin + 8]  # rank 0 then rank 1: the 1-process batch, in order
    assert [len(batch) for batch in parts[0]] == [4, 4, 4] and [len(batch) for batch in parts[1]] == [4, 4, 3]
    weights = [distributed.batch_weight(7, rank, WORLD) for rank in range(WORLD)]
    assert weights == pytest.approx([8 / 7, 6 / 7])  # (4/7 + 3/7) = 1 after averaging over 2 ranks
    assert distributed.shard_batches([5], 8, 1, WORLD) == [[5]]  # empty share: padding sample ...
    assert distributed.batch_weight(1, 1, WORLD) == 0.0  # ... with weight zero


def test_batch_size_must_divide_by_world_size():
    distributed.check_batch_size(64, 4)
    with pytest.raises(
        ConfigError, match=r"data.batch_size=30 is the global batch .* \(4\); use e.g. data.batch_size=28"
    ):
        distributed.check_batch_size(30, 4)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TinyClassifier(nn.Module):
    """A backbone of two linears and a head: what GMixout and SAFT select tensors from."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.GELU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def tiny_split(count: int = 5) -> TensorSplit:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (count, 3, 4, 4), dtype=torch.uint8, generator=generator)
    return TensorSplit(images, torch.arange(count) % 3, {}, "tiny")


def _worker(rank: int, port: int, out: str) -> None:
    """One gloo rank: exercises each cross-rank mechanism and saves what it saw for the parent."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    from robustft.engine import RankMismatchError, _reduce_over_ranks
    from robustft.evaluate import predict
    from robustft.methods.base import RunContext
    from robustft.methods.gmixout import GMixout, GMixoutConfig
    from robustft.methods.saft import gradient_scores
    from robustft.sparse import sparse_updates

    assert distributed.init_from_env(torch.device("cpu")) and distributed.world_size() == WORLD
    seen: dict[str, object] = {"rank": distributed.rank()}
    torch.manual_seed(0)
    model = TinyClassifier()
    split = tiny_split()
    seen["logits"], seen["labels"] = predict(model, split, torch.device("cpu"), batch_size=2)
    shard = distributed.ShardView(split)
    images, labels = shard[list(range(len(shard)))]
    seen["saft_scores"] = gradient_scores(model, ["backbone.1.weight", "head.weight"], [(images, labels)])

    masks = []
    for seed in (3, 3, 4):  # same seed twice: reproducible; another seed: different masks
        method = GMixout(GMixoutConfig(p=0.5, k=1))
        mixed = method.prepare(TinyClassifier(), RunContext(".", torch.device("cpu"), seed, {}, []))
        draws = [{n: u.indices.clone() for n, u in sparse_updates(mixed).items()}]
        for step in range(2):
            method.after_step(mixed, step)  # k=1: resample every step
            draws.append({n: u.indices.clone() for n, u in sparse_updates(mixed).items()})
        masks.append(draws)
    seen["masks"] = masks

    perturbed = TinyClassifier()
    distributed.broadcast_module(perturbed)  # each rank built its own random init; rank 0's wins
    seen["broadcast"] = perturbed.state_dict()

    extra = [nn.Parameter(torch.ones(2))] if rank == 1 else []
    for parameter in extra:
        parameter.grad = torch.ones(2)  # rank 1 "used" one more tensor than rank 0
    try:
        _reduce_over_ranks(torch.tensor(1.0), {}, [p for p in model.parameters() if p.grad is not None] + extra)
        seen["mismatch"] = "not detected"
    except RankMismatchError as error:
        seen["mismatch"] = str(error)
    loss = torch.tensor(float("nan") if rank == 1 else 0.5)
    seen["nan_loss"] = _reduce_over_ranks(loss, {"acc": float(rank)}, [])
    seen["flyp_uneven"] = gathered_contrastive_gradients(5)  # shards of 3 and 2 pairs
    seen["flyp_even"] = gathered_contrastive_gradients(4)
    from open_clip.loss import ClipLoss

    images, texts = contrastive_pairs(4)
    part = distributed.shard_range(4)
    reference = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)
    seen["open_clip_loss"] = reference(images[part.start : part.stop], texts[part.start : part.stop], LOGIT_SCALE)
    torch.save(seen, f"{out}/rank{rank}.pt")


LOGIT_SCALE = 10.0


def contrastive_pairs(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = nn.functional.normalize(torch.randn(count, 8, generator=generator), dim=-1)
    return images, nn.functional.normalize(torch.randn(count, 8, generator=generator), dim=-1)


def gathered_contrastive_gradients(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's FLYP loss over its shard of ``count`` pairs, weighted as the engine weights it, and the
    gradients it sends back to the shard's embeddings through the gather."""
    from robustft.methods.flyp import local_contrastive_loss

    images, texts = contrastive_pairs(count)
    part = distributed.shard_range(count)
    image = images[part.start : part.stop].clone().requires_grad_()
    text = texts[part.start : part.stop].clone().requires_grad_()
    pairs, offset = distributed.gather_with_grad(torch.cat([image, text], dim=1))
    all_images, all_texts = pairs.split([8, 8], dim=1)
    loss = local_contrastive_loss(image, text, all_images, all_texts, LOGIT_SCALE, offset)
    loss = loss * distributed.batch_weight(count, distributed.rank(), WORLD)
    loss.backward()
    return loss.detach(), image.grad, text.grad


def test_cross_rank_mechanisms_on_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]

    torch.manual_seed(0)
    model, split = TinyClassifier(), tiny_split()
    from robustft.evaluate import predict
    from robustft.methods.saft import gradient_scores

    logits, labels = predict(model, split, torch.device("cpu"), batch_size=2)
    full_images, full_labels = split[list(range(len(split)))]
    scores = gradient_scores(model, ["backbone.1.weight", "head.weight"], [(full_images, full_labels)])
    for seen in ranks:
        # sharded inference (3 + 2 samples) gathered in order on every rank = one-process logits
        assert torch.allclose(seen["logits"], logits, atol=1e-6) and torch.equal(seen["labels"], labels)
        # SAFT scores from each rank's shard, all-reduced = scores of the whole split
        for name in scores:
            assert torch.allclose(seen["saft_scores"][name], scores[name], atol=1e-6), name
        assert "rank 0 has gradients for" in ranks[0]["mismatch"] and "rank 1 has" in ranks[1]["mismatch"]
        loss, logs = seen["nan_loss"]
        assert loss != loss and logs == {"acc": 0.5}  # a NaN on rank 1 reaches both ranks; logs averaged
    for name, tensor in ranks[0]["broadcast"].items():
        assert torch.equal(tensor, ranks[1]["broadcast"][name]), name
    same_seed, again, other_seed = ranks[0]["masks"]
    for draw, draw_rank1 in zip(same_seed, ranks[1]["masks"][0], strict=True):
        for name in draw:
            assert torch.equal(draw[name], draw_rank1[name]), name  # GMixout masks equal across ranks
    assert any(not torch.equal(same_seed[0][n], same_seed[1][n]) for n in same_seed[0])  # masks do resample
    assert any(not torch.equal(same_seed[0][n], other_seed[0][n]) for n in same_seed[0])  # and depend on the seed
    assert all(torch.equal(same_seed[2][n], again[2][n]) for n in same_seed[0])
    from robustft.methods.flyp import clip_contrastive_loss

    for count, key in ((5, "flyp_uneven"), (4, "flyp_even")):
        # FLYP's gathered loss: the ranks' mean is the 1-process loss over all pairs, and DDP's mean of the
        # gradients each rank gets through the gather is the 1-process gradient (the sizes 3 + 2 split unevenly)
        images, texts = (tensor.requires_grad_() for tensor in contrastive_pairs(count))
        expected = clip_contrastive_loss(images, texts, LOGIT_SCALE)
        expected.backward()
        loss = sum(seen[key][0] for seen in ranks) / WORLD
        assert torch.allclose(loss, expected.detach(), atol=1e-6), key
        for index, gradient in ((1, images.grad), (2, texts.grad)):
            gathered = torch.cat([seen[key][index] for seen in ranks]) / WORLD
            assert torch.allclose(gathered, gradient, atol=1e-6), key
    images, texts = contrastive_pairs(4)
    for seen in ranks:  # the same loss as open_clip's own ClipLoss(local_loss=True, gather_with_grad=True)
        unweighted = seen["flyp_even"][0] / distributed.batch_weight(4, seen["rank"], WORLD)
        assert torch.allclose(unweighted, seen["open_clip_loss"].detach(), atol=1e-6)


def test_two_process_fit_matches_one_process_run(tmp_path, digits_prepared):
    """``robustft fit --devices 2`` (torchrun, gloo) ends with the weights and scores of a 1-process run.

    GMixout with SGD: a method with extra state (masks, EMA anchor); SGD keeps the comparison tight.
    """
    options = {"p": 0.5, "k": 2, "ema": 0.5}
    single = demo_config(
        "gmixout",
        0,
        tmp_path,
        name="single",
        method_options=options,
        optim={"name": "sgd", "lr": 0.05},
        steps=6,
        checkpoint_every=3,
        log_every=1,
        progress=False,
        device="cpu",
    )
    single.data.batch_size = 16
    fit(single, log=quiet)  # prepared here, not the session fixture: on the CPU like the 2 processes
    raw = single.model_dump(mode="json") | {"name": "ddp"}
    raw["method"] = {"name": "gmixout", **options}
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(raw))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [sys.executable, "-m", "robustft", "fit", str(config), "--devices", "2"],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    one = load_state_dict_file(tmp_path / "single" / FINAL_CHECKPOINT)
    two = load_state_dict_file(tmp_path / "ddp" / FINAL_CHECKPOINT)
    assert one.keys() == two.keys()
    assert max((one[key] - two[key]).abs().max().item() for key in one) < 1e-5
    start = {key: value.cpu() for key, value in digits_prepared.model.state_dict().items()}
    assert max((one[key] - start[key]).abs().max().item() for key in one) > 1e-3  # training moved the weights
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("single", "ddp")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and len(losses[1]) == 6  # one log line, from rank 0
    scores = [
        json.loads((tmp_path / name / "results.json").read_text())["methods"]["gmixout"] for name in ("single", "ddp")
    ]
    assert scores[1]["id"] == pytest.approx(scores[0]["id"], abs=0.3)  # sharded evaluation, gathered
    assert scores[1]["ood"] == pytest.approx(scores[0]["ood"], abs=0.3)


def flyp_config(root: Path, world: int):
    """test_ddp's FLYP run (the tiny random OpenCLIP model, SGD, 4 steps, global batch 8) without loader workers."""
    from test_ddp import run_config

    config = run_config(root, world, "flyp", "flyp", "ddp", 1)
    config.data.num_workers = 0
    return config


def _flyp_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    fit(flyp_config(Path(root), WORLD), log=quiet)


@pytest.mark.slow  # a 1-process and a 2-process FLYP fit of a tiny CLIP
def test_flyp_on_two_processes_equals_one_process(tmp_path):
    """FLYP's negatives are the whole global batch's on every rank (the embeddings gathered with their gradients),
    so 2 gloo processes end with the 1-process weights, as the per-sample methods do (docs/distributed.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the same float reductions
    try:
        fit(flyp_config(tmp_path, 1), log=quiet)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_flyp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    one = load_state_dict_file(tmp_path / "world1" / "flyp" / FINAL_CHECKPOINT)
    two = load_state_dict_file(tmp_path / "world2" / "flyp" / FINAL_CHECKPOINT)
    difference = max((one[key] - two[key]).abs().max().item() for key in one)
    print(f"flyp: max |2 processes - 1 process| = {difference:.3g}")
    assert one.keys() == two.keys() and difference < 1e-5
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / world / "flyp" / "metrics.jsonl").read_text().splitlines()]
        for world in ("world1", "world2")
    ]  # the global batch's contrastive loss: with each rank's own negatives only it would be smaller
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-5)
