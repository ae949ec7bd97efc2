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


def test_find_versions_by_tag_newest_first_whatever_the_name(tmp_path, monkeypatch):
    """A model named after a folder may hold a quote, which an MLflow filter string cannot: still found."""
    import mlflow
    from mlflow import MlflowClient

    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DVC_ROOT"):
        monkeypatch.delenv(k, raising=False)
    tracking.configure(tmp_path)
    client = MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_dict({"a": 1}, "x.json")
    for name in ("plain", "o'brien-digits"):
        client.create_registered_model(name)
        for key in ("k1", "k2", "k1"):
            client.create_model_version(name, f"runs:/{run.info.run_id}/x.json", run_id=run.info.run_id, tags={"register_key": key})
    for name in ("plain", "o'brien-digits"):
        assert tracking.find_versions(name, {"register_key": "k1"}) == ["3", "1"]
        assert tracking.find_versions(name, {"register_key": "k2"}) == ["2"]
        assert tracking.find_versions(name, {}) == ["3", "2", "1"]
        assert tracking.find_versions(name, {"register_key": "none"}) == []
    assert tracking.find_versions("missing", {"register_key": "k1"}) == []


def test_a_missing_model_is_told_from_one_without_aliases_and_a_typo_gets_the_close_names(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DVC_ROOT"):
        monkeypatch.delenv(k, raising=False)
    tracking.configure(tmp_path)
    assert tracking.missing_model("adaptflow-uci_digits") == "adaptflow-uci_digits: no such registered model; this store has none"
    MlflowClient().create_registered_model("adaptflow-uci_digits")
    assert tracking.missing_model("adaptflow-uci_digits") is None and tracking.model_aliases("adaptflow-uci_digits") == {}
    assert tracking.missing_model("adaptflow-uci_digit") == "adaptflow-uci_digit: no such registered model (did you mean adaptflow-uci_digits?)"
    assert tracking.missing_model("zzz") == "zzz: no such registered model; this store has adaptflow-uci_digits"
