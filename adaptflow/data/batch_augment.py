"""Augmentation of whole uint8 batches where they live (the GPU in training), with per-image randomness.

A torchvision v2 transform called on a batch draws *one* set of random parameters for all of it; calling
it image by image gives each image its own draw but costs a Python round trip per image — on a GPU that is
thousands of tiny kernels per step and the accelerator waits. :class:`BatchAugment` takes the pipeline
built from params (:func:`adaptflow.data.transforms.build_pipeline`) and runs each transform on the whole
batch at once, drawing parameters per image from its own seeded generator:

- ``RandomAffine`` (degrees, translate, scale, shear; nearest or bilinear, fill 0): one ``grid_sample``
  with a matrix per image, parameters drawn as v2 draws them;
- ``Downsample``: each image through its drawn side and back, one resize pair per distinct side;
- ``RandomHorizontalFlip``, ``RandomVerticalFlip``, ``RandomInvert``: a per-image mask;
- ``ColorJitter``: per-image brightness, contrast, saturation and hue factors, v2's formulas;
- ``GaussianBlur``: a per-image separable kernel in one grouped convolution;
- ``RandomApply`` / ``Compose`` around any of these.

Any other v2 transform (``RandAugment``, ``RandomErasing``, …) runs image by image — correct, only slower.
:attr:`BatchAugment.batched` says whether the whole pipeline is batched; training runs a pipeline that is
not on the host, in the loader thread, instead of on the device (:func:`adaptflow.training.views`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from adaptflow.data.transforms import Downsample

Op = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # float batch in [0, 255] → same


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, dev: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=dev) * (hi - lo) + lo


def _chance(n: int, p: float, g: torch.Generator, dev: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=dev) < p


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def affine_theta(angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, scale: torch.Tensor, shear_x: torch.Tensor,
                 shear_y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-image N×2×3 ``affine_grid`` matrices equal to torchvision's ``affine`` on tensors (angle and shear
    in degrees, counter-clockwise; shift in pixels; about the image centre): for every output pixel, where
    to read, in grid_sample's [-1, 1] units."""
    # torchvision's rotate·scale·shear about the centre, inverted (det of the unscaled part is 1).
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    # The inverse in pixels is [[d, -b], [-c, a]] / scale; in [-1, 1] units (x by w/2, y by h/2) the
    # off-diagonal terms pick up the aspect ratio. Python scalars only: no host → device copy, no sync.
    d, b, c, a = d / scale, b / scale, c / scale, a / scale
    row_x = torch.stack([d, -b * (h / w), -(d * tx - b * ty) / (w / 2.0)], -1)
    row_y = torch.stack([-c * (w / h), a, -(-c * tx + a * ty) / (h / 2.0)], -1)
    return torch.stack([row_x, row_y], -2)


def _affine(t: v2.RandomAffine) -> Op | None:
    fill = t.fill if not isinstance(t.fill, dict) else t.fill.get(torch.Tensor, t.fill.get(next(iter(t.fill)), 0))
    if fill not in (0, None, 0.0, [0], (0,)) or t.center is not None:
        return None
    mode = {"nearest": "nearest", "bilinear": "bilinear"}.get(InterpolationMode(t.interpolation).value)
    if mode is None:
        return None
    degrees, translate, scale, shear = list(t.degrees), t.translate, t.scale, t.shear

    def op(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        dev = x.device
        angle = _uniform(n, degrees[0], degrees[1], g, dev)
        if translate is not None:  # v2 rounds the shift to whole pixels
            tx = torch.round(_uniform(n, -translate[0] * w, translate[0] * w, g, dev))
            ty = torch.round(_uniform(n, -translate[1] * h, translate[1] * h, g, dev))
        else:
            tx = ty = torch.zeros(n, device=dev)
        s = _uniform(n, scale[0], scale[1], g, dev) if scale is not None else torch.ones(n, device=dev)
        sx = _uniform(n, shear[0], shear[1], g, dev) if shear is not None else torch.zeros(n, device=dev)
        sy = _uniform(n, shear[2], shear[3], g, dev) if shear is not None and len(shear) == 4 else torch.zeros(n, device=dev)
        theta = affine_theta(angle, tx, ty, s, sx, sy, h, w)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)

    return op


def _downsample(t: Downsample) -> Op:
    def op(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        # Every side is computed for the whole batch and selected per image: no host sync (the sides are few).
        n, _, h, w = x.shape
        apply = _chance(n, t.p, g, x.device)
        which = torch.randint(len(t.sizes), (n,), generator=g, device=x.device)
        out = x
        for j, side in enumerate(t.sizes):
            small = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            back = F.interpolate(small, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            out = _where(apply & (which == j), back, out)
        return out

    return op


def _flip(p: float, dim: int) -> Op:
    return lambda x, g: _where(_chance(len(x), p, g, x.device), x.flip(dim), x)


def _invert(p: float) -> Op:
    return lambda x, g: _where(_chance(len(x), p, g, x.device), 255.0 - x, x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x  # as v2: hue of a grey image is a no-op
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

    h, s, v = _rgb_to_hsv(x / 255.0).unbind(1)
    h = (h + shift.view(-1, 1, 1)).remainder(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), 1)) * 255.0


def _color_jitter(t: v2.ColorJitter) -> Op:
    """v2's four adjustments with per-image factors, in an order drawn per batch (v2 draws it per call)."""

    def op(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, dev = len(x), x.device
        steps = []
        if t.brightness is not None:
            fb = _uniform(n, *t.brightness, g, dev).view(-1, 1, 1, 1)
            steps.append(lambda y: (y * fb).clamp(0, 255))
        if t.contrast is not None:
            fc = _uniform(n, *t.contrast, g, dev).view(-1, 1, 1, 1)
            steps.append(lambda y: (fc * y + (1 - fc) * _gray(y).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 255))
        if t.saturation is not None:
            fs = _uniform(n, *t.saturation, g, dev).view(-1, 1, 1, 1)
            steps.append(lambda y: (fs * y + (1 - fs) * _gray(y)).clamp(0, 255))
        if t.hue is not None:
            fh = _uniform(n, *t.hue, g, dev)
            steps.append(lambda y: _hue(y, fh))
        for i in torch.randperm(len(steps), generator=g, device=dev).tolist():
            x = steps[i](x)
        return x

    return op


def _blur(t: v2.GaussianBlur) -> Op:
    kx, ky = t.kernel_size

    def kernel(size: int, sigma: torch.Tensor) -> torch.Tensor:
        r = torch.arange(size, device=sigma.device, dtype=torch.float32) - (size - 1) / 2
        k = torch.exp(-0.5 * (r.view(1, -1) / sigma.view(-1, 1)) ** 2)
        return k / k.sum(1, keepdim=True)

    def op(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        sigma = _uniform(n, float(t.sigma[0]), float(t.sigma[1]), g, x.device)
        wx = kernel(kx, sigma).repeat_interleave(c, 0).view(n * c, 1, 1, kx)
        wy = kernel(ky, sigma).repeat_interleave(c, 0).view(n * c, 1, ky, 1)
        y = F.pad(x.reshape(1, n * c, h, w), (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
        y = F.conv2d(F.conv2d(y, wx, groups=n * c), wy, groups=n * c)
        return y.view(n, c, h, w)

    return op


def _apply(p: float, inner: Op) -> Op:
    def op(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        mask = _chance(len(x), p, g, x.device)
        return _where(mask, inner(x, g), x)  # computed for all, kept where drawn: no host sync

    return op


def _per_image(t: v2.Transform) -> Op:
    """Fallback: the v2 transform itself, image by image, on uint8 (what v2 expects), on x's device."""

    def op(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        u8 = x.round().clamp(0, 255).to(torch.uint8)
        return torch.stack([t(img) for img in u8]).float()

    return op


def compile_ops(t: v2.Transform) -> tuple[list[Op], bool]:
    """The ops of transform ``t`` and whether all of them are batched. Consecutive transforms without a
    batched form run together image by image (they may change the size in between)."""
    ops: list[Op] = []
    pending: list[v2.Transform] = []
    batched = True
    for inner in (t.transforms if isinstance(t, v2.Compose) else [t]):
        op = _batched(inner)
        if op is None:
            pending.append(inner)
            batched = False
            continue
        if pending:
            ops.append(_per_image(v2.Compose(pending)))
            pending = []
        if op is not _IDENTITY:
            ops.append(op)
    if pending:
        ops.append(_per_image(v2.Compose(pending)))
    return ops, batched


_IDENTITY: Op = lambda x, g: x  # noqa: E731


def _batched(t: v2.Transform) -> Op | None:
    """``t`` as one batched op, or None when it (or anything inside it) has no batched form."""
    if isinstance(t, v2.Identity):
        return _IDENTITY
    if isinstance(t, (v2.Compose, v2.RandomApply)):
        ops, ok = compile_ops(v2.Compose(list(t.transforms)))
        if not ok:
            return None
        return _apply(t.p, _seq(ops)) if isinstance(t, v2.RandomApply) else _seq(ops)
    if type(t) is v2.RandomAffine:
        return _affine(t)
    if isinstance(t, Downsample):
        return _downsample(t)
    if type(t) is v2.RandomHorizontalFlip:
        return _flip(t.p, -1)
    if type(t) is v2.RandomVerticalFlip:
        return _flip(t.p, -2)
    if type(t) is v2.RandomInvert:
        return _invert(t.p)
    if type(t) is v2.ColorJitter:
        return _color_jitter(t)
    if type(t) is v2.GaussianBlur:
        return _blur(t)
    return None


def _seq(ops: list[Op]) -> Op:
    def op(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        for o in ops:
            x = o(x, g)
        return x

    return op


class BatchAugment:
    """``pipeline`` applied to uint8 batches N×C×H×W on their device, parameters drawn per image from a
    generator seeded with ``seed`` (the same seed and batches give the same output on the same device)."""

    def __init__(self, pipeline: v2.Transform, seed: int):
        self.ops, self.batched = compile_ops(pipeline)
        self.seed = int(seed)
        self._gens: dict[torch.device, torch.Generator] = {}

    def _gen(self, dev: torch.device) -> torch.Generator:
        if dev not in self._gens:
            self._gens[dev] = torch.Generator(device=dev).manual_seed(self.seed)
        return self._gens[dev]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ops or not len(x):
            return x
        if x.dtype != torch.uint8:
            raise TypeError(f"BatchAugment expects uint8 images, got {x.dtype}")
        y = _seq(self.ops)(x.float(), self._gen(x.device))
        return y.round_().clamp_(0, 255).to(torch.uint8)

