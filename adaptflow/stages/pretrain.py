"""pretrain: train a timm backbone on the source domain.

Optimises cross-entropy on source train with ``augment.source`` applied on the fly; the checkpoint is the
epoch with the best source val accuracy. Weights go to safetensors with a JSON config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from adaptflow import outputs
from adaptflow.data import store
from adaptflow.models import ModelConfig, create, save
from adaptflow.params import Params
from adaptflow.stages.augment import pipeline
from adaptflow.stages.ingest import output_dir as ingested_dir
from adaptflow.training import fit, seed_everything

log = logging.getLogger(__name__)


def output_dir(params: Params, root: Path) -> Path:
    return Path(root) / params.paths.source_model


def input_key(params: Params, root: Path) -> outputs.Key:
    """This stage's identity: pretrain params, seed, the source augmentation and the ingested source."""
    return outputs.input_key("pretrain", params.sections("pretrain", "seed", "augment.source"),
                             [ingested_dir(params, root, "source")])


def splits(params: Params, root: Path = Path(".")) -> tuple[store.Split, store.Split]:
    """Source train and val, as pretraining reads them."""
    src = ingested_dir(params, root, "source")
    return store.load_split(src, "train"), store.load_split(src, "val")


def run(params: Params, root: Path = Path(".")) -> dict:
    out = output_dir(params, root)
    src = ingested_dir(params, root, "source")
    key = input_key(params, root)
    if outputs.is_current(out, key):
        log.info("pretrain: up to date (%s)", out)
        return {"path": str(out), "digest": outputs.digest(out), "cached": True}
    card = store.read_card(src)
    train, val = splits(params, root)
    p = params.pretrain
    cfg = ModelConfig(p.model, card["channels"], card["image_size"], card["classes"], {"domain": card["domain"], "role": "source"},
                      input_size=p.input_size)
    seed_everything(params.seed)  # the initial weights are part of what the seed fixes
    model = create(cfg)
    res = fit(
        model,
        [{"params": model.parameters(), "lr": p.lr}],
        train,
        val,
        epochs=p.epochs,
        batch_size=p.batch_size,
        transform=pipeline(params, "source"),
        seed=params.seed,
        weight_decay=p.weight_decay,
        desc="pretrain",
    )
    cfg.extra.update({"source_val_acc": res.best_val_acc, "best_epoch": res.best_epoch, "selection": "source " + res.selection})
    with outputs.atomic_dir(out, "pretrain", key) as tmp:
        save(model, cfg, tmp)
        (tmp / "history.json").write_text(json.dumps(res.history, indent=2))
    log.info("pretrain: %s source val acc %.4f (epoch %d)", p.model, res.best_val_acc, res.best_epoch)
    return {"path": str(out), "digest": outputs.digest(out), "cached": False, "source_val_acc": res.best_val_acc}
