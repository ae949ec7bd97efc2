"""finetune — the whole source network trained on the labeled target set (plus any objectives).

Minimises cross-entropy on the k labeled target images, starting from the source weights; the backbone
learns at ``lr * backbone_lr_scale`` (optionally decayed layer by layer, ``finetune.layer_decay``) and the
head at ``lr``, so the source features are adjusted, not overwritten. Epoch 0 (the source model) is a
candidate too: if training only hurts on val, it is kept.
"""

from __future__ import annotations

from adaptflow.strategies.base import Adapted, Context
from adaptflow.strategies.transfer import train_from_source


def adapt(ctx: Context, objectives: list[str] | None = None, name: str = "finetune") -> Adapted:
    return train_from_source(ctx, name, objectives=objectives)
