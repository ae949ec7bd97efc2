"""Training in several processes (adaptflow.distributed): two real processes under torchrun, gloo on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adaptflow import distributed
from adaptflow.accel import runtime
from adaptflow.data.files import DataError
from adaptflow.data.store import Split
from adaptflow.training import stream

WORKER = Path(__file__).with_name("dist_worker.py")


def _run(cmd: list[str], out: Path) -> dict[int, dict]:
    proc = subprocess.run(cmd + [str(WORKER), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {int(p.stem[4:]): torch.load(p) for p in sorted(out.glob("rank*.pt"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[int, dict]]:
    """The same training alone and in two processes (one torchrun, gloo, one thread each on this CPU)."""
    alone, two = tmp_path_factory.mktemp("alone"), tmp_path_factory.mktemp("two")
    return {
        "alone": _run([sys.executable], alone),
        "two": _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], two),
    }


def test_two_processes_share_each_batch_one_process_reads(runs):
    alone, (r0, r1) = runs["alone"][0], (runs["two"][0], runs["two"][1])
    assert (alone["world"], r0["world"], r1["world"]) == (1, 2, 2)
    for whole, a, b in zip(alone["batches"], r0["batches"], r1["batches"]):
        assert sorted(a + b) == whole and not set(a) & set(b)
        assert len(a) == len(b) == len(whole) // 2


def test_two_processes_train_as_one_process_would(runs):
    """No BatchNorm, no augmentation: the averaged gradient of two half batches is the whole batch's, so
    the weights and every epoch's validation match one process's (to rounding)."""
    alone, r0, r1 = runs["alone"][0], runs["two"][0], runs["two"][1]
    for k, v in alone["plain"].items():
        torch.testing.assert_close(r0["plain"][k], v, atol=1e-5, rtol=1e-4)
        assert torch.equal(r0["plain"][k], r1["plain"][k])
    assert [h["epoch"] for h in r0["plain_history"]] == [1, 2, 3]
    for h_alone, h_two in zip(alone["plain_history"], r0["plain_history"]):
        assert h_two["val_acc"] == h_alone["val_acc"]
        assert h_two["train_loss"] == pytest.approx(h_alone["train_loss"], rel=1e-4)
        assert h_two["val_loss"] == pytest.approx(h_alone["val_loss"], rel=1e-4)


def test_copies_stay_equal_with_batchnorm_augmentation_and_an_objective(runs):
    r0, r1 = runs["two"][0], runs["two"][1]
    assert r0["bn"].keys() == r1["bn"].keys()
    for k in r0["bn"]:
        assert torch.equal(r0["bn"][k], r1["bn"][k]), k  # parameters and BatchNorm statistics alike
    for k in r0["objective"]:
        assert torch.equal(r0["objective"][k], r1["objective"][k]), k  # the objective's own parameters too
    moved = [k for k, v in r0["bn"].items() if v.is_floating_point() and not torch.equal(v, r0["bn_before"][k])]
    assert any(k.endswith("running_mean") for k in moved) and any(k.endswith("weight") for k in moved)
    assert r0["bn_history"] == r1["bn_history"]  # one verdict per epoch, the same checkpoint kept


def test_every_process_keeps_the_first_ones_verdict(runs):
    r0, r1 = runs["two"][0]["contrary"], runs["two"][1]["contrary"]
    assert r0["best_epoch"] == r1["best_epoch"] == 3  # the first process's scorer prefers the last epoch
    assert r0["history"][1:] == r1["history"][1:]  # (epoch 0's train_loss is nan: not equal to itself)
    assert [h["which"] for h in r1["history"]] == [0.0] * 4


def test_the_pieces(runs):
    r0, r1 = runs["two"][0], runs["two"][1]
    assert r0["seed"] == 5 and r1["seed"] != 5  # the first process draws as one process would; the others their own
    for r in (r0, r1):
        assert r["stepped"] is True
        g1, g2, g3, g4 = r["grads"]
        assert torch.equal(g1, torch.full((3,), 1.5))  # (1 + 2) / 2
        assert torch.equal(g2, torch.full((3,), 2.0))  # missing in the first process: counted as zero there
        assert g3 is None and g4 is None  # no gradient anywhere / frozen: the optimizer skips them
        assert torch.equal(r["bn_buffers"]["running_mean"], torch.full((2,), 0.5))
        assert torch.equal(r["bn_buffers"]["running_var"], torch.full((2,), 0.1))  # equal values come back bit for bit
        assert int(r["bn_buffers"]["num_batches_tracked"]) == 7  # the first process's counter
        assert torch.equal(r["gathered"], torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]))
    # each process's copy of the loss sends its rows a gradient 2x: summed over the two copies, 4x
    assert torch.equal(r0["gather_grad"], torch.full((2, 3), 4.0))
    assert torch.equal(r1["gather_grad"], torch.full((2, 3), 8.0))


def test_scoring_splits_the_images_and_gives_every_process_all_the_logits(runs):
    alone, r0, r1 = runs["alone"][0], runs["two"][0], runs["two"][1]
    for n in (30, 7, 1):
        assert alone["scored"][n].shape == (n, 3)
        torch.testing.assert_close(r0["scored"][n], alone["scored"][n], atol=1e-6, rtol=1e-5)
        assert torch.equal(r0["scored"][n], r1["scored"][n])
    assert (r0["scored_rows"][7], r1["scored_rows"][7]) == ((0, 4), (4, 7))  # each its own rows
    assert (r0["scored_rows"][1], r1["scored_rows"][1]) == ((0, 1), (1, 1))
    assert alone["scored_rows"][7] == (0, 7)
    assert (alone["scored_seen"], r0["scored_seen"], r1["scored_seen"]) == (38, 15 + 4 + 1, 15 + 3 + 0)
    for r in (alone, r0, r1):  # a split read from the store is read a batch at a time, in one process or several
        torch.testing.assert_close(r["scored_lazy"], alone["scored"][30], atol=1e-6, rtol=1e-5)
        assert max(r["lazy_reads"]) <= 4
    assert sum(r0["lazy_reads"]) == sum(r1["lazy_reads"]) == 15


def test_each_process_takes_its_share_of_the_cores(runs):
    assert runs["two"][0]["threads"] == max(1, runtime_cores() // 2)


def runtime_cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def test_alone_everything_is_a_no_op():
    assert (distributed.world(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.seed(7) == 7
    idx = np.arange(5)
    assert distributed.shard(idx) is idx
    assert distributed.from_main({"a": 1}) == {"a": 1}
    p = torch.nn.Parameter(torch.ones(2))
    assert distributed.average_gradients([p]) is False
    p.grad = torch.full((2,), 3.0)
    assert distributed.average_gradients([p]) is True and torch.equal(p.grad, torch.full((2,), 3.0))


def test_too_few_images_for_the_processes_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: 3)
    tiny = Split(np.zeros((5, 1, 4, 4), np.uint8), np.zeros(5, np.int64), ["a"])
    with pytest.raises(DataError, match="5 training images cannot be shared by 3 processes"):
        next(stream(tiny, 4, np.random.default_rng(0)))


def test_threads_and_gpu_per_process_under_a_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("ADAPTFLOW_THREADS", raising=False)
    try:
        runtime(device="cpu")
        assert torch.get_num_threads() == max(1, runtime_cores() // 2)
    finally:
        torch.set_num_threads(1)
    monkeypatch.setenv("ADAPTFLOW_DEVICE", "cuda:1")
    with pytest.raises(ValueError, match="ADAPTFLOW_DEVICE='cuda:1': under torchrun each process takes the GPU of its LOCAL_RANK"):
        runtime()


def test_batches_that_do_not_split_evenly_are_refused_naming_the_key(monkeypatch, tmp_path, params_path):
    from adaptflow.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(app, ["stage", "finetune", "--params", str(params_path), "--set", "finetune.batch_size=33"])
    assert res.exit_code == 2
    assert "finetune.batch_size: 33 does not split into 2 equal shares of at least 2 images" in res.output
    res = CliRunner().invoke(app, ["stage", "pretrain", "--params", str(params_path), "--set", "pretrain.batch_size=2"])
    assert res.exit_code == 2 and "pretrain.batch_size: 2 does not split into 2 equal shares" in res.output


def test_train_processes_makes_the_stage_command_launch_them_after_the_same_checks(monkeypatch, tmp_path, params_path):
    """orchestrate.train_processes: 2 and no launcher: the batch sizes are checked against 2 before anything
    starts, then (its upstream there) the command hands the stage to launch_training."""
    from adaptflow import orchestrate
    from adaptflow.cli import app

    launched = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ADAPTFLOW_DEVICE", "cpu")  # (two processes on the CPU, on any machine)
    monkeypatch.setattr(orchestrate, "launch_training", lambda *a, **k: launched.append((a[0], k)) or True)
    two = ["--params", str(params_path), "--set", "orchestrate.train_processes=2"]
    res = CliRunner().invoke(app, ["stage", "finetune", *two, "--set", "finetune.batch_size=33"])
    assert res.exit_code == 2 and "finetune.batch_size: 33 does not split into 2 equal shares" in res.output
    res = CliRunner().invoke(app, ["stage", "finetune", *two, "--strategy", "finetune"])
    assert res.exit_code == 2 and "data/ingested/target: no complete stage output here (run the upstream stage first)" in res.output
    assert launched == []  # no upstream yet: refused before any process starts
    monkeypatch.setattr(orchestrate, "check_upstream", lambda *a, **k: None)
    res = CliRunner().invoke(app, ["stage", "finetune", *two, "--strategy", "finetune", "--seed", "0"])
    assert res.exit_code == 0 and launched == [("finetune", {"strategy": "finetune", "seed": 0})]


def test_the_unlabeled_batch_is_checked_only_for_strategies_that_read_the_pool(monkeypatch, tmp_path, params_path):
    from adaptflow.cli import app

    class Reached(Exception):
        pass

    def init(cuda: bool) -> bool:
        raise Reached

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "init", init)
    odd = ["--params", str(params_path), "--set", "finetune.unlabeled_batch_size=33"]
    res = CliRunner().invoke(app, ["stage", "finetune", "--strategy", "dann+fixmatch", *odd])
    assert res.exit_code == 2 and "finetune.unlabeled_batch_size: 33 does not split into 2 equal shares" in res.output
    res = CliRunner().invoke(app, ["stage", "finetune", "--strategy", "finetune", *odd])
    assert isinstance(res.exception, Reached)  # past the checks: finetune alone reads no unlabeled batch


def test_a_short_last_batch_leaves_out_what_would_make_shares_unequal(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "shard", lambda idx: idx)  # the whole batch, before it is shared
    labels = np.arange(11)
    feed = stream(Split(np.zeros((11, 1, 4, 4), np.uint8), labels, ["a"]), 6, np.random.default_rng(0))
    sizes = [len(next(feed)[1]) for _ in range(3)]
    assert sizes == [6, 4, 6]  # 11 = 6 + 5: of the 5, the odd one is skipped (the next pass reshuffles all)


@pytest.mark.parametrize("name", ["ingest", "augment", "cache_features", "evaluate", "register"])
def test_stages_that_do_not_train_refuse_several_processes(monkeypatch, tmp_path, params_path, name):
    from adaptflow.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(app, ["stage", name, "--params", str(params_path)])
    assert res.exit_code == 2
    assert f"stage {name} runs in one process; of the stages only pretrain and finetune train in several (torchrun started 2)" in res.output
