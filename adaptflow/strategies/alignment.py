"""Shared machinery of the feature-alignment objectives (dann, coral, mmd).

Each step draws a source batch (labels re-indexed to the target classes, source augmentation) and an
unlabeled target batch (target augmentation), runs them through the network together (shared BatchNorm
statistics), and returns ``source_weight * CE(source) + alignment(features_s, features_t)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adaptflow.imaging import normalize
from adaptflow.models import features
from adaptflow.strategies.base import Context
from adaptflow.training import Objective, stream


class AlignmentObjective(Objective):
    uses_pool = True
    name = "align"

    def __init__(self, ctx: Context, batch_size: int):
        super().__init__()
        if ctx.source is None or ctx.pool is None or len(ctx.pool) == 0:
            raise ValueError(f"{self.name} needs the source train split and the unlabeled target pool")
        source = ctx.source_in_target_labels(ctx.source)
        rng = np.random.default_rng(ctx.seed + 1)
        self._source = stream(source, batch_size, ctx.source_transform or ctx.transform, rng)
        self._target = stream(ctx.pool, batch_size, ctx.transform, np.random.default_rng(ctx.seed + 2))
        self.source_weight = ctx.params.finetune.source_weight
        self.dev = ctx.dev

    def align(self, f_s: torch.Tensor, f_t: torch.Tensor, progress: float) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, model: nn.Module, progress: float) -> tuple[torch.Tensor, dict]:
        xs, ys = next(self._source)
        xt, _ = next(self._target)  # the pool's labels are never read
        x = normalize(torch.cat([xs, xt]).to(self.dev))
        f = features(model, x)
        f_s, f_t = f[: len(xs)], f[len(xs) :]
        ce = F.cross_entropy(model.get_classifier()(f_s), ys.to(self.dev))
        a = self.align(f_s, f_t, progress)
        return self.source_weight * ce + a, {"source_ce": ce.item(), f"{self.name}_loss": a.item()}
