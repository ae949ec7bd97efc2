"""Prefect flows over the adaptflow stages.

Importing any of them sets Prefect's offline defaults first (they reach the ephemeral API server's process
too): no telemetry, the core's ``adaptflow`` loggers forwarded to Prefect's run logs.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "adaptflow")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
