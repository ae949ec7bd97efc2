"""One module per stage, each exposing ``run(params, root) -> dict``.

The same function is called by the CLI (``adaptflow stage NAME``, which DVC runs) and by the Prefect tasks.
"""

from __future__ import annotations

import importlib
from typing import Callable

STAGES = ("ingest", "augment", "pretrain", "cache_features", "finetune", "evaluate", "register")
TRAINING = ("pretrain", "finetune")  # the stages that train, and so may run in several processes


def get(name: str) -> Callable[..., dict]:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return importlib.import_module(f"adaptflow.stages.{name}").run
