"""A user's own data through the real entry points: `adaptflow run` on an image folder with broken files, and
raw data versioned with `dvc add` / `dvc push` / `dvc pull` against the project's default local remote."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.datafiles import make_imagefolder, plant_broken
from tests.integration.conftest import BIN, REPO, run, shrunk_params, write_params

pytestmark = pytest.mark.integration


def test_imagefolder_with_broken_files_runs_end_to_end(tmp_path):
    """The issue's check: real digits + a truncated PNG, an empty file and a .txt → report, run, register."""
    folder = make_imagefolder(tmp_path / "my digits", per_class=15)  # a space in the path, mixed formats
    broken = plant_broken(folder)
    params = shrunk_params()  # shrunk further: this test is about the data, not the training
    params["finetune"]["strategies"], params["evaluate"]["baselines"] = ["source_only", "linear_probe"], ["source_only"]
    params["source"]["limit"], params["pretrain"]["epochs"] = 300, 1
    params["register"]["require_baselines"] = False  # no scratch: the gate checks source_only only
    write_params(tmp_path, params)

    proc = run([str(BIN / "adaptflow"), "run", "--set", f"target.domain=imagefolder:{folder}"], tmp_path)

    report = json.loads((tmp_path / "reports" / "ingest_target.json").read_text())
    got = {q["item"]: q["reason"] for q in report["quarantined"]}
    assert set(got) == set(broken)
    assert all(got[item].startswith(why) for item, why in broken.items())
    assert report["n_images"] == 150 and report["classes"] == [str(d) for d in range(10)]
    console = proc.stdout + proc.stderr
    assert all(item in console for item in broken)  # and each said so on the console
    registry = json.loads((tmp_path / "reports" / "registry.json").read_text())
    assert registry["version"] == "1" and registry["model_name"].startswith("adaptflow-imagefolder")
    metrics = json.loads((tmp_path / "reports" / "evaluate" / "metrics.json").read_text())
    assert "source_only" in metrics["strategies"]


def test_raw_data_versioned_with_dvc(dvc_project):
    """`dvc add` a user's folder, ingest it through `dvc repro`, notice a change, push and pull it back."""
    root = dvc_project
    dvc = str(BIN / "dvc")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the project's default local remote
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    folder = make_imagefolder(root / "data" / "raw" / "digits", per_class=12, classes=3)
    plant_broken(folder, cls="1")
    run([dvc, "add", "data/raw/digits"], root)
    ignored = run(["git", "check-ignore", "-q", "data/raw/digits.dvc"], root, check=False)
    assert ignored.returncode == 1, "the .dvc pointer must be committable"
    assert run(["git", "check-ignore", "-q", "data/raw/digits/0"], root, check=False).returncode == 0

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["target"].update({"domain": "imagefolder:data/raw/digits", "raw": "data/raw/digits", "k": 2, "limit": None})
    write_params(root, params)
    out = run([dvc, "repro", "--single-item", "ingest@target"], root).stdout
    assert "Running stage 'ingest@target'" in out
    report = json.loads((root / "reports" / "ingest_target.json").read_text())
    assert {q["item"] for q in report["quarantined"]} == {"1/truncated.png", "1/empty.png", "1/notes.txt"}
    assert "ingest@target" not in run([dvc, "status", "ingest@target"], root).stdout

    (folder / "2" / "extra.txt").write_text("one more bad file")  # the raw data changes → ingest is stale
    run([dvc, "add", "data/raw/digits"], root)
    assert "ingest@target" in run([dvc, "status", "ingest@target"], root).stdout

    run([dvc, "push"], root)
    assert any((root / ".dvcstore").rglob("*")), "dvc push stores into <repo>/.dvcstore by default"
    shutil.rmtree(folder)
    shutil.rmtree(root / ".dvc" / "cache")
    run([dvc, "pull", "data/raw/digits.dvc"], root)
    assert (folder / "2" / "extra.txt").read_text() == "one more bad file"
    assert len(list(folder.rglob("*"))) > 36
