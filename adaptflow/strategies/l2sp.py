"""l2sp — L2-SP regularisation (Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning
with Convolutional Networks", ICML 2018).

Instead of decaying weights toward zero, pull them toward the *source* weights w⁰:

    Ω(w) = α/2 · ||w_S - w⁰_S||²  +  β/2 · ||w_new||²

where S are the parameters the source model has (same name and shape) and "new" the rest (a
re-initialised head). Zero at the source weights; ``finetune.l2sp.alpha`` / ``beta``.
"""

from __future__ import annotations

import torch
from torch import nn

from adaptflow.models import load
from adaptflow.strategies.base import Context
from adaptflow.training import Objective

__all__ = ["L2SP", "make"]


class L2SP(Objective):
    def __init__(self, reference: dict[str, torch.Tensor], alpha: float, beta: float):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        # The source weights, held in a plain dict so they are neither trained nor saved with the model.
        self._reference = {n: t.detach().clone() for n, t in reference.items()}

    def forward(self, model: nn.Module, progress: float = 0.0) -> tuple[torch.Tensor, dict]:
        sp, new = 0.0, 0.0
        for n, p in model.named_parameters():
            ref = self._reference.get(n)
            if ref is not None and ref.shape == p.shape:
                sp = sp + (p - ref.to(p.device)).pow(2).sum()
            else:
                new = new + p.pow(2).sum()
        penalty = 0.5 * self.alpha * sp + 0.5 * self.beta * new
        if not torch.is_tensor(penalty):
            penalty = torch.zeros((), device=next(model.parameters()).device)
        return penalty, {"l2sp": penalty.detach()}


def make(ctx: Context, model: nn.Module) -> L2SP:
    """Reference = the source checkpoint's weights; a head that was re-initialised (classes differ) is "new"."""
    cfg = ctx.params.finetune.l2sp
    source, _ = load(ctx.source_dir, ctx.dev)
    head = {n for n, p in model.named_parameters() if any(p is q for q in model.get_classifier().parameters())}
    current = dict(model.named_parameters())
    reference = {}
    for n, t in source.state_dict().items():
        if n in current and current[n].shape == t.shape and not (n in head and not torch.equal(current[n].detach(), t)):
            reference[n] = t
    return L2SP(reference, cfg.alpha, cfg.beta)
