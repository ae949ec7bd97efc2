"""The ``transfer_pipeline`` flow: the seven stages in order, as plain sequential Python.

Prefect's ephemeral API is used unless ``PREFECT_API_URL`` points at a server.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "adaptflow")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

from prefect import flow, get_run_logger  # noqa: E402

from adaptflow.params import ROLES, load  # noqa: E402
from tasks import stages as t  # noqa: E402


@flow(name="transfer_pipeline", flow_run_name="transfer_pipeline[{params_path}]")
def transfer_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> dict:
    """ingest → augment → pretrain → cache_features → finetune (each strategy) → evaluate → register."""
    logger = get_run_logger()
    params = load(os.path.join(root, params_path) if not os.path.isabs(params_path) else params_path, overrides)
    results: dict = {"ingest": {role: t.ingest(params, root, role) for role in ROLES}}
    results["augment"] = t.augment(params, root)
    results["pretrain"] = t.pretrain(params, root)
    results["cache_features"] = t.cache_features(params, root)
    results["finetune"] = {f"{s}[seed={k}]": t.finetune(params, root, s, k) for s in params.finetune.strategies for k in params.finetune.seeds}
    results["evaluate"] = t.evaluate(params, root)
    results["register"] = t.register(params, root)
    cached = [name for name, r in results.items() if isinstance(r, dict) and r.get("cached")]
    logger.info("transfer_pipeline done; stages reused unchanged: %s", cached or "none")
    return results
