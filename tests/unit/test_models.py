"""adaptflow.models: timm backbones by name, checkpoint round trip, class-matched heads, features."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from adaptflow.models import ModelConfig, create, features, load, save, set_head
from adaptflow.models.factory import CONFIG, WEIGHTS

ARCHS = ["test_resnet", "resnet10t", "test_efficientnet"]
CLASSES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


def _model(arch, in_chans=1, classes=CLASSES, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch, in_chans, 16, list(classes))
    return create(cfg).eval(), cfg


def test_config_num_classes():
    assert ModelConfig("test_resnet", 1, 16, ["x", "y", "z"]).num_classes == 3


@pytest.mark.parametrize("in_chans", [1, 3])
def test_create_forward_shape(arch, in_chans):
    model, cfg = _model(arch, in_chans)
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, 16, 16))
    assert out.shape == (2, cfg.num_classes)
    assert torch.isfinite(out).all()


def test_create_unknown_arch_raises():
    with pytest.raises(RuntimeError):
        create(ModelConfig("no_such_arch_xyz", 1, 16, ["a"]))


def test_save_load_round_trip(arch, tmp_path):
    model, cfg = _model(arch)
    cfg.extra = {"strategy": "x", "val_acc": 0.5}
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
    save(model, cfg, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / WEIGHTS).is_file()
    assert json.loads((tmp_path / "ckpt" / CONFIG).read_text())["arch"] == arch
    loaded, cfg2 = load(tmp_path / "ckpt")
    assert cfg2 == cfg
    assert not loaded.training  # load returns an eval-mode model
    with torch.no_grad():
        after = loaded(x)
    assert torch.equal(before, after)


def test_round_trip_after_set_head(tmp_path):
    model, cfg = _model("test_resnet")
    set_head(model, CLASSES, ["b", "a"])
    cfg2 = ModelConfig(cfg.arch, cfg.in_chans, cfg.image_size, ["b", "a"])
    save(model, cfg2, tmp_path / "c")
    loaded, _ = load(tmp_path / "c")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_set_head_keeps_source_rows_reordered(arch):
    model, _ = _model(arch)
    x = torch.randn(2, 1, 16, 16)
    old = model.get_classifier()
    w, b = old.weight.detach().clone(), old.bias.detach().clone()
    with torch.no_grad():
        before = model(x)
    target = ["c", "a", "d"]
    assert set_head(model, CLASSES, target) is True
    head = model.get_classifier()
    rows = [CLASSES.index(c) for c in target]
    assert isinstance(head, nn.Linear) and head.out_features == 3
    assert torch.equal(head.weight, w[rows]) and torch.equal(head.bias, b[rows])
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(after, before[:, rows], atol=1e-6)


def test_set_head_same_classes_is_unchanged(arch):
    model, _ = _model(arch)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
    assert set_head(model, CLASSES, list(CLASSES)) is True
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6)


@pytest.mark.parametrize("target", [["a", "zebra"], ["x", "y", "z", "w", "v"], ["A"]])
def test_set_head_reinitialises_for_unknown_classes(arch, target):
    model, _ = _model(arch)
    old = model.get_classifier().weight.detach().clone()
    assert set_head(model, CLASSES, target) is False
    head = model.get_classifier()
    assert head.out_features == len(target)
    if head.weight.shape == old.shape:
        assert not torch.equal(head.weight, old)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, len(target))


@pytest.mark.parametrize("n", [1, 3])
def test_features_shape(arch, n):
    model, _ = _model(arch)
    with torch.no_grad():
        f = features(model, torch.randn(n, 1, 16, 16))
        assert f.shape == (n, model.num_features)
        # the classifier's input: the head applied to features gives the logits
        x = torch.randn(2, 1, 16, 16)
        assert torch.allclose(model.get_classifier()(features(model, x)), model(x), atol=1e-5)


def test_set_head_keeps_the_known_rows_of_a_partly_known_target(arch):
    model, _ = _model(arch)
    w = model.get_classifier().weight.detach().clone()
    assert set_head(model, CLASSES, ["zebra", CLASSES[1]]) is False
    head = model.get_classifier()
    assert torch.equal(head.weight[1], w[1])  # the known class keeps its source row
    assert not torch.equal(head.weight[0], w[0])


def test_input_size_resizes_on_the_device_everywhere(tmp_path):
    """A model whose side differs from the stored images': predict_logits, cache_features' extractor and
    the served model's code all feed it the same resized input, and the side survives a checkpoint."""
    import numpy as np

    from adaptflow import imaging
    from adaptflow.accel import runtime
    from adaptflow.models import input_size
    from adaptflow.stages.cache_features import extract
    from adaptflow.training import predict_logits

    torch.manual_seed(0)
    cfg = ModelConfig("test_resnet", 1, 8, list(CLASSES), input_size=24)
    model = create(cfg).eval()
    assert input_size(model) == 24 and cfg.side == 24
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 8, 8), dtype=np.uint8)
    x = imaging.model_input(torch.from_numpy(images), 24)
    assert x.shape == (5, 1, 24, 24)
    with torch.no_grad():
        want = model(x)
        want_f = features(model, x)
    assert torch.allclose(predict_logits(model, images, rt=runtime(device="cpu")), want, atol=1e-5)
    assert np.allclose(extract(model, images, 2, rt=runtime(device="cpu")), want_f.numpy(), atol=1e-5)
    save(model, cfg, tmp_path)
    again, cfg2 = load(tmp_path)
    assert cfg2.input_size == 24 and input_size(again) == 24
    assert imaging.model_input(torch.from_numpy(images), None).shape == (5, 1, 8, 8)  # no side: as stored
