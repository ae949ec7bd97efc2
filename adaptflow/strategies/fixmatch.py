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

from adaptflow.data.transforms import build_pipeline
from adaptflow.strategies.base import Context
from adaptflow.training import Objective, net_input, views

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
        # Both views of the same pool batch, each with its own draws, applied to the batch on the device
        # (a strong pipeline without a batched form runs per image on the host, in the loader).
        strong = build_pipeline([t.model_dump() for t in cfg.strong])
        self.loss = PseudoLabelLoss(cfg.threshold)
        self.weight = cfg.weight
        self.rt = ctx.rt
        self._pool = views(ctx.pool, ctx.params.finetune.unlabeled_batch_size, [ctx.transform, strong], ctx.seed + 3, self.rt)

    def forward(self, model: nn.Module, progress: float) -> tuple[torch.Tensor, dict]:
        (weak, strong), _ = next(self._pool)  # the pool's labels are never read
        logits = model(net_input(model, torch.cat([weak, strong]), self.rt))
        loss, rate = self.loss(logits[: len(weak)], logits[len(weak) :])
        # logged as device tensors: fit sums them without a host sync per step
        return self.weight * loss, {"fixmatch_loss": loss.detach(), "pseudo_label_rate": rate.detach()}


def make(ctx: Context, model: nn.Module) -> FixMatch:
    return FixMatch(ctx, model)
