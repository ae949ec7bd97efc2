"""Batched, per-image augmentation on the batch's device: each batched transform equals torchvision's
for the same parameters, draws differ per image, the same seed repeats, and transforms without a
batched form still run (image by image)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from adaptflow.data.batch_augment import BatchAugment, affine_theta, compile_ops
from adaptflow.data.transforms import Downsample, build_pipeline

torch.manual_seed(0)
BATCH = torch.randint(0, 256, (16, 1, 20, 20), dtype=torch.uint8)


def _t(v: float) -> torch.Tensor:
    return torch.tensor([float(v)])


@pytest.mark.parametrize("angle,tx,ty,scale,shx,shy", [(0, 0, 0, 1, 0, 0), (30, 0, 0, 1, 0, 0), (0, 3, -2, 1, 0, 0),
                                                        (15, 2, 1, 0.9, 8, 0), (-20, -3, 4, 1.1, 5, -7)])
def test_affine_matrix_equals_torchvision(angle, tx, ty, scale, shx, shy):
    x = torch.rand(1, 3, 24, 20) * 255
    ref = TF.affine(x, angle=angle, translate=[tx, ty], scale=scale, shear=[shx, shy], interpolation=InterpolationMode.BILINEAR)
    theta = affine_theta(_t(angle), _t(tx), _t(ty), _t(scale), _t(shx), _t(shy), 24, 20)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert (out - ref).abs().max() < 1e-2


def test_affine_without_range_is_identity():
    aug = BatchAugment(build_pipeline([{"name": "RandomAffine", "degrees": 0}]), 0)
    assert aug.batched
    assert torch.equal(aug(BATCH), BATCH)


def test_draws_per_image_and_seeded():
    batch = torch.zeros(8, 1, 12, 12, dtype=torch.uint8)
    batch[:, :, 3:9, 5:7] = 255
    pipe = build_pipeline([{"name": "RandomAffine", "degrees": 40, "translate": [0.2, 0.2]}])
    a, b, c = BatchAugment(pipe, 1)(batch), BatchAugment(pipe, 1)(batch), BatchAugment(pipe, 2)(batch)
    assert len({o.numpy().tobytes() for o in a}) > 1  # identical inputs, different draws
    assert torch.equal(a, b)  # same seed, same bytes
    assert not torch.equal(a, c)


def test_downsample_equals_the_v2_transform_for_one_side():
    x = BATCH[:4]
    out = BatchAugment(v2.Compose([Downsample([8])]), 0)(x)
    ref = torch.stack([Downsample([8])(img) for img in x])
    assert (out.int() - ref.int()).abs().max() <= 1  # rounding of the float path


def test_flip_invert_apply():
    assert torch.equal(BatchAugment(build_pipeline([{"name": "RandomHorizontalFlip", "p": 1.0}]), 0)(BATCH), BATCH.flip(-1))
    assert torch.equal(BatchAugment(build_pipeline([{"name": "RandomInvert", "p": 1.0}]), 0)(BATCH), 255 - BATCH)
    never = build_pipeline([{"name": "RandomApply", "p": 0.0, "transforms": [{"name": "RandomInvert", "p": 1.0}]}])
    assert torch.equal(BatchAugment(never, 0)(BATCH), BATCH)
    half = BatchAugment(build_pipeline([{"name": "RandomInvert", "p": 0.5}]), 0)(BATCH)
    inverted = [torch.equal(o, 255 - i) for o, i in zip(half, BATCH)]
    assert 0 < sum(inverted) < len(BATCH)  # a coin per image


def test_brightness_factor_within_range():
    x = torch.full((32, 1, 4, 4), 100, dtype=torch.uint8)
    out = BatchAugment(build_pipeline([{"name": "ColorJitter", "brightness": 0.4}]), 0)(x).float()
    ratio = out[:, 0, 0, 0] / 100
    assert ratio.min() >= 0.59 and ratio.max() <= 1.41 and ratio.std() > 0.05


def test_contrast_matches_v2_formula_at_a_fixed_factor():
    x = BATCH[:2]
    out = BatchAugment(build_pipeline([{"name": "ColorJitter", "contrast": [1.5, 1.5]}]), 0)(x)
    ref = torch.stack([TF.adjust_contrast(img, 1.5) for img in x])
    assert (out.int() - ref.int()).abs().max() <= 1


def test_gaussian_blur_matches_v2_at_a_fixed_sigma():
    x = BATCH[:3]
    out = BatchAugment(build_pipeline([{"name": "GaussianBlur", "kernel_size": 3, "sigma": [0.8, 0.8]}]), 0)(x)
    ref = torch.stack([TF.gaussian_blur(img, [3, 3], [0.8, 0.8]) for img in x])
    assert (out.int() - ref.int()).abs().max() <= 1


def test_presets_are_batched():
    from adaptflow.data.transforms import PRESETS, role_specs

    for name in PRESETS:
        _, batched = compile_ops(build_pipeline(role_specs(name, [8], [])))
        assert batched, name


def test_transforms_without_a_batched_form_run_per_image():
    pipe = build_pipeline([{"name": "RandomAffine", "degrees": 10}, {"name": "TrivialAugmentWide"},
                           {"name": "RandomErasing", "p": 1.0, "scale": [0.1, 0.2], "value": "random"}])
    aug = BatchAugment(pipe, 0)
    assert not aug.batched
    torch.manual_seed(0)
    out = aug(BATCH)
    assert out.shape == BATCH.shape and out.dtype == torch.uint8
    assert len({o.numpy().tobytes() for o in out}) == len(BATCH)
    # v2 draws from torch's global generator; here it is seeded from the augmentation's own: the same
    # seed repeats whatever the global state, and the global state is left as it was.
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = BatchAugment(pipe, 0)(BATCH)
    assert torch.equal(again, out) and torch.equal(torch.get_rng_state(), state)


def test_per_image_transforms_seed_only_the_cpu_generator(monkeypatch):
    # on CUDA they run in a loader thread: reseeding the CUDA generators there would reset the training
    # step's own random draws (dropout) at arbitrary moments
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: seeded.append(s))
    aug = BatchAugment(build_pipeline([{"name": "TrivialAugmentWide"}]), 0)
    assert not aug.batched
    aug(BATCH)
    assert seeded == []


def test_per_image_transforms_repeat_when_loaders_run_them_at_once():
    # two loader threads share torch's global generator: each batch's fork → seed → transform → restore
    # runs whole, so every thread gets what it would get alone
    pipe = build_pipeline([{"name": "AutoAugment"}, {"name": "RandomErasing", "p": 0.5, "scale": [0.1, 0.2], "value": "random"}])

    def run(seed: int) -> list[torch.Tensor]:
        aug = BatchAugment(pipe, seed)
        return [aug(BATCH) for _ in range(40)]

    alone = {s: run(s) for s in (1, 2)}
    with ThreadPoolExecutor(2) as ex:
        together = dict(zip((1, 2), ex.map(run, (1, 2))))
    assert all(torch.equal(a, b) for s in (1, 2) for a, b in zip(alone[s], together[s]))


def _groups(draws, rounds: int, n: int) -> list[list[int]]:
    """Each round's (op, sign) group per image, decoded from the drawn permutation and group sizes."""
    out = []
    for r in range(rounds):
        order, sizes = draws.rows[r].long(), draws.meta[r]
        group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        per_image = torch.empty(n, dtype=torch.long)
        per_image[order] = group
        out.append(per_image.tolist())
    return out


@pytest.mark.parametrize("shape", [(40, 3, 20, 24), (40, 1, 16, 16)])
def test_rand_augment_gives_each_image_v2s_ops_for_its_draws(shape):
    # reference: image by image, v2's RandAugment op for that image's drawn op and sign, round after round
    t = v2.RandAugment(num_ops=2, magnitude=10)
    aug = BatchAugment(t, 3)
    assert aug.batched
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    draws = aug.draw(*x.shape[:1], *x.shape[-2:])
    out = aug.apply(x, draws)
    space = list(t._AUGMENTATION_SPACE.items())
    want = x.clone()
    for groups in _groups(draws, 2, len(x)):
        for k, g in enumerate(groups):
            name, (magnitudes, signed) = space[g // 2]
            m = magnitudes(t.num_magnitude_bins, shape[-2], shape[-1])
            m = 0.0 if m is None else float(m[t.magnitude]) * (-1 if g % 2 else 1)
            assert signed or g % 2 == 0
            want[k] = t._apply_image_or_video_transform(want[k], name, m, interpolation=t.interpolation, fill=t._fill)
    assert torch.equal(out, want)


def test_rand_augment_draws_every_op_and_both_signs_evenly():
    t = v2.RandAugment(num_ops=1)
    draws = BatchAugment(t, 0).draw(14_000, 8, 8)
    sizes = torch.tensor(draws.meta[0], dtype=torch.float32).view(-1, 2)
    signed = torch.tensor([s for _, (_, s) in t._AUGMENTATION_SPACE.items()])
    per_op = sizes.sum(1)
    assert (per_op - 1000).abs().max() < 150  # 14 ops, uniform (±4.7 σ)
    assert torch.all(sizes[~signed, 1] == 0)  # an unsigned op is never negated
    assert ((sizes[signed, 1] / per_op[signed]) - 0.5).abs().max() < 0.08


def test_random_erasing_erases_v2s_box_for_its_draws():
    t = v2.RandomErasing(p=0.7, scale=(0.05, 0.3), ratio=(0.3, 3.3), value=7)
    aug = BatchAugment(t, 0)
    assert aug.batched
    x = torch.randint(0, 256, (400, 3, 12, 16), dtype=torch.uint8)
    draws = aug.draw(len(x), 12, 16)
    out = aug.apply(x, draws)
    i, j, h, w = (r.long() for r in draws.rows)
    want = torch.stack([TF.erase(img, int(a), int(b), int(c), int(d), torch.tensor([7.0]).view(1, 1, 1)) if c else img
                        for img, a, b, c, d in zip(x, i, j, h, w)])
    assert torch.equal(out, want)
    erased = h > 0
    assert 0.6 < erased.float().mean() < 0.8  # p = 0.7 (almost every draw fits in 10 tries)
    area = (h * w)[erased].float() / (12 * 16)
    assert area.min() >= 0.02 and area.max() <= 0.4  # scale (0.05, 0.3), up to rounding of the sides
    assert torch.all((i + h <= 12) & (j + w <= 16))


def test_random_erasing_with_noise_stays_per_image():
    assert not BatchAugment(v2.RandomErasing(value="random"), 0).batched
    assert not BatchAugment(v2.RandomErasing(value=0.5), 0).batched  # not a uint8 value


def test_rejects_float_images():
    with pytest.raises(TypeError, match="uint8"):
        BatchAugment(build_pipeline([{"name": "RandomInvert"}]), 0)(BATCH.float())


def test_saturation_and_hue_match_v2_at_fixed_factors():
    x = torch.randint(0, 256, (3, 3, 10, 10), dtype=torch.uint8)
    out = BatchAugment(build_pipeline([{"name": "ColorJitter", "saturation": [0.5, 0.5]}]), 0)(x)
    ref = torch.stack([TF.adjust_saturation(img, 0.5) for img in x])
    assert (out.int() - ref.int()).abs().max() <= 1
    out = BatchAugment(build_pipeline([{"name": "ColorJitter", "hue": [0.1, 0.1]}]), 0)(x)
    ref = torch.stack([TF.adjust_hue(img, 0.1) for img in x])
    assert (out.int() - ref.int()).abs().max() <= 1


STRONG = [{"name": "RandomAffine", "degrees": 15, "translate": [0.1, 0.1], "scale": [0.8, 1.1], "shear": 10},
          {"name": "RandomApply", "p": 0.5, "transforms": [{"name": "GaussianBlur", "kernel_size": 3, "sigma": [0.1, 1.0]}]},
          {"name": "ColorJitter", "brightness": 0.4, "contrast": 0.4}, {"name": "RandomInvert", "p": 0.3},
          {"name": "Downsample", "sizes": [8, 12]}]


def test_draw_then_apply_equals_a_call():
    # Training draws in its loader and applies on the device; a direct call does both: same bytes.
    split, whole = BatchAugment(build_pipeline(STRONG), 3), BatchAugment(build_pipeline(STRONG), 3)
    for _ in range(2):  # the generator advances the same way
        d = split.draw(len(BATCH), 20, 20)
        assert d.rows.device.type == "cpu" and d.rows.shape[1] == len(BATCH)
        assert torch.equal(split.apply(BATCH, d), whole(BATCH))


def test_downsample_computes_only_the_sides_drawn():
    aug = BatchAugment(v2.Compose([Downsample([8, 12, 16], p=1.0)]), 0)
    d = aug.draw(2, 20, 20)
    drawn = sorted({int(c) for c in d.rows[0]})
    assert d.meta == [drawn] and all(c >= 0 for c in drawn)
    never = BatchAugment(v2.Compose([Downsample([8], p=0.0)]), 0)
    d = never.draw(4, 20, 20)
    assert d.meta == [[]] and torch.equal(never.apply(BATCH[:4], d), BATCH[:4])


def test_draw_needs_a_batched_pipeline():
    aug = BatchAugment(build_pipeline([{"name": "RandomErasing", "p": 1.0, "value": "random"}]), 0)
    with pytest.raises(ValueError, match="batched"):
        aug.draw(2, 20, 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_draws_on_cuda_as_on_cpu():
    from adaptflow.accel import Prefetcher, runtime

    pipe = build_pipeline(STRONG)
    cpu = BatchAugment(pipe, 5)(BATCH)
    rt = runtime(device="cuda")
    aug = BatchAugment(pipe, 5)
    (x, d), = list(Prefetcher([(BATCH, aug.draw(len(BATCH), 20, 20))], rt))
    out = aug.apply(x, d).cpu()
    assert (out.int() - cpu.int()).abs().max() <= 1  # same parameters; float rounding may differ by a level
