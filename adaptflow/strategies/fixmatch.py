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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adaptflow.data.transforms import apply_per_sample, build_pipeline
from adaptflow.imaging import normalize
from adaptflow.strategies.base import Context
from adaptflow.training import Objective, stream

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
        self.weak = ctx.transform
        self.strong = build_pipeline([t.model_dump() for t in cfg.strong])
        self.loss = PseudoLabelLoss(cfg.threshold)
        self.weight = cfg.weight
        self._pool = stream(ctx.pool, ctx.params.finetune.unlabeled_batch_size, _identity, np.random.default_rng(ctx.seed + 3))
        self.dev = ctx.dev

    def forward(self, model: nn.Module, progress: float) -> tuple[torch.Tensor, dict]:
        x, _ = next(self._pool)  # the pool's labels are never read
        weak, strong = apply_per_sample(self.weak, x), apply_per_sample(self.strong, x)
        logits = model(normalize(torch.cat([weak, strong]).to(self.dev)))
        loss, rate = self.loss(logits[: len(x)], logits[len(x) :])
        return self.weight * loss, {"fixmatch_loss": loss.item(), "pseudo_label_rate": rate.item()}


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def make(ctx: Context, model: nn.Module) -> FixMatch:
    return FixMatch(ctx, model)
