"""Augmentation in params (presets, Downsample, explicit v2 lists) and the augment stage (previews, label-set
match, materialised target views that are deterministic by seed)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from adaptflow import params as P
from adaptflow.data import store
from adaptflow.data.batch_augment import BatchAugment
from adaptflow.data.transforms import PRESETS, Downsample, build_pipeline, role_specs
from adaptflow.stages import augment, ingest
from tests.datafiles import make_imagefolder

BATCH = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 1, 16, 16), dtype=np.uint8))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_and_keeps_shape(preset, channels):
    batch = BATCH.repeat(1, channels, 1, 1)
    torch.manual_seed(0)
    out = BatchAugment(build_pipeline(role_specs(preset, [8], [])), 0)(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8


def test_role_specs_order_preset_downsample_explicit():
    specs = role_specs("digits", [8, 12], [{"name": "RandomInvert", "p": 1.0}])
    assert [s["name"] for s in specs] == ["RandomAffine", "Downsample", "RandomInvert"]
    assert specs[1] == {"name": "Downsample", "sizes": [8, 12]}
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        role_specs("nope", [], [])


def test_downsample_keeps_shape_and_loses_detail():
    checker = torch.zeros(1, 16, 16, dtype=torch.uint8)
    checker[:, ::2, ::2] = checker[:, 1::2, 1::2] = 255  # the finest detail 16 px can hold
    out = Downsample([4])(checker)
    assert out.shape == checker.shape
    assert out.float().std() < 0.1 * checker.float().std()  # averaged away at 4 px
    assert torch.equal(Downsample([4], p=0.0)(checker), checker)
    assert Downsample([4])(BATCH).shape == BATCH.shape  # batches too


@pytest.mark.parametrize("bad", [{"sizes": []}, {"sizes": [0]}, {"sizes": [8], "p": 2.0}])
def test_downsample_bad_arguments(bad):
    with pytest.raises(ValueError, match="Downsample"):
        build_pipeline([{"name": "Downsample", **bad}])


def test_params_role_forms(params_path):
    legacy = P.load(params_path, ["augment.source=[{name: RandomAffine, degrees: 3}]"]).augment.source
    assert legacy.preset == "none" and legacy.downsample == [] and legacy.specs() == [{"name": "RandomAffine", "degrees": 3}]
    full = P.load(params_path, ["augment.target={preset: light, downsample: [8], transforms: [{name: RandomInvert}]}"]).augment.target
    assert [s["name"] for s in full.specs()] == ["RandomAffine", "Downsample", "RandomInvert"]
    assert P.load(params_path, ["augment.source.downsample=[28]"]).augment.source.downsample == [28]


@pytest.mark.parametrize("override, key, text", [
    ("augment.source.preset=bogus", "augment.source.preset", "unknown preset 'bogus'; choose one of none, light, digits"),
    ("augment.target.downsample=[0]", "augment.target.downsample", "sides must be positive"),
    ("augment.target.transforms=[{name: Rezise}]", "augment.target", "'Rezise' is not a torchvision.transforms.v2 transform"),
    ("augment.n_views=-1", "augment.n_views", "greater than or equal to 0"),
])
def test_bad_augment_params_name_the_key(params_path, override, key, text):
    with pytest.raises(P.ParamsError) as exc:
        P.load(params_path, [override])
    assert f"{key}: " in str(exc.value) and text in str(exc.value)


def test_views_deterministic_by_seed_and_leave_the_rng_alone():
    pipe = build_pipeline(role_specs("digits_strong", [8], []))
    images = BATCH.numpy()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = augment.views(pipe, images, 3, seed=0)
    assert torch.equal(torch.rand(1), before)  # the caller's generator did not move
    b = augment.views(pipe, images, 3, seed=0)
    c = augment.views(pipe, images, 3, seed=1)
    assert len(a) == 3 and all(x.shape == images.shape and x.dtype == np.uint8 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not np.array_equal(a[0], a[1])  # each view is its own draw


def test_class_match_reports_unknown_target_classes():
    m = augment.class_match(["0", "1", "2"], ["2", "1", "cat"])
    assert m["shared"] == ["2", "1"] and m["target_unknown_to_source"] == ["cat"] and m["source_unused"] == ["0"]
    assert not m["source_head_reusable"]
    assert augment.class_match(["0", "1"], ["1", "0"])["source_head_reusable"]


def test_augment_stage_previews_views_and_classes(tmp_path, caplog):
    make_imagefolder(tmp_path / "src", per_class=10, classes=3, mixed=False, start=20)
    make_imagefolder(tmp_path / "tgt", per_class=10, classes=4)
    p = P.from_dict({"preprocess": {"image_size": 12, "channels": 1},
                     "source": {"domain": "imagefolder:src"}, "target": {"domain": "imagefolder:tgt", "k": 2},
                     "augment": {"source": {"preset": "digits", "downsample": [8]}, "target": {"preset": "light"}, "n_views": 3, "preview_n": 8}})
    for role in P.ROLES:
        ingest.run(p, tmp_path, role)
    with caplog.at_level(logging.WARNING, logger="adaptflow.stages.augment"):
        result = augment.run(p, tmp_path)
    out = tmp_path / "data" / "augmented"
    assert (out / "preview_source.png").stat().st_size > 1000 and (out / "preview_target.png").stat().st_size > 1000
    classes = json.loads((out / "classes.json").read_text())
    assert classes["target_unknown_to_source"] == ["3"] and result["classes"] == {k: v for k, v in classes.items() if k != "target_native_size"}
    assert any("['3'] are unknown to the source" in r.getMessage() for r in caplog.records)
    assert classes["target_native_size"] == 12  # mixed 8, 12 and 16 px files: the median shorter side
    pipelines = json.loads((out / "pipelines.json").read_text())
    assert [s["name"] for s in pipelines["source"]["specs"]] == ["RandomAffine", "Downsample"]

    views = np.load(out / "views_target.npy")
    table = pd.read_parquet(out / "views_target.parquet")
    labeled = store.load_split(tmp_path / "data" / "ingested" / "target", "train", labeled=True)
    assert result["n_views"] == len(views) == len(table) == 3 * len(labeled) == 3 * 4 * 2
    assert (table.label.to_numpy() == np.tile(labeled.labels, 3)).all() and sorted(table.view.unique()) == [0, 1, 2]
    first = views.copy()
    (out / "_manifest.json").unlink()  # force a re-run: same seed, same bytes
    augment.run(p, tmp_path)
    assert np.array_equal(np.load(out / "views_target.npy"), first)


def test_augment_refuses_a_source_holding_target_val_or_test_images(tmp_path):
    """Target images copied into the source: refused before any training, naming a pair; all pairs listed."""
    import shutil

    make_imagefolder(tmp_path / "src", per_class=10, classes=3, mixed=False, start=20)
    make_imagefolder(tmp_path / "tgt", per_class=10, classes=3, mixed=False)
    p = P.from_dict({"preprocess": {"image_size": 12, "channels": 1}, "source": {"domain": "imagefolder:src"},
                     "target": {"domain": "imagefolder:tgt", "k": 2}, "augment": {"n_views": 1, "preview_n": 4}})
    ingest.run(p, tmp_path, "target")
    meta = store.read_meta(tmp_path / "data" / "ingested" / "target")
    test_item = meta[meta.split == "test"].item.iloc[0]
    train_item = meta[meta.split == "train"].item.iloc[0]
    shutil.copy(tmp_path / "tgt" / test_item, tmp_path / "src" / "0" / "copied_test.png")
    shutil.copy(tmp_path / "tgt" / train_item, tmp_path / "src" / "1" / "copied_train.png")
    ingest.run(p, tmp_path, "source")
    with pytest.raises(ingest.DataError, match="1 image\\(s\\) identical to target val/test images \\(1 test of imagefolder:tgt\\)") as err:
        augment.run(p, tmp_path)
    assert "source 0/copied_test.png = target " + test_item in str(err.value)
    listed = json.loads((tmp_path / "reports" / "augment_overlap.json").read_text())
    assert listed["n_pairs"] == 1 and listed["pairs"][0]["source"] == "0/copied_test.png" and listed["pairs"][0]["target_split"] == "test"
    assert not (tmp_path / "data" / "augmented").exists()  # nothing made
    (tmp_path / "src" / "0" / "copied_test.png").unlink()  # a shared target *train* image is fine
    ingest.run(p, tmp_path, "source")
    augment.run(p, tmp_path)
    clean = (tmp_path / "reports" / "augment_overlap.json").read_bytes()
    assert json.loads(clean) == {"n_pairs": 0, "pairs": []}  # no domain names either: another target changes nothing
    # the record pretrain depends on under DVC: the same bytes when the target gains images or a preview
    # setting changes, so neither retrains the source model
    for cls in ("0", "1"):
        extra = tmp_path / "tgt" / cls / "extra.png"
        Image.fromarray(np.random.default_rng(int(cls)).integers(0, 256, (8, 8), dtype=np.uint8)).save(extra)
    ingest.run(p, tmp_path, "target")
    augment.run(p.model_copy(update={"augment": p.augment.model_copy(update={"preview_n": 4})}), tmp_path)
    assert (tmp_path / "reports" / "augment_overlap.json").read_bytes() == clean


def test_a_target_whose_classes_the_source_never_saw_is_refused_before_pretraining_when_source_only_runs(tmp_path):
    """source_only could predict none of them: refused at augment (also when it is up to date, as the strategy
    list may change without it), not after pretraining and the other strategies."""
    import shutil

    make_imagefolder(tmp_path / "src", per_class=10, classes=3, mixed=False, start=20)
    make_imagefolder(tmp_path / "tgt", per_class=10, classes=3, mixed=False)
    for digit, name in (("0", "zero"), ("1", "one"), ("2", "two")):
        shutil.move(tmp_path / "tgt" / digit, tmp_path / "tgt" / name)
    data = {"preprocess": {"image_size": 12, "channels": 1}, "source": {"domain": "imagefolder:src"},
            "target": {"domain": "imagefolder:tgt", "k": 2}, "augment": {"n_views": 1, "preview_n": 4},
            "finetune": {"strategies": ["scratch", "finetune"]}, "evaluate": {"baselines": ["scratch"]},
            "register": {"require_baselines": False}}
    p = P.from_dict(data)
    for role in P.ROLES:
        ingest.run(p, tmp_path, role)
    assert augment.run(p, tmp_path)["classes"]["shared"] == []  # without source_only: fine-tuning re-initialises the head
    data["finetune"]["strategies"] = ["scratch", "source_only", "finetune"]
    with pytest.raises(ingest.DataError, match=r"source_only: the source knows none of the target classes \['one', 'two', 'zero'\]"):
        augment.run(P.from_dict(data), tmp_path)
