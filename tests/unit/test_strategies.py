"""Every registered strategy on a tiny synthetic context: a valid Adapted whose val_acc is the model's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adaptflow import strategies
from adaptflow.models import features, load, save
from adaptflow.params import STRATEGIES
from adaptflow.stages.augment import pipeline
from adaptflow.strategies import Adapted, Context
from adaptflow.training import accuracy, predict_logits

CPU = torch.device("cpu")
SOURCE = ["0", "1", "2"]

TARGETS = {
    "same": ["0", "1", "2"],
    "subset_reordered": ["2", "0"],
    "unknown_class": ["0", "7"],
}


@pytest.fixture
def make_ctx(tmp_path, source_checkpoint, split_factory, params_factory, feature_cache_writer):
    def make(target_classes, **finetune) -> Context:
        params = params_factory(**finetune)
        labeled = split_factory(2, target_classes, seed=0)
        val = split_factory(3, target_classes, seed=1)
        pool = split_factory(4, target_classes, seed=2)
        feats = feature_cache_writer(tmp_path / "features", source_checkpoint,
                                     {"labeled": labeled, "val": val, "pool": pool, "test": pool})
        return Context(params=params, source_dir=source_checkpoint, features_dir=feats, labeled=labeled, val=val,
                       transform=pipeline(params, "target"), dev=CPU, pool=pool,
                       source=split_factory(4, SOURCE, seed=3), source_val=split_factory(2, SOURCE, seed=4),
                       source_transform=pipeline(params, "source"))

    return make


CASES = [(n, t) for n in STRATEGIES for t in sorted(TARGETS)]


@pytest.mark.parametrize("name, target", CASES)
def test_strategy_returns_valid_adapted(name, target, make_ctx, tmp_path):
    classes = TARGETS[target]
    ctx = make_ctx(classes)
    adapted = strategies.get(name)(ctx)
    assert isinstance(adapted, Adapted)
    assert 0.0 <= adapted.val_acc <= 1.0
    assert adapted.config.classes == classes
    assert adapted.config.extra.get("strategy") == name
    assert adapted.selection
    model = adapted.model
    with torch.no_grad():
        logits = predict_logits(model, ctx.val.images)
    assert logits.shape == (len(ctx.val), len(classes))
    assert torch.isfinite(logits).all()
    # the reported val accuracy is the returned model's accuracy on target val
    assert adapted.val_acc == pytest.approx(accuracy(logits, ctx.val.labels), abs=1e-6)  # linear_probe: float32
    # the checkpoint round-trips as the finetune stage saves it
    save(model.cpu(), adapted.config, tmp_path / "adapted")
    loaded, cfg = load(tmp_path / "adapted")
    assert cfg.classes == classes
    assert torch.allclose(predict_logits(loaded, ctx.val.images), logits, atol=1e-5)


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_history_and_selection(name, make_ctx):
    ctx = make_ctx(SOURCE, epochs=2, linear_probe_epochs=3)
    adapted = strategies.get(name)(ctx)
    epochs = [h["epoch"] for h in adapted.history]
    # Everything that starts from the source scores the source model as epoch 0; scratch has no such start.
    expected = {"scratch": [1, 2], "linear_probe": [0, 1, 2, 3], "source_only": []}.get(name, [0, 1, 2])
    assert epochs == expected
    if adapted.history:
        best = next(h for h in adapted.history if h["epoch"] == adapted.best_epoch)
        assert best["val_acc"] == adapted.val_acc == max(h["val_acc"] for h in adapted.history)


def test_source_only_is_the_source_model_with_matched_head(make_ctx, source_checkpoint):
    ctx = make_ctx(["2", "0"])
    adapted = strategies.get("source_only")(ctx)
    src, _ = load(source_checkpoint)
    with torch.no_grad():
        a = predict_logits(adapted.model, ctx.val.images)
        s = predict_logits(src, ctx.val.images)
    assert torch.allclose(a, s[:, [2, 0]], atol=1e-5)
    assert adapted.config.extra["source_head_kept"] is True


def test_source_only_never_predicts_a_class_the_source_never_saw(make_ctx):
    ctx = make_ctx(["0", "7"])
    adapted = strategies.get("source_only")(ctx)
    assert adapted.config.extra["unknown_target_classes"] == ["7"]
    assert (predict_logits(adapted.model, ctx.val.images).argmax(1) == 0).all()


def test_source_only_refuses_when_no_target_class_is_known(make_ctx):
    from adaptflow.data.files import DataError  # bad input: the CLI ends with the message, exit 2

    with pytest.raises(DataError, match=r"knows none of the target classes \['7', '8'\]"):
        strategies.get("source_only")(make_ctx(["7", "8"]))


def test_linear_probe_keeps_the_backbone_frozen(make_ctx, source_checkpoint):
    ctx = make_ctx(SOURCE)
    adapted = strategies.get("linear_probe")(ctx)
    src, _ = load(source_checkpoint)
    x = torch.from_numpy(ctx.val.images).float() / 127.5 - 1
    with torch.no_grad():
        assert torch.allclose(features(adapted.model, x), features(src, x), atol=1e-5)


def test_linear_probe_refuses_incomplete_features(make_ctx, tmp_path):
    ctx = make_ctx(SOURCE)
    (ctx.features_dir / "_manifest.json").unlink()
    with pytest.raises(FileNotFoundError):
        strategies.get("linear_probe")(ctx)


@pytest.mark.parametrize("target", ["same", "subset_reordered"])
def test_finetune_starts_from_source_only(make_ctx, target):
    # epoch 0 of finetune is the source model with its matched head: the source_only baseline
    ctx = make_ctx(TARGETS[target], epochs=1)
    tuned = strategies.get("finetune")(ctx)
    base = strategies.get("source_only")(ctx)
    assert tuned.history[0]["epoch"] == 0
    assert tuned.history[0]["val_acc"] == pytest.approx(base.val_acc)
    assert tuned.val_acc >= base.val_acc  # never worse on val than where it started


def test_finetune_uses_backbone_lr_scale(make_ctx, monkeypatch):
    import adaptflow.strategies.finetune as ft
    import adaptflow.strategies.transfer as tr

    seen = {}

    def fake_fit(model, groups, *a, **kw):
        seen["groups"] = groups
        seen["kw"] = kw
        from adaptflow.training import FitResult

        return FitResult(history=[], best_epoch=0, best_val_acc=0.5)

    monkeypatch.setattr(tr, "fit", fake_fit)
    ctx = make_ctx(SOURCE, lr=0.01, backbone_lr_scale=0.25)
    adapted = ft.adapt(ctx)
    *body, head = seen["groups"]
    assert all(g["lr"] == pytest.approx(0.0025) for g in body) and head["lr"] == pytest.approx(0.01)
    head_ids = {id(p) for p in adapted.model.get_classifier().parameters()}
    assert {id(p) for p in head["params"]} == head_ids
    body_ids = {id(p) for g in body for p in g["params"]}
    assert not head_ids & body_ids
    assert len(body_ids) + len(head["params"]) == len(list(adapted.model.parameters()))
    assert seen["kw"]["evaluate_start"] is True


def test_scratch_ignores_source_weights(make_ctx, source_checkpoint):
    ctx = make_ctx(SOURCE)
    model, cfg = ctx.fresh_model()
    src, _ = load(source_checkpoint)
    w = "conv1.weight" if "conv1.weight" in src.state_dict() else next(iter(src.state_dict()))
    assert not torch.equal(model.state_dict()[w], src.state_dict()[w])
    assert cfg.classes == SOURCE and cfg.arch == "test_resnet"


@pytest.mark.parametrize("bad, message", [("nope", "unknown strategy"), ("", "empty strategy"), ("Finetune", "unknown strategy"),
                                          ("fixmatch+partial", "at most one base"), ("scratch+dann", "takes no objectives"),
                                          ("dann+dann", "repeated")])
def test_get_unknown_strategy(bad, message):
    with pytest.raises(ValueError, match=message):
        strategies.get(bad)


@pytest.mark.parametrize("name", STRATEGIES)
def test_get_every_registered_strategy(name):
    assert callable(strategies.get(name))


def test_features_cache_matches_backbone(make_ctx, source_checkpoint):
    from adaptflow.stages.cache_features import load_features

    ctx = make_ctx(SOURCE)
    x, y = load_features(ctx.features_dir, "val")
    assert x.dtype == np.float32 and (y == ctx.val.labels).all()
    src, _ = load(source_checkpoint)
    assert x.shape == (len(ctx.val), src.num_features)


def test_every_checkpoint_scorer_scores_on_each_process_share(monkeypatch):
    """Under several processes each scores its share of the images (predict_logits(across=True)); alone the
    flag changes nothing. Every selection rule asks for it."""
    from adaptflow import training
    from adaptflow.data.store import Split
    from adaptflow.strategies import base

    asked = []

    def logits(model, images, dev=None, across=False, **kw):
        asked.append(across)
        return torch.zeros(len(images), 2)

    monkeypatch.setattr(training, "predict_logits", logits)
    monkeypatch.setattr(base, "predict_logits", logits)
    split = Split(np.zeros((4, 1, 8, 8), np.uint8), np.array([0, 1, 0, 1]), ["a", "b"])
    for scorer in (training.val_scorer(split, None), base.source_val_scorer(split, None), base.im_scorer(split, None)):
        scorer(torch.nn.Identity())
    assert asked == [True, True, True]


@pytest.mark.parametrize("rule, key", [("im", "sel_im"), ("source_val", "sel_source_val_acc")])
def test_a_label_free_rule_reports_no_target_val_accuracy(rule, key, make_ctx):
    """The checkpoint a label-free rule chose has its score, not a 'target val accuracy' that is something else."""
    adapted = strategies.get("finetune")(make_ctx(SOURCE, epochs=2, selection=rule))
    best = next(h for h in adapted.history if h["epoch"] == adapted.best_epoch)
    assert adapted.score == best[key] == max(h[key] for h in adapted.history)
    assert math.isnan(adapted.val_acc) and "val_acc" not in best


def test_fixmatch_that_pseudo_labeled_nothing_is_said(caplog):
    """FixMatch whose threshold no pool image reached trained nothing; the run still counts as trained, so say it."""
    import logging

    from adaptflow.stages.finetune import warn_no_pseudo_labels
    from tests.unit.conftest import tiny_params

    none = [{"epoch": 0, "train_loss": float("nan")}] + [{"epoch": e, "train_loss": 0.0, "pseudo_label_rate": 0.0} for e in (1, 2, 3)]
    with caplog.at_level(logging.WARNING, logger="adaptflow"):
        warn_no_pseudo_labels("finetune[fixmatch,seed=0]", none, tiny_params())
        warn_no_pseudo_labels("finetune[fixmatch,seed=1]", none[:2] + [{"epoch": 2, "pseudo_label_rate": 0.02}], tiny_params())
        warn_no_pseudo_labels("finetune[finetune,seed=0]", [{"epoch": 1, "train_loss": 0.3}], tiny_params())
    [said] = [r.getMessage() for r in caplog.records]
    assert said.startswith("finetune[fixmatch,seed=0]: no pool image reached finetune.fixmatch.threshold=0.95 in any of 3 epochs")
    assert "at target.k=0" not in said  # tiny_params has labels (k > 0)
