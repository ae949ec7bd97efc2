"""timm backbones by name and their checkpoints.

A checkpoint directory holds ``model.safetensors`` and ``config.json`` (:class:`ModelConfig`): enough to
rebuild the network with timm alone, without adaptflow or MLflow.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass
class ModelConfig:
    arch: str  # timm model name
    in_chans: int
    image_size: int
    classes: list[str]
    extra: dict = field(default_factory=dict)  # strategy, selection rule, source checkpoint, ...
    input_size: int | None = None  # the side the network sees (None: image_size); resized on the device

    @property
    def side(self) -> int:
        return self.input_size or self.image_size

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def create(cfg: ModelConfig) -> nn.Module:
    """A randomly initialised timm model for ``cfg`` (weights come from a checkpoint, never a hub)."""
    model = timm.create_model(cfg.arch, pretrained=False, in_chans=cfg.in_chans, num_classes=cfg.num_classes)
    model.adaptflow_input_size = cfg.input_size  # read by input_size(); not a parameter, not saved in weights
    return model


@functools.lru_cache(maxsize=32)
def input_problem(arch: str, side: int, channels: int) -> str | None:
    """Why timm's ``arch`` cannot be built or take ``side``×``side`` inputs, or None. Only a model timm marks
    as built for one input size (ViT, Swin, …) is probed: one forward pass of a randomly initialised copy, on
    the CPU (many such models take other sizes; some do not)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch)
    except Exception as exc:  # noqa: BLE001 — e.g. a pretrained tag timm does not know
        return f"{arch}: {exc}"
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return None
    try:
        model = timm.create_model(arch, pretrained=False, in_chans=channels, num_classes=2).eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, side, side))
    except Exception as exc:  # noqa: BLE001 — whatever the model raises is the reason
        n = cfg.input_size[-1]
        return (f"{arch} cannot take {side}×{side} inputs ({type(exc).__name__}: {str(exc).strip()[:200]}); timm builds it for "
                f"{n}×{n}: set pretrain.input_size: {n} (images are resized on the device), or choose another model")
    return None


def input_size(model: nn.Module) -> int | None:
    """The side ``model`` takes its input at, when it differs from the stored images' (None: as stored)."""
    return getattr(model, "adaptflow_input_size", None)


def save(model: nn.Module, cfg: ModelConfig, directory: Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True))


def load(directory: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    directory = Path(directory)
    cfg = ModelConfig(**json.loads((directory / CONFIG).read_text()))
    model = create(cfg)
    model.load_state_dict(load_file(str(directory / WEIGHTS), device="cpu"))
    return model.to(device).eval(), cfg


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled backbone features (the classifier's input)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def set_head(model: nn.Module, source_classes: list[str], target_classes: list[str]) -> bool:
    """Point the classifier at the target classes.

    Classes are matched by name: the source head's row of every target class the source knows is kept
    (in the target's order), so for those the model starts as the source classifier; rows of classes the
    source never saw are freshly initialised. Returns whether *every* target class was known.
    """
    head = model.get_classifier()
    known = [i for i, c in enumerate(target_classes) if c in source_classes]
    if not isinstance(head, nn.Linear) or not known:
        model.reset_classifier(len(target_classes))
        return False
    rows = torch.tensor([source_classes.index(target_classes[i]) for i in known])
    weight, bias = head.weight.data[rows].clone(), head.bias.data[rows].clone()
    model.reset_classifier(len(target_classes))
    new = model.get_classifier()
    new.weight.data[known] = weight
    new.bias.data[known] = bias
    return len(known) == len(target_classes)
