"""fixmatch — self-training with confidence-thresholded pseudo-labels (Sohn et al., "FixMatch: Simplifying
Semi-Supervised Learning with Consistency and Confidence", NeurIPS 2020).

For each unlabeled target image: predict on a weak augmentation (``augment.target``); where the top
probability reaches ``finetune.fixmatch.threshold``, that class is the pseudo-label, and the model is
trained to predict it on a strong augmentation (``finetune.fixmatch.strong``):

    L_u = weight · mean_i[ 1(max p_weak_i ≥ τ) · CE(p_strong_i, argmax p_weak_i) ]

Combinable with any base or objective (``dann+fixmatch``): the pseudo-labels then come from the better
aligned model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from adaptflow.accel import runtime
from adaptflow.data.batch_augment import BatchAugment
from adaptflow.data.transforms import build_pipeline
from adaptflow.strategies.base import Context
from adaptflow.training import Objective, batches, model_input

__all__ = ["PseudoLabelLoss", "FixMatch", "make"]


class PseudoLabelLoss(nn.Module):
    """Masked cross-entropy of strong-view logits against confident weak-view predictions."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, logits_weak: torch.Tensor, logits_strong: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(logits_weak.detach().float(), dim=1)
        conf, pseudo = probs.max(1)
        mask = (conf >= self.threshold).float()
        loss = (F.cross_entropy(logits_strong, pseudo, reduction="none") * mask).mean()
        return loss, mask.mean()


class FixMatch(Objective):
    uses_pool = True

    def __init__(self, ctx: Context, model: nn.Module):
        super().__init__()
        if ctx.pool is None or len(ctx.pool) == 0:
            raise ValueError("fixmatch needs the unlabeled target pool")
        cfg = ctx.params.finetune.fixmatch
        # Both views are drawn on the device from the same raw pool batch (each with its own generator).
        self.weak = BatchAugment(ctx.transform, ctx.seed + 4)
        self.strong = BatchAugment(build_pipeline([t.model_dump() for t in cfg.strong]), ctx.seed + 5)
        self.loss = PseudoLabelLoss(cfg.threshold)
        self.weight = cfg.weight
        self.rt = runtime(device=str(ctx.dev))
        self._pool = batches(ctx.pool, ctx.params.finetune.unlabeled_batch_size, v2.Identity(), ctx.seed + 3, self.rt)

    def forward(self, model: nn.Module, progress: float) -> tuple[torch.Tensor, dict]:
        x, _ = next(self._pool)  # the pool's labels are never read
        logits = model(model_input(model, torch.cat([self.weak(x), self.strong(x)]), self.rt))
        loss, rate = self.loss(logits[: len(x)], logits[len(x) :])
        # logged as device tensors: fit sums them without a host sync per step
        return self.weight * loss, {"fixmatch_loss": loss.detach(), "pseudo_label_rate": rate.detach()}


def make(ctx: Context, model: nn.Module) -> FixMatch:
    return FixMatch(ctx, model)
