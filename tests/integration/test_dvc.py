"""The same stages through real `dvc repro` in a temporary git repo."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import BIN, run

pytestmark = pytest.mark.integration


def test_dvc_repro_runs_stages_then_has_nothing_to_do(dvc_project):
    first = run([str(BIN / "dvc"), "repro"], dvc_project)
    for stage in ("ingest@source", "ingest@target", "augment", "pretrain", "cache_features", "finetune", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    assert (dvc_project / "dvc.lock").is_file()
    metrics = json.loads((dvc_project / "reports" / "evaluate" / "metrics.json").read_text())
    assert metrics["candidate"] in {"finetune", "dann+fixmatch"}  # never a baseline
    registry = json.loads((dvc_project / "reports" / "registry.json").read_text())
    assert registry["version"] == "1"

    second = run([str(BIN / "dvc"), "repro"], dvc_project)
    assert "Running stage" not in second.stdout
    status = run([str(BIN / "dvc"), "status"], dvc_project)
    assert "up to date" in status.stdout.lower()

    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], dvc_project)
    assert "test_acc" in shown.stdout


    # A finetune param changes: only finetune and what reads it re-run.
    params = (dvc_project / "params.yaml").read_text()
    assert "linear_probe_epochs: 20" in params
    (dvc_project / "params.yaml").write_text(params.replace("linear_probe_epochs: 20", "linear_probe_epochs: 10"))
    out = run([str(BIN / "dvc"), "repro"], dvc_project).stdout
    assert "Running stage 'finetune'" in out
    for untouched in ("ingest@source", "ingest@target", "pretrain", "cache_features", "augment"):
        assert f"Running stage '{untouched}'" not in out, untouched

    # A preview setting changes: augment re-runs; its overlap check passes with the same record, so the
    # source model is not retrained and nothing after it runs (the manifests hold nothing time-dependent).
    version = json.loads((dvc_project / "reports" / "registry.json").read_text())["version"]
    params = (dvc_project / "params.yaml").read_text()
    assert "preview_n: 8" in params
    (dvc_project / "params.yaml").write_text(params.replace("preview_n: 8", "preview_n: 6"))
    out = run([str(BIN / "dvc"), "repro"], dvc_project).stdout
    assert "Running stage 'augment'" in out
    for untouched in ("ingest@source", "ingest@target", "pretrain", "cache_features", "finetune", "evaluate", "register"):
        assert f"Running stage '{untouched}'" not in out, untouched
    assert json.loads((dvc_project / "reports" / "registry.json").read_text())["version"] == version

    # A transform's `size` changes: finetune re-runs and trains anew. (DVC's run cache leaves keys named
    # `size` out of a run's signature: it would restore the models trained at the old size.)
    import yaml

    params = yaml.safe_load((dvc_project / "params.yaml").read_text())
    params["augment"]["target"]["transforms"] += [
        {"name": "RandomChoice", "transforms": [{"name": "Resize", "size": 8}, {"name": "Resize", "size": 12}]},
        {"name": "Resize", "size": 16}]
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Running stage 'finetune'" in run([str(BIN / "dvc"), "repro"], dvc_project).stdout
    trained = (dvc_project / "models" / "adapted" / "finetune" / "seed0" / "_manifest.json").read_text()
    params["augment"]["target"]["transforms"][-2]["transforms"][0]["size"] = 10
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([str(BIN / "dvc"), "repro"], dvc_project).stdout
    assert "Running stage 'finetune'" in out and "is cached" not in out, out
    assert (dvc_project / "models" / "adapted" / "finetune" / "seed0" / "_manifest.json").read_text() != trained
    assert "size: 10" in (dvc_project / "dvc.lock").read_text()

    # The source model is given as a weights file (pretrain.weights, epochs 0): pretrain re-runs and keeps it
    # as it is; other bytes under the same name are a change `dvc status` sees through pretrain.weights_dep.
    from safetensors.torch import load_file, save_file

    weights = dvc_project / "weights" / "source.safetensors"
    weights.parent.mkdir()
    state = load_file(str(dvc_project / "models" / "source" / "model.safetensors"))
    save_file(state, str(weights))
    params = yaml.safe_load((dvc_project / "params.yaml").read_text())
    params["pretrain"].update({"weights": "weights/source.safetensors", "weights_dep": "weights/source.safetensors", "epochs": 0})
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([str(BIN / "dvc"), "repro", "pretrain"], dvc_project).stdout
    assert "Running stage 'pretrain'" in out and "Running stage 'ingest@source'" not in out
    kept = load_file(str(dvc_project / "models" / "source" / "model.safetensors"))
    assert kept.keys() == state.keys() and all((kept[k] == v).all() for k, v in state.items())
    assert "changed" not in run([str(BIN / "dvc"), "status", "pretrain"], dvc_project).stdout
    state["fc.bias"] = state["fc.bias"] + 0.5
    save_file(state, str(weights))
    status = run([str(BIN / "dvc"), "status", "pretrain"], dvc_project).stdout
    assert "changed deps" in status and "weights/source.safetensors" in status, status
