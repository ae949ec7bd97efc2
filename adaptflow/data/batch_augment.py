"""Augmentation of whole uint8 batches where they live (the GPU in training), with per-image randomness.

A torchvision v2 transform called on a batch draws *one* set of random parameters for all of it; calling
it image by image gives each image its own draw but costs a Python round trip per image — on a GPU that is
thousands of tiny kernels per step and the accelerator waits. :class:`BatchAugment` takes the pipeline
built from params (:func:`adaptflow.data.transforms.build_pipeline`) and runs each transform on the whole
batch at once, with parameters drawn per image on the host from its own seeded CPU generator (so the
device makes no host sync and the same seed draws the same on every device):

- ``RandomAffine`` (degrees, translate, scale, shear; nearest or bilinear, fill 0): one ``grid_sample``
  with a matrix per image, parameters drawn as v2 draws them;
- ``Downsample``: each image through its drawn side and back, one resize pair per distinct side;
- ``RandomHorizontalFlip``, ``RandomVerticalFlip``, ``RandomInvert``: a per-image mask;
- ``ColorJitter``: per-image brightness, contrast, saturation and hue factors, v2's formulas;
- ``GaussianBlur``: a per-image separable kernel in one grouped convolution;
- ``RandAugment``: each image's ops and signs drawn per image, the images grouped by them, each group
  through v2's own op at once (uint8, as v2);
- ``RandomErasing`` with a constant fill: a per-image box, drawn as v2 draws it;
- ``RandomApply`` / ``Compose`` around any of these.

Any other v2 transform (``AutoAugment``, ``TrivialAugmentWide``, ``RandomErasing`` with random noise, …)
runs image by image — correct, only slower.
:attr:`BatchAugment.batched` says whether the whole pipeline is batched; training runs a pipeline that is
not on the host, in the loader thread, instead of on the device (:func:`adaptflow.training.views`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from adaptflow.data.transforms import Downsample

# Every random parameter of a batch is drawn on the host, from a CPU generator, before the batch reaches
# the device: the device only applies them (a handful of kernels per transform, no host sync), the same
# seed gives the same draws on every device, and training draws them in its loader thread.
Rows = Iterator[torch.Tensor]  # per-image float parameters, each of length N, in draw order
Meta = Iterator[Any]  # per-batch host values (e.g. ColorJitter's order), in draw order


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else x.round().clamp_(0, 255).to(torch.uint8)


class Op:
    """One batched transform: ``draw`` appends its parameters for N images of H×W (rows of length N, and
    host values) in a fixed order; ``apply`` consumes them in that order on a batch of values in [0, 255],
    uint8 or float: an op that computes in float takes ``x.float()`` (no copy when it is), one that computes
    in uint8 (as v2 does) :func:`_as_uint8`, so a pipeline of uint8 ops never converts a large batch back and
    forth."""

    def draw(self, n: int, h: int, w: int, g: torch.Generator, rows: list, meta: list) -> None:
        pass

    def apply(self, x: torch.Tensor, rows: Rows, meta: Meta) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass
class Draws:
    """The parameters of one batch: ``rows`` (M×N float32) and host values. Moves like a tensor — the
    :class:`adaptflow.accel.Prefetcher` pins it and copies it to the device with the images."""

    rows: torch.Tensor
    meta: list

    def pin_memory(self) -> "Draws":
        return Draws(self.rows.pin_memory(), self.meta)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Draws":
        return Draws(self.rows.to(device, non_blocking=non_blocking), self.meta)

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        self.rows.record_stream(stream)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _chance(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=g) < p).float()


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image: ``a`` where the row ``mask`` is 1, else ``b``."""
    return torch.where(mask.view(-1, 1, 1, 1) > 0.5, a, b)


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


class _Affine(Op):
    def __init__(self, t: v2.RandomAffine, mode: str):
        self.t, self.mode = t, mode

    def draw(self, n, h, w, g, rows, meta):
        t = self.t
        angle = _uniform(n, t.degrees[0], t.degrees[1], g)
        if t.translate is not None:  # v2 rounds the shift to whole pixels
            tx = torch.round(_uniform(n, -t.translate[0] * w, t.translate[0] * w, g))
            ty = torch.round(_uniform(n, -t.translate[1] * h, t.translate[1] * h, g))
        else:
            tx = ty = torch.zeros(n)
        s = _uniform(n, t.scale[0], t.scale[1], g) if t.scale is not None else torch.ones(n)
        shear = t.shear
        sx = _uniform(n, shear[0], shear[1], g) if shear is not None else torch.zeros(n)
        sy = _uniform(n, shear[2], shear[3], g) if shear is not None and len(shear) == 4 else torch.zeros(n)
        rows.extend(affine_theta(angle, tx, ty, s, sx, sy, h, w).reshape(n, 6).T)

    def apply(self, x, rows, meta):
        x = x.float()
        theta = torch.stack([next(rows) for _ in range(6)], 1).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode=self.mode, padding_mode="zeros", align_corners=False)


def _affine(t: v2.RandomAffine) -> Op | None:
    fill = t.fill if not isinstance(t.fill, dict) else t.fill.get(torch.Tensor, t.fill.get(next(iter(t.fill)), 0))
    if fill not in (0, None, 0.0, [0], (0,)) or t.center is not None:
        return None
    mode = {"nearest": "nearest", "bilinear": "bilinear"}.get(InterpolationMode(t.interpolation).value)
    return None if mode is None else _Affine(t, mode)


class _Downsample(Op):
    """Each image through its drawn side and back; only the sides drawn in this batch are computed."""

    def __init__(self, t: Downsample):
        self.t = t

    def draw(self, n, h, w, g, rows, meta):
        apply = torch.rand(n, generator=g) < self.t.p
        which = torch.randint(len(self.t.sizes), (n,), generator=g)
        code = torch.where(apply, which, -1)
        rows.append(code.float())
        meta.append(sorted(set(code[apply].tolist())))

    def apply(self, x, rows, meta):
        code, present = next(rows), next(meta)
        x = x.float() if present else x
        h, w = x.shape[-2:]
        out = x
        for j in present:
            side = self.t.sizes[j]
            small = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            back = F.interpolate(small, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            out = torch.where((code == j).view(-1, 1, 1, 1), back, out)
        return out


class _Masked(Op):
    """A per-image yes/no with chance ``p``: ``fn(x)`` where yes (flips, invert)."""

    def __init__(self, p: float, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.p, self.fn = p, fn

    def draw(self, n, h, w, g, rows, meta):
        rows.append(_chance(n, self.p, g))

    def apply(self, x, rows, meta):
        return _where(next(rows), self.fn(x), x)


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


class _ColorJitter(Op):
    """v2's four adjustments with per-image factors, in an order drawn per batch (v2 draws it per call)."""

    def __init__(self, t: v2.ColorJitter):
        col = lambda f: f.view(-1, 1, 1, 1)  # noqa: E731
        steps = {
            "brightness": lambda y, f: (y * col(f)).clamp(0, 255),
            "contrast": lambda y, f: (col(f) * y + (1 - col(f)) * _gray(y).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 255),
            "saturation": lambda y, f: (col(f) * y + (1 - col(f)) * _gray(y)).clamp(0, 255),
            "hue": _hue,
        }
        self.steps = [(getattr(t, k), fn) for k, fn in steps.items() if getattr(t, k) is not None]

    def draw(self, n, h, w, g, rows, meta):
        rows.extend(_uniform(n, *bounds, g) for bounds, _ in self.steps)
        meta.append(torch.randperm(len(self.steps), generator=g).tolist())

    def apply(self, x, rows, meta):
        factors, order = [next(rows) for _ in self.steps], next(meta)
        x = x.float()
        for i in order:
            x = self.steps[i][1](x, factors[i])
        return x


class _Blur(Op):
    """A per-image separable Gaussian kernel (weights drawn on the host) in one grouped convolution."""

    def __init__(self, t: v2.GaussianBlur):
        self.t = t

    @staticmethod
    def _kernel(size: int, sigma: torch.Tensor) -> torch.Tensor:
        r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        k = torch.exp(-0.5 * (r.view(1, -1) / sigma.view(-1, 1)) ** 2)
        return k / k.sum(1, keepdim=True)

    def draw(self, n, h, w, g, rows, meta):
        kx, ky = self.t.kernel_size
        sigma = _uniform(n, float(self.t.sigma[0]), float(self.t.sigma[1]), g)
        rows.extend(self._kernel(kx, sigma).T)
        rows.extend(self._kernel(ky, sigma).T)

    def apply(self, x, rows, meta):
        x = x.float()
        kx, ky = self.t.kernel_size
        n, c, h, w = x.shape
        wx = torch.stack([next(rows) for _ in range(kx)], 1).repeat_interleave(c, 0).view(n * c, 1, 1, kx)
        wy = torch.stack([next(rows) for _ in range(ky)], 1).repeat_interleave(c, 0).view(n * c, 1, ky, 1)
        y = F.pad(x.reshape(1, n * c, h, w), (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
        y = F.conv2d(F.conv2d(y, wx, groups=n * c), wy, groups=n * c)
        return y.view(n, c, h, w)


class _RandAugment(Op):
    """v2's RandAugment with each image's ops (and their signs) drawn per image. Per round, the images are
    grouped by what they drew: a permutation that sorts them into groups travels with the batch, the group
    sizes stay on the host, and each group goes through v2's own operation at once (v2 applies a fixed op
    and magnitude to a batch as to one image). So each image gets exactly what v2 gives it for the same
    draws, in uint8 as v2 computes it, with a few dozen batched kernels instead of thousands per batch."""

    def __init__(self, t: v2.RandAugment):
        self.t = t
        self.space = list(t._AUGMENTATION_SPACE.items())  # name → (magnitudes(bins, h, w), signed)
        self._signed = torch.tensor([signed for _, (_, signed) in self.space])

    def draw(self, n, h, w, g, rows, meta):
        for _ in range(self.t.num_ops):
            op = torch.randint(len(self.space), (n,), generator=g)
            negative = (torch.rand(n, generator=g) <= 0.5) & self._signed[op]  # v2: a signed op's sign, 50/50
            group = op * 2 + negative
            rows.append(torch.argsort(group, stable=True).float())  # exact: n < 2**24
            meta.append(torch.bincount(group, minlength=2 * len(self.space)).tolist())

    def _op(self, group: int, x: torch.Tensor) -> torch.Tensor:
        name, (magnitudes, _) = self.space[group // 2]
        m = magnitudes(self.t.num_magnitude_bins, x.shape[-2], x.shape[-1])
        m = 0.0 if m is None else float(m[self.t.magnitude]) * (-1 if group % 2 else 1)
        return self.t._apply_image_or_video_transform(x, name, m, interpolation=self.t.interpolation, fill=self.t._fill)

    def apply(self, x, rows, meta):
        u8 = _as_uint8(x)  # v2's ops take and give uint8, as between v2 transforms
        for _ in range(self.t.num_ops):
            order, sizes = next(rows).long(), next(meta)
            grouped, out, start = u8.index_select(0, order), torch.empty_like(u8), 0
            for group, size in enumerate(sizes):
                if size:  # each group's images straight back to their places
                    out.index_copy_(0, order[start : start + size], self._op(group, grouped[start : start + size]))
                    start += size
            u8 = out
        return u8


class _Erase(Op):
    """v2's RandomErasing with a box drawn per image as v2 draws it (chance ``p``; up to 10 tries at an area
    and aspect ratio that fit; none if all fail), filled with its constant value."""

    def __init__(self, t: v2.RandomErasing, value: torch.Tensor):
        self.t, self.value = t, value

    def draw(self, n, h, w, g, rows, meta):
        t, tries = self.t, 10
        area = h * w * _uniform(n * tries, t.scale[0], t.scale[1], g).view(n, tries)
        aspect = torch.exp(_uniform(n * tries, float(t._log_ratio[0]), float(t._log_ratio[1]), g)).view(n, tries)
        bh, bw = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
        fits = (bh < h) & (bw < w)
        first = torch.where(fits.any(1), fits.float().argmax(1), -1)  # the first try that fits, as v2's loop
        pick = first.clamp_min(0).view(-1, 1)
        bh, bw = bh.gather(1, pick).squeeze(1), bw.gather(1, pick).squeeze(1)
        erase = (torch.rand(n, generator=g) < t.p) & (first >= 0)
        i = torch.floor(torch.rand(n, generator=g) * (h - bh + 1))
        j = torch.floor(torch.rand(n, generator=g) * (w - bw + 1))
        rows.extend([i, j, torch.where(erase, bh, 0.0), torch.where(erase, bw, 0.0)])

    def apply(self, x, rows, meta):
        i, j, bh, bw = (next(rows).view(-1, 1, 1, 1) for _ in range(4))
        ys = torch.arange(x.shape[-2], device=x.device, dtype=i.dtype).view(1, 1, -1, 1)
        xs = torch.arange(x.shape[-1], device=x.device, dtype=i.dtype).view(1, 1, 1, -1)
        inside = (ys >= i) & (ys < i + bh) & (xs >= j) & (xs < j + bw)  # N×1×H×W
        return torch.where(inside, self.value.to(x.device, x.dtype).view(1, -1, 1, 1), x)  # in x's dtype


def _erase(t: v2.RandomErasing) -> Op | None:
    """Batched when the fill is a constant a uint8 image holds exactly (v2 casts it into the image)."""
    if t.value is None or any(v != int(v) or not 0 <= v <= 255 for v in t.value):
        return None
    return _Erase(t, torch.tensor(t.value, dtype=torch.float32))


class _Seq(Op):
    def __init__(self, ops: list[Op]):
        self.ops = ops

    def draw(self, n, h, w, g, rows, meta):
        for o in self.ops:
            o.draw(n, h, w, g, rows, meta)

    def apply(self, x, rows, meta):
        for o in self.ops:
            x = o.apply(x, rows, meta)
        return x


class _Apply(Op):
    """RandomApply: the inner ops are drawn and computed for every image and kept where the coin said so
    (no host sync, and the draw order does not depend on the coins)."""

    def __init__(self, p: float, inner: Op):
        self.p, self.inner = p, inner

    def draw(self, n, h, w, g, rows, meta):
        rows.append(_chance(n, self.p, g))
        self.inner.draw(n, h, w, g, rows, meta)

    def apply(self, x, rows, meta):
        mask = next(rows)
        return _where(mask, self.inner.apply(x, rows, meta), x)


# v2 draws from torch's global CPU generator; per-image pipelines of different loaders (threads, on CUDA)
# take turns with it, so that one's fork → seed → transform → restore never interleaves with another's.
_GLOBAL_RNG = threading.Lock()


class _PerImage(Op):
    """Fallback: the v2 transform itself, image by image, on uint8 (what v2 expects), on x's device. v2
    draws from torch's global CPU generator: it runs under a forked one, seeded per batch from this
    augmentation's own generator, so the draws repeat with the seed whoever else uses torch's generator.
    Only the CPU generator is seeded (``torch.manual_seed`` would reseed the CUDA generators too, from a
    loader thread, under the training step's dropout)."""

    def __init__(self, t: v2.Transform):
        self.t = t

    def draw(self, n, h, w, g, rows, meta):
        meta.append(int(torch.randint(2**62, (1,), generator=g)))

    def apply(self, x, rows, meta):
        u8 = _as_uint8(x)
        with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(next(meta))
            return torch.stack([self.t(img) for img in u8])


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
            ops.append(_PerImage(v2.Compose(pending)))
            pending = []
        if not isinstance(op, _Identity):
            ops.append(op)
    if pending:
        ops.append(_PerImage(v2.Compose(pending)))
    return ops, batched


class _Identity(Op):
    def apply(self, x, rows, meta):
        return x


def _batched(t: v2.Transform) -> Op | None:
    """``t`` as one batched op, or None when it (or anything inside it) has no batched form."""
    if isinstance(t, v2.Identity):
        return _Identity()
    if isinstance(t, (v2.Compose, v2.RandomApply)):
        ops, ok = compile_ops(v2.Compose(list(t.transforms)))
        if not ok:
            return None
        return _Apply(t.p, _Seq(ops)) if isinstance(t, v2.RandomApply) else _Seq(ops)
    if type(t) is v2.RandomAffine:
        return _affine(t)
    if isinstance(t, Downsample):
        return _Downsample(t)
    if type(t) is v2.RandomHorizontalFlip:
        return _Masked(t.p, lambda x: x.flip(-1))
    if type(t) is v2.RandomVerticalFlip:
        return _Masked(t.p, lambda x: x.flip(-2))
    if type(t) is v2.RandomInvert:
        return _Masked(t.p, lambda x: 255.0 - x)
    if type(t) is v2.ColorJitter:
        return _ColorJitter(t)
    if type(t) is v2.GaussianBlur:
        return _Blur(t)
    if type(t) is v2.RandAugment:
        return _RandAugment(t)
    if type(t) is v2.RandomErasing:
        return _erase(t)
    return None


class BatchAugment:
    """``pipeline`` applied to uint8 batches N×C×H×W on their device, parameters drawn per image on the
    host from a CPU generator seeded with ``seed``: the same seed and batches give the same draws on every
    device. ``draw`` and ``apply`` split a call in two, so training draws in its loader thread and the
    device only applies (see :func:`adaptflow.training.views`)."""

    def __init__(self, pipeline: v2.Transform, seed: int):
        self.ops, self.batched = compile_ops(pipeline)
        self._seq = _Seq(self.ops)
        self.seed = int(seed)
        self._g = torch.Generator().manual_seed(self.seed)

    def draw(self, n: int, h: int, w: int) -> Draws:
        """Parameters for the next batch of ``n`` images of ``h``×``w`` (batched pipelines only: their ops
        keep the size, so everything can be drawn before any is applied)."""
        if not self.batched:
            raise ValueError("draw() needs a fully batched pipeline; call the augmentation on the batch instead")
        rows: list[torch.Tensor] = []
        meta: list = []
        self._seq.draw(n, h, w, self._g, rows, meta)
        return Draws(torch.stack(rows) if rows else torch.zeros(0, n), meta)

    def apply(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        """``x`` (uint8) with ``draws`` (on ``x``'s device) applied."""
        if not self.ops or not len(x):
            return x
        self._check(x)
        return _as_uint8(self._seq.apply(x, iter(draws.rows), iter(draws.meta)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ops or not len(x):
            return x
        self._check(x)
        if self.batched:
            return self.apply(x, self.draw(*_nhw(x)).to(x.device))
        y = x
        for op in self.ops:  # drawn op by op: a per-image transform may change the size for the next
            rows: list[torch.Tensor] = []
            meta: list = []
            op.draw(*_nhw(y), self._g, rows, meta)
            y = op.apply(y, iter(r.to(y.device) for r in rows), iter(meta))
        return _as_uint8(y)

    @staticmethod
    def _check(x: torch.Tensor) -> None:
        if x.dtype != torch.uint8:
            raise TypeError(f"BatchAugment expects uint8 images, got {x.dtype}")


def _nhw(x: torch.Tensor) -> tuple[int, int, int]:
    return len(x), x.shape[-2], x.shape[-1]
