"""Prefect orchestration for real: content-keyed caching, a SIGKILLed run resumed, the project lock, Dask.

Each test works on a copy of the shared ``flow_project`` (one cold run for the whole session), with only
the ``scratch`` and ``source_only`` strategies so the runs that must re-train stay small.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from filelock import FileLock

from adaptflow import orchestrate, outputs
from adaptflow.params import load
from tests.integration.conftest import BIN, env_with_venv

pytestmark = pytest.mark.integration

SMALL = ["finetune.strategies=[scratch,source_only]", "finetune.seeds=[0]"]

# Loaded into every Python process of a run (PYTHONPATH): the named stage finishes writing its files into
# the temporary directory, says where, then hangs before the manifest and the rename — so the test can
# SIGKILL the run at exactly that point.
HANG = '''
import os
if os.environ.get("ADAPTFLOW_TEST_HANG_STAGE"):
    import contextlib, time
    from pathlib import Path
    from adaptflow import outputs
    _atomic_dir = outputs.atomic_dir

    @contextlib.contextmanager
    def atomic_dir(directory, stage, key):
        with _atomic_dir(directory, stage, key) as tmp:
            yield tmp
            if stage == os.environ["ADAPTFLOW_TEST_HANG_STAGE"]:
                Path(os.environ["ADAPTFLOW_TEST_HANG_MARK"]).write_text(str(tmp))
                time.sleep(600)

    outputs.atomic_dir = atomic_dir
'''


def copy_project(flow_project: dict, dest: Path) -> Path:
    shutil.copytree(flow_project["root"], dest, ignore=shutil.ignore_patterns(orchestrate.STATE_DIR))
    return dest


def adaptflow_run(root: Path, overrides: list[str], log: Path, extra_env: dict | None = None) -> subprocess.Popen:
    """``adaptflow run`` in its own session (so the test can kill its whole process group)."""
    env = env_with_venv()
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(root.parent / "prefect_home")  # its own ephemeral server database
    env.update(extra_env or {})
    cmd = [str(BIN / "adaptflow"), "run"] + [a for o in overrides for a in ("--set", o)]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run exited {proc.returncode} before {what}\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout:.0f} s\n{log.read_text()[-4000:]}")


def trusted_outputs_are_whole(top: Path) -> int:
    """Every directory with a manifest holds exactly the files its manifest lists, byte for byte."""
    n = 0
    for m in top.rglob(outputs.MANIFEST):
        d, listed = m.parent, json.loads(m.read_text())["files"]
        found = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != outputs.MANIFEST}
        assert found == set(listed), d
        assert all(outputs.file_digest(d / f) == h for f, h in listed.items()), d
        n += 1
    return n


def last_run(root: Path) -> dict:
    return json.loads((root / orchestrate.STATE_DIR / "last_run.json").read_text())


def test_prefect_keys_are_the_stage_manifests(flow_project):
    """The cache key Prefect uses is the key each stage wrote into its manifest (the core computes both)."""
    root = flow_project["root"]
    p = load(root / "params.yaml")
    for role in ("source", "target"):
        ident = orchestrate.identity("ingest", p, root, role=role)
        assert outputs.read_manifest(ident.output)["key"] == ident.key and orchestrate.is_current(ident, root)
    for stage in ("augment", "pretrain", "cache_features", "evaluate"):
        ident = orchestrate.identity(stage, p, root)
        assert outputs.read_manifest(ident.output)["key"] == ident.key, stage
    for s in p.finetune.strategies:
        for seed in p.finetune.seeds:
            ident = orchestrate.identity("finetune", p, root, strategy=s, seed=seed)
            assert outputs.read_manifest(ident.output)["key"] == ident.key, (s, seed)
    reg = orchestrate.identity("register", p, root)
    assert json.loads(reg.output.read_text())["key"] == reg.key and orchestrate.is_current(reg, root)
    steps = last_run(root)["steps"]
    assert set(steps) >= {"ingest[source]", "evaluate", "register", "finetune[scratch,seed=1]"}


def test_killed_run_leaves_nothing_trusted_and_the_next_run_waits_then_resumes(flow_project, tmp_path):
    """Changed source data, a run SIGKILLed mid-finetune, a second run that waits on the project lock and then
    resumes after the last completed stage: everything downstream of ingest[source] re-ran, ingest[target] never."""
    root = copy_project(flow_project, tmp_path / "project")
    target_manifest = root / "data/ingested/target" / outputs.MANIFEST
    target_mtime = target_manifest.stat().st_mtime_ns
    overrides = ["source.limit=790"] + SMALL  # new source data: a different stratified subset
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG)
    mark, log = tmp_path / "hanging.txt", tmp_path / "killed.log"
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    proc = adaptflow_run(root, overrides, log, {"PYTHONPATH": pythonpath, "ADAPTFLOW_TEST_HANG_STAGE": "finetune", "ADAPTFLOW_TEST_HANG_MARK": str(mark)})
    try:
        wait_for(mark.is_file, proc, log, 400, "finetune writing its output")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its ephemeral Prefect server
        proc.wait(timeout=30)
    half = Path(mark.read_text())
    assert half.is_dir() and half.name.startswith(".seed0.tmp-") and not (half / outputs.MANIFEST).exists()
    assert trusted_outputs_are_whole(root) >= 7
    p = load(root / "params.yaml", overrides)
    for stage in ("augment", "pretrain", "cache_features"):  # finished before the kill, with the new source data
        assert orchestrate.is_current(orchestrate.identity(stage, p, root), root), stage
    killed = orchestrate.identity("finetune", p, root, strategy="scratch", seed=0)
    assert not orchestrate.is_current(killed, root)  # the old complete output stands, and is not trusted for these inputs

    # A second run while the project is locked (here by this test) waits, says by whom, and touches nothing.
    log2 = tmp_path / "resumed.log"
    with orchestrate.project_lock(root, what="test holding the project"):
        proc2 = adaptflow_run(root, overrides, log2)
        try:
            wait_for(lambda: f"is locked by pid {os.getpid()}" in log2.read_text(), proc2, log2, 300, "the lock message")
            time.sleep(1.0)
            assert proc2.poll() is None and half.is_dir()
            assert "test holding the project" in log2.read_text()
        except BaseException:
            os.killpg(proc2.pid, signal.SIGKILL)
            raise
    assert proc2.wait(timeout=500) == 0, log2.read_text()[-4000:]
    steps = last_run(root)["steps"]
    assert {k: steps[k] for k in ("ingest[source]", "ingest[target]", "augment", "pretrain", "cache_features")} == dict.fromkeys(
        ("ingest[source]", "ingest[target]", "augment", "pretrain", "cache_features"), "cached"), steps
    assert [steps[k] for k in ("finetune[scratch,seed=0]", "finetune[source_only,seed=0]", "evaluate", "register")] == ["ran"] * 4, steps
    assert not half.exists() and f"removed {half}" in log2.read_text()
    assert orchestrate.is_current(killed, root)
    assert target_manifest.stat().st_mtime_ns == target_mtime  # the target's ingest never re-ran
    assert trusted_outputs_are_whole(root) >= 8


def test_dask_fan_out_reruns_only_finetune_and_after(flow_project, tmp_path):
    """Strategy × seed runs mapped onto a Dask LocalCluster; a finetune-only change re-runs finetune →
    evaluate → register; task runs are named for what they ran; the comparison is a Prefect artifact."""
    from prefect import get_client
    from prefect.artifacts import Artifact
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.transfer_pipeline import run_pipeline

    root = copy_project(flow_project, tmp_path / "project")
    overrides = ["orchestrate.task_runner=dask", "orchestrate.max_workers=2", "finetune.epochs=1",
                 "finetune.strategies=[scratch,source_only]", "finetune.seeds=[0,1]"]
    result = run_pipeline("params.yaml", overrides, str(root))
    assert all(r["cached"] for r in result["ingest"].values())
    assert all(result[s]["cached"] for s in ("augment", "pretrain", "cache_features"))
    assert set(result["finetune"]) == {"scratch[seed=0]", "scratch[seed=1]", "source_only[seed=0]", "source_only[seed=1]"}
    assert not any(r["cached"] for r in result["finetune"].values())
    assert not result["evaluate"]["cached"] and not result["register"]["cached"]

    run = last_run(root)
    assert run["flow_run_name"] == "transfer_pipeline[mnist→uci_digits,k=5,finetune.epochs=1,finetune.strategies=[scratch,source_only],finetune.seeds=[0,1]]"
    with get_client(sync_client=True) as client:
        names = {tr.name for tr in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run["flow_run_id"]])))}
    assert {"finetune[scratch,k=5,seed=1]", "finetune[source_only,k=5,seed=0]", "ingest[source]", "evaluate[uci_digits,k=5]"} <= names
    artifact = Artifact.get("comparison-adaptflow-uci-digits")
    assert artifact is not None and "scratch" in artifact.data and "source_only" in artifact.data


def test_a_failed_finetune_ends_the_run_only_once_its_running_sibling_has_stopped(flow_project, tmp_path, monkeypatch):
    """Threads runner, two finetunes at once: one fails while the other is still running. The run fails,
    but the sibling ends while the run still holds the project lock (Prefect's runner alone would wait for
    it only after the flow body, and so the lock, had gone)."""
    from flows.transfer_pipeline import run_pipeline
    from tasks import stages as t

    root = copy_project(flow_project, tmp_path / "project")
    real, finished = t._run, []

    def run(name, params, where, **kw):
        if name != "finetune":
            return real(name, params, where, **kw)
        if kw["strategy"] == "scratch":
            time.sleep(1.0)  # the sibling is running by now
            raise RuntimeError("finetune failed on purpose")
        time.sleep(6.0)
        lock = FileLock(str(orchestrate.state_dir(root) / orchestrate.LOCK_NAME), thread_local=False, is_singleton=True)
        finished.append((kw["strategy"], lock.is_locked))  # the run's own lock object (one per file and process)
        return {"strategy": kw["strategy"], "seed": kw["seed"]}

    monkeypatch.setattr(t, "_run", run)
    overrides = ["orchestrate.task_runner=threads", "orchestrate.max_workers=2", "finetune.epochs=1", *SMALL]
    with pytest.raises(Exception, match="finetune failed on purpose"):
        run_pipeline("params.yaml", overrides, str(root))
    assert finished == [("source_only", True)]  # it ended while the run still held the project


def test_sigterm_ends_the_run_at_the_training_step_and_stops_its_prefect_server(flow_project, tmp_path):
    """What ops' `kill PID` (or a supervisor) sends: the stage training in the run's thread ends at its next
    step rather than after its last epoch, the run exits 143 through its exit hooks (Prefect's temporary API
    server stops with it), and nothing of the stopped stage is kept."""
    import re
    import socket

    import psutil

    root = copy_project(flow_project, tmp_path / "project")
    overrides = ["pretrain.epochs=400"] + SMALL  # pretrain re-runs, for minutes if nothing stopped it
    log = tmp_path / "run.log"
    proc = adaptflow_run(root, overrides, log)
    try:
        wait_for(lambda: "pretrain epoch 2/400" in log.read_text(), proc, log, 300, "pretrain training")
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()[-4000:]
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        port = re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", log.read_text())
        left = [q for q in psutil.process_iter(["cmdline"]) if port and "--port" in (q.info["cmdline"] or [])
                and port.group(1) in q.info["cmdline"]]
        for q in left:  # (a failed check leaves no server behind)
            q.kill()
    text = log.read_text()
    assert "pretrain: stopped, the run is stopping" in text and "pretrain epoch 400/400" not in text
    assert not left, "the run's temporary Prefect server outlived it"
    with pytest.raises(OSError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", int(port.group(1))), timeout=2).close()
    p = load(root / "params.yaml", overrides)
    assert not orchestrate.is_current(orchestrate.identity("pretrain", p, root), root)
    assert not list((root / p.paths.source_model).parent.glob(".*.tmp-*"))
