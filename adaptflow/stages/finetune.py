"""finetune: adapt the source model to the target with each strategy (baselines included).

One output directory per strategy, each complete or absent, so strategies can run in parallel (Prefect
maps over them) or in one process (``adaptflow stage finetune``, which DVC runs). Checkpoints are chosen
on target val; target test is not loaded here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from adaptflow import outputs, strategies
from adaptflow.data import store
from adaptflow.models import save
from adaptflow.params import Params
from adaptflow.stages.augment import pipeline
from adaptflow.stages.cache_features import output_dir as features_dir
from adaptflow.stages.ingest import output_dir as ingested_dir
from adaptflow.stages.pretrain import output_dir as source_model_dir
from adaptflow.training import device

log = logging.getLogger(__name__)


def output_dir(params: Params, root: Path, strategy: str | None = None) -> Path:
    base = Path(root) / params.paths.adapted
    return base / strategy if strategy else base


def run_one(params: Params, root: Path, strategy: str) -> dict:
    out = output_dir(params, root, strategy)
    tgt, src, feats = ingested_dir(params, root, "target"), source_model_dir(params, root), features_dir(params, root)
    upstream = [tgt, src] + ([feats] if strategy == "linear_probe" else [])
    key = outputs.input_key(f"finetune:{strategy}", params.section_hash("finetune", "augment.target", "seed"), upstream)
    if outputs.is_current(out, key):
        log.info("finetune %s: up to date", strategy)
        return {"strategy": strategy, "path": str(out), "digest": outputs.digest(out), "cached": True}
    ctx = strategies.Context(
        params=params,
        source_dir=src,
        features_dir=feats,
        labeled=store.load_split(tgt, "train", labeled=True),
        val=store.load_split(tgt, "val"),
        transform=pipeline(params, "target"),
        dev=device(),
    )
    adapted = strategies.get(strategy)(ctx)
    adapted.config.extra.update({"selection": adapted.selection, "val_acc": adapted.val_acc, "best_epoch": adapted.best_epoch})
    with outputs.atomic_dir(out, "finetune", key) as tmp:
        save(adapted.model.cpu(), adapted.config, tmp)
        (tmp / "history.json").write_text(json.dumps(adapted.history, indent=2))
    log.info("finetune %s: target val acc %.4f (%s)", strategy, adapted.val_acc, adapted.selection)
    return {"strategy": strategy, "path": str(out), "digest": outputs.digest(out), "cached": False, "val_acc": adapted.val_acc}


def run(params: Params, root: Path = Path("."), strategy: str | None = None) -> dict:
    """Run one strategy, or every strategy in ``finetune.strategies``."""
    names = [strategy] if strategy else list(params.finetune.strategies)
    results = {name: run_one(params, root, name) for name in names}
    return {"path": str(output_dir(params, root)), "strategies": results}
