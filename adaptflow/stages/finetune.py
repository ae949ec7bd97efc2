"""finetune: adapt the source model to the target with each strategy (baselines included), for each seed.

One output directory per strategy and seed (``<adapted>/<strategy>/seed<N>/``), each complete or absent,
so runs can go in parallel (Prefect maps over them) or in one process (``adaptflow stage finetune``, which
DVC runs). Each run can also train in several processes, one per GPU, under ``torchrun``
(:mod:`adaptflow.distributed`). Checkpoints are chosen on target val; target test is not loaded here.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from adaptflow import distributed, outputs, strategies
from adaptflow.data import store
from adaptflow.models import save
from adaptflow.params import Params
from adaptflow.stages.augment import pipeline
from adaptflow.stages.cache_features import output_dir as features_dir
from adaptflow.stages.ingest import output_dir as ingested_dir
from adaptflow.stages.pretrain import output_dir as source_model_dir
from adaptflow.training import device

log = logging.getLogger(__name__)


def output_dir(params: Params, root: Path, strategy: str | None = None, seed: int | None = None) -> Path:
    base = Path(root) / params.paths.adapted
    if strategy is None:
        return base
    return base / strategy / f"seed{seed}" if seed is not None else base / strategy


def runs(params: Params) -> list[tuple[str, int]]:
    """Every (strategy, seed) pair the params ask for, in a stable order."""
    return [(s, seed) for s in params.finetune.strategies for seed in params.finetune.seeds]


def input_key(params: Params, root: Path, strategy: str, seed: int) -> outputs.Key:
    """One run's identity: the finetune and augment params (not which other strategies and seeds run: they
    do not change this run's result), the ingested target, the source model, the cached features (for
    linear_probe) and the ingested source (for strategies that train on it)."""
    upstream = [ingested_dir(params, root, "target"), source_model_dir(params, root)]
    upstream += [features_dir(params, root)] if strategy == "linear_probe" else []
    upstream += [ingested_dir(params, root, "source")] if strategies.uses_source(strategy) else []
    section = params.sections("finetune", "augment.target", "augment.source", exclude=("finetune.strategies", "finetune.seeds"))
    return outputs.input_key(f"finetune:{strategy}:{seed}", section, upstream)


def run_one(params: Params, root: Path, strategy: str, seed: int) -> dict:
    out = output_dir(params, root, strategy, seed)
    tgt, src, feats = ingested_dir(params, root, "target"), source_model_dir(params, root), features_dir(params, root)
    src_data = ingested_dir(params, root, "source")
    key = input_key(params, root, strategy, seed)
    label = f"finetune[{strategy},seed={seed}]"
    if distributed.from_main(outputs.is_current(out, key)):  # several processes: the first one's reading
        log.info("%s: up to date", label)
        return {"strategy": strategy, "seed": seed, "path": str(out), "digest": outputs.digest(out), "cached": True}
    ctx = strategies.Context(
        params=params,
        source_dir=src,
        features_dir=feats,
        labeled=store.load_split(tgt, "train", labeled=True),
        val=store.load_split(tgt, "val"),
        transform=pipeline(params, "target"),
        dev=device(),
        seed=seed,
        pool=store.load_split(tgt, "train", labeled=False),
        source=store.load_split(src_data, "train") if strategies.uses_source(strategy) else None,
        source_val=store.load_split(src_data, "val"),
        source_transform=pipeline(params, "source"),
    )
    adapted = strategies.get(strategy)(ctx)
    val_acc = adapted.val_acc if math.isfinite(adapted.val_acc) else None  # None: its rule scored no target val accuracy
    adapted.config.extra.update({"seed": seed, "selection": adapted.selection, "val_acc": val_acc,
                                 "selection_score": adapted.score, "best_epoch": adapted.best_epoch})
    adapted.config.extra["processes"] = distributed.world()
    if distributed.is_main():  # in several processes (torchrun) every copy holds the same model: one writes
        with outputs.atomic_dir(out, "finetune", key) as tmp:
            save(adapted.model.cpu(), adapted.config, tmp)
            (tmp / "history.json").write_text(json.dumps(adapted.history, indent=2))
    distributed.barrier()
    # which checkpoint: epoch 0 is the model before any training step (its score may beat every epoch's)
    epoch = {None: "", 0: "; epoch 0, before training"}.get(adapted.best_epoch, f"; epoch {adapted.best_epoch}")
    if val_acc is None:
        log.info("%s: selection score %s (%s%s)", label, "n/a" if adapted.score is None else f"{adapted.score:.4f}", adapted.selection, epoch)
    else:
        log.info("%s: target val acc %.4f (%s%s)", label, val_acc, adapted.selection, epoch)
    warn_no_pseudo_labels(label, adapted.history, params)
    return {"strategy": strategy, "seed": seed, "path": str(out), "digest": outputs.digest(out), "cached": False, "val_acc": val_acc}


def max_pseudo_label_rate(history: list[dict]) -> float | None:
    """A fixmatch run's highest share of pool images pseudo-labeled in an epoch (0: its loss trained nothing);
    None for a run without fixmatch."""
    rates = [r["pseudo_label_rate"] for r in history if r.get("pseudo_label_rate") is not None]
    return float(max(rates)) if rates else None


def diverged_at(history: list[dict]) -> int | None:
    """The epoch whose training loss was not finite (training stops there: ``training.fit``), or None. Epoch 0,
    scored before training, has no loss."""
    return next((r["epoch"] for r in history if r.get("epoch", 0) > 0 and not math.isfinite(r.get("train_loss", 0.0))), None)


def warn_no_pseudo_labels(label: str, history: list[dict], params: Params) -> None:
    """Say so when fixmatch trained on nothing: no pool image reached its threshold in any epoch (its loss was 0
    throughout). The run still counts as trained, so the table alone would not show it (evaluate's report says it too)."""
    if max_pseudo_label_rate(history) != 0:
        return
    rates = [r for r in history if r.get("pseudo_label_rate") is not None]
    k = params.target.k
    log.warning("%s: no pool image reached finetune.fixmatch.threshold=%s in any of %d epochs (pseudo_label_rate 0): its "
                "fixmatch loss trained nothing%s. Lower the threshold, or start from a model more confident on the target",
                label, params.finetune.fixmatch.threshold, len(rates),
                "; at target.k=0 no label trains anything either" if k == 0 else "")


def selected(params: Params, strategy: str | None = None, seed: int | None = None) -> list[tuple[str, int]]:
    """The (strategy, seed) pairs in params, optionally narrowed to one strategy and/or one seed."""
    pairs = [(s, k) for s, k in runs(params) if (strategy is None or s == strategy) and (seed is None or k == seed)]
    if not pairs:
        raise ValueError(f"nothing to run: strategy={strategy!r} seed={seed!r} are not in finetune.strategies/seeds")
    return pairs


def run(params: Params, root: Path = Path("."), strategy: str | None = None, seed: int | None = None) -> dict:
    """Run the (strategy, seed) pairs in params, optionally narrowed to one strategy and/or one seed."""
    results = [run_one(params, root, s, k) for s, k in selected(params, strategy, seed)]
    return {"path": str(output_dir(params, root)), "runs": results}
