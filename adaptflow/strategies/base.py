"""What every strategy receives and returns, and the checkpoint-selection rules."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from adaptflow.accel import Runtime, runtime
from adaptflow.data.store import Split
from adaptflow.models import ModelConfig, create, load, set_head
from adaptflow.params import Params
from adaptflow.training import Scorer, accuracy, predict_logits, seed_everything, val_scorer


@dataclass
class Context:
    params: Params
    source_dir: Path  # source checkpoint (pretrain's output)
    features_dir: Path  # cache_features' output
    labeled: Split  # the k-shot labeled target train set (empty when target.k = 0)
    val: Split  # labeled target val: chooses checkpoints when target.k > 0
    transform: v2.Transform  # augment.target (the weak augmentation)
    dev: torch.device
    seed: int = 0  # this run's seed (one of finetune.seeds): initial heads, data order, augmentation draws
    pool: Split | None = None  # unlabeled target train (labels present in the store, never read by adaptation)
    source: Split | None = None  # source train, for objectives that align source and target
    source_val: Split | None = None  # source val, for the label-free source-val selection rule
    source_transform: v2.Transform | None = None  # augment.source

    @property
    def rt(self) -> Runtime:
        """The runtime (device, AMP, memory format) of ``dev``, for objectives that feed batches themselves."""
        return runtime(device=str(self.dev))

    def source_classes(self) -> list[str]:
        return ModelConfig(**json.loads((self.source_dir / "config.json").read_text())).classes

    def source_model(self) -> tuple[nn.Module, ModelConfig, bool]:
        """The source network with its head pointed at the target classes (kept when classes match)."""
        seed_everything(self.seed)  # a re-initialised head draws from the seeded generator
        model, cfg = load(self.source_dir, self.dev)
        kept = set_head(model, cfg.classes, self.labeled.classes)
        cfg = ModelConfig(cfg.arch, cfg.in_chans, cfg.image_size, list(self.labeled.classes), {"source_head_kept": kept},
                          input_size=cfg.input_size)
        return model.to(self.dev), cfg, kept

    def fresh_model(self) -> tuple[nn.Module, ModelConfig]:
        _, src_cfg = load(self.source_dir, "cpu")
        cfg = ModelConfig(src_cfg.arch, src_cfg.in_chans, src_cfg.image_size, list(self.labeled.classes), input_size=src_cfg.input_size)
        seed_everything(self.seed)  # the initial weights are part of what the seed fixes
        return create(cfg).to(self.dev), cfg

    def source_in_target_labels(self, split: Split) -> Split:
        """``split`` (a source split) with labels re-indexed to the target classes; other classes dropped."""
        target = list(self.labeled.classes)
        mapping = np.array([target.index(c) if c in target else -1 for c in split.classes])
        labels = mapping[split.labels]
        keep = labels >= 0
        return Split(split.images[keep], labels[keep].astype(np.int64), target)

    def has_target_labels(self) -> bool:
        return len(self.labeled) > 0

    def scorer(self) -> tuple[Scorer, str]:
        """The checkpoint-selection rule and its description.

        ``auto``: target val accuracy when there are target labels (k > 0); with none, the label-free
        information-maximisation score on the unlabeled pool.
        """
        rule = self.params.finetune.selection
        if rule == "auto":
            rule = "val" if self.has_target_labels() else "im"
        if rule == "val":
            return val_scorer(self.val, self.dev), "target val: max accuracy (ties: lowest val loss)"
        if rule == "source_val":
            if self.source_val is None:
                raise ValueError("selection source_val needs the source val split")
            return source_val_scorer(self.source_in_target_labels(self.source_val), self.dev), "label-free: max source val accuracy"
        if rule == "im":
            if self.pool is None or len(self.pool) == 0:
                raise ValueError("selection im needs the unlabeled target pool")
            return im_scorer(self.pool, self.dev), "label-free: max information maximisation H(mean p) - mean H(p) on the target pool"
        raise ValueError(f"unknown selection rule {rule!r}")


def source_val_scorer(source_val: Split, dev: torch.device) -> Scorer:
    def score(model: nn.Module) -> dict:
        acc = accuracy(predict_logits(model, source_val.images, dev=dev, across=True), source_val.labels)
        return {"score": acc, "tiebreak": 0.0, "sel_source_val_acc": acc}

    return score


def im_scorer(pool: Split, dev: torch.device) -> Scorer:
    """Information maximisation on unlabeled target images: confident (low per-image entropy) and diverse
    (high entropy of the mean prediction). Uses no labels; a collapsed model scores low."""

    def score(model: nn.Module) -> dict:
        p = torch.softmax(predict_logits(model, pool.images, dev=dev, across=True), dim=1).clamp_min(1e-12)
        cond = float(-(p * p.log()).sum(1).mean())
        mean = p.mean(0)
        marg = float(-(mean * mean.log()).sum())
        im = (marg - cond) / math.log(p.shape[1])
        return {"score": im, "tiebreak": -cond, "sel_im": im}

    return score


@dataclass
class Adapted:
    model: nn.Module
    config: ModelConfig
    selection: str  # how the checkpoint was chosen, in words
    val_acc: float  # target val accuracy of the chosen checkpoint where its rule measured one, else NaN (label-free, source val)
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    score: float | None = None  # the selection rule's score of the chosen checkpoint (label-free when k = 0)
