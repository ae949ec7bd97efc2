"""Training that starts from the source network: shared by finetune, partial, gradual_unfreeze, oracle and
every objective (l2sp, dann, coral, mmd, fixmatch).

What trains is decided by *parameter groups* in timm's order (stem, stages…, head): ``frozen`` groups from
the input side stay bit-identical; the rest learn at ``lr`` (head) and ``lr * backbone_lr_scale`` (the
backbone), optionally decayed layer by layer (``finetune.layer_decay``, timm's rule).
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn
from timm.models import group_parameters

from adaptflow.data import store
from adaptflow.data.store import Split
from adaptflow.strategies.base import Adapted, Context
from adaptflow.training import Objective, fit, recalibrate_bn


def parameter_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names by timm's coarse groups, input side first; the classifier is the last group."""
    groups = group_parameters(model, model.group_matcher(coarse=True))
    ordered = [list(groups[k]) for k in sorted(groups)]
    head = {n for n, p in model.named_parameters() if any(p is q for q in model.get_classifier().parameters())}
    body = [[n for n in g if n not in head] for g in ordered]
    return [g for g in body if g] + [sorted(head)]


def set_trainable(model: nn.Module, n_frozen: int) -> None:
    """Freeze the first ``n_frozen`` groups (never the head), unfreeze the rest."""
    groups = parameter_groups(model)
    n_frozen = min(n_frozen, len(groups) - 1)
    frozen = {n for g in groups[:n_frozen] for n in g}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)


def optimizer_groups(model: nn.Module, ctx: Context) -> list[dict]:
    """LR per parameter: the head at ``lr``; body groups at ``lr * backbone_lr_scale`` times
    ``layer_decay ** (distance from the head)`` when layer decay is set. Frozen parameters are left out."""
    f = ctx.params.finetune
    groups = parameter_groups(model)
    params = dict(model.named_parameters())
    out = []
    n_body = len(groups) - 1
    for i, names in enumerate(groups):
        ps = [params[n] for n in names]  # frozen ones stay in: AdamW skips params without grads
        if i == n_body:
            lr = f.lr
        else:
            lr = f.lr * f.backbone_lr_scale * (f.layer_decay ** (n_body - i) if f.layer_decay else 1.0)
        out.append({"params": ps, "lr": lr})
    return out


def _bn_mode(mode: str) -> Callable[[nn.Module], None]:
    """BatchNorm layers whose parameters are frozen keep their statistics too (eval mode), so a frozen part
    stays bit-identical; with ``finetune.bn = frozen`` every BatchNorm keeps the source statistics."""

    def hook(m: nn.Module) -> None:
        for layer in m.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                frozen = all(not p.requires_grad for p in layer.parameters(recurse=False))
                if mode == "frozen" or frozen:
                    layer.eval()

    return hook


def build_objectives(ctx: Context, model: nn.Module, names: list[str]) -> list[Objective]:
    return [importlib.import_module(f"adaptflow.strategies.{n}").make(ctx, model) for n in names]


def train_from_source(
    ctx: Context,
    name: str,
    *,
    objectives: list[str] | None = None,
    labeled: Split | None = None,
    frozen_groups: int = 0,
    unfreeze_at: list[int] | None = None,
) -> Adapted:
    """Start from the source model, train on ``labeled`` (default: the k-shot set) plus the objectives,
    choose the checkpoint by the context's rule (epoch 0, the source model, is a candidate)."""
    f = ctx.params.finetune
    model, cfg, _ = ctx.source_model()
    labeled = ctx.labeled if labeled is None else labeled
    objs = build_objectives(ctx, model, objectives or [])
    set_trainable(model, frozen_groups)
    scorer, rule = ctx.scorer()
    steps = None
    if objectives and any(getattr(o, "uses_pool", False) for o in objs):
        steps = f.steps_per_epoch or max(1, -(-len(ctx.pool) // f.unlabeled_batch_size))
    elif len(labeled) == 0:
        raise ValueError(f"{name} needs labeled target images (target.k > 0) or an objective that reads the unlabeled pool")
    before = None
    if f.bn == "adabn":
        target_images = store.concat([labeled.images] + ([ctx.pool.images] if ctx.pool is not None else []))
        before = lambda m: recalibrate_bn(m, target_images)  # noqa: E731

    epoch_hook = None
    if unfreeze_at:
        n_groups = len(parameter_groups(model))

        def epoch_hook(epoch: int) -> None:
            # Head only at first; one more group from the head side at each milestone; all after the last.
            reached = sum(epoch > m for m in unfreeze_at)
            set_trainable(model, 0 if reached == len(unfreeze_at) else max(0, n_groups - 1 - reached))

        epoch_hook(0)
    res = fit(
        model,
        optimizer_groups(model, ctx),
        labeled if len(labeled) else None,
        None,
        epochs=f.epochs,
        batch_size=f.batch_size,
        transform=ctx.transform,
        seed=ctx.seed,
        weight_decay=f.weight_decay,
        evaluate_start=True,
        dev=ctx.dev,
        desc=f"{name}[seed={ctx.seed}]",
        objectives=objs,
        steps_per_epoch=steps,
        scorer=scorer,
        selection=rule,
        before_score=before,
        train_mode=_bn_mode(f.bn),
        epoch_hook=epoch_hook,
    )
    if before is not None:
        before(model)
    cfg.extra.update({"strategy": name, "frozen_groups": frozen_groups, "bn": f.bn})
    return Adapted(model, cfg, res.selection, res.best_val_acc, res.history, res.best_epoch, res.best_score)
