"""The registry against a real `mlflow server` (SQLite backend, proxied artifacts) on 127.0.0.1.

Three pipeline runs through the Prefect flow, reusing the session's project (only finetune for the worse
configuration, evaluate and register do work): a worse configuration first (it becomes the first
champion), the normal one (better, but on the test set that picked the champion: held, then promoted by
hand with `adaptflow registry promote`), the worse one again (it stays `challenger`, with the reason). Then consumers: a process without adaptflow loads `models:/NAME@champion` from the server,
`mlflow models serve` answers `/invocations`, the weights rebuild with timm alone; and the alias
compare-and-set refuses a move whose premise changed.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from adaptflow.data import store
from adaptflow.params import load
from tests.integration.conftest import BIN, as_another_model, env_with_venv, free_port, run, start_server, stop
from tests.integration.test_registry import CONSUMER, _raw_test_pngs

pytestmark = pytest.mark.integration

# A configuration that must lose to the normal run yet beat chance (the gate refuses a first champion that a constant
# answer would beat): only `source_only`, the pretrained model unadapted.
WORSE = ["finetune.strategies=[source_only]", "finetune.seeds=[0]"]


@pytest.fixture(scope="module")
def server_runs(flow_project, mlflow_server, tmp_path_factory):
    from flows.transfer_pipeline import transfer_pipeline

    base = tmp_path_factory.mktemp("server_runs")
    normal, worse = base / "normal", base / "worse"
    shutil.copytree(flow_project["root"], normal)
    shutil.copytree(flow_project["root"], worse)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    try:
        first = transfer_pipeline(params_path="params.yaml", overrides=WORSE, root=str(worse))["register"]
        better = transfer_pipeline(params_path="params.yaml", root=str(normal))["register"]
        lineage_better = json.loads((normal / "reports" / "lineage.json").read_text())
        promoted = subprocess.run([str(BIN / "adaptflow"), "registry", "promote", better["model_name"], better["version"]], cwd=normal,
                                  env={**env_with_venv(), "MLFLOW_TRACKING_URI": mlflow_server["uri"]}, capture_output=True, text=True)
        as_another_model(mp)  # as if the worse configuration came out another (equally worse) model: a version of its own
        again = transfer_pipeline(params_path="params.yaml", overrides=WORSE + ["register.margin=0.0001"], root=str(worse))["register"]
        yield {"first": first, "better": better, "promoted": promoted, "again": again, "normal": normal, "worse": worse, "uri": mlflow_server["uri"],
               "name": better["model_name"], "lineage_better": lineage_better}
    finally:
        mp.undo()


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_a_better_run_on_the_champions_test_set_is_held_until_promoted_and_a_worse_one_is_rejected(server_runs):
    first, better, again = server_runs["first"], server_runs["better"], server_runs["again"]
    assert first["tracking_uri"] == server_runs["uri"]
    assert first["promoted"] and first["candidate"] == "source_only" and "no current champion" in first["reasons"], first["reasons"]
    # the same data, so the same test set that made version 1 champion: the passing gate is held
    assert not better["promoted"] and better["gate"] == "passed, held" and better["previous_champion"] == first["version"]
    assert any(r.startswith("beats current champion") for r in better["reasons"])
    assert any(r.startswith(f"held: champion (version {first['version']}) was registered on this same test set") for r in better["reasons"])
    promoted = server_runs["promoted"]
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.startswith(f"{better['model_name']}@champion: version {better['version']} (was {first['version']})")
    assert not again["promoted"] and again["alias"] == "challenger"
    assert any(r.startswith("does not beat current champion") for r in again["reasons"])

    client = _client(server_runs["uri"])
    model = client.get_registered_model(server_runs["name"])
    assert model.aliases == {"champion": better["version"], "challenger": again["version"]}
    tags = client.get_model_version(server_runs["name"], again["version"]).tags
    assert tags["gate"] == "rejected" and "does not beat current champion" in tags["gate_reasons"]


def test_registry_history_cli_says_who_was_champion_when(server_runs):
    env = {**env_with_venv(), "MLFLOW_TRACKING_URI": server_runs["uri"]}
    cmd = [str(BIN / "adaptflow"), "registry", "history", server_runs["name"]]
    moves = json.loads(subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, check=True, cwd=server_runs["normal"]).stdout)
    v1, v2, v3 = server_runs["first"]["version"], server_runs["better"]["version"], server_runs["again"]["version"]
    assert [(m["alias"], m["from_version"], m["to_version"]) for m in moves] == [
        ("champion", None, v1), ("challenger", None, v2), ("champion", v1, v2), ("challenger", v2, None), ("challenger", None, v3)]
    assert moves[0]["reason"].startswith("gate passed: ") and moves[1]["reason"].startswith("gate passed, held: ")
    assert moves[2]["reason"].startswith("promoted by hand (adaptflow registry promote): gate passed: ")
    assert moves[3]["reason"] == f"version {v2} promoted to champion by hand (adaptflow registry promote)"
    assert moves[4]["reason"].startswith("gate rejected")
    assert moves[1]["context"]["orchestrator"] == "prefect" and moves[1]["context"]["prefect_flow_run_id"]
    assert moves[2]["context"]["orchestrator"] == "cli"

    text = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=server_runs["normal"]).stdout
    assert text.count("gate passed") == 3 and "gate rejected" in text and "promoted by hand" in text
    at_first = datetime_iso(moves[0]["time"] + 0.001)
    held = subprocess.run(cmd + ["--at", at_first], env=env, capture_output=True, text=True, check=True, cwd=server_runs["normal"]).stdout
    assert f"version {v1} " in held and "why: gate passed" in held
    now = subprocess.run(cmd + ["--at", datetime_iso(time.time() + 1)], env=env, capture_output=True, text=True, check=True, cwd=server_runs["normal"]).stdout
    assert f"version {v2} " in now
    bogus = subprocess.run(cmd + ["--alias", "champoin"], env=env, capture_output=True, text=True, cwd=server_runs["normal"])
    assert bogus.returncode == 2 and "--alias champoin" in bogus.stderr and "its aliases with moves: challenger, champion" in bogus.stderr
    show = subprocess.run([str(BIN / "adaptflow"), "registry", "show", server_runs["name"]], env=env, capture_output=True, text=True, check=True).stdout
    assert f"champion    version {v2}" in show and f"challenger  version {v3}" in show
    assert re.search(r"test_acc \d\.\d{4}  gate", show), show  # as the table and the gate round it


def datetime_iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat()


def test_lineage_ties_flow_run_git_dvc_data_and_mlflow(server_runs):
    lin, better = server_runs["lineage_better"], server_runs["better"]
    client = _client(server_runs["uri"])
    assert lin["orchestrator"]["kind"] == "prefect" and len(lin["orchestrator"]["prefect_flow_run_id"]) == 36
    assert lin["mlflow"]["model_version"] == better["version"] and lin["mlflow"]["parent_run_id"] == better["parent_run_id"]
    assert set(lin["git"]) == {"commit", "dirty"} and lin["code_version"]
    card = store.read_card(server_runs["normal"] / "data" / "ingested" / "target")
    assert lin["datasets"]["target"]["data_hash"] == card["data_hash"]

    # from the registered version to its run, its parent, its data and its lineage
    mv = client.get_model_version(server_runs["name"], better["version"])
    cand_key = f"{better['candidate']}/seed{better['candidate_seed']}"
    assert mv.run_id == lin["mlflow"]["run_ids"][cand_key]
    cand = client.get_run(mv.run_id)
    assert cand.data.tags["mlflow.parentRunId"] == better["parent_run_id"]
    for key in ("git_commit", "git_dirty", "target_data_hash", "source_data_hash", "source_model_digest", "source_model_run_id"):
        assert cand.data.tags[key] and mv.tags[key] == cand.data.tags[key], key
    assert {d.dataset.digest for d in cand.inputs.dataset_inputs} == {card["data_hash"]}
    parent = client.get_run(better["parent_run_id"])
    assert {d.dataset.name.split(":")[0] for d in parent.inputs.dataset_inputs} == {"source", "target"}
    assert parent.data.params["finetune.epochs"] == str(load(server_runs["normal"] / "params.yaml").finetune.epochs)
    assert len(client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")) == len(lin["mlflow"]["run_ids"])
    import mlflow

    mlflow.set_tracking_uri(server_runs["uri"])
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="lineage.json")).read_text())
    assert logged == lin
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "evaluate")}
    assert {"evaluate/report.html", "evaluate/metrics.json", "evaluate/plots"} <= artifacts
    src = client.get_run(cand.data.tags["source_model_run_id"])
    assert src.data.tags["adaptflow.kind"] == "source_model" and src.data.tags["source_model_digest"] == mv.tags["source_model_digest"]


def test_champion_loads_from_server_in_a_process_without_adaptflow(server_runs, tmp_path):
    root, better = server_runs["normal"], server_runs["better"]
    metrics = json.loads((root / "reports" / "evaluate" / "metrics.json").read_text())
    paths, truth = _raw_test_pngs(root, tmp_path / "pngs")
    proc = run([sys.executable, "-c", CONSUMER, server_runs["uri"], f"models:/{server_runs['name']}@champion", *paths], tmp_path)
    labels = json.loads(proc.stdout.strip().splitlines()[-1])
    acc = float(np.mean(np.array(labels) == np.array(truth)))
    assert acc == pytest.approx(metrics["runs"][f"{better['candidate']}/seed{better['candidate_seed']}"]["test_acc"], abs=1e-9)


def test_model_rebuilds_with_timm_alone_and_holds_no_pickle(server_runs, tmp_path):
    import mlflow
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    mlflow.set_tracking_uri(server_runs["uri"])
    mlflow.set_registry_uri(server_runs["uri"])
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{server_runs['name']}@champion", dst_path=str(tmp_path / "model")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".cloudpickle"))], files
    assert {"MLmodel", "serving_model.py", "code/imaging.py", "requirements.txt", "artifacts/model.safetensors", "artifacts/timm_config.json"} <= files
    reqs = (local / "requirements.txt").read_text().split()
    assert all("==" in r for r in reqs if not r.startswith("-")) and any(r.startswith("timm==") for r in reqs)

    cfg = json.loads((local / "artifacts" / "timm_config.json").read_text())
    net = timm.create_model(**cfg["create_model"])
    net.load_state_dict(load_file(str(local / "artifacts" / "model.safetensors")))
    net.eval()
    paths, _ = _raw_test_pngs(server_runs["normal"], tmp_path / "pngs")
    size, mode = cfg["input"]["size"][0], cfg["input"]["color"]
    x = np.stack([np.asarray(Image.open(p).convert(mode).resize((size, size), Image.BILINEAR), dtype=np.uint8) for p in paths[:20]])
    x = torch.from_numpy(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)).float() / 127.5 - 1.0
    rebuilt = [cfg["classes"][i] for i in net(x).argmax(1).tolist()]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{server_runs['name']}@champion").predict(__import__("pandas").DataFrame({"image": paths[:20]}))
    assert rebuilt == list(pyfunc["label"])


def test_mlflow_models_serve_answers_invocations(server_runs, tmp_path):
    paths, truth = _raw_test_pngs(server_runs["normal"], tmp_path / "pngs")
    paths, truth = paths[:16], truth[:16]
    port = free_port()
    env = {**env_with_venv(), "MLFLOW_TRACKING_URI": server_runs["uri"], "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{server_runs['name']}@champion", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    proc = start_server(cmd, tmp_path, f"http://127.0.0.1:{port}/ping", env)
    try:
        b64 = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b] for b in b64]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            preds = json.loads(r.read())["predictions"]
        refusals = [_refusal(port, p) for p in (str(Path(paths[0]).resolve()), str(tmp_path / "missing.png"))]
    finally:
        stop(proc)
    # a client can neither read a server file nor tell from the answer whether one exists
    assert refusals[0] == refusals[1] and "reads no file paths when served" in refusals[0]
    assert len(preds) == len(paths)
    classes = [str(d) for d in range(10)]
    for p in preds:
        assert p["label"] in classes and sum(p[f"proba_{c}"] for c in classes) == pytest.approx(1.0, abs=1e-4)
        assert p["confidence"] == pytest.approx(max(p[f"proba_{c}"] for c in classes))
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(server_runs["uri"])
    mlflow.set_registry_uri(server_runs["uri"])
    local = mlflow.pyfunc.load_model(f"models:/{server_runs['name']}@champion").predict(pd.DataFrame({"image": b64}))
    assert [p["label"] for p in preds] == list(local["label"])


def _refusal(port: int, path: str) -> str:
    """The served model's answer to a file path, with the path itself blanked out."""
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[path]]}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=60)
    assert exc.value.code == 400
    answer = json.loads(exc.value.read())
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in answer, answer  # the server's code stays its own
    return answer["message"].rpartition("Error: ")[2].replace(repr(path[:60]), "<path>")


def test_gate_does_not_overwrite_a_champion_that_moved_meanwhile(server_runs, monkeypatch, another_model):
    """Another pipeline promotes while this one's gate is scoring: compare-and-set refuses the stale move."""
    from adaptflow import aliases, tracking
    from adaptflow.stages import register

    name, root = server_runs["name"], server_runs["normal"]
    v1, v2, v3 = server_runs["first"]["version"], server_runs["better"]["version"], server_runs["again"]["version"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_runs["uri"])
    tracking.configure(root)
    # Put the weak v1 back as champion (recorded like any move), so the normal candidate passes the gate, and
    # as if every version had been registered on an older split: the gate on today's test set may then promote.
    tracking.move_alias(name, "champion", v1, expected=v2, reason="test: roll back to v1")
    client = _client(server_runs["uri"])
    test_sets = {v: client.get_model_version(name, v).tags[register.TEST_SET] for v in (v1, v2, v3)}
    for v in test_sets:
        client.set_model_version_tag(name, v, register.TEST_SET, "an older split")
    with pytest.raises(aliases.AliasConflict):
        tracking.move_alias(name, "champion", v3, expected=v2, reason="stale premise")

    real_load, raced = tracking.load_model, []

    def load_and_race(uri):  # while the gate scores v1, someone else promotes v3
        model = real_load(uri)
        if not raced:
            raced.append(uri)
            tracking.move_alias(name, "champion", v3, expected=v1, reason="test: a concurrent promotion")
        return model

    monkeypatch.setattr(tracking, "load_model", load_and_race)
    p = load(root / "params.yaml", overrides=["register.margin=0.0002"])  # a new key: register runs again
    try:
        res = register.run(p, root)
    finally:
        for v, test_set in test_sets.items():
            client.set_model_version_tag(name, v, register.TEST_SET, test_set)
    assert raced == [f"models:/{name}/{v1}"]
    assert res["promoted"] is False and res["alias"] == "challenger"
    assert any("champion moved to version " + v3 in r for r in res["reasons"]), res["reasons"]
    assert tracking.alias_version(name, "champion") == v3
    assert tracking.alias_version(name, "challenger") == res["version"]
    champ = [(m.from_version, m.to_version) for m in tracking.alias_history(name, "champion")]
    assert champ[-2:] == [(v2, v1), (v1, v3)]


def test_rollback_and_a_champion_moved_outside_adaptflow(server_runs):
    """Ops take a bad champion back with the CLI; a move made with MLflow's own client is warned about, and the
    next move adaptflow makes records it, so `registry history` agrees with the registry again."""
    name, v1, v2 = server_runs["name"], server_runs["first"]["version"], server_runs["better"]["version"]
    env = {**env_with_venv(), "MLFLOW_TRACKING_URI": server_runs["uri"]}
    client = _client(server_runs["uri"])

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "adaptflow"), "registry", *args], env=env, capture_output=True, text=True, cwd=server_runs["normal"])

    before = client.get_registered_model(name).aliases["champion"]
    if before != v2:
        back = cli("rollback", name, "--to", v2, "--reason", "v3 mislabels the new scanner's images")
        assert back.returncode == 0 and back.stdout.startswith(f"{name}@champion: version {v2} (rolled back from {before})"), back.stderr
        assert client.get_model_version(name, before).tags["rolled_back"] == "v3 mislabels the new scanner's images"
    never = client.get_registered_model(name).aliases["challenger"]  # rejected (or held), never champion
    refused = cli("rollback", name, "--to", never, "--reason", "x")
    assert refused.returncode == 2 and "was never made champion by adaptflow: only a former champion" in refused.stderr

    client.set_registered_model_alias(name, "champion", v1)  # outside adaptflow: no history entry
    now = cli("history", name, "--at", datetime_iso(time.time() + 1))
    assert now.returncode == 0 and f"version {v2} " in now.stdout and "unless the move outside adaptflow" in now.stdout
    assert f"warning: {name}@champion points at version {v1} now, but its last recorded move" in now.stderr, now.stderr
    assert f"warning: {name}@champion points at version {v1} now" in cli("show", name).stderr

    back = cli("rollback", name, "--to", v2, "--reason", "put back what the history says")
    assert back.returncode == 0 and f"version {v2} (rolled back from {v1})" in back.stdout, back.stderr
    moves = json.loads(cli("history", name, "--alias", "champion", "--json").stdout)
    noticed, rolled = moves[-2:]
    assert (noticed["from_version"], noticed["to_version"], noticed["context"]) == (v2, v1, {"outside": True})
    assert noticed["actor"].startswith("outside adaptflow (noticed by ")
    assert (rolled["from_version"], rolled["to_version"]) == (v1, v2) and rolled["context"]["rolled_back_from"] == v1
    assert "warning" not in cli("show", name).stderr
