"""coral — Deep CORAL (Sun & Saenko, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation",
ECCV-W 2016).

Aligns second-order statistics: ``||C_s - C_t||_F^2 / (4 d^2)`` where C are the feature covariance
matrices of a source and a target batch (d features), plus the squared difference of the means.
Weighted by ``finetune.coral.weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from adaptflow.strategies.alignment import DistanceAlignment
from adaptflow.strategies.base import Context

__all__ = ["CorrelationAlignmentLoss", "make"]


class CorrelationAlignmentLoss(nn.Module):
    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        d = f_s.shape[1]
        mean_s, mean_t = f_s.mean(0, keepdim=True), f_t.mean(0, keepdim=True)
        cs = (f_s - mean_s).T @ (f_s - mean_s) / max(1, len(f_s) - 1)
        ct = (f_t - mean_t).T @ (f_t - mean_t) / max(1, len(f_t) - 1)
        return (mean_s - mean_t).pow(2).mean() + (cs - ct).pow(2).sum() / (4 * d * d)


class CORAL(DistanceAlignment):
    name = "coral"
    loss_cls = CorrelationAlignmentLoss


def make(ctx: Context, model: nn.Module) -> CORAL:
    return CORAL(ctx, model)
