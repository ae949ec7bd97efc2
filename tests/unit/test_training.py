"""adaptflow.training.fit: loss goes down, the returned model holds the best-val weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaptflow.data.store import Split
from adaptflow.data.transforms import build_pipeline
from adaptflow.models import ModelConfig, create
from adaptflow.training import accuracy, fit, predict_logits

CPU = torch.device("cpu")


def bright_dark(n: int, seed: int, flip: bool = False) -> Split:
    """2 classes of 8×8 images: dark (0) and bright (1); ``flip`` swaps the labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    bright = rng.integers(180, 256, (n, 1, 8, 8))
    dark = rng.integers(0, 60, (n, 1, 8, 8))
    x = np.where(y[:, None, None, None] == 1, bright, dark).astype(np.uint8)
    return Split(x, (1 - y if flip else y).astype(np.int64), ["dark", "bright"])


def _model(seed=0):
    torch.manual_seed(seed)
    return create(ModelConfig("test_resnet", 1, 8, ["dark", "bright"]))


def _fit(model, train, val, **kw):
    args = dict(epochs=4, batch_size=8, transform=build_pipeline([]), seed=0, dev=CPU)
    args.update(kw)
    return fit(model, [{"params": model.parameters(), "lr": 1e-2}], train, val, **args)


def _val(model, val):
    logits = predict_logits(model, val.images)
    return accuracy(logits, val.labels), float(F.cross_entropy(logits, torch.from_numpy(val.labels)))


def test_fit_learns_separable_problem():
    train, val = bright_dark(16, 0), bright_dark(8, 1)
    model = _model()
    res = _fit(model, train, val)
    losses = [h["train_loss"] for h in res.history]
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    assert losses[-1] < losses[0]
    assert all(math.isfinite(v) for v in losses)
    assert res.best_val_acc == 1.0
    acc, _ = _val(model, val)
    assert acc == res.best_val_acc
    assert not model.training


def test_fit_restores_best_val_weights():
    # val labels are the opposite of train labels: training makes val worse, so the best epoch is early
    train, val = bright_dark(16, 0), bright_dark(8, 1, flip=True)
    model = _model()
    res = _fit(model, train, val, epochs=4, evaluate_start=True)
    assert res.best_epoch < 4
    best = next(h for h in res.history if h["epoch"] == res.best_epoch)
    assert best["val_acc"] == max(h["val_acc"] for h in res.history)
    acc, loss = _val(model, val)
    assert acc == res.best_val_acc == best["val_acc"]
    assert loss == pytest.approx(best["val_loss"], rel=1e-5)
    last = res.history[-1]
    assert last["val_acc"] < res.best_val_acc  # the restore made a difference


class _Diverges(torch.nn.Module):
    """An objective whose loss turns NaN ``after`` a share of training (a learning rate far too high)."""

    def __init__(self, after: float = 0.25, value: float = float("nan")):
        super().__init__()
        self.after, self.value = after, value

    def forward(self, model, progress):
        return torch.tensor(self.value if progress >= self.after else 0.0), {}  # 0.25: from epoch 2 (2 steps of 8)


def test_fit_stops_where_the_loss_diverged_and_keeps_the_last_good_checkpoint(caplog):
    train, val = bright_dark(16, 0), bright_dark(8, 1)
    model = _model()
    res = _fit(model, train, val, epochs=4, objectives=[_Diverges()])
    assert [h["epoch"] for h in res.history] == [1, 2] and res.diverged_at == 2  # stopped there, not two epochs of NaN more
    assert math.isfinite(res.history[0]["train_loss"]) and not math.isfinite(res.history[1]["train_loss"])
    assert res.best_epoch == 1 and all(torch.isfinite(p).all() for p in model.parameters())  # epoch 1's weights, not NaN
    assert "training diverged, so it stopped there; the checkpoint is epoch 1's" in caplog.text
    with pytest.raises(RuntimeError, match="before any checkpoint could be kept: training diverged; lower the learning rate"):
        _fit(_model(), train, val, epochs=2, objectives=[_Diverges(after=0.0, value=float("inf"))])


def test_evaluate_start_records_epoch_zero():
    train, val = bright_dark(8, 0), bright_dark(6, 1)
    model = _model()
    with torch.no_grad():
        acc0, loss0 = _val(model, val)
    res = _fit(model, train, val, epochs=2, evaluate_start=True)
    assert [h["epoch"] for h in res.history] == [0, 1, 2]
    first = res.history[0]
    assert math.isnan(first["train_loss"])
    assert first["val_acc"] == acc0
    assert first["val_loss"] == pytest.approx(loss0, rel=1e-5)


def test_without_evaluate_start_no_epoch_zero():
    train, val = bright_dark(8, 0), bright_dark(6, 1)
    res = _fit(_model(), train, val, epochs=1)
    assert [h["epoch"] for h in res.history] == [1]
    assert res.best_epoch == 1


def test_fit_is_deterministic_for_a_seed():
    train, val = bright_dark(12, 0), bright_dark(6, 1)
    t = build_pipeline([{"name": "RandomAffine", "degrees": 10}])
    a, b = _model(), _model()
    ra = _fit(a, train, val, epochs=2, transform=t)
    rb = _fit(b, train, val, epochs=2, transform=t)
    assert [h["train_loss"] for h in ra.history] == pytest.approx([h["train_loss"] for h in rb.history], rel=1e-5)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5)


def test_odd_batch_of_one_is_skipped():
    # 9 images, batch 4 → the last batch has one image; BatchNorm must not see it
    train, val = bright_dark(9, 0), bright_dark(4, 1)
    res = _fit(_model(), train, val, epochs=1, batch_size=4)
    assert math.isfinite(res.history[0]["train_loss"])


def test_batches_from_no_images_is_refused_not_an_endless_wait():
    from adaptflow.data.files import DataError
    from adaptflow.training import stream

    empty = Split(np.zeros((0, 1, 8, 8), np.uint8), np.zeros(0, np.int64), ["0", "1"])
    with pytest.raises(DataError, match="no training images to draw batches from"):
        next(stream(empty, 4, np.random.default_rng(0)))
    three = Split(np.zeros((3, 1, 8, 8), np.uint8), np.zeros(3, np.int64), ["0", "1"])
    with pytest.raises(DataError, match="batch size 1: BatchNorm needs at least 2 images"):  # each batch skipped
        next(stream(three, 1, np.random.default_rng(0)))
    assert len(next(stream(three, 2, np.random.default_rng(0)))[1]) == 2


def test_predict_logits_and_accuracy():
    model = _model().eval()
    images = bright_dark(7, 0).images
    full = predict_logits(model, images, batch_size=512)
    chunked = predict_logits(model, images, batch_size=3)
    assert full.shape == (7, 2) and full.dtype == torch.float32
    assert torch.allclose(full, chunked, atol=1e-5)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    assert math.isnan(accuracy(torch.zeros(0, 2), np.array([], dtype=np.int64)))


class _BackwardFails(torch.autograd.Function):
    """Identity whose backward raises like inductor's stride check did on the lent H100 (torch 2.11)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("expected size 512==512, stride 9==1 at dim=1\nError in op: convolution_backward")


def _failing_compiler(calls: list, fail_at: int = 1, error: type[BaseException] | None = None):
    """A stand-in for torch.compile whose compiled model runs the model, and fails from its ``fail_at``-th
    call on: in backward (like inductor did), or in forward with ``error``."""

    def compile(model, **_):
        def compiled(x):
            calls.append(len(x))
            if len(calls) < fail_at:
                return model(x)
            if error is not None:
                raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
            return _BackwardFails.apply(model(x))

        return compiled

    return compile


def test_a_compiled_step_that_fails_is_retried_eagerly_and_training_goes_on(monkeypatch, caplog):
    from adaptflow import accel

    calls: list = []
    monkeypatch.setattr(accel.torch, "compile", _failing_compiler(calls))
    train, val = bright_dark(16, 0), bright_dark(8, 1)
    model = _model()
    with caplog.at_level("WARNING", logger="adaptflow.accel"):
        res = _fit(model, train, val, rt=accel.runtime(device="cpu", compile=True))
    assert calls == [8]  # the compiled model ran once; every later step, the retry included, ran eagerly
    assert res.compile_fell_back.startswith("AssertionError: expected size 512==512")
    assert "going on eagerly" in caplog.text
    assert len(res.history) == 4 and res.best_val_acc == 1.0  # trained all epochs, and learned


@pytest.mark.parametrize("fail_at", [1, 5])  # the first step (a first compile), a later one (a recompile)
def test_a_run_that_fell_back_is_the_eager_run(monkeypatch, fail_at):
    # the failed attempt's forward updated BatchNorm's running statistics; they are put back before the
    # retry, so the run ends with exactly the weights and statistics of a run that never compiled
    from adaptflow import accel

    train, val = bright_dark(16, 0), bright_dark(8, 1)
    eager = _model()
    _fit(eager, train, val, rt=accel.runtime(device="cpu"))
    calls: list = []
    monkeypatch.setattr(accel.torch, "compile", _failing_compiler(calls, fail_at))
    fell_back = _model()
    assert _fit(fell_back, train, val, rt=accel.runtime(device="cpu", compile=True)).compile_fell_back
    assert len(calls) == fail_at
    a, b = eager.state_dict(), fell_back.state_dict()
    assert any("running_mean" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_running_out_of_memory_in_a_compiled_step_is_raised_not_blamed_on_the_compiler(monkeypatch):
    from adaptflow import accel

    calls: list = []
    monkeypatch.setattr(accel.torch, "compile", _failing_compiler(calls, error=torch.OutOfMemoryError))
    train, val = bright_dark(16, 0), bright_dark(8, 1)
    with pytest.raises(torch.OutOfMemoryError):
        _fit(_model(), train, val, rt=accel.runtime(device="cpu", compile=True))
    assert calls == [8]


def test_a_failing_step_without_the_compiler_is_raised_not_retried():
    from adaptflow.training import Objective

    class Broken(Objective):
        calls = 0

        def forward(self, model, progress):
            Broken.calls += 1
            raise RuntimeError("objective bug")

    train, val = bright_dark(16, 0), bright_dark(8, 1)
    with pytest.raises(RuntimeError, match="objective bug"):
        _fit(_model(), train, val, objectives=[Broken()])
    assert Broken.calls == 1


def test_a_step_that_fails_eagerly_too_raises_the_eager_error(monkeypatch):
    from adaptflow import accel
    from adaptflow.training import Objective

    class Broken(Objective):
        def forward(self, model, progress):
            raise RuntimeError("objective bug")

    monkeypatch.setattr(accel.torch, "compile", _failing_compiler([]))
    train, val = bright_dark(16, 0), bright_dark(8, 1)
    with pytest.raises(RuntimeError, match="objective bug"):
        _fit(_model(), train, val, objectives=[Broken()], rt=accel.runtime(device="cpu", compile=True))


def test_recalibrate_bn_averages_the_statistics_of_the_given_images():
    from adaptflow.training import recalibrate_bn

    images = bright_dark(9, 0).images  # batches of 4, 4 and a last one of 1, which BatchNorm cannot use
    means = []
    for bs in (4, 8):
        model = _model()
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        momenta = [m.momentum for m in bns]
        recalibrate_bn(model, images, batch_size=bs)
        assert not model.training and [m.momentum for m in bns] == momenta
        assert all(int(m.num_batches_tracked) == 8 // bs for m in bns)
        means.append(bns[0].running_mean.clone())
    # equal batches: the mean of their means is the mean of all 8 images, whatever the batch size
    assert torch.allclose(means[0], means[1], atol=1e-5)
    assert not torch.allclose(means[0], torch.zeros_like(means[0]))


@pytest.mark.parametrize("channels_last", [False, True])
def test_fit_steps_with_fused_adamw_as_the_per_tensor_loop_would(channels_last, monkeypatch):
    """fit asks for a fused AdamW. The fused CPU kernel assumes each gradient and state tensor has its
    parameter's layout: for a model placed as fit places it (``rt.place``, channels-last included) and
    gradients as autograd lays them out, three fused steps match torch's per-tensor loop."""
    import copy

    from adaptflow.accel import runtime

    real = torch.optim.AdamW
    rt = runtime(device="cpu", channels_last=channels_last)
    model = rt.place(_model())
    twin = copy.deepcopy(model)
    x = torch.randn(8, 1, 8, 8).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    y = torch.randint(0, 2, (8,))
    opts = [real(m.parameters(), lr=1e-2, weight_decay=1e-4, fused=fused) for m, fused in ((model, True), (twin, None))]
    for _ in range(3):  # the same gradients, as autograd laid them out, for both (Adam amplifies rounding in them)
        for opt in opts:
            opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for a, b in zip(model.parameters(), twin.parameters()):
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
    moved = [float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), _model().parameters())]
    assert max(moved) > 1e-3  # the steps did move the weights
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    asked = []
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: asked.append(kw.get("fused")) or real(*a, **kw))
    _fit(_model(), bright_dark(16, 0), bright_dark(8, 1), epochs=1)
    assert asked == [True]


def test_a_compiled_step_that_fails_in_one_of_several_processes_is_raised_not_retried(monkeypatch, caplog):
    # an eager retry in one process would draw batches and gather features the others do not: the processes
    # would part, so the run stops with the error and says how to go on
    from adaptflow import accel, training

    calls: list = []
    monkeypatch.setattr(accel.torch, "compile", _failing_compiler(calls))
    monkeypatch.setattr(training.distributed, "world", lambda: 2)  # (no process group: collectives stay no-ops)
    train, val = bright_dark(16, 0), bright_dark(8, 1)
    with caplog.at_level("ERROR", logger="adaptflow.training"), pytest.raises(AssertionError, match="expected size 512==512"):
        _fit(_model(), train, val, rt=accel.runtime(device="cpu", compile=True))
    assert calls == [8]
    assert "cannot retry it eagerly in step: run with ADAPTFLOW_COMPILE=0" in caplog.text


def test_training_ends_at_its_next_step_when_the_run_is_stopping():
    from adaptflow import accel, stopping

    train, val = bright_dark(16, 0), bright_dark(8, 1)
    stopping.request()
    try:
        with pytest.raises(stopping.Stopped, match="stopped, the run is stopping"):
            _fit(_model(), train, val, rt=accel.runtime(device="cpu"))
    finally:
        stopping.clear()
    assert _fit(_model(), train, val, rt=accel.runtime(device="cpu")).best_val_acc == 1.0
