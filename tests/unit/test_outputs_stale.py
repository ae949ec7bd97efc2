"""What a writer killed with SIGKILL leaves behind, and how the next writer cleans it up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from adaptflow import outputs


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _complete(d, text="x", key="k"):
    with outputs.atomic_dir(d, "s", key) as tmp:
        (tmp / "f").write_text(text)
    return d


def test_pid_alive():
    assert outputs.pid_alive(os.getpid())
    assert not outputs.pid_alive(dead_pid())
    assert not outputs.pid_alive(0)


def test_killed_unreaped_child_counts_as_dead():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait for the kernel to make it a zombie, without reaping it
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        assert not outputs.pid_alive(proc.pid)
    finally:
        proc.wait()


def test_remove_stale_deletes_dead_writers_only(tmp_path):
    dead, live = dead_pid(), os.getpid()
    (tmp_path / f".out.tmp-{dead}").mkdir()
    (tmp_path / f".out.tmp-{dead}" / "half").write_text("partial")
    (tmp_path / f".out.tmp-{live}").mkdir()
    (tmp_path / f".other.tmp-{dead}").mkdir()
    (tmp_path / f".registry.json.tmp-{dead}").write_text("{")
    removed = outputs.remove_stale(tmp_path, "out")
    assert [p.name for p in removed] == [f".out.tmp-{dead}"]
    assert (tmp_path / f".out.tmp-{live}").is_dir() and (tmp_path / f".other.tmp-{dead}").is_dir()
    outputs.remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp-{live}"]


def test_killed_mid_swap_restores_the_previous_output(tmp_path):
    """Killed between the two renames: the old complete output is put back, the new one discarded."""
    final = _complete(tmp_path / "out", "v1", "old")
    dead = dead_pid()
    final.rename(tmp_path / f".out.old-{dead}")
    _complete(tmp_path / "scratch", "v2", "new").rename(tmp_path / f".out.tmp-{dead}")
    outputs.remove_stale(tmp_path, "out")
    assert outputs.is_current(final, "old") and (final / "f").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_old_copy_is_dropped_when_the_output_exists(tmp_path):
    _complete(tmp_path / "out", "v2", "new")
    _complete(tmp_path / "x", "v1", "old").rename(tmp_path / f".out.old-{dead_pid()}")
    outputs.remove_stale(tmp_path)
    assert outputs.is_current(tmp_path / "out", "new") and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_and_write_clean_their_own_leftovers(tmp_path):
    dead = dead_pid()
    (tmp_path / f".out.tmp-{dead}").mkdir()
    (tmp_path / f".r.json.tmp-{dead}").write_text("{")
    _complete(tmp_path / "out")
    outputs.atomic_write_text(tmp_path / "r.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.json"]


def test_remove_stale_tree_reaches_nested_outputs(tmp_path):
    dead = dead_pid()
    nested = tmp_path / "models" / "adapted" / "dann" / f".seed0.tmp-{dead}"
    nested.mkdir(parents=True)
    (nested / "model.safetensors").write_bytes(b"\0" * 10)
    assert outputs.remove_stale_tree(tmp_path / "models") == [nested]
    assert not nested.exists() and (tmp_path / "models" / "adapted" / "dann").is_dir()
    assert outputs.remove_stale_tree(tmp_path / "missing") == []


def test_a_run_clears_only_its_own_output_folders(tmp_path):
    """Leftovers of killed writers in and beside the stages' output folders go; a file of the same shape
    anywhere else in the project (or outside it) is not adaptflow's to delete."""
    from adaptflow.orchestrate import remove_stale_outputs
    from adaptflow.params import Params

    dead = dead_pid()
    root = tmp_path / "project"
    ours = [root / "models" / f".source.tmp-{dead}",  # the source model's temporary copy, beside it
            root / "models" / "adapted" / "dann" / f".seed0.tmp-{dead}",
            root / "reports" / f".metrics.json.tmp-{dead}",
            root / "data" / "ingested" / f".target.tmp-{dead}"]
    theirs = [root / "data" / "raw" / f".images.tmp-{dead}", root / "models" / "mine" / f".w.tmp-{dead}",
              root / f".notes.tmp-{dead}", tmp_path / "elsewhere" / f".results.tmp-{dead}"]
    for p in ours + theirs:
        p.mkdir(parents=True)
    assert sorted(remove_stale_outputs(Params(), root)) == sorted(ours)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
