"""Shared test set-up: offline switches, and a private Prefect home so tests never touch ~/.prefect."""

from __future__ import annotations

import os
import tempfile

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="adaptflow-prefect-"))
for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL"):
    os.environ.pop(var, None)
