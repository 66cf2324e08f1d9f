"""Masked-image counterfactual fine-tuning: teacher, loss, presets, equivalence to FT, run and CLI."""

from __future__ import annotations

import copy
import typing

import pytest
import torch
from typer.testing import CliRunner

from robustft.backbones.classifier import ImageClassifier
from robustft.cli import app
from robustft.config import ConfigError
from robustft.demo import demo_config
from robustft.methods import get_method
from robustft.methods.base import Method
from robustft.methods.masked_counterfactual import PRESETS, MaskedCounterfactualConfig, PresetName
from robustft.runner import FINAL_CHECKPOINT, fit


def quiet(message: str) -> None:
    pass


def _method(**options) -> Method:
    cls = get_method("masked_counterfactual")
    return cls(cls.config_cls(**options))


def _steps(method: Method, model, ctx, batches, sgd: bool = False):
    """Engine-like updates (AdamW, or SGD whose update is proportional to the gradient); returns the last logs."""
    model = method.prepare(model, ctx)
    groups = method.parameter_groups(model, 0.1)
    optimizer = torch.optim.SGD(groups, lr=0.1) if sgd else torch.optim.AdamW(groups, lr=1e-3)
    model.train()
    logs = {}
    for step, batch in enumerate(batches):
        loss, logs = method.loss(model, batch, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, logs


def _train_batches(prepared, n: int = 2, size: int = 16):
    split = prepared.ctx.splits["train"]
    return [split[list(range(i * size, (i + 1) * size))] for i in range(n)]


def test_teacher_is_frozen_outside_the_optimiser_and_the_final_model(digits_prepared, tmp_path):
    ctx = digits_prepared.ctx.for_run(tmp_path, 0, quiet)
    zero_shot = {k: v.clone() for k, v in digits_prepared.model.state_dict().items()}
    method = _method()
    model, optimizer, logs = _steps(method, copy.deepcopy(digits_prepared.model), ctx, _train_batches(digits_prepared))
    teacher = method.teacher
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, zero_shot[k]) for k, v in teacher.state_dict().items())
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised.isdisjoint(id(p) for p in teacher.parameters())
    assert not torch.equal(model.backbone.blocks[0].attn.qkv.weight, zero_shot["backbone.blocks.0.attn.qkv.weight"])
    assert set(logs) == {"loss_task", "loss_distill", "masked"} and logs["loss_distill"] > 0
    assert 0 < logs["masked"] < 1
    final = method.finalize(model, ctx)
    assert type(final) is ImageClassifier and set(final.state_dict()) == set(zero_shot)
    assert method.teacher is None


@pytest.mark.parametrize("share", [True, False])
def test_beta_zero_update_equals_finetune(digits_prepared, tmp_path, share):
    ctx = digits_prepared.ctx.for_run(tmp_path, 0, quiet)
    batches = _train_batches(digits_prepared)
    torch.manual_seed(0)
    finetuned, _, _ = _steps(get_method("finetune")(), copy.deepcopy(digits_prepared.model), ctx, batches, True)
    ours, _, logs = _steps(
        _method(beta=0.0, share_cam_forward=share), copy.deepcopy(digits_prepared.model), ctx, batches, True
    )
    assert logs["loss_distill"] > 0  # the term is computed, only weighted by zero
    for (name, a), b in zip(finetuned.named_parameters(), ours.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    moved = _steps(_method(beta=30.0), copy.deepcopy(digits_prepared.model), ctx, batches, True)[0]
    # beta > 0 moves the backbone differently (the head gets no distillation gradient)
    assert not torch.allclose(moved.backbone.norm.weight, ours.backbone.norm.weight, atol=1e-6)


def test_loss_is_task_plus_beta_times_distillation(digits_prepared, tmp_path):
    ctx = digits_prepared.ctx.for_run(tmp_path, 0, quiet)
    images, labels = _train_batches(digits_prepared, 1)[0]
    method = _method(beta=7.0)
    model = method.prepare(copy.deepcopy(digits_prepared.model), ctx)
    torch.manual_seed(3)
    loss, logs = method.loss(model, (images, labels), 0)
    assert loss.item() == pytest.approx(logs["loss_task"].item() + 7.0 * logs["loss_distill"].item(), rel=1e-5)
    assert logs["loss_task"].item() == pytest.approx(
        torch.nn.functional.cross_entropy(model(images), labels).item(), rel=1e-4
    )


def test_presets_and_explicit_options():
    assert (
        MaskedCounterfactualConfig().model_dump() | {}
        == MaskedCounterfactualConfig(preset="obj_mask_single_fill").model_dump()
    )
    default = MaskedCounterfactualConfig()
    assert (default.mask, default.fill, default.threshold, default.beta) == ("object", "single", 0.3, 30.0)
    context = MaskedCounterfactualConfig(preset="ctx_mask_multi_fill")
    assert (context.mask, context.fill, context.threshold) == ("context", "multi", 0.3)
    random = MaskedCounterfactualConfig(preset="rand_mask_no_fill", rate=0.4)
    assert (random.mask, random.fill, random.rate) == ("random", "none", 0.4)
    with pytest.raises(ValueError):
        MaskedCounterfactualConfig(preset="obj_mask_magic_fill")
    assert set(PRESETS) == set(typing.get_args(PresetName))


def test_fit_writes_a_plain_student(digits_prepared, tmp_path):
    config = demo_config("masked_counterfactual", 0, tmp_path, steps=2, progress=False)
    results = fit(config, log=quiet, prepared=digits_prepared)
    entry = results["methods"]["masked_counterfactual"]
    assert entry["steps"] == 2 and entry["ood_avg"] > 10
    from robustft.backbones.checkpoint_files import load_state_dict_file

    saved = load_state_dict_file(tmp_path / "masked_counterfactual" / FINAL_CHECKPOINT)
    assert set(saved) == set(digits_prepared.model.state_dict())
    lines = (tmp_path / "masked_counterfactual" / "metrics.jsonl").read_text().splitlines()
    assert "loss_distill" in lines[-1]

    out = tmp_path / "cams"
    result = CliRunner().invoke(
        app, ["cam", "id_test", "--run", str(tmp_path / "masked_counterfactual"), "--out", str(out), "--count", "3"]
    )
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    bad = CliRunner().invoke(app, ["cam", "no_such_split", "--run", str(tmp_path / "masked_counterfactual")])
    assert bad.exit_code != 0


def test_cam_command_on_an_image_file(digits_prepared, tmp_path):
    from PIL import Image

    fit(demo_config("zeroshot", 0, tmp_path, progress=False), log=quiet, prepared=digits_prepared)
    picture = tmp_path / "digit.png"
    Image.fromarray(digits_prepared.ctx.splits["id_test"].images[0].permute(1, 2, 0).numpy()).save(picture)
    out = tmp_path / "cams"
    result = CliRunner().invoke(app, ["cam", str(picture), "--run", str(tmp_path / "zeroshot"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.glob("*.png")] == ["cam_000.png"]


def test_non_vit_model_is_a_config_error(tmp_path, digits_prepared):
    model = ImageClassifier(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(ConfigError, match="masked_counterfactual"):
        _method().prepare(model, digits_prepared.ctx.for_run(tmp_path, 0, quiet))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_shared_cam_forward_back_propagates_into_the_weights_only(digits_prepared, tmp_path):
    """The CAM forward the task loss reuses needs no image gradient: the patch embedding gets none."""
    ctx = digits_prepared.ctx.for_run(tmp_path, 0, quiet)
    method = _method()
    model = method.prepare(copy.deepcopy(digits_prepared.model), ctx).train()
    assert method.share_forward
    image_gradients = []
    patch_projection = model.backbone.patch_embed.proj
    handle = patch_projection.register_full_backward_hook(
        lambda module, grad_in, grad_out: image_gradients.append(grad_in[0])
    )
    loss, _ = method.loss(model, _train_batches(digits_prepared, 1)[0], 0)
    loss.backward()
    handle.remove()
    assert len(image_gradients) == 2  # the shared clean forward and the counterfactual forward
    assert all(gradient is None for gradient in image_gradients)
    assert patch_projection.weight.grad is not None and patch_projection.weight.grad.abs().sum() > 0


def test_class_token_step_equals_the_full_forward_step(digits_prepared, tmp_path, monkeypatch):
    """The class-token forwards (CAM, teacher, student) give the loss and gradients of full forwards (to ~1e-5)."""
    import robustft.cam as cam_module
    import robustft.methods.masked_counterfactual as method_module
    from robustft.cam import gradient_rollout

    ctx = digits_prepared.ctx.for_run(tmp_path, 0, quiet)
    batch = _train_batches(digits_prepared, 1, 32)[0]

    def step() -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
        method = _method()
        model = method.prepare(copy.deepcopy(digits_prepared.model), ctx).train()
        with torch.no_grad():  # the student moves away from the teacher, so the distillation term is not zero
            model.backbone.blocks[-1].mlp.fc1.weight.add_(0.05)
        torch.manual_seed(5)
        loss, logs = method.loss(model, batch, 0)
        loss.backward()
        return loss.detach(), logs, [p.grad for p in model.parameters()]

    loss, logs, grads = step()
    with monkeypatch.context() as patch:  # the path before: the model's own forwards, the full L x L rollout
        patch.setattr(cam_module, "class_token_logits", lambda model, images: model(images))
        patch.setattr(cam_module, "class_token_relevance", lambda a, g: gradient_rollout(a, g)[:, 0])
        patch.setattr(method_module, "class_token_embedding", lambda model, images: model.image_embedding(images))
        full_loss, full_logs, full_grads = step()
    assert logs["masked"] == full_logs["masked"] and logs["loss_distill"] > 0  # the same patches masked
    torch.testing.assert_close(loss, full_loss, atol=1e-5, rtol=1e-5)
    for ours, full in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-4)
