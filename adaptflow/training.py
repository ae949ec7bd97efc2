"""The training loop every strategy shares: supervised epochs, checkpoint chosen on a validation split.

Selection is always on the split passed as ``val`` (target val for adaptation, source val for
pretraining); the test split never reaches this module.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from adaptflow.data.store import Split
from adaptflow.data.transforms import apply_per_sample
from adaptflow.imaging import normalize

log = logging.getLogger(__name__)


def device() -> torch.device:
    """CUDA when present, else CPU with one thread per core."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 512, dev: torch.device | None = None) -> torch.Tensor:
    """Logits for uint8 images N×C×H×W, in eval mode, on CPU float32."""
    dev = dev or next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(dev))
        out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float((logits.argmax(1).numpy() == labels).mean()) if len(labels) else float("nan")


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch: epoch, train_loss, val_acc, val_loss
    best_epoch: int = 0
    best_val_acc: float = float("nan")
    selection: str = "max val_acc (ties: lowest val_loss)"


def _val_row(model: nn.Module, val: Split, dev: torch.device) -> tuple[float, float]:
    logits = predict_logits(model, val.images, dev=dev)
    loss = float(F.cross_entropy(logits, torch.from_numpy(val.labels)).item())
    return accuracy(logits, val.labels), loss


def fit(
    model: nn.Module,
    param_groups: list[dict],
    train: Split,
    val: Split,
    *,
    epochs: int,
    batch_size: int,
    transform: v2.Transform,
    seed: int,
    weight_decay: float = 0.0,
    evaluate_start: bool = False,
    dev: torch.device | None = None,
    desc: str = "fit",
) -> FitResult:
    """Cross-entropy training with AdamW + cosine LR; the returned model holds the best-val weights.

    ``evaluate_start`` scores the initial weights as epoch 0, so a run whose training only hurts keeps
    its starting point (chosen on val, like every other epoch).
    """
    dev = dev or device()
    seed_everything(seed)
    model.to(dev)
    opt = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    steps = epochs * max(1, -(-len(train) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    rng = np.random.default_rng(seed)
    result = FitResult()
    best_key, best_state = None, None

    def consider(epoch: int, train_loss: float) -> None:
        nonlocal best_key, best_state
        acc, loss = _val_row(model, val, dev)
        result.history.append({"epoch": epoch, "train_loss": train_loss, "val_acc": acc, "val_loss": loss})
        key = (acc, -loss)
        if best_key is None or key > best_key:
            best_key, best_state = key, copy.deepcopy(model.state_dict())
            result.best_epoch, result.best_val_acc = epoch, acc

    if evaluate_start:
        consider(0, float("nan"))
    labels = torch.from_numpy(train.labels)
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(train))
        total, n = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = np.sort(order[i : i + batch_size])
            if len(idx) < 2 and len(order) >= 2:
                continue  # BatchNorm cannot train on a batch of one
            x = apply_per_sample(transform, torch.from_numpy(np.ascontiguousarray(train.images[idx])))
            x, y = normalize(x.to(dev)), labels[idx].to(dev)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * len(idx), n + len(idx)
        consider(epoch, total / max(n, 1))
        row = result.history[-1]
        log.info("%s epoch %d/%d train_loss %.4f val_acc %.4f", desc, epoch, epochs, row["train_loss"], row["val_acc"])
    model.load_state_dict(best_state)
    model.eval()
    return result
