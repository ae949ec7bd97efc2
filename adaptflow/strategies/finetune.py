"""finetune — the whole source network trained on the labeled target set.

Minimises cross-entropy on the k labeled target images, starting from the source weights; the backbone
learns at ``lr * backbone_lr_scale`` and the head at ``lr`` so the source features are adjusted, not
overwritten. Epoch 0 (the source model) is a candidate too: if training only hurts on val, it is kept.
"""

from __future__ import annotations

from adaptflow.strategies.base import Adapted, Context
from adaptflow.training import fit


def adapt(ctx: Context) -> Adapted:
    f = ctx.params.finetune
    model, cfg, _ = ctx.source_model()
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    head = [p for p in model.parameters() if id(p) in head_ids]
    groups = [{"params": backbone, "lr": f.lr * f.backbone_lr_scale}, {"params": head, "lr": f.lr}]
    res = fit(model, groups, ctx.labeled, ctx.val, epochs=f.epochs, batch_size=f.batch_size,
              transform=ctx.transform, seed=ctx.seed, weight_decay=f.weight_decay,
              evaluate_start=True, dev=ctx.dev, desc="finetune")
    cfg.extra.update({"strategy": "finetune"})
    return Adapted(model, cfg, "target val: " + res.selection, res.best_val_acc, res.history, res.best_epoch)
