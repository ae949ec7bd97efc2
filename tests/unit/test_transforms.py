"""adaptflow.data.transforms: torchvision.transforms.v2 pipelines from params specs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torchvision.transforms import v2

from adaptflow.data.batch_augment import BatchAugment
from adaptflow.data.transforms import build_pipeline, build_transform

BATCH = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 1, 12, 12), dtype=np.uint8))


def test_empty_pipeline_is_identity():
    pipe = build_pipeline([])
    assert isinstance(pipe, v2.Identity)
    out = BatchAugment(pipe, 0)(BATCH)
    assert torch.equal(out, BATCH)


def test_pipeline_is_a_compose_in_order():
    pipe = build_pipeline([{"name": "Resize", "size": 8}, {"name": "CenterCrop", "size": 6}])
    assert isinstance(pipe, v2.Compose)
    assert [type(t).__name__ for t in pipe.transforms] == ["Resize", "CenterCrop"]
    assert pipe(BATCH[0]).shape == (1, 6, 6)


def test_build_does_not_mutate_spec():
    spec = {"name": "RandomChoice", "transforms": [{"name": "Resize", "size": 8}]}
    before = yaml.safe_dump(spec)
    build_transform(spec)
    assert yaml.safe_dump(spec) == before


def test_nested_random_choice_builds():
    spec = {"name": "RandomChoice", "transforms": [{"name": "Resize", "size": 8}, {"name": "Resize", "size": 12},
                                                   {"name": "RandomApply", "p": 0.5, "transforms": [{"name": "RandomInvert"}]}]}
    t = build_transform(spec)
    assert isinstance(t, v2.RandomChoice)
    assert [type(x).__name__ for x in t.transforms] == ["Resize", "Resize", "RandomApply"]
    assert isinstance(t.transforms[2].transforms[0], v2.RandomInvert)


def test_real_params_pipelines_build(params_path):
    from adaptflow.params import load
    from adaptflow.stages.augment import pipeline

    p = load(params_path)
    for role in ("source", "target"):
        pipe = pipeline(p, role)
        out = BatchAugment(pipe, 0)(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
        assert out.shape == (2, 1, 32, 32) and out.dtype == torch.uint8


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "RandomAffin", "degrees": 3},
        {"name": "functional"},  # exists in v2 but is not a transform class
        {"name": "Tensor"},
        {"degrees": 3},
        {"name": 3},
        {"name": "RandomAffine", "degreez": 3},
        {"name": "Resize"},
        {"name": "RandomAffine", "degrees": -5},
        {"name": "RandomChoice", "transforms": [{"name": "Rezise", "size": 8}]},
        {"name": "RandomApply", "transforms": [{"name": "Resize", "size": 8, "bogus": 1}]},
    ],
)
def test_bad_name_or_argument_raises_value_error(spec):
    with pytest.raises(ValueError):
        build_pipeline([spec])


def test_bad_name_message_names_it():
    with pytest.raises(ValueError, match="RandomAffin"):
        build_transform({"name": "RandomAffin"})
    with pytest.raises(ValueError, match="RandomAffine"):
        build_transform({"name": "RandomAffine", "degreez": 3})


SHAPE_KEEPING = [
    [{"name": "RandomAffine", "degrees": 15, "translate": [0.1, 0.1], "scale": [0.8, 1.2], "shear": 5}],
    [{"name": "RandomChoice", "transforms": [{"name": "Resize", "size": 6}, {"name": "Resize", "size": 9}]},
     {"name": "Resize", "size": 12}],
    [{"name": "RandomInvert", "p": 1.0}],
    [{"name": "RandomHorizontalFlip"}, {"name": "RandomRotation", "degrees": 20}],
]


@pytest.mark.parametrize("specs", SHAPE_KEEPING)
def test_batch_augment_keeps_shape_and_dtype(specs):
    torch.manual_seed(0)
    out = BatchAugment(build_pipeline(specs), 0)(BATCH)
    assert out.shape == BATCH.shape
    assert out.dtype == torch.uint8


def test_batch_augment_draws_per_image():
    # one RandomAffine per image: identical inputs come out different
    batch = torch.zeros(8, 1, 12, 12, dtype=torch.uint8)
    batch[:, :, 3:9, 5:7] = 255
    torch.manual_seed(0)
    out = BatchAugment(build_pipeline([{"name": "RandomAffine", "degrees": 40, "translate": [0.2, 0.2]}]), 0)(batch)
    assert len({o.numpy().tobytes() for o in out}) > 1


def test_invert_is_applied():
    out = BatchAugment(build_pipeline([{"name": "RandomInvert", "p": 1.0}]), 0)(BATCH)
    assert torch.equal(out, 255 - BATCH)
