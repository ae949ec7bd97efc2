"""pretrain and finetune in two processes under torchrun (gloo on the CPU), as a user with several GPUs runs them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, run, shrunk_params, write_params

pytestmark = pytest.mark.integration

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "adaptflow"]


def test_pretrain_and_finetune_in_two_processes(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    params = shrunk_params()
    params["source"]["limit"], params["target"]["limit"] = 400, 400
    write_params(root, params)
    adaptflow = [str(BIN / "adaptflow")]
    run(adaptflow + ["stage", "ingest"], root)
    run(adaptflow + ["stage", "augment"], root)
    run(TORCHRUN + ["stage", "pretrain"], root)
    run(adaptflow + ["stage", "cache_features"], root)
    out = run(TORCHRUN + ["stage", "finetune", "--strategy", "dann+fixmatch"], root)

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

    # the outputs are the stages' own: one process, same params, finds them up to date
    again = run(adaptflow + ["stage", "finetune", "--strategy", "dann+fixmatch"], root)
    assert "finetune[dann+fixmatch,seed=0]: up to date" in again.stderr
