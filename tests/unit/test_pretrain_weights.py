"""pretrain.weights: starting the source model from a local weights file (timm's pretrained_cfg_overlay) or the hub."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from adaptflow import orchestrate, outputs
from adaptflow import params as params_mod
from adaptflow.data import store
from adaptflow.data.files import DataError
from adaptflow.models import ModelConfig, check_weights, start
from adaptflow.stages import pretrain
from adaptflow.stages.ingest import output_dir as ingested_dir
from adaptflow.training import accuracy, predict_logits
from tests.unit.conftest import CPU, SIZE, class_images

CLASSES = ["0", "1", "2"]
CFG = ModelConfig("test_resnet", 1, SIZE, CLASSES)


def _weights(path, arch="test_resnet", in_chans=1, num_classes=3, wrap=None, seed=1):
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=num_classes)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(wrap(state) if wrap else state, path)
    return state


def test_a_source_model_file_starts_it_head_and_all(tmp_path):
    state = _weights(tmp_path / "src.safetensors")
    model, began = start(CFG, "src.safetensors", tmp_path)
    assert began["head"] == "kept" and began["weights"] == "src.safetensors" and len(began["sha256"]) == 64
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_checkpoint_that_names_its_classes_is_matched_by_name(tmp_path):
    """An adaptflow checkpoint names its classes (safetensors metadata): the same classes in another order keep
    the classifier with its rows in the card's order, so each class keeps its own row; other classes of the same
    count get a fresh classifier, not the rows of some other class."""
    from adaptflow.models import save
    from adaptflow.models.factory import file_classes

    torch.manual_seed(3)
    src = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=3)
    save(src, ModelConfig("test_resnet", 1, SIZE, ["2", "0", "1"]), tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    assert file_classes(path) == ["2", "0", "1"]
    (tmp_path / "src" / "config.json").unlink()  # the file alone says it
    model, began = start(CFG, str(path), tmp_path)
    assert began["head"] == "kept" and began["head_classes"] == "by name"
    x = torch.randn(4, 1, SIZE, SIZE)
    with torch.no_grad():
        before, after = src.eval()(x), model.eval()(x)
    assert torch.allclose(after, before[:, [1, 2, 0]], atol=1e-5)  # the card's "0", "1", "2"
    save(src, ModelConfig("test_resnet", 1, SIZE, ["a", "b", "c"]), tmp_path / "other")
    model, began = start(CFG, str(tmp_path / "other" / "model.safetensors"), tmp_path)
    assert began["head"] == "new" and began["head_why"] == "the file's classes (a, b, c) are not the source's (0, 1, 2)"
    assert not torch.equal(model.state_dict()["fc.weight"], src.state_dict()["fc.weight"])


def test_an_older_checkpoint_names_its_classes_in_the_config_beside_it_and_a_foreign_file_by_count_only(tmp_path):
    from adaptflow.models.factory import file_classes

    _weights(tmp_path / "model.safetensors")  # no metadata
    assert file_classes(tmp_path / "model.safetensors") is None
    _, began = start(CFG, "model.safetensors", tmp_path)
    assert began["head"] == "kept" and began["head_classes"] == "by count (the file names no classes)"
    (tmp_path / "config.json").write_text(json.dumps({"classes": ["x", "y", "z"]}))
    assert file_classes(tmp_path / "model.safetensors") == ["x", "y", "z"]
    _, began = start(CFG, "model.safetensors", tmp_path)
    assert began["head"] == "new" and "(x, y, z) are not the source's" in began["head_why"]


@pytest.mark.parametrize("metadata", ['"012"', "{", '{"0": 1}', "[]", "[true, false, true]"])
def test_class_metadata_that_is_not_a_list_of_names_is_refused_naming_it(tmp_path, metadata):
    state = _weights(tmp_path / "w.safetensors")
    save_file(state, str(tmp_path / "w.safetensors"), metadata={"adaptflow.classes": metadata})
    with pytest.raises(DataError, match=r"pretrain.weights: .*w.safetensors: its metadata adaptflow.classes is not a list of class names"):
        start(CFG, "w.safetensors", tmp_path)


def test_imagenet_like_weights_get_a_new_head_and_a_one_channel_stem(tmp_path):
    """3-channel weights with a 1000-class head into a 1-channel, 3-class model: timm sums the stem over the
    colour channels; the classifier starts fresh. A torch checkpoint under "state_dict", saved from a
    DataParallel model ("module."), reads the same."""
    state = _weights(tmp_path / "in1k.pth", in_chans=3, num_classes=1000, wrap=lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}})
    model, began = start(CFG, str(tmp_path / "in1k.pth"), tmp_path)
    assert began["head"] == "new" and began["file_in_chans"] == 3
    sd = model.state_dict()
    assert torch.allclose(sd["conv1.0.weight"], state["conv1.0.weight"].sum(1, keepdim=True))
    assert torch.equal(sd["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"]) and sd["fc.weight"].shape == (3, sd["fc.weight"].shape[1])
    # and one-channel weights into a three-channel model: the stem is spread over the colour channels
    grey = _weights(tmp_path / "grey.safetensors")["conv1.0.weight"]
    rgb, _ = start(ModelConfig("test_resnet", 3, SIZE, CLASSES), "grey.safetensors", tmp_path)
    # the grey filter a third on each colour: a grey picture (R = G = B) gives the same response as before
    assert torch.allclose(rgb.state_dict()["conv1.0.weight"], grey.repeat(1, 3, 1, 1) / 3)


class _Code:  # a pickled object: loading it would run code
    def __reduce__(self):
        return (print, ("ran",))


@pytest.mark.parametrize("case, message", [
    ("missing", "pretrain.weights: {root}/nowhere.safetensors is not a file"),
    ("corrupt", "is not a weights file timm can read (SafetensorError"),
    ("pickle", "torch.load(weights_only=True) refused it: not a state dict of plain tensors"),
    ("other_arch", "is not a test_resnet's weights: 75 of its weights missing (e.g. conv1.0.weight"),
    ("extra", "is not a test_resnet's weights: 1 it does not have (e.g. layer9.weight). Set pretrain.model"),
    ("wrong_shape", "is not a test_resnet's weights: 1 of other shapes (e.g. layer1.0.conv1.weight: (1, 1, 1, 1) for (32, 32, 3, 3))"),
])
def test_weights_that_do_not_fit_are_refused_naming_the_key(tmp_path, case, message):
    """Refused before any work (check_weights, what `adaptflow run` asks first) and by pretrain itself (start),
    also when the classifier would be replaced anyway (timm then loads leniently: a bigger network's file
    would half-load)."""
    name = {"missing": "nowhere.safetensors", "corrupt": "bad.safetensors", "pickle": "code.pth", "other_arch": "other.safetensors",
            "extra": "extra.safetensors", "wrong_shape": "wide.safetensors"}[case]
    if case == "corrupt":
        (tmp_path / name).write_bytes(b"not weights")
    elif case == "pickle":
        torch.save({"conv1.0.weight": _Code()}, tmp_path / name)
    elif case == "other_arch":
        _weights(tmp_path / name, arch="test_vit")
    elif case in ("extra", "wrong_shape"):
        state = _weights(tmp_path / name, num_classes=1000)  # the classifier is replaced: only the rest must fit
        if case == "extra":
            state["layer9.weight"] = torch.zeros(2)
        else:
            state["layer1.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
        save_file(state, str(tmp_path / name))
    for check in (lambda: start(CFG, name, tmp_path), lambda: check_weights("test_resnet", 1, name, tmp_path)):
        with pytest.raises(DataError, match="^pretrain.weights") as exc:
            check()
        assert message.format(root=tmp_path) in str(exc.value)


def test_batchnorm_counters_may_be_absent(tmp_path):
    state = _weights(tmp_path / "full.safetensors")
    save_file({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, str(tmp_path / "lean.safetensors"))
    check_weights("test_resnet", 1, "lean.safetensors", tmp_path)
    model, began = start(CFG, "lean.safetensors", tmp_path)
    assert began["head"] == "kept" and torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, no proxy, the hub client online; the test sets the endpoint. timm must not
    be asked to download (it would retry for about a minute offline)."""
    from huggingface_hub import constants

    from adaptflow.models import factory

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_download(cfg, pretrained=False, **overlay):
        raise AssertionError("timm was asked to download")

    monkeypatch.setattr(factory, "create", no_download)
    return constants


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("why, setup", [
    ("HF_HUB_OFFLINE is set", lambda c, mp: mp.setattr(c, "HF_HUB_OFFLINE", True)),
    (r"the hub at 127.0.0.1:\d+ cannot be reached \(.*refused", lambda c, mp: mp.setattr(c, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")),
])
def test_the_hub_out_of_reach_is_refused_before_any_download(hub, monkeypatch, tmp_path, why, setup):
    """Weights not in the local cache and a hub that cannot answer: refused by `adaptflow run`'s first check and
    by pretrain, at once, naming the key and what to do — not after the hub client's minute of retries."""
    setup(hub, monkeypatch)
    says = rf"pretrain.weights=hub: timm/resnet10t\.\w+'s weights are not in the local Hugging Face cache .* {why}.*set pretrain.weights to the file"
    with pytest.raises(DataError, match=says):
        check_weights("resnet10t", 1, "hub", tmp_path)
    with pytest.raises(DataError, match=says):
        start(ModelConfig("resnet10t", 1, SIZE, CLASSES), "hub", tmp_path)


def test_weights_in_the_local_cache_or_a_hub_that_answers_are_not_refused(hub, monkeypatch, tmp_path):
    import socket

    from adaptflow.models.factory import hub_problem

    with socket.create_server(("127.0.0.1", 0)) as server:  # a hub that takes the connection
        monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_problem("resnet10t") is None
    monkeypatch.setattr(hub, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in hub_problem("resnet10t")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")  # not probed behind a proxy... unless offline
    assert "HF_HUB_OFFLINE is set" in hub_problem("resnet10t")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    assert hub_problem("resnet10t") is None
    monkeypatch.delenv("HTTPS_PROXY")
    # The cache's layout (models--org--name/refs/main → snapshots/<commit>/file): timm finds it offline.
    repo = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id
    entry = tmp_path / "hf-cache" / ("models--" + repo.replace("/", "--"))
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0" * 40)
    (entry / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (entry / "snapshots" / ("0" * 40) / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    assert hub_problem("resnet10t") is None


def test_a_fetch_that_fails_anyway_says_what_to_do(hub, monkeypatch, tmp_path):
    from adaptflow.models import factory

    monkeypatch.setattr(factory, "hub_problem", lambda arch: None)

    def refused(cfg, pretrained=False, **overlay):
        raise OSError("401 Client Error")

    monkeypatch.setattr(factory, "create", refused)
    with pytest.raises(DataError, match=r"pretrain.weights=hub: timm could not fetch pretrained weights for resnet10t \(OSError: 401 .*set pretrain.weights to the file"):
        start(ModelConfig("resnet10t", 1, SIZE, CLASSES), "hub", tmp_path)


def test_zero_epochs_need_weights_that_hold_a_classifier_and_an_empty_name_is_refused():
    with pytest.raises(params_mod.ParamsError, match="epochs: 0 trains nothing, so it needs pretrain.weights"):
        params_mod.from_dict({"pretrain": {"epochs": 0}})
    with pytest.raises(params_mod.ParamsError, match="epochs: 0 with weights: hub cannot work"):
        params_mod.from_dict({"pretrain": {"epochs": 0, "weights": "hub"}})
    with pytest.raises(params_mod.ParamsError, match="pretrain.weights: .*empty: name a weights file, `hub`, or null"):
        params_mod.from_dict({"pretrain": {"weights": " "}})


def _project(root, **pretrain_section) -> params_mod.Params:
    p = params_mod.from_dict({"preprocess": {"image_size": SIZE, "channels": 1}, "augment": {"source": []},
                              "pretrain": {"model": "test_resnet", "batch_size": 8, **pretrain_section}})
    labels = np.arange(36) % 3
    splits = np.array(["train"] * 24 + ["val"] * 12)
    meta = pd.DataFrame({"label": labels, "class_name": [CLASSES[i] for i in labels], "split": splits,
                         "labeled": False, "source_index": np.arange(36), "sha1": [str(i) for i in range(36)]})
    with outputs.atomic_dir(ingested_dir(p, root, "source"), "ingest", "k") as tmp:
        store.write(tmp, class_images(labels, 3), meta, {"classes": CLASSES, "data_hash": "cafe", "domain": "mnist", "channels": 1,
                                                         "image_size": SIZE})
    return p


def test_pretrain_from_a_source_model_with_no_epochs_keeps_it_and_records_the_start(tmp_path):
    state = _weights(tmp_path / "mine.safetensors")
    p = _project(tmp_path, weights="mine.safetensors", weights_dep="mine.safetensors", epochs=0)
    res = pretrain.run(p, tmp_path)
    out = pretrain.output_dir(p, tmp_path)
    kept = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(kept[k], v) for k, v in state.items())
    model, _ = start(CFG, "mine.safetensors", tmp_path)
    val = store.load_split(ingested_dir(p, tmp_path, "source"), "val")
    assert res["source_val_acc"] == pytest.approx(accuracy(predict_logits(model.eval(), val.images, dev=CPU), val.labels))
    cfg = ModelConfig(**json.loads((out / "config.json").read_text()))
    assert cfg.extra["init"]["head"] == "kept" and cfg.extra["best_epoch"] == 0
    assert pretrain.run(p, tmp_path)["cached"] is True
    # the same path with other bytes is another start: the stage's key moves, and what was made from the old file is refused
    _weights(tmp_path / "mine.safetensors", seed=2)
    assert not outputs.is_current(out, pretrain.input_key(p, tmp_path))
    downstream = outputs.input_key("cache_features", {}, [out])
    assert outputs.inconsistent_upstream(downstream, p.sections, orchestrate._raw_now(p, tmp_path)) == [
        f"{out} was made from a weights file that has changed since"]


def test_pretrain_refuses_no_epochs_when_the_head_is_not_the_sources(tmp_path):
    _weights(tmp_path / "in1k.safetensors", num_classes=1000)
    p = _project(tmp_path, weights="in1k.safetensors", epochs=0)
    with pytest.raises(DataError, match=r"pretrain.epochs: 0 uses pretrain.weights .* no classifier with one output per source class \(3\)"):
        pretrain.run(p, tmp_path)
    assert not pretrain.output_dir(p, tmp_path).exists()
    # three outputs, but of three other classes: refused too, naming both lists
    from adaptflow.models import save

    save(timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=3), ModelConfig("test_resnet", 1, SIZE, ["7", "8", "9"]),
         tmp_path / "other")
    p = _project(tmp_path, weights="other/model.safetensors", epochs=0)
    with pytest.raises(DataError, match=r"no classifier with one output per source class \(3\): the file's classes \(7, 8, 9\) are not the "
                                        r"source's \(0, 1, 2\); set pretrain.epochs"):
        pretrain.run(p, tmp_path)
    assert not pretrain.output_dir(p, tmp_path).exists()


def test_the_same_refusal_comes_before_any_work(tmp_path):
    """What pretrain would refuse with epochs 0, `adaptflow run` checks on the listed source classes first."""
    from adaptflow.models import check_weights, save

    _weights(tmp_path / "in1k.safetensors", num_classes=1000)
    with pytest.raises(DataError, match=r"pretrain.epochs: 0 uses pretrain.weights .* no classifier with one output per source class \(3\); set"):
        check_weights("test_resnet", 1, "in1k.safetensors", tmp_path, as_is_for=["0", "1", "2"])
    check_weights("test_resnet", 1, "in1k.safetensors", tmp_path)  # trained from (epochs > 0): fine
    save(timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=3), ModelConfig("test_resnet", 1, SIZE, ["7", "8", "9"]),
         tmp_path / "other")
    with pytest.raises(DataError, match=r"the file's classes \(7, 8, 9\) are not the source's \(0, 1, 2\)"):
        check_weights("test_resnet", 1, "other/model.safetensors", tmp_path, as_is_for=["0", "1", "2"])
    check_weights("test_resnet", 1, "other/model.safetensors", tmp_path, as_is_for=["9", "7", "8"])  # the same classes, in another order


def test_a_new_classifier_never_competes_as_epoch_0(tmp_path):
    """ImageNet-like weights: the classifier is new (random), so the checkpoint is a trained epoch."""
    _weights(tmp_path / "in1k.safetensors", num_classes=1000)
    p = _project(tmp_path, weights="in1k.safetensors", epochs=1)
    pretrain.run(p, tmp_path)
    out = pretrain.output_dir(p, tmp_path)
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1]
    assert json.loads((out / "config.json").read_text())["extra"]["best_epoch"] == 1
