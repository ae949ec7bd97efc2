"""pretrain and finetune in two processes under torchrun (gloo on the CPU), as a user with several GPUs runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, env_with_venv, run, shrunk_params, write_params

pytestmark = pytest.mark.integration

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "adaptflow"]


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    """Two processes with gloo on the CPU, on any machine (on CUDA each would want a GPU of its own)."""
    monkeypatch.setenv("ADAPTFLOW_DEVICE", "cpu")


def test_pretrain_and_finetune_in_two_processes(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    params = shrunk_params()
    params["source"]["limit"], params["target"]["limit"] = 400, 400
    write_params(root, params)
    adaptflow = [str(BIN / "adaptflow")]
    run(adaptflow + ["stage", "ingest"], root)
    # while another run holds the project, the processes wait (the first for the lock, the others for it)
    from adaptflow import orchestrate

    with orchestrate.project_lock(root, what="a test holding the project"):
        waiting = subprocess.Popen(TORCHRUN + ["stage", "pretrain"], cwd=root, env=env_with_venv(), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seen, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline and waiting.poll() is None:  # until the first process says it waits
            seen.append(waiting.stdout.readline())
            if "locked by" in seen[-1] and "a test holding the project" in seen[-1]:
                break
        assert waiting.poll() is None, "".join(seen)[-3000:]
        time.sleep(2)  # had any process gone on without the lock, pretrain (about 1 s here) would be writing
        assert not (root / params["paths"]["source_model"]).exists()
    log, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, ("".join(seen) + log)[-3000:]
    # orchestrate.train_processes: `adaptflow stage` (what dvc repro runs) starts the two processes itself
    out = run(adaptflow + ["stage", "finetune", "--strategy", "dann+fixmatch", "--set", "orchestrate.train_processes=2"], root)
    assert "finetune in 2 processes: torch.distributed.run --standalone --nproc_per_node 2" in out.stderr

    source = root / params["paths"]["source_model"]
    adapted = root / params["paths"]["adapted"] / "dann+fixmatch" / "seed0"
    for d in (source, adapted):
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["extra"]["processes"] == 2
        assert [h["epoch"] for h in json.loads((d / "history.json").read_text())][-1] >= 2
        assert not [p.name for p in d.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    # one process reports: the epochs are logged once, not once per process
    assert out.stderr.count("dann+fixmatch[seed=0] epoch 3/3") == 1

    from adaptflow.models import load

    model, cfg = load(adapted)
    assert cfg.extra["strategy"] == "dann+fixmatch" and cfg.extra["best_epoch"] >= 1

    # launched by a process that does not hold the project: refused at once (not a wait for that very process),
    # in the processes' own words, raised once by the launcher
    from adaptflow.data.files import DataError
    from adaptflow.params import load as load_params

    pending = load_params(root / "params.yaml", ["orchestrate.train_processes=2", "finetune.lr=0.01"])
    said: list[str] = []
    with pytest.raises(DataError, match=r"launched by pid \d+ to train for it, but that process does not hold the project lock"):
        orchestrate.launch_training("finetune", pending, root, said.append, strategy="dann+fixmatch", seed=0)
    # (torchrun reports its processes' exit 2; none of them printed a traceback of ours, nor the message)
    assert not [line for line in said if "does not hold the project lock" in line or "adaptflow/" in line or "ProjectLocked" in line], said
    assert not list((root / ".adaptflow" / "launch").iterdir())

    # the outputs are the stages' own: the same params find them up to date, in this one process (with
    # train_processes set, nothing to train starts no processes)
    again = run(adaptflow + ["stage", "finetune", "--strategy", "dann+fixmatch", "--set", "orchestrate.train_processes=2"], root)
    assert "finetune[dann+fixmatch,seed=0]: up to date" in again.stderr and "processes:" not in again.stderr


def test_the_flow_trains_in_two_processes_under_its_own_lock(tmp_path, prefect_harness):
    """A pipeline run with orchestrate.train_processes: 2 starts pretrain's and finetune's processes; it holds the
    project for them (were they to wait for its lock, lock_timeout would fail the run)."""
    from flows.transfer_pipeline import transfer_pipeline

    root = tmp_path / "project"
    root.mkdir()
    params = shrunk_params()
    params["source"]["limit"], params["target"]["limit"] = 400, 400
    params["finetune"].update({"strategies": ["dann+fixmatch"], "epochs": 2})
    params["evaluate"]["baselines"], params["register"]["require_baselines"] = [], False
    params["orchestrate"].update({"train_processes": 2, "lock_timeout": 30})
    write_params(root, params)
    result = transfer_pipeline(params_path="params.yaml", root=str(root))

    assert result["pretrain"]["cached"] is False and result["finetune"]["dann+fixmatch[seed=0]"]["cached"] is False
    source = root / params["paths"]["source_model"]
    adapted = root / params["paths"]["adapted"] / "dann+fixmatch" / "seed0"
    assert [json.loads((d / "config.json").read_text())["extra"]["processes"] for d in (source, adapted)] == [2, 2]
    assert result["register"]["version"] == "1"
    assert not list((root / ".adaptflow" / "launch").iterdir())  # the params copies the processes read are gone
