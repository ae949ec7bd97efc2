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


def run(cmd: list[str], cwd: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env_with_venv(), capture_output=True, text=True, timeout=timeout)
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
    params["evaluate"]["baselines"] = []  # so the first registration is promoted deterministically
    params["finetune"]["seeds"] = [0, 1]
    write_params(root, params)
    result = transfer_pipeline(params_path="params.yaml", root=str(root))
    return {"root": root, "result": result}


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
