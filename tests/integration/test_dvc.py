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
