"""source_only — baseline: the source model applied to the target as is, no target training.

Needs every target class to be a source class (matched by name); what adaptation must beat.
"""

from __future__ import annotations

from adaptflow.strategies.base import Adapted, Context
from adaptflow.training import accuracy, predict_logits


def adapt(ctx: Context) -> Adapted:
    model, cfg, kept = ctx.source_model()
    if not kept:
        missing = sorted(set(ctx.labeled.classes) - set(ctx.source_classes()))
        raise ValueError(f"source_only needs every target class in the source classes; unknown to the source: {missing}")
    cfg.extra.update({"strategy": "source_only"})
    val_acc = accuracy(predict_logits(model, ctx.val.images), ctx.val.labels)  # reported; chooses nothing here
    return Adapted(model, cfg, "none (no training; the source checkpoint)", val_acc)
