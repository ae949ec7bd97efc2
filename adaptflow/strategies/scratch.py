"""scratch — baseline: the same architecture, randomly initialised, trained on the k labeled target images.

Minimises cross-entropy on the labeled target set with target augmentation; what transfer must beat.
"""

from __future__ import annotations

from adaptflow.strategies.base import Adapted, Context
from adaptflow.training import fit


def adapt(ctx: Context) -> Adapted:
    f = ctx.params.finetune
    if not ctx.has_target_labels():
        raise ValueError("scratch needs labeled target images (target.k > 0)")
    model, cfg = ctx.fresh_model()
    scorer, rule = ctx.scorer()
    res = fit(model, [{"params": model.parameters(), "lr": f.lr}], ctx.labeled, None, epochs=f.epochs,
              batch_size=f.batch_size, transform=ctx.transform, seed=ctx.seed, weight_decay=f.weight_decay,
              dev=ctx.dev, desc=f"scratch[seed={ctx.seed}]", scorer=scorer, selection=rule)
    cfg.extra.update({"strategy": "scratch"})
    return Adapted(model, cfg, res.selection, res.best_val_acc, res.history, res.best_epoch, res.best_score)
