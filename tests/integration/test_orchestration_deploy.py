"""The scheduled deployment end to end: a real Prefect server on 127.0.0.1, a process worker, a triggered run
that absorbs new target images, versions them with DVC, runs the pipeline and registers a model version."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.datafiles import digits, make_imagefolder, save_image
from tests.integration.conftest import BIN, REPO, env_with_venv, free_port, run, shrunk_params, start_server, stop, write_params

pytestmark = pytest.mark.integration


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME (SQLite); stopped by PID."""
    home = tmp_path / "prefect_home"
    home.mkdir()
    port = free_port()
    env = env_with_venv()
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2"})
    proc = start_server([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], home, f"http://127.0.0.1:{port}/api/health", env)
    yield env
    stop(proc)


def _project(root: Path) -> Path:
    """A git + DVC project whose target is an image folder, with new images waiting in the watched folder."""
    root.mkdir()
    make_imagefolder(root / "data/raw/digits", per_class=40, mixed=False)
    images, labels = digits(45)
    for i, (im, y) in enumerate(zip(images, labels)):
        if i % 45 >= 40:  # the five per class not yet in the dataset
            save_image(im, root / "data/incoming/digits" / str(y) / f"new{i:04d}", i, mixed=False)
    (root / "data/incoming/digits/3/broken.png").write_bytes(b"\x89PNG cut short")  # held: no image
    p = shrunk_params()
    p["target"].update({"domain": "imagefolder:data/raw/digits", "raw": "data/raw/digits", "limit": None})
    p["finetune"]["strategies"] = ["scratch", "source_only", "finetune"]
    write_params(root, p)
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    (root / ".gitignore").write_text("/.adaptflow/\n/mlflow.db\n/mlartifacts/\n")
    run(["git", "init", "-q"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    return root


def _wait_flow_run(env: dict, flow_run_id: str, worker: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = json.loads(run([str(BIN / "prefect"), "flow-run", "inspect", flow_run_id, "--output", "json"], log.parent, check=True, env=env).stdout)["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state["name"]
        if worker.poll() is not None:
            raise AssertionError(f"worker exited {worker.returncode}\n{log.read_text()[-4000:]}")
        time.sleep(3)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout:.0f} s\n{log.read_text()[-4000:]}")


def test_deployment_runs_on_a_worker_and_registers_a_version(prefect_server, tmp_path):
    env = prefect_server
    root = _project(tmp_path / "project")

    # prefect.yaml describes the same nightly deployment: `prefect deploy` registers it with its schedule.
    run([str(BIN / "prefect"), "work-pool", "create", "adaptflow", "--type", "process"], root, env=env)
    run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], root, env=env)
    nightly = json.loads(run([str(BIN / "prefect"), "deployment", "inspect", "scheduled_pipeline/nightly", "--output", "json"], root, env=env).stdout)
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(root.resolve())}}]
    from flows import RUN_ENV

    assert nightly["job_variables"] == {"env": RUN_ENV}  # prefect.yaml and `adaptflow deploy` give a run the same logging

    # `--serve` refuses the name the work pool runs: serving would take that deployment off the pool and pause
    # it on stopping
    taken = run([str(BIN / "adaptflow"), "deploy", "--serve"], root, timeout=120, check=False, env=env)  # (serving, it would block)
    assert taken.returncode == 2 and "deployment scheduled_pipeline/nightly runs on work pool 'adaptflow'" in taken.stderr, taken.stderr
    # `adaptflow deploy --serve` serves it from one process (registered while it runs).
    served = subprocess.Popen([str(BIN / "adaptflow"), "deploy", "--serve", "--name", "served"], cwd=root, env=env,
                              stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while run([str(BIN / "prefect"), "deployment", "inspect", "scheduled_pipeline/served"], root, check=False, env=env).returncode != 0:
            assert time.time() < deadline and served.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
    finally:
        stop(served)

    # `adaptflow deploy` registers it from params.yaml; a worker runs it when triggered.
    out = run([str(BIN / "adaptflow"), "deploy", "--name", "test-now", "--cron", "30 3 * * *"], root, env=env).stdout
    assert "scheduled_pipeline/test-now" in out
    test_now = json.loads(run([str(BIN / "prefect"), "deployment", "inspect", "scheduled_pipeline/test-now", "--output", "json"], root, env=env).stdout)
    assert test_now["job_variables"] == {"env": RUN_ENV}
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "adaptflow", "--type", "process"], cwd=tmp_path, env=env,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        triggered = run([str(BIN / "prefect"), "deployment", "run", "scheduled_pipeline/test-now"], root, env=env).stdout
        flow_run_id = next(line.split()[-1] for line in triggered.splitlines() if "UUID" in line)
        assert _wait_flow_run(env, flow_run_id, worker, log) == "Completed", log.read_text()[-6000:]
        # the core's own records (INFO too) reach the runs' logs in Prefect, not only Prefect's: the scheduled
        # run's, and its pipeline subflow's
        logs = run([str(BIN / "prefect"), "flow-run", "logs", flow_run_id], root, env=env).stdout
        assert "incoming: 50 new image(s) in 10 class(es)" in logs, logs[-6000:]
        pipeline = json.loads(run([str(BIN / "prefect"), "flow-run", "ls", "--flow-name", "transfer_pipeline", "-o", "json"], root, env=env).stdout)
        assert [r["parent_task_run_id"] is not None for r in pipeline] == [True]
        logs = run([str(BIN / "prefect"), "flow-run", "logs", pipeline[0]["id"]], root, env=env).stdout
        assert "ingest target: 450 images of imagefolder:data/raw/digits" in logs and "register: adaptflow-imagefolder-data-raw-digits version 1" in logs, logs[-6000:]
    finally:
        worker.send_signal(signal.SIGINT)  # a worker stops on SIGINT; SIGTERM it ignores for a while
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)

    assert [p.name for p in (root / "data/incoming/digits").rglob("*") if p.is_file()] == ["broken.png"]  # the rest absorbed
    held = json.loads(run([str(BIN / "prefect"), "artifact", "inspect", "incoming-adaptflow-imagefolder-data-raw-digits", "-o", "json"],
                          root, env=env).stdout)
    assert len(held) == 1 and held[0]["flow_run_id"] == flow_run_id and held[0]["type"] == "table", held
    rows = json.loads(held[0]["data"]) if isinstance(held[0]["data"], str) else held[0]["data"]
    assert [r["file"] for r in rows] == ["3/broken.png"] and rows[0]["left in the incoming folder because"] == "not an image Pillow can read", rows
    assert len(list((root / "data/raw/digits/3").iterdir())) == 45
    assert (root / "data/raw/digits.dvc").is_file()  # versioned by DVC
    assert json.loads((root / "data/ingested/target/card.json").read_text())["n_found"] == 450  # the new images were ingested
    registry = json.loads((root / "reports/registry.json").read_text())
    assert registry["version"] == "1" and registry["model_name"] == "adaptflow-imagefolder-data-raw-digits"
    lineage = json.loads((root / "reports/lineage.json").read_text())
    assert lineage["orchestrator"] == {"kind": "prefect", "prefect_flow_run_id": lineage["orchestrator"]["prefect_flow_run_id"]}
