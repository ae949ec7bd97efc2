"""Shared machinery of the feature-alignment objectives (dann, coral, mmd).

Each step draws a source batch (labels re-indexed to the target classes, source augmentation) and an
unlabeled target batch (target augmentation), runs them through the network together (shared BatchNorm
statistics), and returns ``source_weight * CE(source) + alignment(features_s, features_t)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaptflow import distributed
from adaptflow.models import features
from adaptflow.strategies.base import Context
from adaptflow.training import Objective, batches, net_input


class AlignmentObjective(Objective):
    uses_pool = True
    name = "align"

    def __init__(self, ctx: Context, batch_size: int):
        super().__init__()
        if ctx.source is None or ctx.pool is None or len(ctx.pool) == 0:
            raise ValueError(f"{self.name} needs the source train split and the unlabeled target pool")
        source = ctx.source_in_target_labels(ctx.source)
        self.rt = ctx.rt
        self._source = batches(source, batch_size, ctx.source_transform or ctx.transform, ctx.seed + 1, self.rt)
        self._target = batches(ctx.pool, batch_size, ctx.transform, ctx.seed + 2, self.rt)
        self.source_weight = ctx.params.finetune.source_weight

    def align(self, f_s: torch.Tensor, f_t: torch.Tensor, progress: float) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, model: nn.Module, progress: float) -> tuple[torch.Tensor, dict]:
        xs, ys = next(self._source)
        xt, _ = next(self._target)  # the pool's labels are never read
        f = features(model, net_input(model, torch.cat([xs, xt]), self.rt))
        f_s, f_t = f[: len(xs)], f[len(xs) :]
        ce = F.cross_entropy(model.get_classifier()(f_s), ys)
        # in several processes, aligned on the whole batch: every process's features (distributed.gather)
        a = self.align(distributed.gather(f_s), distributed.gather(f_t), progress)
        # logged as device tensors: fit sums them without a host sync per step
        return self.source_weight * ce + a, {"source_ce": ce.detach(), f"{self.name}_loss": a.detach()}


class DistanceAlignment(AlignmentObjective):
    """Alignment by a distance between the two feature batches, ``loss_cls()(f_s, f_t)``, weighted by
    ``finetune.<name>.weight`` (coral, mmd)."""

    loss_cls: type[nn.Module]

    def __init__(self, ctx: Context, model: nn.Module):
        super().__init__(ctx, ctx.params.finetune.unlabeled_batch_size)
        self.loss = self.loss_cls()
        self.weight = getattr(ctx.params.finetune, self.name).weight

    def align(self, f_s: torch.Tensor, f_t: torch.Tensor, progress: float) -> torch.Tensor:
        # In float32 whatever the runtime's precision: under bf16 autocast CORAL's covariance products would
        # be rounded to 8 bits of mantissa and subtracted there, for a loss that is a small difference.
        with torch.autocast(f_s.device.type, enabled=False):
            return self.weight * self.loss(f_s.float(), f_t.float())
