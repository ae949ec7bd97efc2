"""adaptflow.orchestrate: the project lock, incoming data, when dvc.lock may be committed; the cache policy."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaptflow import orchestrate
from adaptflow.data import store
from adaptflow.data.domains import DataError
from adaptflow.params import Params, ParamsError, from_dict

ROOT = Path(__file__).resolve().parents[2]


def _params(**sections) -> Params:
    return from_dict(sections)


def test_lock_is_reentrant_and_leaves_no_holder_record(tmp_path):
    info = tmp_path / orchestrate.STATE_DIR / (orchestrate.LOCK_NAME + ".json")
    with orchestrate.project_lock(tmp_path, what="outer"):
        assert '"what": "outer"' in info.read_text()
        with orchestrate.project_lock(tmp_path, what="inner"):  # a scheduled flow around the pipeline flow
            assert '"what": "outer"' in info.read_text()
        assert info.is_file()
    assert not info.exists()


def test_second_process_waits_then_gives_up_naming_the_holder(tmp_path):
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO)\n"
            "from adaptflow import orchestrate\n"
            f"with orchestrate.project_lock({str(tmp_path)!r}, timeout=1.0, remind_every=0.3): print('GOT')\n")
    with orchestrate.project_lock(tmp_path, what="test holder"):
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "GOT" not in proc.stdout
    assert "is locked by pid" in proc.stderr and "test holder" in proc.stderr and "waiting for that run to finish" in proc.stderr
    assert "ProjectLocked" in proc.stderr and "still locked" in proc.stderr
    free = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert free.returncode == 0 and "GOT" in free.stdout


def test_the_holder_holds_the_project_for_the_training_processes_it_launches(tmp_path, monkeypatch):
    """A child naming its holder in ADAPTFLOW_LOCK_HOLDER (what launch_training sets) goes in while the holder
    holds the lock. A child without it waits as any other; one naming a process that does not hold the lock
    for it is refused at once (waiting would wait for the process waiting for it)."""
    code = (f"from adaptflow import orchestrate\nwith orchestrate.project_lock({str(tmp_path)!r}, timeout=0.5): print('GOT')\n")

    def child(holder: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != orchestrate.HOLDER_ENV}
        env.update({orchestrate.HOLDER_ENV: holder} if holder else {})
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    with orchestrate.project_lock(tmp_path, what="a pipeline run"):
        assert "GOT" in child(str(os.getpid())).stdout
        waited = child(None)
        assert waited.returncode != 0 and "GOT" not in waited.stdout and "still locked" in waited.stderr
        refused = child(str(os.getppid()))  # an ancestor, but not the holder
        assert "GOT" not in refused.stdout and f"launched by pid {os.getppid()} to train for it, but that process does not hold" in refused.stderr
        monkeypatch.setenv(orchestrate.HOLDER_ENV, str(os.getpid()))  # the holder, but not an ancestor of itself
        with pytest.raises(orchestrate.ProjectLocked, match="does not hold the project lock"):
            orchestrate.check_held_for_me(tmp_path)


def test_a_process_working_under_a_holders_lock_ends_when_the_holder_dies(tmp_path):
    """While the holder (a stand-in writing its lock record) lives, what it launched works on; once it has
    died, that process stops within the watch's poll."""
    import psutil

    info, out = tmp_path / "lock.json", tmp_path / "out"
    inner = ("import os, time\nfrom pathlib import Path\nfrom adaptflow import orchestrate\n"
             f"orchestrate._end_with(os.getppid(), Path({str(info)!r}), poll=0.1)\n"
             "print('WATCHING', flush=True)\ntime.sleep(60)\nprint('STILL HERE', flush=True)\n")
    holder = ("import json, os, subprocess, sys, time\n"
              f"open({str(info)!r}, 'w').write(json.dumps({{'pid': os.getpid()}}))\n"
              f"c = subprocess.Popen([sys.executable, '-c', {inner!r}], stdout=open({str(out)!r}, 'w'), stderr=subprocess.STDOUT)\n"
              f"while 'WATCHING' not in open({str(out)!r}).read(): time.sleep(0.05)\n"
              "time.sleep(1)\n"
              "print(c.pid, 'alive while held' if c.poll() is None else 'ended while held', flush=True)\n")
    said = subprocess.run([sys.executable, "-c", holder], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout.split()
    child = psutil.Process(int(said[0]))
    try:
        assert " ".join(said[1:]) == "alive while held"
        child.wait(timeout=30)  # (long before its 60 s sleep)
        text = out.read_text()
        assert "no longer does: stopping" in text and "STILL HERE" not in text
    finally:
        with contextlib.suppress(psutil.Error):
            child.kill()


def test_a_dvc_run_holds_the_project_between_its_stages(tmp_path):
    """A real process tree: a `dvc` process runs a stage through a shell (as DVC does, with DVC_STAGE set),
    then sits between stages. Another run is kept out until that dvc process exits; its own next stage is not."""
    stage = ("from adaptflow import orchestrate\n"
             f"with orchestrate.project_lock({str(tmp_path)!r}, what='stage', timeout=5): print('STAGE', flush=True)\n")
    dvc = tmp_path / "bin" / "dvc"
    dvc.parent.mkdir()
    dvc.write_text(
        "import os, shlex, subprocess, sys, time\n"
        f"cmd = shlex.join([{sys.executable!r}, '-c', {stage!r}])\n"
        "env = {**os.environ, 'DVC_STAGE': 'pretrain'}\n"
        "subprocess.run(cmd, shell=True, check=True, env=env)\n"
        "print('BETWEEN', flush=True)\n"
        f"while not os.path.exists({str(tmp_path / 'go')!r}): time.sleep(0.1)\n"
        "subprocess.run(cmd, shell=True, check=True, env={**env, 'DVC_STAGE': 'finetune'})\n")
    other = ("import logging; logging.basicConfig(level=logging.INFO)\n"
             "from adaptflow import orchestrate\n"
             f"with orchestrate.project_lock({str(tmp_path)!r}, what='flow', timeout=1.5, poll=0.2): print('GOT')\n")
    proc = subprocess.Popen([sys.executable, str(dvc), "repro"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "STAGE" and proc.stdout.readline().strip() == "BETWEEN"
        run = orchestrate.dvc_run_in_progress(tmp_path)
        assert run is not None and run["pid"] == proc.pid and run["stage"] == "pretrain" and run["cmd"] == "dvc repro"
        kept_out = subprocess.run([sys.executable, "-c", other], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert kept_out.returncode != 0 and "GOT" not in kept_out.stdout
        assert "between DVC stages" in kept_out.stderr and f"pid {proc.pid}" in kept_out.stderr and "ProjectLocked" in kept_out.stderr
        (tmp_path / "go").touch()
        assert proc.stdout.readline().strip() == "STAGE"  # the dvc run's own next stage goes on
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    after = subprocess.run([sys.executable, "-c", other], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert after.returncode == 0 and "GOT" in after.stdout  # the dvc process has exited: its note is stale
    assert not (tmp_path / orchestrate.STATE_DIR / orchestrate.DVC_RUN_NAME).exists()


def test_dvc_note_judged_by_what_this_machine_can_see(tmp_path, monkeypatch):
    """A dvc process this user may not inspect still holds; one that is gone does not (its note goes); a note
    from another machine is left alone and holds nothing here (its pid means nothing on this one)."""
    import json
    import socket

    import psutil

    note = tmp_path / orchestrate.STATE_DIR / orchestrate.DVC_RUN_NAME
    note.parent.mkdir(parents=True)
    gone = 2**22 + 12345  # above Linux's default pid_max: no such process
    note.write_text(json.dumps({"pid": gone, "host": socket.gethostname(), "create_time": 1.0, "cmd": "dvc repro", "stage": "ingest"}))
    real = psutil.Process

    class Denied(real):  # as psutil answers for another user's process on some systems
        def __init__(self, pid=None):
            if pid == gone:
                raise psutil.AccessDenied(pid)
            super().__init__(pid)

    monkeypatch.setattr(psutil, "Process", Denied)
    assert orchestrate.dvc_run_in_progress(tmp_path)["pid"] == gone
    monkeypatch.setattr(psutil, "Process", real)
    assert orchestrate.dvc_run_in_progress(tmp_path) is None and not note.exists()
    note.write_text(json.dumps({"pid": os.getppid(), "host": "elsewhere", "create_time": 1.0, "cmd": "dvc repro", "stage": "ingest"}))
    assert orchestrate.dvc_run_in_progress(tmp_path) is None and note.exists()


def _imagefolder(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _png(value: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), value).save(buf, format="PNG")
    return buf.getvalue()


def test_absorb_incoming_moves_new_files_into_the_target_folder(tmp_path):
    from adaptflow.stages.ingest import class_size_needed

    p = _params(target={"domain": "imagefolder:data/raw/digits", "k": 1})
    a, b, b2, c = _png(1), _png(2), _png(3), _png(4)
    _imagefolder(tmp_path / "data/raw/digits", {"0/a.png": a, "1/b.png": b})
    incoming = orchestrate.incoming_dir(p, tmp_path)
    assert incoming == tmp_path / "data/incoming/digits"
    need = class_size_needed(p, "target")
    new_class = {f"2/c{i}.png": _png(10 + i) for i in range(need)}
    _imagefolder(incoming, {"0/a.png": a, "1/b.png": b2, **new_class, "loose.png": c, "2/.partial.png": c,
                            "1/.upload/d.png": _png(5), "1/notes.png": b"not an image", "1/empty.png": b"", "seven/one.png": c})
    report = orchestrate.absorb_incoming(p, tmp_path)
    assert report["added"] == 1 + need and report["duplicates"] == 1 and report["classes"] == ["1", "2"]
    dest = tmp_path / "data/raw/digits"
    assert (dest / "2/c0.png").read_bytes() == _png(10) and (dest / "1/b.png").read_bytes() == b
    renamed = [f for f in (dest / "1").iterdir() if f.name != "b.png"]
    assert len(renamed) == 1 and renamed[0].read_bytes() == b2  # a different file under a taken name is kept, renamed
    # held, with the reason: a file that is no image, and a new class too small to fill the splits
    held = {h["item"]: h["reason"] for h in report["held"]}
    assert held["1/notes.png"] == "not an image Pillow can read" and held["1/empty.png"] == "empty file (0 bytes)"
    assert held["loose.png"] == "not in a class folder: put it in a subfolder named after its class"
    assert sorted(held) == ["1/empty.png", "1/notes.png", "loose.png", "seven/one.png"]  # every file left but the hidden ones
    assert held["seven/one.png"].startswith(f"class 'seven' is new; ingest would keep 1 of its 1 readable image(s); it joins when that reaches {need}")
    assert not (dest / "seven").exists()
    assert sorted(str(f.relative_to(incoming)) for f in incoming.rglob("*") if f.is_file()) == [
        "1/.upload/d.png", "1/empty.png", "1/notes.png", "2/.partial.png", "loose.png", "seven/one.png"]
    assert orchestrate.absorb_incoming(p, tmp_path)["added"] == 0
    # the new class joins once it has enough images
    _imagefolder(incoming, {f"seven/more{i}.png": _png(100 + i) for i in range(need - 1)})
    assert orchestrate.absorb_incoming(p, tmp_path)["added"] == need and len(list((dest / "seven").iterdir())) == need


def test_a_new_class_is_counted_as_ingest_will_keep_it(tmp_path):
    """Copies among a new class's own files do not count towards its minimum, nor does the share
    target.limit leaves it: let in short, it would fail every later ingest. A file holding an image the
    dataset has under another class stays out whatever its class: moved, it would be a label conflict, and
    ingest would exclude every copy, the one already there too."""
    from adaptflow.stages import ingest

    p = _params(target={"domain": "imagefolder:data/raw/digits", "k": 1})
    need = ingest.class_size_needed(p, "target")
    dest = tmp_path / "data/raw/digits"
    _imagefolder(dest, {f"{c}/{i}.png": _png(20 * c + i) for c in range(2) for i in range(need + 4)})
    ingest.run(p, tmp_path, "target")  # the store knows what the dataset holds
    incoming = orchestrate.incoming_dir(p, tmp_path)
    conflicts = {f"seven/copy{i}.png": _png(i) for i in range(3)}  # the same pixels as class 0's first images
    twins = {"seven/twin_a.png": _png(199), "seven/twin_b.png": _png(199)}  # a copy among its own files
    _imagefolder(incoming, {**conflicts, **twins, "1/copy_of_0.png": _png(0),
                            **{f"seven/new{i}.png": _png(200 + i) for i in range(need - 2)}})
    report = orchestrate.absorb_incoming(p, tmp_path)
    held = {h["item"]: h["reason"] for h in report["held"]}
    assert report["added"] == 0 and not (dest / "seven").exists()
    for item in [*conflicts, "1/copy_of_0.png"]:  # an existing class's file too
        assert held[item].endswith("but the same image is in class '0': moved, every copy would be excluded as a label conflict; "
                                   "fix the label (or the folder) it is in"), held[item]
    assert f"ingest would keep {need - 1} of its {need} readable image(s) (1 copies among them)" in held["seven/new0.png"]
    _imagefolder(incoming, {"seven/new_last.png": _png(250)})  # one more distinct image: enough
    assert orchestrate.absorb_incoming(p, tmp_path)["added"] == need + 1
    assert sorted(str(f.relative_to(incoming)) for f in incoming.rglob("*.png")) == sorted([*conflicts, "1/copy_of_0.png"])
    ingest.run(p, tmp_path, "target")  # and ingest agrees: no label conflict, every class big enough
    assert not store.read_card(ingest.output_dir(p, tmp_path, "target"))["duplicates"]["label_conflicts"]

    limited = _params(target={"domain": "imagefolder:data/raw/digits", "k": 1, "limit": 3 * need})
    _imagefolder(incoming, {f"eight/{i}.png": _png(150 + i) for i in range(need)})
    report = orchestrate.absorb_incoming(limited, tmp_path)
    assert report["added"] == 0 and "(target.limit=" in {h["item"]: h["reason"] for h in report["held"]}["eight/0.png"]


def test_a_new_class_may_not_squeeze_a_class_below_its_minimum_under_the_limit(tmp_path):
    """Under target.limit a new class takes its share from the others: one it would cut below the minimum keeps
    the new class out, with the reason; without the limit it joins."""
    from adaptflow.stages import ingest

    p = _params(target={"domain": "imagefolder:data/raw/digits", "k": 1, "limit": None})
    need = ingest.class_size_needed(p, "target")
    dest = tmp_path / "data/raw/digits"
    _imagefolder(dest, {**{f"0/{i}.png": _png(i) for i in range(need)}, **{f"1/{i}.png": _png(50 + i) for i in range(10 * need)}})
    limited = _params(target={"domain": "imagefolder:data/raw/digits", "k": 1, "limit": 11 * need})
    ingest.run(limited, tmp_path, "target")  # the limit keeps every image now
    incoming = orchestrate.incoming_dir(p, tmp_path)
    _imagefolder(incoming, {f"seven/{i}.png": _png(150 + i) for i in range(10 * need)})
    report = orchestrate.absorb_incoming(limited, tmp_path)
    assert report["added"] == 0 and not (dest / "seven").exists()
    reason = report["held"][0]["reason"]
    assert f"with it, target.limit={11 * need} would cut '0' to " in reason and f"below the {need} every class needs" in reason
    assert orchestrate.absorb_incoming(p, tmp_path)["added"] == 10 * need  # no limit: it joins
    ingest.run(p, tmp_path, "target")


def test_the_watched_folder_keeps_a_dotted_folder_name(tmp_path):
    p = _params(target={"domain": "imagefolder:data/raw/my.digits.v2"})
    assert orchestrate.incoming_dir(p, tmp_path) == tmp_path / "data/incoming/my.digits.v2"
    assert orchestrate.target_folder_name(_params(target={"domain": "csv:data/raw/labels.csv"})) == "labels"


def test_absorb_incoming_needs_an_imagefolder_target(tmp_path):
    p = _params()  # uci_digits: a built-in, nothing to add files to
    assert orchestrate.absorb_incoming(p, tmp_path)["added"] == 0
    _imagefolder(orchestrate.incoming_dir(p, tmp_path), {"3/x.png": b"x"})
    with pytest.raises(DataError, match="imagefolder target"):
        orchestrate.absorb_incoming(p, tmp_path)


def test_dvc_commit_blocker(tmp_path):
    assert "not a DVC pipeline" in orchestrate.dvc_commit_blocker(tmp_path, str(tmp_path / "params.yaml"), None)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    # a copy of the project without .git/: dvc commit would fail after all the work, so it is skipped
    assert "git" in orchestrate.dvc_commit_blocker(tmp_path, str(tmp_path / "params.yaml"), None)
    (tmp_path / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    assert orchestrate.dvc_commit_blocker(tmp_path, str(tmp_path / "params.yaml"), None) is None
    (tmp_path / ".dvc" / "config").unlink()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert orchestrate.dvc_commit_blocker(tmp_path, str(tmp_path / "params.yaml"), ["orchestrate.task_runner=threads"]) is None
    assert "finetune.lr=0.1" in orchestrate.dvc_commit_blocker(tmp_path, str(tmp_path / "params.yaml"), ["finetune.lr=0.1"])
    assert "other.yaml" in orchestrate.dvc_commit_blocker(tmp_path, str(tmp_path / "other.yaml"), None)


def test_orchestrate_params_validate():
    assert Params().orchestrate.task_runner == "sequential"  # deterministic by default
    with pytest.raises(ParamsError, match="orchestrate.task_runner"):
        _params(orchestrate={"task_runner": "ray"})
    with pytest.raises(ParamsError, match="orchestrate.cron"):
        _params(orchestrate={"cron": "nightly"})
    assert Params().orchestrate.train_processes == 1
    with pytest.raises(ParamsError, match="train_processes: 2 runs each training stage on 2 processes .* task_runner must then be sequential, not 'threads'"):
        _params(orchestrate={"train_processes": 2, "task_runner": "threads"})
    with pytest.raises(ParamsError, match="orchestrate.train_processes"):
        _params(orchestrate={"train_processes": 0})
    # every batch the processes share must split: checked when params load, before any stage runs
    with pytest.raises(ParamsError, match="pretrain.batch_size: 128 does not split into 3 equal shares of at least 2 images"):
        _params(orchestrate={"train_processes": 3})
    odd = {"strategies": ["scratch", "source_only", "finetune"], "unlabeled_batch_size": 33}
    assert _params(orchestrate={"train_processes": 2}, finetune=odd).orchestrate.train_processes == 2  # no strategy reads the pool
    with pytest.raises(ParamsError, match="finetune.unlabeled_batch_size: 33 does not split into 2"):
        _params(orchestrate={"train_processes": 2}, finetune={**odd, "strategies": [*odd["strategies"], "finetune+fixmatch"]})


class _FakeLauncher:
    """Stands in for torchrun: records the command, environment and params file it was given, prints
    ``lines``, writes ``refusal`` where a refusing process would, exits ``code`` having trained (the output is
    then current) unless ``trains`` is False."""

    trained = False

    def __init__(self, lines: list[str], code: int, trains: bool = True, refusal: str | None = None):
        self.lines, self.code, self.trains, self.refusal, self.seen = lines, code, trains, refusal, {}
        _FakeLauncher.trained = False

    def __call__(self, cmd, cwd, env, **kw):
        self.seen = {"cmd": cmd, "cwd": cwd, "env": env, "kw": kw, "params": Path(cmd[cmd.index("--params") + 1]).read_text()}
        if self.refusal:
            Path(env[orchestrate.REFUSAL_ENV]).write_text(self.refusal)
        self.stdout = iter(line + "\n" for line in self.lines)
        return self

    def wait(self, timeout=None):
        _FakeLauncher.trained = self.code == 0 and self.trains
        return self.code


@pytest.fixture
def pending(monkeypatch):
    monkeypatch.setattr(orchestrate, "_pending", lambda *a, **k: not _FakeLauncher.trained)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_launch_training_starts_torchrun_with_these_params_and_says_what_it_says(tmp_path, monkeypatch, pending):
    import yaml

    params = _params(orchestrate={"train_processes": 2}, finetune={"lr": 0.123})
    fake = _FakeLauncher(["epoch 1/2", "epoch 2/2"], 0)
    monkeypatch.setattr(orchestrate.subprocess, "Popen", fake)
    said: list[str] = []
    assert orchestrate.launch_training("finetune", params, tmp_path, said.append, strategy="dann", seed=1)
    cmd = fake.seen["cmd"]
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cmd[6:10] == ["-m", "adaptflow", "stage", "finetune"] and cmd[-4:] == ["--strategy", "dann", "--seed", "1"]
    assert from_dict(yaml.safe_load(fake.seen["params"])) == params  # exactly these params, overrides included
    assert fake.seen["cwd"] == tmp_path and fake.seen["env"][orchestrate.HOLDER_ENV] == str(os.getpid())
    assert fake.seen["kw"]["start_new_session"] and fake.seen["kw"]["encoding"] == "utf-8"
    assert said == ["epoch 1/2", "epoch 2/2"]
    assert not list((tmp_path / orchestrate.STATE_DIR / "launch").iterdir())  # the params copy is removed


def test_launch_training_raises_what_the_processes_refused_and_other_failures(tmp_path, monkeypatch, pending):
    params = _params(orchestrate={"train_processes": 2})
    why = "target.domain: class(es) with too few usable images —\n  '3': 1 (2 unreadable)"
    monkeypatch.setattr(orchestrate.subprocess, "Popen", _FakeLauncher(["starting"], 1, refusal=why))
    said: list[str] = []
    with pytest.raises(DataError) as exc:
        orchestrate.launch_training("pretrain", params, tmp_path, said.append)
    assert str(exc.value) == why and said == ["starting"]  # every line of it, said once, by the exception
    monkeypatch.setattr(orchestrate.subprocess, "Popen", _FakeLauncher(["Traceback ...", "RuntimeError: NCCL"], 1))
    with pytest.raises(orchestrate.LaunchFailed, match="pretrain in 2 processes .torchrun. exited 1"):
        orchestrate.launch_training("pretrain", params, tmp_path, said.append)
    monkeypatch.setattr(orchestrate.subprocess, "Popen", _FakeLauncher([], 0, trains=False))
    with pytest.raises(orchestrate.LaunchFailed, match="exited 0 but left no current output"):  # not trained again in one process
        orchestrate.launch_training("pretrain", params, tmp_path, said.append)
    assert not list((tmp_path / orchestrate.STATE_DIR / "launch").iterdir())


def test_a_killed_launchers_params_copy_is_removed_with_the_stale_outputs(tmp_path):
    launch = tmp_path / orchestrate.STATE_DIR / "launch"
    launch.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (launch / f"finetune-{dead}-1.yaml").write_text("seed: 0\n")
    (launch / f"finetune-{os.getpid()}-2.yaml").write_text("seed: 0\n")  # a launch of this live process
    assert orchestrate.remove_stale_outputs(Params(), tmp_path) == [launch / f"finetune-{dead}-1.yaml"]
    assert [f.name for f in launch.iterdir()] == [f"finetune-{os.getpid()}-2.yaml"]


def test_launch_training_leaves_to_the_caller_what_needs_no_launch(tmp_path, monkeypatch, pending):
    monkeypatch.setattr(orchestrate.subprocess, "Popen", lambda *a, **k: pytest.fail("launched"))
    assert not orchestrate.launch_training("finetune", _params(), tmp_path, print)  # train_processes: 1
    two = _params(orchestrate={"train_processes": 2})
    assert not orchestrate.launch_training("evaluate", two, tmp_path, print)  # not a training stage
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not orchestrate.launch_training("finetune", two, tmp_path, print)  # already one of the launched processes
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(orchestrate, "_pending", lambda *a, **k: False)
    assert not orchestrate.launch_training("finetune", two, tmp_path, print)  # current: nothing to train


def test_nothing_to_train_launches_nothing(tmp_path, monkeypatch):
    """source_only keeps the source model, pretrain with no epochs the weights it was given: in one process."""
    two = _params(orchestrate={"train_processes": 2}, finetune={"strategies": ["source_only", "finetune"]}, evaluate={"baselines": ["source_only"]},
                  register={"require_baselines": False})
    monkeypatch.setattr(orchestrate, "is_current", lambda ident, root: False)
    monkeypatch.setattr(orchestrate, "identity", lambda *a, **k: None)
    assert not orchestrate._pending("finetune", two, tmp_path, strategy="source_only", seed=0)
    assert orchestrate._pending("finetune", two, tmp_path, strategy="finetune", seed=0) and orchestrate._pending("finetune", two, tmp_path)
    assert orchestrate._pending("pretrain", two, tmp_path)
    assert not orchestrate._pending("pretrain", from_dict({**two.to_dict(), "pretrain": {"epochs": 0, "weights": "w.safetensors"}}), tmp_path)
    monkeypatch.setattr(orchestrate.subprocess, "Popen", lambda *a, **k: pytest.fail("launched"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not orchestrate.launch_training("finetune", two, tmp_path, print, strategy="source_only", seed=0)


def test_no_launch_starts_once_the_run_is_stopping(tmp_path, monkeypatch, pending):
    """settle() stops the launches of a failed run: a finetune task that reaches its launch just after does not
    start N processes for a run that is ending."""
    monkeypatch.setattr(orchestrate.subprocess, "Popen", lambda *a, **k: pytest.fail("launched"))
    orchestrate.stop_launches()
    try:
        with pytest.raises(orchestrate.LaunchFailed, match="finetune: not started, the run is stopping"):
            orchestrate.launch_training("finetune", _params(orchestrate={"train_processes": 2}), tmp_path, print, strategy="finetune", seed=0)
    finally:
        orchestrate.allow_launches()
    assert not list((tmp_path / orchestrate.STATE_DIR / "launch").iterdir())


def test_identity_unknown_stage_and_missing_upstream(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        orchestrate.identity("train", Params(), tmp_path)
    with pytest.raises(FileNotFoundError):
        orchestrate.identity("pretrain", Params(), tmp_path)


def test_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert orchestrate.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert orchestrate.tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_a_dvc_experiment_workspace_uses_the_projects_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = tmp_path / "proj"
    workspace = project / ".dvc" / "tmp" / "exps" / "tmp8f3k"  # `dvc exp run --temp`: a copy DVC deletes after
    monkeypatch.setenv("DVC_ROOT", str(project))  # DVC names the project for every experiment's stage
    assert orchestrate.tracking_uri(workspace) == f"sqlite:///{project.resolve() / 'mlflow.db'}"
    assert orchestrate.tracking_uri(project) == f"sqlite:///{project.resolve() / 'mlflow.db'}"
    other = tmp_path / "elsewhere"  # a project in a folder of its own is its own store
    assert orchestrate.tracking_uri(other) == f"sqlite:///{other.resolve() / 'mlflow.db'}"


def test_stage_cache_key_is_the_stage_key_and_forgets_stale_records(tmp_path, monkeypatch):
    from tasks.caching import StageInputs

    current = {"value": True}
    monkeypatch.setattr(orchestrate, "identity", lambda stage, params, root, **w: orchestrate.Identity(stage, f"k-{w.get('seed')}", tmp_path / "out"))
    monkeypatch.setattr(orchestrate, "is_current", lambda ident, root: current["value"])
    policy = StageInputs(stage="finetune").configure(key_storage=tmp_path / "keys")
    inputs = {"params": Params(), "root": str(tmp_path), "strategy": "dann", "seed": 1}
    key = policy.compute_key(None, inputs, {})
    assert key == policy.compute_key(None, dict(inputs), {}) and key != policy.compute_key(None, {**inputs, "seed": 2}, {})
    other_root = tmp_path / "copy"
    assert key != policy.compute_key(None, {**inputs, "root": str(other_root)}, {})  # a copied project never reuses records
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / key).write_text("{}")
    policy.compute_key(None, inputs, {})
    assert (tmp_path / "keys" / key).is_file()  # output current: the record stands
    current["value"] = False
    assert policy.compute_key(None, inputs, {}) == key
    assert not (tmp_path / "keys" / key).exists()  # output gone or replaced: the record is dropped, the task runs


def test_stage_cache_key_none_when_upstream_missing(tmp_path):
    from tasks.caching import StageInputs

    assert StageInputs(stage="evaluate").compute_key(None, {"params": Params(), "root": str(tmp_path)}, {}) is None


def test_retries_skip_bad_input():
    """Ingest and register retry a flaky disk or server, never bad data: a DataError fails at once."""
    from prefect.states import Failed

    from tasks import stages as task_stages

    assert task_stages.transient(None, None, Failed(data=OSError("stale NFS handle"))) is True
    assert task_stages.transient(None, None, Failed(data=DataError("target.domain: folder is empty"))) is False
    assert task_stages.ingest.retry_condition_fn is task_stages.transient
    assert task_stages.register.retry_condition_fn is task_stages.transient


def test_stage_command_reports_bad_data_without_a_traceback(tmp_path):
    """`adaptflow stage ingest` on a missing image folder: one clear line, exit status 2, nothing written."""
    proc = subprocess.run([sys.executable, "-m", "adaptflow.cli", "stage", "ingest", "--role", "target",
                           "--params", str(Path(__file__).parents[2] / "params.yaml"), "--set", f"target.domain=imagefolder:{tmp_path / 'nope'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "nope" in proc.stderr
    assert not (tmp_path / "data" / "ingested" / "target").exists()


def test_dvc_stage_names_as_dvc_names_them(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  ingest:\n    foreach: {source: 1, target: 2}\n    do:\n      cmd: echo ${key}\n"
        "  shard:\n    foreach: [a, b]\n    do:\n      cmd: echo ${item}\n"
        "  register: {cmd: echo r}\n")
    assert orchestrate.dvc_stage_names(tmp_path) == ["ingest@source", "ingest@target", "shard@a", "shard@b", "register"]


def test_a_tracking_server_that_answers_with_any_status_is_reachable():
    """A proxy asking for credentials answers: only no answer (refused, no such host) is unreachable."""
    import http.server
    import socket
    import threading

    status = [401]

    class Deny(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the handler's name)
            self.send_response(status[0])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert orchestrate.server_unreachable(f"http://127.0.0.1:{server.server_port}") is None
        assert orchestrate.server_unreachable(f"http://alice:s3cret@127.0.0.1:{server.server_port}") is None  # as MLflow sends them
        status[0] = 503  # a gateway whose backend is gone: MLflow's client would retry it for minutes
        why = orchestrate.server_unreachable(f"http://alice:s3cret@127.0.0.1:{server.server_port}")
        assert f"answers at http://127.0.0.1:{server.server_port} (HTTP 503 from a gateway in front of it)" in why and "s3cret" not in why
    finally:
        server.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert "no MLflow tracking server answers at http://127.0.0.1:" in orchestrate.server_unreachable(f"http://127.0.0.1:{closed}")
    assert orchestrate.server_unreachable("sqlite:///mlflow.db") is None
