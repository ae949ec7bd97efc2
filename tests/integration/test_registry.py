"""Registry round trip on the local SQLite store: register → alias → load in another process → predict raw
images; the predict CLI. (The same against a real tracking server: test_registry_server.py.)

The consumer process cannot import adaptflow: the model must carry its own code.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from adaptflow.data import store
from adaptflow.params import load
from tests.integration.conftest import BIN, env_with_venv, run

pytestmark = pytest.mark.integration

CONSUMER = r"""
import sys, json
sys.modules["adaptflow"] = None  # the consumer has no adaptflow: importing it must fail
try:
    import adaptflow
    raise SystemExit("adaptflow importable in the consumer")
except ImportError:
    pass
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
out = model.predict(pd.DataFrame({"image": sys.argv[3:]}))
print(json.dumps(list(out["label"])))
"""


def _raw_test_pngs(root: Path, dest: Path) -> tuple[list[str], list[str]]:
    """The target test images at their native 8×8 size, as a consumer would hold them."""
    from sklearn.datasets import load_digits

    p = load(root / "params.yaml")
    tgt = root / p.paths.ingested / "target"
    meta = store.read_meta(tgt)
    test = meta[meta.split == "test"]
    raw = load_digits().images
    dest.mkdir()
    paths = []
    for i, idx in enumerate(test.source_index):
        path = dest / f"{i:04d}.png"
        Image.fromarray(np.clip(np.rint(raw[idx] * 255 / 16), 0, 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths, list(test.class_name)


@contextmanager
def records_kept(root: Path) -> Iterator[tuple[Path, Path]]:
    """Register's two records in the shared project, put back as they were once the block ends: a test that
    registers again must not leave the project's records pointing at its own version for the tests after it."""
    files = (root / "reports" / "registry.json", root / "reports" / "lineage.json")
    records = {f: f.read_bytes() for f in files}
    try:
        yield files
    finally:
        for f, data in records.items():
            f.write_bytes(data)


def test_champion_loads_without_adaptflow_and_matches_evaluate(flow_project, tmp_path):
    root = flow_project["root"]
    p = load(root / "params.yaml")
    registry = json.loads((root / p.paths.reports / "registry.json").read_text())
    metrics = json.loads((root / p.paths.reports / "evaluate" / "metrics.json").read_text())
    name, uri = registry["model_name"], f"sqlite:///{root / 'mlflow.db'}"
    paths, truth = _raw_test_pngs(root, tmp_path / "pngs")

    proc = run([sys.executable, "-c", CONSUMER, uri, f"models:/{name}@champion", *paths], tmp_path)
    labels = json.loads(proc.stdout.strip().splitlines()[-1])
    acc = float(np.mean(np.array(labels) == np.array(truth)))
    # Same images, preprocessed inside the model from their raw 8×8 form: the accuracy evaluate reported
    # for the registered run (the candidate strategy at its chosen seed).
    run_acc = metrics["runs"][f"{registry['candidate']}/seed{registry['candidate_seed']}"]["test_acc"]
    assert acc == pytest.approx(run_acc, abs=1e-9)


def test_the_registered_model_carries_a_train_image_as_its_example_never_a_test_image(flow_project):
    import base64
    import hashlib
    import io

    import mlflow

    from adaptflow import tracking

    root = flow_project["root"]
    p = load(root / "params.yaml")
    registry = json.loads((root / p.paths.reports / "registry.json").read_text())
    tracking.configure(root)
    example = mlflow.pyfunc.load_model(f"models:/{registry['model_name']}/{registry['version']}").input_example
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(example["image"].iloc[0]))))
    pixels = np.ascontiguousarray(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))  # as stored: C×H×W
    meta = store.read_meta(root / p.paths.ingested / "target", ["split", "sha1"])
    assert meta.split[meta.sha1 == hashlib.sha1(pixels.tobytes()).hexdigest()].tolist() == ["train"]


def test_predict_cli_prints_one_label_per_image(flow_project, tmp_path):
    root = flow_project["root"]
    paths, _ = _raw_test_pngs(root, tmp_path / "pngs")
    name = json.loads((root / "reports" / "registry.json").read_text())["model_name"]
    # the CLI reads the files itself: a shell that turned path reading off for a served model changes nothing
    env = {**env_with_venv(), "ADAPTFLOW_READ_PATHS": "0"}
    out = run([str(BIN / "adaptflow"), "predict", "--model", f"models:/{name}@champion", *paths[:5]], root, env=env).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 5
    for line, path in zip(lines, paths[:5]):
        file, label, conf = line.split("\t")
        assert file == path and label in [str(d) for d in range(10)] and 0.0 <= float(conf) <= 1.0

    bad = run([str(BIN / "adaptflow"), "predict", "--model", f"models:/{name}@champion", str(tmp_path / "missing.png")], root, check=False)
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_predict_cli_takes_a_folder_and_writes_csv(flow_project, tmp_path):
    root = flow_project["root"]
    paths, _ = _raw_test_pngs(root, tmp_path / "pngs")
    (tmp_path / "pngs" / "nested").mkdir()
    Path(paths[0]).rename(tmp_path / "pngs" / "nested" / "first.png")
    (tmp_path / "pngs" / "notes.txt").write_text("not an image")
    (tmp_path / "pngs" / "corrupt.png").write_text("not an image either")  # an image's name, not its bytes
    name = json.loads((root / "reports" / "registry.json").read_text())["model_name"]
    csv = tmp_path / "out" / "pred.csv"
    # three images a batch: the corrupt file falls inside one batch, the CSV joins them all
    proc = run([str(BIN / "adaptflow"), "predict", "-m", f"models:/{name}@champion", str(tmp_path / "pngs"), "-o", str(csv), "--batch-size", "3"], root)
    out = proc.stdout
    assert f"skipped {tmp_path / 'pngs' / 'corrupt.png'}: not an image Pillow can read" in proc.stderr  # the others are predicted
    table = pd.read_csv(csv)
    assert len(table) == len(paths) == len([line for line in out.splitlines() if line.strip()])
    assert list(table.columns[:3]) == ["path", "label", "confidence"] and "proba_0" in table.columns
    assert str(tmp_path / "pngs" / "nested" / "first.png") in set(table.path)
    assert np.allclose(table.filter(like="proba_").sum(axis=1), 1.0, atol=1e-4)

    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run([str(BIN / "adaptflow"), "predict", "-m", f"models:/{name}@champion", str(empty)], root, check=False)
    assert bad.returncode == 2 and "no image files" in bad.stderr


def test_gate_keeps_champion_when_candidate_does_not_beat_it(flow_project, another_model):
    """A second registration of an equally good model is not promoted: it becomes `challenger`."""
    from adaptflow import tracking
    from adaptflow.stages import register

    root = flow_project["root"]
    p = load(root / "params.yaml", overrides=["register.margin=0.001"])  # a new key: register runs again
    with records_kept(root) as (registry, _):
        first = json.loads(registry.read_text())
        second = register.run(p, root)
        assert json.loads(registry.read_text())["version"] == second["version"]
    assert second["cached"] is False and second["version"] != first["version"]
    assert second["promoted"] is False
    # the same model as the champion, scored by the same path on the same images: a tie, which does not beat
    assert any(re.fullmatch(r"does not beat current champion \((\d\.\d{4}) vs \1 on this test set\)", r) for r in second["reasons"]), second["reasons"]
    tracking.configure(root)
    assert tracking.alias_version(first["model_name"], "champion") == first["version"]
    assert tracking.alias_version(first["model_name"], "challenger") == second["version"]


def test_a_candidate_a_version_already_serves_is_not_registered_again(flow_project, monkeypatch):
    """The same weights come back after a change that leaves them alone (a register or evaluate setting; a code
    change, retrained bit for bit): register adds no copy and moves nothing, and going back and forth restores
    each run's records byte for byte. A version whose verdict stands, or that was rolled back, answers for its
    weights (no re-gate undoes it); one gated against a champion since replaced is registered and gated anew."""
    from mlflow import MlflowClient

    from adaptflow import tracking
    from adaptflow.stages import register

    root = flow_project["root"]
    p = [load(root / "params.yaml", overrides=["register.model_name=same-{target}", f"register.margin={m}"]) for m in (0, 1e-3, 2e-3, 3e-3, 4e-3)]
    name = p[0].registered_model_name()

    def other_model(params):  # the other weights: version 2, and later the rolled-back one
        with monkeypatch.context() as mp:
            mp.setattr(tracking, "served_digest", lambda d: "another-model")
            return register.run(params, root)

    with records_kept(root) as files:
        first = register.run(p[0], root)
        again = register.run(p[1], root)
        written = [f.read_bytes() for f in files]
        assert json.loads(files[0].read_text())["version"] == first["version"] == again["version"] == "1"
        back, forth = register.run(p[0], root), register.run(p[1], root)
        assert [f.read_bytes() for f in files] == written  # the records of the run that registered nothing, as it wrote them
        other = other_model(p[2])
        tracking.move_alias(name, "champion", other["version"], expected=first["version"], reason="test: another champion")
        anew = register.run(p[3], root)  # version 1 was gated against no champion; champion is 2 now: gated anew
        register.rollback(name, "test: version 2 misreads sevens")  # champion back to 1; 2 tagged rolled_back
        kept = tracking.version_tags(name, "2")
        out = other_model(p[4])
    assert first["promoted"] and not again["cached"] and again["gate"] == register.SAME and again["alias"] == "champion"
    assert again["reasons"] == [f"the candidate ({first['candidate']}, seed {first['candidate_seed']}) serves exactly what version 1 serves "
                                f"(weights, classes, input and serving code, by served_digest {tracking.version_tags(name, '1')['served_digest']}): "
                                "nothing registered, no alias moved; it is the champion"]
    assert register.summary(again, root).startswith(f"registry: {name} version 1 already champion: the candidate")
    assert back["cached"] and back["version"] == "1" and forth["cached"] and forth["gate"] == register.SAME
    assert other["version"] == "2" and anew["version"] == "3" and anew["previous_champion"] == "2" and not anew["promoted"]
    # the rolled-back weights come back: nothing registered, nothing moved, and the way back if wanted
    assert out["version"] == "2" and out["gate"] == register.SAME_VERSION and not out["promoted"] and out["alias"] is None
    assert "and it was rolled back (test: version 2 misreads sevens)" in out["reasons"][0], out["reasons"]
    assert f"adaptflow registry rollback {name} --to 2" in out["reasons"][0]
    assert register.summary(out, root).startswith(f"registry: {name} version 2 already registered: the candidate")
    assert sorted(str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'")) == ["1", "2", "3"]
    assert tracking.version_tags(name, "2") == kept and tracking.alias_version(name, "champion") == "1"


def test_gate_scores_the_champion_only_on_test_images_it_never_saw(flow_project, monkeypatch, another_model):
    """New target data re-splits every class: the champion must not be scored on images it trained on."""
    from adaptflow import tracking
    from adaptflow.stages import register

    root = flow_project["root"]
    p = load(root / "params.yaml", overrides=["register.margin=0.002"])  # a new key: register runs again
    meta = store.read_meta(root / p.paths.ingested / "target", ["split", "sha1", "content"])
    name = p.registered_model_name()
    tracking.configure(root)
    champion = tracking.alias_version(name, "champion")
    # what each registration records: the target images its models trained or chose on, by both hashes
    seen = tracking.seen_by(name, champion, register.SEEN)
    for key in ("content", "sha1"):
        assert sorted(seen[key]) == sorted(meta[key][meta.split.isin(["train", "val"])])
    test_content = list(meta.content[meta.split == "test"])
    real = tracking.seen_by
    # as if today's test split held 10 images the champion had in train (at another image size: only the
    # decoded-content hash tells them): it is scored on the others only
    monkeypatch.setattr(tracking, "seen_by", lambda n, v, f: {"content": real(n, v, f)["content"] + test_content[:10], "sha1": []})
    with records_kept(root):
        out = register.run(p, root)
    note = f"champion and candidate compared on the {len(test_content) - 10} of {len(test_content)} test images the champion never trained or chose on (10 it had were left out)"
    assert note in out["reasons"], out["reasons"]
    assert any(r.startswith(("beats current champion", "does not beat current champion")) for r in out["reasons"])


def test_an_experiment_never_moves_champion_and_promote_applies_its_held_verdict(flow_project, monkeypatch, another_model):
    """Under `dvc exp run` a passing gate is held: across a sweep the best test score would otherwise pick the
    champion. `adaptflow registry promote` applies a held verdict, only while the champion it compared with stands."""
    from adaptflow import tracking
    from adaptflow.stages import register

    root = flow_project["root"]
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-lamb")
    p = load(root / "params.yaml", overrides=["register.model_name=exp-{target}"])  # a model with no champion yet
    name = p.registered_model_name()
    with records_kept(root):
        first = register.run(p, root)
        second = register.run(load(root / "params.yaml", overrides=["register.model_name=exp-{target}", "register.margin=0.001"]), root)
    for out in (first, second):
        assert out["promoted"] is False and out["gate"] == register.HELD and out["alias"] == "challenger", out
        assert "no current champion" in out["reasons"] and any(r.startswith("held: DVC experiment 'tidy-lamb'") for r in out["reasons"])
    tracking.configure(root)
    assert tracking.alias_version(name, "champion") is None and tracking.alias_version(name, "challenger") == second["version"]
    monkeypatch.delenv("DVC_EXP_NAME")

    promoted = run([str(BIN / "adaptflow"), "registry", "promote", name, first["version"]], root)
    assert f"{name}@champion: version {first['version']} (was none)" in promoted.stdout
    assert tracking.alias_version(name, "champion") == first["version"]
    move = tracking.alias_history(name, "champion")[-1]
    assert move.to_version == first["version"] and move.reason.startswith("promoted by hand")
    assert tracking.version_tags(name, first["version"])["gate"] == "promoted"
    assert tracking.alias_version(name, "challenger") == second["version"]  # it named another version: it stays
    # the second was gated against no champion; there is one now, so its verdict no longer holds
    stale = run([str(BIN / "adaptflow"), "registry", "promote", name, second["version"]], root, check=False)
    assert stale.returncode == 2 and f"gated against champion none, but champion is now {first['version']}" in stale.stderr
    again = run([str(BIN / "adaptflow"), "registry", "promote", name, first["version"]], root, check=False)
    assert again.returncode == 0 and f"version {first['version']} already; nothing moved" in again.stdout
    assert tracking.alias_version(name, "champion") == first["version"]
    # the versions still held, each with what chooses among them (val accuracy here, k > 0), never its test score
    # (the second was gated against no champion: listed apart, as promote refuses it now)
    shown = run([str(BIN / "adaptflow"), "registry", "show", name], root).stdout
    assert f"held against an earlier champion (champion is now {first['version']}: promote refuses" in shown
    assert "held (gate passed; choose on these" not in shown
    line = next(x for x in shown.splitlines() if x.startswith(f"  version {second['version']} "))
    assert re.search(r"val_acc \d\.\d{4}  gated against none$", line) and "test" not in line, line
    assert not any(x.startswith(f"  version {first['version']} ") for x in shown.splitlines())  # promoted: no longer held


def test_going_back_to_inputs_registered_before_registers_nothing_until_champion_moves(flow_project, another_model):
    """After `dvc exp run` (or any other run) rewrote reports/registry.json, which neither git nor the DVC cache
    restores, the same inputs again find their version by its register_key tag: its records are written back
    as they were and nothing is registered. Once champion has moved, its verdict is stale: gated again."""
    from mlflow import MlflowClient

    from adaptflow import tracking
    from adaptflow.stages import register

    root = flow_project["root"]
    base = load(root / "params.yaml", overrides=["register.model_name=back-{target}"])  # a model of its own
    other = load(root / "params.yaml", overrides=["register.model_name=back-{target}", "register.margin=0.0005"])
    name = base.registered_model_name()
    with records_kept(root) as files:
        first = register.run(base, root)
        written = [f.read_bytes() for f in files]
        second = register.run(other, root)  # another key: a new version (another model, as good: it does not beat champion)
        back = register.run(base, root)
        restored = [f.read_bytes() for f in files]
        forth = register.run(other, root)
        tracking.configure(root)
        tracking.move_alias(name, "champion", second["version"], expected=first["version"], reason="test: champion moves")
        stale = register.run(base, root)
    assert (first["version"], second["version"]) == ("1", "2") and first["promoted"] and not second["promoted"]
    assert back["cached"] and back["version"] == "1" and restored == written  # byte for byte: dvc.lock's hashes hold
    assert forth["cached"] and forth["version"] == "2"
    assert not stale["cached"] and stale["version"] == "3"  # gated against version 2, today's champion
    assert any(r.startswith("does not beat current champion") for r in stale["reasons"]) and stale["previous_champion"] == "2"
    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    assert {str(v.version): v.tags["register_key"] for v in versions} == {"1": first["key"], "2": second["key"], "3": first["key"]}
