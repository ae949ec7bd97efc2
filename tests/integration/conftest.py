"""Integration fixtures: the real params.yaml, shrunk (tiny model, few steps, small images), in tmp dirs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def shrunk_params() -> dict:
    """The project's params.yaml made small enough for a test: same keys, same stages, less work."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["preprocess"]["image_size"] = 16
    p["source"]["limit"] = 800
    p["target"]["limit"] = 700
    p["target"]["k"] = 5
    p["augment"]["source"] = [
        {"name": "RandomAffine", "degrees": 10, "translate": [0.1, 0.1]},
        {"name": "RandomChoice", "transforms": [{"name": "Resize", "size": 8}, {"name": "Resize", "size": 12}]},
        {"name": "Resize", "size": 16},
    ]
    p["augment"]["preview_n"] = 8
    p["pretrain"].update({"model": "test_resnet", "epochs": 2, "batch_size": 64})
    p["finetune"].update({"epochs": 3, "batch_size": 16, "linear_probe_epochs": 20, "seeds": [0]})
    return p


def write_params(root: Path, params: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def env_with_venv() -> dict:
    import os

    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(cmd: list[str], cwd: Path, timeout: int = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or env_with_venv(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def flow_project(tmp_path_factory, prefect_harness) -> dict:
    """One real Prefect flow run of the whole pipeline on shrunk params, shared by the tests that read it."""
    from flows.transfer_pipeline import transfer_pipeline

    root = tmp_path_factory.mktemp("flow_project")
    params = shrunk_params()
    params["evaluate"]["baselines"] = []  # the first registration need only beat chance (the gate always checks it): it is far above
    params["register"]["require_baselines"] = False  # (a gate without baselines must be asked for)
    params["finetune"]["seeds"] = [0, 1]
    write_params(root, params)
    result = transfer_pipeline(params_path="params.yaml", root=str(root))
    return {"root": root, "result": result}


def as_another_model(mp: pytest.MonkeyPatch) -> None:
    """Every registration from here on as a model of its own. Register registers nothing for a candidate that
    a version already serves (register.SERVED): gate tests that register one project's candidate again, as if
    another model had come out equally good, stand for the runs whose weights differ."""
    import uuid

    from adaptflow import tracking

    mp.setattr(tracking, "served_digest", lambda checkpoint_dir: f"another-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def another_model(monkeypatch) -> None:
    as_another_model(monkeypatch)


@pytest.fixture
def dvc_project(tmp_path) -> Path:
    """A fresh git + DVC repo holding the project's dvc.yaml, the core's sources and shrunk params."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "adaptflow", root / "adaptflow", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "data").mkdir()
    shutil.copy(REPO / "data" / ".gitignore", root / "data" / ".gitignore")
    write_params(root, shrunk_params())
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "ci@adaptflow.invalid"], root)
    run(["git", "config", "user.name", "adaptflow ci"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 90.0) -> None:
    """Poll ``url`` until it answers 200; fail with the process's log if it exits or never answers."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited {proc.returncode} before answering {url}\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s\n{log_path.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server we started, by its PID (SIGTERM, then SIGKILL of its process group)."""
    import os
    import signal

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is the server and its workers
            proc.wait(timeout=15)


def start_server(cmd: list[str], cwd: Path, health_url: str, env: dict | None = None) -> subprocess.Popen:
    log_path = cwd / f"{Path(cmd[0]).name}-{health_url.rsplit(':', 1)[-1].split('/')[0]}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or env_with_venv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(health_url, proc, log_path)
    except BaseException:
        stop(proc)
        raise
    return proc


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts; stopped by PID."""
    d = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = env_with_venv()
    env.update({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"})
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = start_server(cmd, d, f"http://127.0.0.1:{port}/health", env)
    yield {"uri": f"http://127.0.0.1:{port}", "dir": d, "pid": proc.pid}
    stop(proc)
