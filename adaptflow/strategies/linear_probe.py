"""linear_probe — a new linear head on the frozen source features.

Minimises cross-entropy of a linear classifier on the cached features of the k labeled target images
(full batch, AdamW), initialised from the source head when the classes match; the epoch with the best
target val accuracy is kept. The backbone is never run during training: features come from cache_features.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from adaptflow.stages.cache_features import load_features
from adaptflow.strategies.base import Adapted, Context
from adaptflow.training import seed_everything


def adapt(ctx: Context) -> Adapted:
    f = ctx.params.finetune
    if not ctx.has_target_labels():
        raise ValueError("linear_probe needs labeled target images (target.k > 0)")
    seed_everything(ctx.seed)
    model, cfg, _ = ctx.source_model()
    x_tr, y_tr = (torch.from_numpy(a) for a in load_features(ctx.features_dir, "labeled"))
    x_va, y_va = (torch.from_numpy(a) for a in load_features(ctx.features_dir, "val"))
    head = copy.deepcopy(model.get_classifier()).cpu().train()
    opt = torch.optim.AdamW(head.parameters(), lr=f.linear_probe_lr, weight_decay=f.weight_decay)
    history, best = [], None
    for epoch in range(0, f.linear_probe_epochs + 1):
        if epoch > 0:
            loss = F.cross_entropy(head(x_tr), y_tr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = head(x_va)
            acc = float((logits.argmax(1) == y_va).float().mean())
            vloss = float(F.cross_entropy(logits, y_va))
        history.append({"epoch": epoch, "train_loss": loss.item() if epoch else float("nan"), "val_acc": acc, "val_loss": vloss})
        if best is None or (acc, -vloss) > best[0]:
            best = ((acc, -vloss), epoch, copy.deepcopy(head.state_dict()))
    model.get_classifier().load_state_dict(best[2])
    cfg.extra.update({"strategy": "linear_probe"})
    sel = "target val: max accuracy (ties: lowest val loss)"
    return Adapted(model.eval(), cfg, sel, best[0][0], history, best[1], best[0][0])
