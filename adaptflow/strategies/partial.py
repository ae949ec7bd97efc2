"""partial — fine-tune only the top of the source network; the first ``finetune.partial.freeze_groups``
parameter groups (timm's order: stem, stage 1, …) stay bit-identical to the source.

With few labels, the generic low-level filters are kept and only task-specific layers move.
"""

from __future__ import annotations

from adaptflow.strategies.base import Adapted, Context
from adaptflow.strategies.transfer import train_from_source


def adapt(ctx: Context, objectives: list[str] | None = None, name: str = "partial") -> Adapted:
    return train_from_source(ctx, name, objectives=objectives, frozen_groups=ctx.params.finetune.partial.freeze_groups)
