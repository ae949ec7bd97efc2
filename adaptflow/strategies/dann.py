"""dann — domain-adversarial training (Ganin et al., "Domain-Adversarial Training of Neural Networks",
JMLR 2016).

A domain discriminator D learns to tell source features from target features; a gradient-reversal layer
between the backbone and D makes the backbone *maximise* D's loss, so features become domain-invariant
while the classifier keeps them discriminative on the labeled data:

    min_{F,C} max_D  CE(C(F(x_s)), y_s) + CE_target_labeled  -  λ_p · BCE(D(F(x)), domain)

λ_p ramps from 0 to ``finetune.dann.weight`` as 2 / (1 + exp(-10 p)) - 1 over training progress p, so
the discriminator is not trusted before the features mean anything. Shapes: features (N, d) → D → (N, 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from adaptflow.strategies.alignment import AlignmentObjective
from adaptflow.strategies.base import Context

__all__ = ["GradientReversal", "DomainDiscriminator", "DomainAdversarialLoss", "make"]


class _Reverse(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:  # noqa: D401
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


class GradientReversal(nn.Module):
    """Identity forward; multiplies the gradient by ``-coeff`` backward."""

    def forward(self, x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
        return _Reverse.apply(x, coeff)


class DomainDiscriminator(nn.Sequential):
    def __init__(self, in_features: int, hidden: int = 256):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class DomainAdversarialLoss(nn.Module):
    """BCE of the discriminator on source (label 1) and target (label 0) features behind gradient reversal."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator
        self.grl = GradientReversal()

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, coeff: float) -> torch.Tensor:
        f = self.grl(torch.cat([f_s, f_t]), coeff)
        d = self.discriminator(f).squeeze(1)
        # made on d's device: a host tensor copied there would wait for the device every step
        y = torch.cat([d.new_ones(len(f_s)), d.new_zeros(len(f_t))])
        return F.binary_cross_entropy_with_logits(d, y)


def schedule(progress: float, weight: float) -> float:
    return weight * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)


class DANN(AlignmentObjective):
    name = "dann"

    def __init__(self, ctx: Context, model: nn.Module):
        super().__init__(ctx, ctx.params.finetune.unlabeled_batch_size)
        self.loss = DomainAdversarialLoss(DomainDiscriminator(model.num_features))
        self.weight = ctx.params.finetune.dann.weight

    def align(self, f_s: torch.Tensor, f_t: torch.Tensor, progress: float) -> torch.Tensor:
        # The reversal coefficient carries the schedule; the discriminator itself always learns at full strength.
        return self.loss(f_s, f_t, schedule(progress, self.weight))


def make(ctx: Context, model: nn.Module) -> DANN:
    return DANN(ctx, model)
