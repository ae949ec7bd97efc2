"""oracle — an upper bound: the source network fine-tuned on *every* target train label (the k-shot set
plus the pool's labels). Reported to show how much room is left; never a candidate for the registry.
"""

from __future__ import annotations

import numpy as np

from adaptflow.data.store import Split, concat
from adaptflow.strategies.base import Adapted, Context
from adaptflow.strategies.transfer import train_from_source


def adapt(ctx: Context) -> Adapted:
    parts = [ctx.labeled] + ([ctx.pool] if ctx.pool is not None else [])
    everything = Split(concat([p.images for p in parts]), np.concatenate([p.labels for p in parts]), ctx.labeled.classes)
    return train_from_source(ctx, "oracle", labeled=everything)
