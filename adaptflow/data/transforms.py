"""Augmentation pipelines built from params: torchvision.transforms.v2 classes by name.

A spec is ``{"name": "RandomAffine", "degrees": 10}``; wrappers that take other transforms
(``RandomChoice``, ``RandomApply``, ``RandomOrder``, ``Compose``) take a nested ``transforms`` list.
Pipelines run on uint8 image tensors ``(C, H, W)`` or batches ``(N, C, H, W)``, on CPU or on a device.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

_WRAPPERS = {"RandomChoice", "RandomApply", "RandomOrder", "Compose"}


def build_transform(spec: dict[str, Any]) -> v2.Transform:
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"transform spec {spec} has no 'name'")
    cls = getattr(v2, name, None)
    if not (isinstance(cls, type) and issubclass(cls, v2.Transform)):
        raise ValueError(f"{name!r} is not a torchvision.transforms.v2 transform")
    if name in _WRAPPERS:
        spec["transforms"] = [build_transform(t) for t in spec.get("transforms", [])]
    try:
        return cls(**spec)
    except TypeError as exc:
        raise ValueError(f"{name}: {exc}") from None


def build_pipeline(specs: list[dict[str, Any]]) -> v2.Transform:
    """Compose a list of specs; an empty list is the identity."""
    if not specs:
        return v2.Identity()
    return v2.Compose([build_transform(s) for s in specs])


def apply_per_sample(pipeline: v2.Transform, batch: torch.Tensor) -> torch.Tensor:
    """Random transforms draw one set of parameters per call: apply per sample for per-image variety."""
    if isinstance(pipeline, v2.Identity):
        return batch
    return torch.stack([pipeline(img) for img in batch])
