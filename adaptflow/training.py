"""The training loop every strategy shares: supervised epochs, checkpoint chosen on a validation split.

Selection is always on the split passed as ``val`` (target val for adaptation, source val for
pretraining); the test split never reaches this module.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from adaptflow import distributed, stopping
from adaptflow.accel import Prefetcher, Runtime, runtime, slices
from adaptflow.data import store
from adaptflow.data.store import Split
from adaptflow.data.batch_augment import BatchAugment
from adaptflow.data.files import DataError
from adaptflow.models import input_size

log = logging.getLogger(__name__)


def device() -> torch.device:
    """CUDA when present, else CPU with one thread per core (see :func:`adaptflow.accel.runtime`)."""
    return runtime().device


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 512, dev: torch.device | None = None,
                   rt: Runtime | None = None, across: bool = False) -> torch.Tensor:
    """Logits for uint8 images N×C×H×W, in eval mode, on CPU float32 (batches prefetched to the device). They
    stay on the device until the end: one copy back, so the host never waits for a batch before queueing the
    next. ``across``: in several processes (every one calling it, with equal models), each computes its share
    of the images and every one gets all the logits."""
    if across and distributed.active():
        return distributed.gather_rows(predict_logits(model, store.subset(images, distributed.share(len(images))), batch_size, dev, rt))
    rt = rt or runtime(device=str(dev or next(model.parameters()).device))
    model.eval()
    out = []
    for x, _ in Prefetcher(slices(images, batch_size), rt):
        with rt.autocast():
            out.append(model(net_input(model, x, rt)).float())
    return torch.cat(out).cpu() if out else torch.zeros(0)


def accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float((logits.argmax(1).numpy() == labels).mean()) if len(labels) else float("nan")


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch: epoch, train_loss, val_acc, val_loss, ...
    best_epoch: int = 0
    best_val_acc: float = float("nan")  # NaN where the rule scores no val accuracy (label-free, source val)
    best_score: float = float("nan")  # the selection rule's score at the chosen epoch
    selection: str = "max val_acc (ties: lowest val_loss)"
    compile_fell_back: str = ""  # the compiler's error when a compiled run went on eagerly ("" if it did not)
    diverged_at: int | None = None  # the epoch whose training loss was not finite (training stopped there), or None


Scorer = Callable[[nn.Module], dict]  # → {"score": higher is better, "tiebreak": higher is better, **logged}; every process calls it


def val_scorer(val: Split, dev: torch.device) -> Scorer:
    """Selection on labeled val: accuracy, ties broken by the lower cross-entropy."""

    def score(model: nn.Module) -> dict:
        logits = predict_logits(model, val.images, dev=dev, across=True)
        loss = float(F.cross_entropy(logits, torch.from_numpy(val.labels)).item())
        acc = accuracy(logits, val.labels)
        return {"score": acc, "tiebreak": -loss, "val_acc": acc, "val_loss": loss}

    return score


def stream(split: Split, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled host batches (raw uint8 images as stored, labels), reshuffled every pass: one
    sorted fancy-index read of the (memory-mapped) store per batch, nothing decoded.

    In one of several processes (:mod:`adaptflow.distributed`) every process draws the same order and
    reads an equal share of each batch of ``batch_size``, so together they cover the batch one process
    would; of a pass's last, shorter batch, the few images (fewer than the processes) that would make the
    shares unequal are skipped: the next pass reshuffles all."""
    n, procs = len(split), distributed.world()
    if n == 0:  # (a pass over nothing yields nothing: the loop below would spin forever)
        raise DataError("no training images to draw batches from")
    if procs > 1 and n < 2 * procs:
        raise DataError(f"{n} training images cannot be shared by {procs} processes (BatchNorm needs at least 2 "
                        f"per process and batch): run in fewer processes")
    distributed.check_batches({"batch size": batch_size}, procs)
    if n >= 2 and batch_size < 2:  # in one process (check_batches covers several): every batch skipped, the same spin
        raise DataError(f"batch size {batch_size}: BatchNorm needs at least 2 images per process and batch")
    labels = torch.from_numpy(split.labels)
    while True:
        order = rng.permutation(n)
        for i in range(0, n, batch_size):
            idx = np.sort(order[i : i + batch_size])
            if len(idx) < 2 * procs and n >= 2:
                break  # BatchNorm cannot train on a batch of one (in any of the processes)
            idx = distributed.shard(idx[: len(idx) - len(idx) % procs])
            yield torch.from_numpy(np.ascontiguousarray(split.images[idx])), labels[idx]


def views(split: Split, batch_size: int, pipelines: list[v2.Transform], seed: int, rt: Runtime) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """Endless shuffled training batches on the device, one augmented view per pipeline: raw uint8
    batches are read on the host and copied ahead by the :class:`Prefetcher`. For a pipeline that
    :class:`BatchAugment` runs batched, the loader draws each image's parameters on the host and they
    travel with the batch; the device only applies them. A pipeline with a per-image transform
    (AutoAugment, TrivialAugmentWide, …) runs whole on the host, in the loader, so the device never waits on
    thousands of tiny per-image kernels. Pipeline ``i`` draws from a generator seeded with ``seed + i``;
    the data order is seeded with ``seed`` (in several processes: the same order in each, and each its own
    augmentation draws, :func:`adaptflow.distributed.seed`)."""
    augs = [BatchAugment(p, distributed.seed(seed + i)) for i, p in enumerate(pipelines)]
    need_raw = any(a.batched for a in augs)

    def host(source: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple]:
        for x, y in source:
            n, h, w = len(x), x.shape[-2], x.shape[-1]
            yield (*[a.draw(n, h, w) if a.batched else a(x) for a in augs], x if need_raw else None, y)

    prefetcher = Prefetcher(host(stream(split, batch_size, np.random.default_rng(seed))), rt)
    try:
        for *done, raw, y in prefetcher:
            yield [a.apply(raw, v) if a.batched else v for a, v in zip(augs, done)], y
    finally:
        prefetcher.close()


def batches(split: Split, batch_size: int, transform: v2.Transform, seed: int, rt: Runtime) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`views` with one pipeline: ``(augmented uint8 batch, labels)`` on the device."""
    for (x,), y in views(split, batch_size, [transform], seed, rt):
        yield x, y


def net_input(model: nn.Module, x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """A uint8 batch on the device → what ``model`` takes (normalised, resized to its input side)."""
    return rt.to_input(x, input_size(model))


class Objective(nn.Module):
    """An extra training loss computed every step (domain alignment, self-training, a weight penalty).

    Subclasses draw their own batches (unlabeled target, source) and may own parameters (a domain
    discriminator): those are optimised with the model.
    """

    def forward(self, model: nn.Module, progress: float) -> tuple[torch.Tensor, dict]:  # pragma: no cover
        raise NotImplementedError


def fit(
    model: nn.Module,
    param_groups: list[dict],
    train: Split | None,
    val: Split | None,
    *,
    epochs: int,
    batch_size: int,
    transform: v2.Transform,
    seed: int,
    weight_decay: float = 0.0,
    evaluate_start: bool = False,
    dev: torch.device | None = None,
    desc: str = "fit",
    objectives: list[Objective] | None = None,
    steps_per_epoch: int | None = None,
    scorer: Scorer | None = None,
    selection: str | None = None,
    before_score: Callable[[nn.Module], None] | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    epoch_hook: Callable[[int], None] | None = None,
    rt: Runtime | None = None,
) -> FitResult:
    """Cross-entropy on ``train`` (if any) plus each objective's loss, AdamW + cosine LR; the returned model
    holds the weights of the epoch the scorer liked best (default: labeled ``val`` accuracy).

    ``evaluate_start`` scores the initial weights as epoch 0, so a run whose training only hurts keeps
    its starting point (chosen by the same rule as every other epoch). ``before_score`` runs before each
    scoring (e.g. re-estimating BatchNorm statistics on target images); ``train_mode`` runs after
    ``model.train()`` (e.g. to keep BatchNorm frozen); ``epoch_hook(epoch)`` runs before each epoch.

    With a compiled model (``ADAPTFLOW_COMPILE=1``), a step the compiler fails on is retried eagerly and the
    run goes on eagerly (:meth:`~adaptflow.accel.Forward.fall_back`; the error in ``compile_fell_back``), from
    the BatchNorm statistics it had before the failed attempt: without objectives it ends as an eager run
    would. Objectives draw their next batches for the retry. Running out of memory is raised, not retried.
    """
    rt = rt or runtime(device=str(dev) if dev is not None else "auto")
    dev = rt.device
    seed_everything(seed)
    rt.place(model)
    forward = rt.forward_fn(model, input_size(model))
    objectives = [o.to(dev) for o in objectives or []]
    if distributed.world() > 1:
        distributed.broadcast_state([model, *objectives])  # every copy starts as the first's,
        torch.manual_seed(distributed.seed(seed))  # then draws its own dropout
    groups = list(param_groups)
    extra = [p for o in objectives for p in o.parameters() if p.requires_grad]
    if extra:
        groups.append({"params": extra, "lr": max(g["lr"] for g in param_groups)})
    # Fused: one kernel per parameter instead of a dozen elementwise passes (CPU and CUDA have one). On a
    # 2-core CPU resnet10t's AdamW step took 9 ms fused against 41 ms with the default per-tensor loop. The
    # model is placed (memory format included) before the optimizer exists, so every gradient and state
    # tensor has its parameter's layout, which the fused CPU kernel assumes.
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True if dev.type in ("cpu", "cuda") else None)
    has_labels = train is not None and len(train) > 0
    if steps_per_epoch is None:
        if not has_labels:
            raise ValueError("fit without labeled data needs steps_per_epoch")
        steps_per_epoch = max(1, -(-len(train) // batch_size))
    total_steps = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    feed = batches(train, batch_size, transform, seed, rt) if has_labels else None
    if scorer is None:
        if val is None:
            raise ValueError("fit needs a val split or a scorer to choose a checkpoint")
        scorer = val_scorer(val, dev)
    result = FitResult(selection=selection or FitResult.selection)
    best_key, best_state = None, None

    def consider(epoch: int, logs: dict, eligible: bool = True) -> None:
        nonlocal best_key, best_state
        if before_score is not None:
            before_score(model)
        s = distributed.from_main(scorer(model))  # in several processes, one verdict: all keep the same epoch
        row = {"epoch": epoch, **logs, **{k: v for k, v in s.items() if k not in ("score", "tiebreak")}}
        result.history.append(row)
        key = (s["score"], s["tiebreak"])
        if eligible and (best_key is None or key > best_key):
            best_key, best_state = key, copy.deepcopy(model.state_dict())
            result.best_epoch, result.best_val_acc, result.best_score = epoch, s.get("val_acc", float("nan")), s["score"]

    def backward(batch: tuple | None, step: int) -> tuple[torch.Tensor, dict]:
        """One step's loss and its gradients (not yet applied)."""
        loss = torch.zeros((), device=dev)
        logs: dict[str, torch.Tensor] = {}
        with rt.autocast():
            if batch is not None:
                x, y = batch
                ce = F.cross_entropy(forward(x), y)
                loss = loss + ce
                logs["ce"] = ce.detach()
            for o in objectives:
                extra_loss, extra_logs = o(model, step / max(1, total_steps))
                loss = loss + extra_loss
                logs.update(extra_logs)
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        return loss, logs

    if evaluate_start:
        consider(0, {"train_loss": float("nan")})
    trained = [p for g in opt.param_groups for p in g["params"]]
    step = 0
    for epoch in range(1, epochs + 1):
        if epoch_hook is not None:
            epoch_hook(epoch)
        model.train()
        if train_mode is not None:
            train_mode(model)
        sums: dict[str, float] = {}
        for _ in range(steps_per_epoch):
            stopping.check(desc)  # (one flag read: a run that is stopping ends here, not after the last epoch)
            batch = next(feed) if feed is not None else None
            try:
                loss, logs = backward(batch, step)
            except Exception as exc:
                # the compiler's failure: once more, eagerly; anything else: raised. Not in one of several processes:
                # its retry would draw batches and gather features the others do not, and the processes would part
                if distributed.world() > 1 and forward.compiled:
                    log.error("a compiled training step failed in one of %d processes; they cannot retry it eagerly "
                              "in step: run with ADAPTFLOW_COMPILE=0", distributed.world())
                    raise
                if not forward.fall_back(exc):
                    raise
                loss, logs = backward(batch, step)
            if distributed.average_gradients(trained):  # alone: whether there is a gradient to apply
                opt.step()
            sched.step()
            step += 1
            logs["train_loss"] = loss.detach()
            for k, v in logs.items():  # device tensors summed without a sync per step
                sums[k] = sums.get(k, 0.0) + v
        distributed.average_buffers([model, *objectives])
        sums = distributed.mean_across(sums)
        epoch_logs = {k: float(v) / steps_per_epoch for k, v in sums.items()}
        # a loss that is no longer finite: the weights it moved are no model (NaN or inf), never a checkpoint;
        # every process has the same mean, so all stop here
        diverged = not math.isfinite(epoch_logs.get("train_loss", 0.0))
        consider(epoch, epoch_logs, eligible=not diverged)
        row = result.history[-1]
        log.info("%s epoch %d/%d train_loss %.4f score %s", desc, epoch, epochs, row["train_loss"],
                 {k: round(v, 4) for k, v in row.items() if k.startswith("val") or k.startswith("sel")})
        if diverged:
            result.diverged_at = epoch
            if best_state is None:
                raise RuntimeError(f"{desc}: the training loss is {row['train_loss']} at epoch {epoch}, before any checkpoint could be "
                                   "kept: training diverged; lower the learning rate (or the loss weights)")
            log.warning("%s: the training loss is %s at epoch %d: training diverged, so it stopped there; the checkpoint is "
                        "epoch %d's. Lower the learning rate (or the loss weights)", desc, row["train_loss"], epoch, result.best_epoch)
            break
    if feed is not None:
        feed.close()
    model.load_state_dict(best_state)
    model.eval()
    result.compile_fell_back = forward.fell_back
    return result


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> None:
    """Re-estimate BatchNorm running statistics on ``images`` (AdaBN): the target's own feature statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(images) < 2:
        return
    rt = runtime(device=str(next(model.parameters()).device))
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    for x, _ in Prefetcher(slices(images, batch_size), rt):  # the next batch copied while this one runs
        if len(x) < 2:
            break
        with rt.autocast():
            model(net_input(model, x, rt))
    for m, (momentum, _) in zip(bns, saved):
        m.momentum = momentum
    model.eval()
