"""Prefect and DVC over the same project agree: each finds the other's work done."""

from __future__ import annotations

import json

import pytest
import yaml

from adaptflow import orchestrate
from tests.integration.conftest import BIN, run

pytestmark = pytest.mark.integration


def test_prefect_run_commits_to_dvc_and_dvc_experiments_warm_prefect(dvc_project, prefect_harness):
    from flows.transfer_pipeline import run_pipeline

    def dvc(*args: str) -> str:
        return run([str(BIN / "dvc"), *args], dvc_project).stdout

    params = yaml.safe_load((dvc_project / "params.yaml").read_text())
    params["finetune"]["strategies"] = ["scratch", "source_only", "finetune"]
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dvc_project / ".gitignore").write_text("/.adaptflow/\n/mlflow.db\n/mlartifacts/\n")
    run(["git", "add", "-A"], dvc_project)
    run(["git", "commit", "-qm", "three strategies"], dvc_project)

    # A Prefect run records what it produced in dvc.lock: DVC then has nothing to do.
    cold = run_pipeline("params.yaml", [], str(dvc_project))
    assert not cold["register"]["cached"]
    assert (dvc_project / "dvc.lock").is_file()
    records = {f: (dvc_project / "reports" / f).read_bytes() for f in ("registry.json", "lineage.json")}
    run(["git", "add", "dvc.lock"], dvc_project)
    run(["git", "commit", "-qm", "the first run"], dvc_project)
    assert "up to date" in dvc("status").lower()
    assert "Running stage" not in dvc("repro")
    # ... and the lineage record carries this run's dvc.lock hashes (committed before register ran), not none
    from adaptflow.stages.register import dvc_lock_hashes

    lineage = json.loads((dvc_project / "reports/lineage.json").read_text())
    assert lineage["dvc_lock"]["stages"] == dvc_lock_hashes(dvc_project)["stages"] and "finetune" in lineage["dvc_lock"]["stages"]

    # An experiment through DVC changes a metric and is listed.
    before = json.loads((dvc_project / "reports/evaluate/metrics.json").read_text())
    out = dvc("exp", "run", "-n", "lr-high", "-S", "finetune.lr=0.05")
    assert "Running stage 'finetune'" in out and "Running stage 'pretrain'" not in out
    after = json.loads((dvc_project / "reports/evaluate/metrics.json").read_text())
    assert after["strategies"]["finetune"]["test_acc"] != before["strategies"]["finetune"]["test_acc"]
    shown = dvc("exp", "show", "--md")
    assert "lr-high" in shown and "0.05" in shown
    # ... and registers its candidate, but never as champion: that waits for a choice on val and `registry promote`
    reg = json.loads((dvc_project / "reports/registry.json").read_text())
    assert reg["version"] == "2" and reg["alias"] == "challenger" and reg["gate"] in ("passed, held", "rejected"), reg
    assert (reg["gate"] == "passed, held") == any(r.startswith("held: DVC experiment 'lr-high'") for r in reg["reasons"])
    from adaptflow import tracking

    tracking.configure(dvc_project)
    assert tracking.alias_version(reg["model_name"], "champion") == "1"
    # The experiment's stages noted the dvc process, so nothing ran between them; it has exited, so the
    # note holds nothing back now.
    note = json.loads((dvc_project / orchestrate.STATE_DIR / orchestrate.DVC_RUN_NAME).read_text())
    assert note["cmd"] == "dvc exp run" and note["stage"] == "register", note
    assert orchestrate.dvc_run_in_progress(dvc_project) is None

    # A Prefect run after DVC's: every stage finds its output current (the workspace holds the experiment).
    warm = run_pipeline("params.yaml", [], str(dvc_project))
    assert all(r["cached"] for r in warm["ingest"].values()) and all(r["cached"] for r in warm["finetune"].values())
    assert all(warm[s]["cached"] for s in ("augment", "pretrain", "cache_features", "evaluate", "register"))
    assert warm["register"]["version"] == json.loads((dvc_project / "reports/registry.json").read_text())["version"] == "2"
    assert "up to date" in dvc("status").lower()

    # Back at the committed state: reports/registry.json is in neither git nor the DVC cache, so it still holds
    # the experiment's registration. A Prefect run's register runs, finds version 1 registered from these very
    # inputs, and writes the first run's records back: nothing new is registered, and DVC agrees.
    run(["git", "checkout", "params.yaml", "dvc.lock"], dvc_project)
    dvc("checkout")
    assert json.loads((dvc_project / "reports/registry.json").read_text())["version"] == "2"
    back = run_pipeline("params.yaml", [], str(dvc_project))
    assert back["register"]["cached"] and back["register"]["version"] == "1" and all(back[s]["cached"] for s in ("evaluate", "pretrain"))
    assert {f: (dvc_project / "reports" / f).read_bytes() for f in records} == records
    assert tracking.find_versions(reg["model_name"], {})[0] == "2"  # the newest version is still the experiment's
    assert "up to date" in dvc("status").lower()
