"""What every strategy receives and returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2

from adaptflow.data.store import Split
from adaptflow.models import ModelConfig, create, load, set_head
from adaptflow.params import Params
from adaptflow.training import seed_everything


@dataclass
class Context:
    params: Params
    source_dir: Path  # source checkpoint (pretrain's output)
    features_dir: Path  # cache_features' output
    labeled: Split  # the k-shot labeled target train set
    val: Split  # labeled target val: the only split that chooses anything
    transform: v2.Transform  # augment.target
    dev: torch.device
    seed: int = 0  # this run's seed (one of finetune.seeds): initial heads, data order, augmentation draws

    def source_model(self) -> tuple[nn.Module, ModelConfig, bool]:
        """The source network with its head pointed at the target classes (kept when classes match)."""
        seed_everything(self.seed)  # a re-initialised head draws from the seeded generator
        model, cfg = load(self.source_dir, self.dev)
        kept = set_head(model, cfg.classes, self.labeled.classes)
        cfg = ModelConfig(cfg.arch, cfg.in_chans, cfg.image_size, list(self.labeled.classes), {"source_head_kept": kept})
        return model.to(self.dev), cfg, kept

    def source_classes(self) -> list[str]:
        return ModelConfig(**json.loads((self.source_dir / "config.json").read_text())).classes

    def fresh_model(self) -> tuple[nn.Module, ModelConfig]:
        _, src_cfg = load(self.source_dir, "cpu")
        cfg = ModelConfig(src_cfg.arch, src_cfg.in_chans, src_cfg.image_size, list(self.labeled.classes))
        seed_everything(self.seed)  # the initial weights are part of what the seed fixes
        return create(cfg).to(self.dev), cfg


@dataclass
class Adapted:
    model: nn.Module
    config: ModelConfig
    selection: str  # how the checkpoint was chosen, in words
    val_acc: float
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
