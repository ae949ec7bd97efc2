"""Prefect caching keyed on content: a stage's cache key is the input key the stage itself computes.

Prefect's default policy (inputs + task source + run id) reuses nothing across flow runs, and would hash
a path argument as its string, not as the data behind it. :class:`StageInputs` asks the core
(:func:`adaptflow.orchestrate.identity`) for the stage's key instead — its params sections, the digests of
its upstream outputs, the code version — so a cache hit means "these exact inputs were processed", in
any process, for as long as the project's state directory lives.

Records are kept per project (``<root>/.adaptflow/prefect``; see :func:`for_project`), and the project
directory is part of the key: a copied or different project never reuses another's results, since a
cached result stands in for files that must exist in *this* project. If those files are gone or were
replaced (deleted by hand, overwritten by another tool) the record is dropped and the task runs again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from adaptflow import orchestrate

log = logging.getLogger(__name__)

WHICH = ("role", "strategy", "seed")  # the task arguments that pick one output of a stage


@dataclass
class StageInputs(CachePolicy):
    """Cache key = the stage's own input key + the project directory."""

    stage: str = ""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> Optional[str]:
        root = Path(inputs["root"]).resolve()
        which = {k: inputs[k] for k in WHICH if k in inputs}
        try:
            ident = orchestrate.identity(self.stage, inputs["params"], root, **which)
        except Exception as exc:  # noqa: BLE001 — no key, no cache: the task runs and the stage reports the problem
            log.debug("%s: no cache key (%s); running it", self.stage, exc)
            return None
        key = hashlib.sha256(f"{self.stage}|{ident.key}|{root}".encode()).hexdigest()[:32]
        if not orchestrate.is_current(ident, root):
            self._forget(key)
        return key

    def _forget(self, key: str) -> None:
        """Drop a record whose output no longer matches it (Prefect would otherwise return it unchecked)."""
        if isinstance(self.key_storage, Path):
            (self.key_storage / key).unlink(missing_ok=True)


def storage(root: str | Path) -> Path:
    return orchestrate.state_dir(Path(root)) / "prefect"


def for_project(task: Task, root: str | Path) -> Task:
    """``task`` with its records in this project's state directory (results and keys persisted there)."""
    d = storage(root)
    return task.with_options(cache_policy=task.cache_policy.configure(key_storage=d / "keys"), result_storage=d / "results", persist_result=True)
