"""Augmentation pipelines built from params: torchvision.transforms.v2 classes by name.

A spec is ``{"name": "RandomAffine", "degrees": 10}``; wrappers that take other transforms
(``RandomChoice``, ``RandomApply``, ``RandomOrder``, ``Compose``) take a nested ``transforms`` list.
Pipelines run on uint8 image tensors ``(C, H, W)``; :class:`adaptflow.data.batch_augment.BatchAugment`
runs them on whole batches on the device with parameters drawn per image.

A role's augmentation in params is a named preset, then :class:`Downsample` (the source brought down to
the target's native resolution and back), then an explicit list of specs: :func:`role_specs` resolves
the three into one list, so what runs is always a plain spec list that can be printed and hashed.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

_WRAPPERS = {"RandomChoice", "RandomApply", "RandomOrder", "Compose"}


class Downsample(v2.Transform):
    """Resize to one of ``sizes`` (drawn per call) and back to the input's own size.

    The shape is kept, the detail above the chosen resolution is lost: a 32-px source digit passed through
    8 px looks like a UCI digit upsampled by ingest. Use the target's native resolution (its dataset card
    records it) to bring the source closer to the target; ``p`` is the chance of applying it at all.
    """

    def __init__(self, sizes: Sequence[int], p: float = 1.0) -> None:
        super().__init__()
        if isinstance(sizes, int):
            sizes = [sizes]
        if not sizes or any(int(s) < 1 for s in sizes):
            raise ValueError(f"Downsample: sizes must be a non-empty list of positive sides, got {sizes!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Downsample: p must be in [0, 1], got {p}")
        self.sizes = [int(s) for s in sizes]
        self.p = float(p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if torch.rand(1).item() >= self.p:
            return {"size": None}
        return {"size": self.sizes[int(torch.randint(len(self.sizes), ()).item())]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["size"] is None:
            return inpt
        h, w = F.get_size(inpt)
        small = F.resize(inpt, [params["size"], params["size"]], antialias=True)
        return F.resize(small, [h, w], antialias=True)


_CUSTOM: dict[str, type[v2.Transform]] = {"Downsample": Downsample}

# Named presets: geometric jitter scaled for the kind of image. Digits are never flipped (a flipped 2 is
# not a 2); photos are. Each is a plain spec list, shown resolved in data/augmented/pipelines.json.
PRESETS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "light": [{"name": "RandomAffine", "degrees": 5, "translate": [0.05, 0.05], "scale": [0.95, 1.05]}],
    "digits": [{"name": "RandomAffine", "degrees": 12, "translate": [0.1, 0.1], "scale": [0.85, 1.1], "shear": 8}],
    "digits_strong": [
        {"name": "RandomAffine", "degrees": 15, "translate": [0.12, 0.12], "scale": [0.8, 1.15], "shear": 10},
        {"name": "RandomApply", "p": 0.3, "transforms": [{"name": "GaussianBlur", "kernel_size": 3, "sigma": [0.1, 1.0]}]},
        {"name": "ColorJitter", "brightness": 0.4, "contrast": 0.4},
        {"name": "RandomInvert", "p": 0.2},
    ],
    "photo": [
        {"name": "RandomHorizontalFlip"},
        {"name": "RandomAffine", "degrees": 10, "translate": [0.1, 0.1], "scale": [0.9, 1.1]},
        {"name": "ColorJitter", "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.02},
    ],
}


def role_specs(preset: str, downsample: Sequence[int], transforms: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One role's augmentation as a flat spec list: preset, then Downsample, then the explicit specs."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    specs = [dict(s) for s in PRESETS[preset]]
    if downsample:
        specs.append({"name": "Downsample", "sizes": [int(s) for s in downsample]})
    return specs + [dict(t) for t in transforms]


def _transform_class(name: Any) -> type[v2.Transform] | None:
    cls = _CUSTOM.get(name) or getattr(v2, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) and issubclass(cls, v2.Transform) else None


def build_transform(spec: dict[str, Any]) -> v2.Transform:
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"transform spec {spec} has no 'name'")
    cls = _transform_class(name)
    if cls is None:
        raise ValueError(f"{name!r} is not a torchvision.transforms.v2 transform (nor one of adaptflow's: {', '.join(_CUSTOM)})")
    if name in _WRAPPERS:
        spec["transforms"] = [build_transform(t) for t in spec.get("transforms", [])]
    try:
        return cls(**spec)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 — a bad argument, whatever the constructor raises for it
        raise ValueError(f"{name}: {type(exc).__name__ + ': ' if not isinstance(exc, TypeError) else ''}{exc}") from None


def build_pipeline(specs: list[dict[str, Any]]) -> v2.Transform:
    """Compose a list of specs; an empty list is the identity."""
    if not specs:
        return v2.Identity()
    return v2.Compose([build_transform(s) for s in specs])


def _taken(spec: dict[str, Any], option: int) -> dict[str, Any]:
    """``spec`` with every random branch in it taken: ``p`` at 1 wherever a transform has one (unless it is
    0), and each ``RandomChoice`` reduced to its ``option``-th possible transform (its last, when it has
    fewer)."""
    spec = dict(spec)
    if spec.get("name") in _WRAPPERS:
        spec["transforms"] = [_taken(t, option) for t in spec.get("transforms", [])]
    if spec.get("name") == "RandomChoice":
        weights = spec.get("p") or [1.0] * len(spec["transforms"])
        live = [t for t, w in zip(spec["transforms"], weights) if w > 0]
        return {"name": "Compose", "transforms": [live[min(option, len(live) - 1)]]} if live else {"name": "Identity"}
    cls = _transform_class(spec.get("name"))
    p = inspect.signature(cls).parameters.get("p") if cls is not None else None
    if p is not None and spec.get("p", p.default) not in (0, 0.0, None, inspect.Parameter.empty):
        spec["p"] = 1.0
    return spec


def _choices(specs: list[dict[str, Any]]) -> int:
    """The most transforms any ``RandomChoice`` in ``specs`` chooses from (1 when there is none)."""
    most = 1
    for s in specs:
        inner = s.get("transforms", []) if s.get("name") in _WRAPPERS else []
        most = max(most, len(inner) if s.get("name") == "RandomChoice" else 1, _choices(inner))
    return most


def image_problem(specs: list[dict[str, Any]], channels: int, size: int, tries: int = 4) -> str | None:
    """Why a pipeline would break training, or None. Training applies it to batches of stored images (uint8,
    ``channels``×``size``×``size``) exactly as :class:`~adaptflow.data.batch_augment.BatchAugment` does here,
    and must get the same back: normalising and resizing to the network's input side come after, on the
    device. The pipeline runs ``tries`` times as it is, then with every random branch taken (:func:`_taken`),
    once per option index ``i`` up to its widest ``RandomChoice``, every ``RandomChoice`` taking its
    ``i``-th option: each option of each choice runs, though not every combination of options of nested
    choices. The values random transforms draw (angles, crops, orders) are still samples."""
    from adaptflow.data.batch_augment import BatchAugment  # it builds on this module

    runs = [("", build_pipeline(specs), seed) for seed in range(tries)]
    n = _choices(specs)
    for i in range(n):
        when = f" (with every random branch taken{f', option {i + 1} of each RandomChoice' if n > 1 else ''})"
        runs.append((when, build_pipeline([_taken(s, i) for s in specs]), tries + i))
    x = torch.randint(0, 256, (2, channels, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for when, pipe, seed in runs:
        try:
            y = BatchAugment(pipe, seed)(x)
        except Exception as exc:  # noqa: BLE001 — whatever a transform raises is the user's to see
            return f"it fails on a batch of uint8 {channels}×{size}×{size} images{when} ({type(exc).__name__}: {exc})"
        if tuple(y.shape) != tuple(x.shape):  # (BatchAugment hands back uint8 whatever the transforms made)
            return (f"it turns {channels}×{size}×{size} images into {'×'.join(map(str, y.shape[1:]))}{when}; it must give them back at "
                    "preprocess.image_size and channels (resizing to pretrain.input_size comes after it, on the device)")
    return None
