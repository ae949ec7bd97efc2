"""One process of a training run, alone or under ``torchrun``, for tests/unit/test_distributed.py.

``python dist_worker.py OUT`` (alone) or ``torchrun --standalone --nproc_per_node 2 dist_worker.py OUT``: each
process writes ``OUT/rank<R>.pt`` with what it trained and the batches it read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from adaptflow import distributed
from adaptflow.accel import runtime
from adaptflow.data.store import Rows, Split
from adaptflow.models import ModelConfig, create
from adaptflow.training import Objective, batches, fit, predict_logits, stream

SIDE = 8


def split(n: int, seed: int) -> Split:
    """n images in 3 classes whose brightness tells the class; the label of image i is its class."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3).astype(np.int64)
    images = np.clip(40 + 80 * labels[:, None, None, None] + rng.integers(-30, 31, (n, 1, SIDE, SIDE)), 0, 255).astype(np.uint8)
    return Split(images, labels, ["a", "b", "c"])


def plain_net() -> nn.Module:
    """No BatchNorm, no dropout: one process with batch B and two with B/2 each compute the same gradient."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


class Spread(Objective):
    """A statistic of the whole unlabeled batch (the variance of its outputs), as CORAL's covariance is:
    every process's outputs gathered first, so that several processes compute what one would."""

    def __init__(self, pool: Split, rt):
        super().__init__()
        self._pool = batches(pool, 6, v2.Identity(), 11, rt)

    def forward(self, model: nn.Module, progress: float):
        x, _ = next(self._pool)
        out = distributed.gather(model(x.float() / 255))
        loss = out.var(0).mean()
        return 0.5 * loss, {"spread": loss.detach()}


class Calibrate(Objective):
    """An objective with parameters of its own, drawing its own (augmented) batches, as DANN's does."""

    def __init__(self, pool: Split, rt):
        super().__init__()
        self.scale = nn.Linear(3, 3)
        self._pool = batches(pool, 6, v2.RandomAffine(degrees=20), 11, rt)

    def forward(self, model: nn.Module, progress: float):
        x, _ = next(self._pool)
        logits = self.scale(model(x.float() / 255))
        loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
        return 0.1 * loss, {"entropy": loss.detach()}


def main(out: Path) -> None:
    distributed.init(cuda=False)
    rt = runtime(device="cpu", channels_last=False)
    r = distributed.rank()
    train, val = split(48, 0), split(30, 1)
    record: dict = {"world": distributed.world(), "threads": torch.get_num_threads()}

    # 1. the batches: every process reads its share of the batch one process would read
    feed = stream(Split(train.images, np.arange(48), train.classes), 8, np.random.default_rng(5))
    record["batches"] = [next(feed)[1].tolist() for _ in range(9)]

    # 2. a net without BatchNorm or dropout, no augmentation, an objective on a statistic of the whole batch:
    #    the same training as one process
    net = plain_net()
    res = fit(net, [{"params": net.parameters(), "lr": 0.05}], train, val, epochs=3, batch_size=8,
              transform=v2.Identity(), seed=0, rt=rt, desc="plain", objectives=[Spread(split(40, 2), rt)])
    record["plain"] = {k: v.clone() for k, v in net.state_dict().items()}
    record["plain_history"] = res.history

    # 3. BatchNorm, augmentation, an objective with parameters: the copies stay equal (started unequal)
    cfg = ModelConfig("test_resnet", 1, SIDE, list(train.classes), {})
    torch.manual_seed(4 + r)
    model = create(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extra = Calibrate(split(40, 2), rt)
    res = fit(model, [{"params": model.parameters(), "lr": 0.01}], train, val, epochs=2, batch_size=8,
              transform=v2.RandomAffine(degrees=10, translate=(0.1, 0.1)), seed=0, rt=rt, objectives=[extra], desc="bn")
    record["bn_before"] = before
    record["bn"] = {k: v.clone() for k, v in model.state_dict().items()}
    record["objective"] = {k: v.clone() for k, v in extra.state_dict().items()}
    record["bn_history"] = res.history

    # 4. a scorer whose verdict differs by process: all keep the first process's
    calls = []

    def contrary(m: nn.Module) -> dict:
        calls.append(1)
        return {"score": float(len(calls) if r == 0 else -len(calls)), "tiebreak": 0.0, "which": float(r)}

    net = plain_net()
    res = fit(net, [{"params": net.parameters(), "lr": 0.05}], train, None, epochs=3, batch_size=8,
              transform=v2.Identity(), seed=0, rt=rt, scorer=contrary, evaluate_start=True)
    record["contrary"] = {"best_epoch": res.best_epoch, "history": res.history}

    # 5. the pieces, directly
    record["seed"] = distributed.seed(5)
    p1, p2, p3, p4 = (nn.Parameter(torch.zeros(3)) for _ in range(4))
    p4.requires_grad_(False)
    p1.grad = torch.full((3,), float(r + 1))
    if r == 1:
        p2.grad = torch.full((3,), 4.0)
    record["stepped"] = distributed.average_gradients([p1, p2, p3, p4])
    record["grads"] = [None if p.grad is None else p.grad.clone() for p in (p1, p2, p3, p4)]
    bn = nn.BatchNorm2d(2)
    bn.running_mean.fill_(float(r))
    bn.running_var.fill_(0.1)  # equal everywhere, not a float32 that halves exactly
    bn.num_batches_tracked.fill_(7 + r)
    distributed.average_buffers([bn])
    record["bn_buffers"] = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.full((2, 3), float(r + 1), requires_grad=True)
    g = distributed.gather(x)
    (g**2).sum().backward()
    record["gathered"], record["gather_grad"] = g.detach().clone(), x.grad.clone()
    # 6. scoring: each process its share of the images, every process all the logits (uneven, and fewer than processes)
    net, seen = plain_net(), []
    net.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    record["scored"] = {n: predict_logits(net, val.images[:n], batch_size=4, rt=rt, across=True) for n in (30, 7, 1)}
    record["scored_rows"] = {n: (lambda s: (s.start, s.stop))(distributed.share(n)) for n in (30, 7, 1)}
    record["scored_seen"] = sum(seen)  # the images this process put through the model
    reads: list[int] = []

    class Counted(Rows):  # a split read from the store: how many rows each read takes
        def _read_rows(self, sel):
            reads.append(int(np.size(sel)))
            return super()._read_rows(sel)

    lazy = Counted(np.ascontiguousarray(val.images), np.arange(30))
    record["scored_lazy"] = predict_logits(net, lazy, batch_size=4, rt=rt, across=True)
    record["lazy_reads"] = reads  # a batch at a time, never the whole share at once
    torch.save(record, out / f"rank{r}.pt")
    distributed.finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
