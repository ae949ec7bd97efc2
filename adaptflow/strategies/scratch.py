"""scratch — baseline: the same architecture, randomly initialised, trained on the k labeled target images.

Minimises cross-entropy on the labeled target set with target augmentation; what transfer must beat.
"""

from __future__ import annotations

from adaptflow.strategies.base import Adapted, Context
from adaptflow.training import fit


def adapt(ctx: Context) -> Adapted:
    f = ctx.params.finetune
    model, cfg = ctx.fresh_model()
    res = fit(model, [{"params": model.parameters(), "lr": f.lr}], ctx.labeled, ctx.val, epochs=f.epochs,
              batch_size=f.batch_size, transform=ctx.transform, seed=ctx.seed,
              weight_decay=f.weight_decay, dev=ctx.dev, desc="scratch")
    cfg.extra.update({"strategy": "scratch"})
    return Adapted(model, cfg, "target val: " + res.selection, res.best_val_acc, res.history, res.best_epoch)
