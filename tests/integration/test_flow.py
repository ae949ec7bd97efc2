"""A real Prefect flow run of all seven stages, and a re-run that reuses every stage."""

from __future__ import annotations

import json
import shutil

import pytest

from adaptflow import outputs
from adaptflow.params import load

pytestmark = pytest.mark.integration


def test_flow_runs_every_stage_and_registers(flow_project):
    root, result = flow_project["root"], flow_project["result"]
    p = load(root / "params.yaml")
    assert set(result) == {"ingest", "augment", "pretrain", "cache_features", "finetune", "evaluate", "register"}
    for d in [root / p.paths.ingested / "source", root / p.paths.ingested / "target", root / p.paths.augmented,
              root / p.paths.source_model, root / p.paths.features, root / p.paths.reports / "evaluate"]:
        assert outputs.read_manifest(d) is not None, f"{d} has no complete output"
    assert len(result["finetune"]) == len(p.finetune.strategies) * len(p.finetune.seeds) == 8
    for s in p.finetune.strategies:
        for seed in p.finetune.seeds:
            assert (root / p.paths.adapted / s / f"seed{seed}" / "model.safetensors").is_file()
    assert (root / p.paths.augmented / "preview_target.png").stat().st_size > 1000
    metrics = json.loads((root / p.paths.reports / "evaluate" / "metrics.json").read_text())
    assert set(metrics["strategies"]) == set(p.finetune.strategies)
    assert metrics["candidate"] in {"finetune", "dann+fixmatch"}  # never a baseline
    for s, m in metrics["strategies"].items():
        assert 0.0 <= m["test_acc"] <= 1.0 and 0.0 <= m["val_acc"] <= 1.0 and m["n_seeds"] == 2
    assert len(metrics["runs"]) == 8
    assert metrics["candidate_seed"] in (0, 1)
    registry = json.loads((root / p.paths.reports / "registry.json").read_text())
    assert registry["version"] == "1" and registry["promoted"] is True
    assert registry["candidate"] == metrics["candidate"]


def test_rerun_with_nothing_changed_does_no_work(flow_project):
    from flows.transfer_pipeline import transfer_pipeline

    root = flow_project["root"]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("_manifest.json")}
    again = transfer_pipeline(params_path="params.yaml", root=str(root))
    assert all(r["cached"] for r in again["ingest"].values())
    for stage in ("augment", "pretrain", "cache_features", "evaluate", "register"):
        assert again[stage]["cached"], stage
    assert all(r["cached"] for r in again["finetune"].values())
    assert again["register"]["version"] == flow_project["result"]["register"]["version"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("_manifest.json")} == before


def test_changing_a_finetune_param_reruns_only_downstream(flow_project, tmp_path):
    from flows.transfer_pipeline import transfer_pipeline

    root = tmp_path / "copy"  # a copy: the shared project stays as the first run left it
    shutil.copytree(flow_project["root"], root)
    again = transfer_pipeline(params_path="params.yaml", overrides=["finetune.epochs=2"], root=str(root))
    assert all(r["cached"] for r in again["ingest"].values())
    assert again["pretrain"]["cached"] and again["cache_features"]["cached"]
    assert not again["finetune"]["finetune[seed=0]"]["cached"]
    assert not again["evaluate"]["cached"]
