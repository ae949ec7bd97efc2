"""adaptflow.tracking: the project's default MLflow store."""

from __future__ import annotations

import logging
import shutil

from adaptflow import tracking


def test_a_store_copied_from_another_project_is_named(tmp_path, monkeypatch, caplog):
    """MLflow records the experiment's artifact folder as an absolute path: a copied project's store still writes
    (and its models read) under the original. configure says so; the original's own store is quiet."""
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DVC_ROOT"):
        monkeypatch.delenv(k, raising=False)
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    tracking.configure(original)
    shutil.copytree(original, copy)
    with caplog.at_level(logging.WARNING, logger="adaptflow.tracking"):
        tracking.configure(copy)
    assert "outside the project" in caplog.text and (original / "mlartifacts").as_uri() in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adaptflow.tracking"):
        tracking.configure(original)
    assert "outside the project" not in caplog.text
