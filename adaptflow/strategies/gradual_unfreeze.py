"""gradual_unfreeze — train the head first, then unfreeze one parameter group more (from the head side)
after each epoch in ``finetune.gradual_unfreeze.milestones``; everything trains after the last one
(ULMFiT's schedule). Early noisy head gradients cannot wreck the source features.
"""

from __future__ import annotations

from adaptflow.strategies.base import Adapted, Context
from adaptflow.strategies.transfer import train_from_source


def adapt(ctx: Context, objectives: list[str] | None = None, name: str = "gradual_unfreeze") -> Adapted:
    return train_from_source(ctx, name, objectives=objectives, unfreeze_at=list(ctx.params.finetune.gradual_unfreeze.milestones))
