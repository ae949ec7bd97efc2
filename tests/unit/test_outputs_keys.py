"""The code part of every stage key: what counts as code that can change a stage's result."""

from __future__ import annotations

from adaptflow import outputs


def test_code_version_ignores_orchestration_only_modules(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_PKG", tmp_path)
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "train.py").write_text("x = 1\n")
    (tmp_path / "cli.py").write_text("# the command line\n")
    (tmp_path / "orchestrate.py").write_text("# locks and keys\n")
    before = outputs.code_version()
    (tmp_path / "cli.py").write_text("# the command line, with a new flag\n")
    (tmp_path / "orchestrate.py").write_text("# locks and keys, reworded\n")
    assert outputs.code_version() == before  # how stages run changed, not what they compute
    (tmp_path / "stages" / "train.py").write_text("x = 2\n")
    assert outputs.code_version() != before
