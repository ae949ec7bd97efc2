"""adaptflow: adapt a source-domain model to a target domain, prove whether transfer helped, register the winner."""

import os as _os

# Telemetry that fails (or hangs on DNS) offline; the user's own settings win.
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_os.environ.setdefault("DVC_NO_ANALYTICS", "1")
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

__version__ = "0.1.0"
