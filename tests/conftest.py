"""Shared test set-up: offline switches, and a private Prefect home so tests never touch ~/.prefect."""

from __future__ import annotations

import os
import tempfile

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ["HF_HUB_OFFLINE"] = "1"
# Each test process its own (make test runs several, and an ephemeral server's SQLite database is not to share).
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"adaptflow-prefect-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL"):
    os.environ.pop(var, None)


import pytest  # noqa: E402

from adaptflow.machine import environ_kept  # noqa: E402


@pytest.fixture(autouse=True)
def _mlflow_uris_stay_put():
    """mlflow.set_tracking_uri / set_registry_uri also export MLFLOW_*_URI into os.environ: a test that calls
    them would leave a later test (and every subprocess it starts) pointed at its store or stopped server."""
    with environ_kept("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        yield


@pytest.fixture(autouse=True)
def _no_store_left_in_the_working_folder(request):
    """A test that reaches MLflow without configuring it gets MLflow's default store: an ``mlflow.db`` in the
    working folder (the repository, under ``make test``). Name the test that left one, and remove it."""
    from pathlib import Path

    stray = Path.cwd() / "mlflow.db"
    before = stray.exists()
    yield
    if not before and stray.exists():
        stray.unlink()
        pytest.fail(f"{request.node.nodeid} left {stray}: mock the tracking call it makes, or configure a store in tmp_path")
