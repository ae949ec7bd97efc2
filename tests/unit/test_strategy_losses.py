"""The adaptation losses as modules (TLlib-style): each lowers under one step, and the special properties
each is built on hold — gradient reversal flips the gradient, L2-SP is zero at the source weights,
frozen groups stay bit-identical, the name grammar composes bases and objectives."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adaptflow import strategies
from adaptflow.models import ModelConfig, create, load
from adaptflow.strategies import needs_labels, parse, uses_pool, uses_source
from adaptflow.strategies.coral import CorrelationAlignmentLoss
from adaptflow.strategies.dann import DomainAdversarialLoss, DomainDiscriminator, GradientReversal, schedule
from adaptflow.strategies.fixmatch import PseudoLabelLoss
from adaptflow.strategies.l2sp import L2SP
from adaptflow.strategies.mmd import MultiKernelMMD
from adaptflow.strategies.transfer import parameter_groups, set_trainable
from tests.unit.test_strategies import SOURCE, make_ctx  # noqa: F401  (fixture)


def _one_step_lowers(loss_fn, *tensors: torch.Tensor, module: nn.Module | None = None, lr: float = 0.05) -> None:
    params = [t.requires_grad_() for t in tensors] + (list(module.parameters()) if module is not None else [])
    opt = torch.optim.SGD(params, lr=lr)
    before = loss_fn()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_fn()
    assert after.item() < before.item()


def test_coral_step_lowers_and_is_zero_for_equal_batches():
    torch.manual_seed(0)
    fs, ft = torch.randn(32, 8), torch.randn(32, 8) * 3 + 1
    loss = CorrelationAlignmentLoss()
    _one_step_lowers(lambda: loss(fs, ft), ft)
    assert loss(fs.detach(), fs.detach()).item() == pytest.approx(0.0, abs=1e-7)


def test_mmd_step_lowers_and_is_zero_for_equal_batches():
    torch.manual_seed(0)
    fs, ft = torch.randn(32, 8), torch.randn(32, 8) + 2
    loss = MultiKernelMMD()
    _one_step_lowers(lambda: loss(fs, ft), ft, lr=0.5)
    assert loss(fs.detach(), fs.detach()).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["coral", "mmd"])
def test_alignment_losses_run_in_float32_under_autocast(name, make_ctx):  # noqa: F811
    # under bf16 autocast the features arrive in bf16; the loss on them is the float32 loss of those values
    obj = getattr(strategies, name).make(make_ctx(SOURCE, epochs=1), None)
    torch.manual_seed(0)
    fs, ft = torch.randn(64, 32).bfloat16(), (torch.randn(64, 32) * 2 + 1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = obj.align(fs, ft, 0.5)
    assert amp.dtype == torch.float32
    assert torch.equal(amp, obj.align(fs.float(), ft.float(), 0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_domain_adversarial_loss_makes_no_host_sync():
    fs, ft = torch.randn(32, 8, device="cuda"), torch.randn(32, 8, device="cuda")
    loss = DomainAdversarialLoss(DomainDiscriminator(8, hidden=16)).cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss(fs, ft, 1.0).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_domain_adversarial_discriminator_step_lowers():
    torch.manual_seed(0)
    fs, ft = torch.randn(32, 8) + 1, torch.randn(32, 8) - 1
    loss = DomainAdversarialLoss(DomainDiscriminator(8, hidden=16)).eval()  # no dropout noise in the comparison
    _one_step_lowers(lambda: loss(fs, ft, 1.0), module=loss.discriminator, lr=0.1)


def test_gradient_reversal_flips_the_gradient_sign():
    x = torch.randn(5, 3, requires_grad=True)
    (GradientReversal()(x, 0.5) * torch.arange(3.0)).sum().backward()
    assert torch.allclose(x.grad, -0.5 * torch.arange(3.0).expand(5, 3))
    y = torch.randn(4, requires_grad=True)
    out = GradientReversal()(y, 1.0)
    assert torch.equal(out, y)  # identity forward


def test_dann_schedule_ramps_from_zero_to_the_weight():
    assert schedule(0.0, 2.0) == 0.0
    assert 0 < schedule(0.1, 2.0) < schedule(0.5, 2.0) < schedule(1.0, 2.0) <= 2.0
    assert schedule(1.0, 2.0) == pytest.approx(2.0, rel=1e-3)


def test_pseudo_label_loss_masks_unconfident_and_lowers():
    weak = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.0]])  # confident / not
    strong = torch.zeros(2, 3)
    loss = PseudoLabelLoss(threshold=0.9)
    value, rate = loss(weak, strong)
    assert rate.item() == pytest.approx(0.5)
    assert value.item() == pytest.approx(torch.nn.functional.cross_entropy(strong[:1], torch.tensor([0])).item() / 2)
    _one_step_lowers(lambda: loss(weak, strong)[0], strong, lr=1.0)
    nothing, zero_rate = PseudoLabelLoss(0.99)(torch.zeros(3, 3), torch.randn(3, 3))
    assert nothing.item() == 0.0 and zero_rate.item() == 0.0


def test_l2sp_is_zero_at_the_source_and_grows_away_from_it():
    torch.manual_seed(0)
    model = create(ModelConfig("test_resnet", 1, 16, ["a", "b"]))
    ref = {n: p.detach().clone() for n, p in model.named_parameters() if "fc" not in n}  # the head is "new"
    penalty = L2SP(ref, alpha=1.0, beta=0.0)
    assert penalty(model)[0].item() == 0.0
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "fc" not in n).add_(0.1)
    assert penalty(model)[0].item() > 0
    only_new = L2SP({}, alpha=0.0, beta=1.0)(model)[0].item()
    assert only_new == pytest.approx(0.5 * sum(p.pow(2).sum().item() for p in model.parameters()), rel=1e-5)


def test_partial_keeps_frozen_groups_bit_identical(make_ctx, source_checkpoint):  # noqa: F811
    ctx = make_ctx(SOURCE, epochs=2, lr=0.05, partial={"freeze_groups": 2})
    adapted = strategies.get("partial")(ctx)
    src, _ = load(source_checkpoint)
    frozen = {n for g in parameter_groups(src)[:2] for n in g}
    after, before = adapted.model.state_dict(), src.state_dict()
    # Parameters *and* BatchNorm statistics of the frozen groups are untouched; later groups moved.
    prefixes = {n.rsplit(".", 1)[0] for n in frozen}
    for name, tensor in before.items():
        if name.rsplit(".", 1)[0] in prefixes:
            assert torch.equal(after[name], tensor), name
    moved = [n for n in parameter_groups(src)[-2] if not torch.equal(after[n], before[n])]
    assert moved


def _last_epoch_wins(ctx) -> None:
    """Choose the last epoch's weights (a scorer whose score grows with every call), so a test reads trained
    weights, not the source model that epoch 0 offers."""
    calls = iter(range(10**6))
    ctx.scorer = lambda: ((lambda model: {"score": float(next(calls)), "tiebreak": 0.0}), "test: the last epoch")


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.state_dict().items() if n.endswith(("running_mean", "running_var"))}


def test_bn_frozen_keeps_every_source_statistic(make_ctx, source_checkpoint):  # noqa: F811
    ctx = make_ctx(SOURCE, epochs=2, lr=0.05, bn="frozen")
    _last_epoch_wins(ctx)
    adapted = strategies.get("finetune")(ctx)
    src, _ = load(source_checkpoint)
    before, after = _bn_stats(src), _bn_stats(adapted.model)
    assert before and all(torch.equal(after[n], t) for n, t in before.items())
    assert any(not torch.equal(adapted.model.state_dict()[n], t) for n, t in src.state_dict().items() if n.endswith("weight"))


def test_bn_adabn_ends_with_the_targets_own_statistics(make_ctx, source_checkpoint):  # noqa: F811
    """AdaBN: the statistics are re-estimated on the target images (labeled + pool) for the final weights —
    not the source's, and a second re-estimation on the same images changes nothing."""
    from adaptflow.data import store
    from adaptflow.training import recalibrate_bn

    ctx = make_ctx(SOURCE, epochs=1, lr=0.05, bn="adabn")
    _last_epoch_wins(ctx)
    adapted = strategies.get("finetune")(ctx)
    src, _ = load(source_checkpoint)
    after = _bn_stats(adapted.model)
    assert any(not torch.equal(after[n], t) for n, t in _bn_stats(src).items())
    again = copy.deepcopy(adapted.model)
    recalibrate_bn(again, store.concat([ctx.labeled.images, ctx.pool.images]))
    assert all(torch.allclose(_bn_stats(again)[n], t, atol=1e-5) for n, t in after.items())


def test_gradual_unfreeze_keeps_all_but_the_head_bit_identical_before_its_first_milestone(make_ctx, source_checkpoint):  # noqa: F811
    ctx = make_ctx(SOURCE, epochs=1, lr=0.05, gradual_unfreeze={"milestones": [1, 2]})
    _last_epoch_wins(ctx)
    adapted = strategies.get("gradual_unfreeze")(ctx)
    src, _ = load(source_checkpoint)
    head = {n for n, p in adapted.model.named_parameters() if any(p is q for q in adapted.model.get_classifier().parameters())}
    head_prefixes = {n.rsplit(".", 1)[0] for n in head}
    after, before = adapted.model.state_dict(), src.state_dict()
    for name, tensor in before.items():  # parameters and BatchNorm statistics of every group but the head
        if name.rsplit(".", 1)[0] not in head_prefixes:
            assert torch.equal(after[name], tensor), name
    assert any(not torch.equal(after[n], before[n]) for n in head)


def test_set_trainable_never_freezes_the_head():
    model = create(ModelConfig("test_resnet", 1, 16, ["a", "b"]))
    set_trainable(model, 99)
    head = {id(p) for p in model.get_classifier().parameters()}
    assert all(p.requires_grad == (id(p) in head) for p in model.parameters())


@pytest.mark.parametrize("name, base, objectives", [
    ("finetune", "finetune", []), ("dann", "finetune", ["dann"]), ("dann+fixmatch", "finetune", ["dann", "fixmatch"]),
    ("partial+coral", "partial", ["coral"]), ("gradual_unfreeze+l2sp", "gradual_unfreeze", ["l2sp"]),
])
def test_names_compose(name, base, objectives):
    assert parse(name) == (base, objectives)


def test_label_needs():
    assert needs_labels("finetune") and needs_labels("scratch") and needs_labels("l2sp")
    assert not needs_labels("dann") and not needs_labels("fixmatch") and not needs_labels("source_only")
    assert uses_source("dann+fixmatch") and not uses_source("fixmatch") and uses_pool("fixmatch")


@pytest.mark.parametrize("name", ["dann", "coral", "mmd", "fixmatch", "dann+fixmatch"])
def test_label_free_strategies_run_without_target_labels(name, make_ctx):  # noqa: F811
    ctx = make_ctx(SOURCE, epochs=1, steps_per_epoch=2)
    ctx = copy.copy(ctx)
    ctx.labeled = ctx.labeled.__class__(ctx.labeled.images[:0], ctx.labeled.labels[:0], ctx.labeled.classes)
    adapted = strategies.get(name)(ctx)
    assert adapted.selection.startswith("label-free")
    assert [h["epoch"] for h in adapted.history] == [0, 1]
    assert all("sel_im" in h for h in adapted.history)
