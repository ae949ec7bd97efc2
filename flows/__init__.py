"""Prefect flows over the adaptflow stages.

Importing any of them sets Prefect's offline defaults first (they reach the ephemeral API server's process
too): no telemetry, the core's ``adaptflow`` loggers forwarded to Prefect's run logs.
"""

import logging
import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "adaptflow")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def forward_core_logs() -> None:
    """Where Prefect set up its logging before this package was imported — a worker's flow-run process
    (``python -m prefect.engine``) imports the flow only then — the setting above came too late: hand the
    core's ``adaptflow`` loggers Prefect's handlers for extra loggers (the run's logs in the API) as
    Prefect does at set-up, and let their INFO records through (that process's root logger is at WARNING).
    Elsewhere Prefect has not set up yet and does it itself; nothing here then."""
    if "adaptflow" not in [name.strip() for name in os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"].split(",")]:
        return  # the user's own setting leaves the core out
    handlers = logging.getLogger("prefect.extra").handlers
    core = logging.getLogger("adaptflow")
    if not handlers or all(h in core.handlers for h in handlers):
        return
    for handler in handlers:
        if handler not in core.handlers:
            core.addHandler(handler)
    if core.getEffectiveLevel() > logging.INFO:
        core.setLevel(logging.INFO)


forward_core_logs()
