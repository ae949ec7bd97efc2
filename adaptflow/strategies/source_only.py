"""source_only — baseline: the source model applied to the target as is, no target training.

Classes are matched by name. A target class the source never saw cannot be predicted by it: its logit is
masked out, so the baseline scores 0 on that class — honestly what the source model knows. What
adaptation must beat.
"""

from __future__ import annotations

import torch

from adaptflow.data.domains import no_shared_classes
from adaptflow.strategies.base import Adapted, Context
from adaptflow.training import accuracy, predict_logits


def adapt(ctx: Context) -> Adapted:
    model, cfg, kept = ctx.source_model()
    source = set(ctx.source_classes())
    unknown = [c for c in ctx.labeled.classes if c not in source]
    if len(unknown) == len(ctx.labeled.classes):
        raise no_shared_classes(unknown, source)
    if unknown:
        head = model.get_classifier()
        with torch.no_grad():
            for i, c in enumerate(ctx.labeled.classes):
                if c in unknown:
                    head.weight[i].zero_()
                    head.bias[i].fill_(-1e4)  # never predicted: the source has no notion of this class
    cfg.extra.update({"strategy": "source_only", "unknown_target_classes": unknown})
    val_acc = accuracy(predict_logits(model, ctx.val.images), ctx.val.labels)  # reported; chooses nothing here
    return Adapted(model, cfg, "none (no training; the source checkpoint)", val_acc)
