"""pretrain: train a timm backbone on the source domain, from a random start or from given weights.

Optimises cross-entropy on source train with ``augment.source`` applied on the fly; the checkpoint is the
epoch with the best source val accuracy. ``pretrain.weights`` starts from a local weights file (timm's
``pretrained_cfg_overlay``: e.g. ImageNet weights, or a source model trained elsewhere) or timm's hub
weights. A file whose classifier fits the source classes is a source model already: it competes as epoch 0,
and with ``pretrain.epochs: 0`` it is the source model as it is. Weights go to safetensors with a JSON
config that records what training started from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from adaptflow import distributed, outputs
from adaptflow.data import store
from adaptflow.models import ModelConfig, head_refused, save, start, weights_digest, weights_file
from adaptflow.params import Params
from adaptflow.stages.augment import pipeline
from adaptflow.stages.ingest import output_dir as ingested_dir
from adaptflow.stages.ingest import unwatched
from adaptflow.training import fit, seed_everything

log = logging.getLogger(__name__)


def output_dir(params: Params, root: Path) -> Path:
    return Path(root) / params.paths.source_model


def input_key(params: Params, root: Path) -> outputs.Key:
    """This stage's identity: pretrain params (not ``weights_dep``, which only tells DVC what to watch), seed,
    the source augmentation, the ingested source and the content of the weights file it starts from
    (:func:`weights_now`)."""
    return outputs.input_key("pretrain", params.sections("pretrain", "seed", "augment.source", exclude=("pretrain.weights_dep",)),
                             [ingested_dir(params, root, "source")], raw=weights_now(params, root))


def weights_now(params: Params, root: Path) -> str:
    """The fingerprint of what training starts from: the weights file's sha256, ``hub``, or "" (random)."""
    return weights_digest(params.pretrain.weights, root)


def splits(params: Params, root: Path = Path(".")) -> tuple[store.Split, store.Split]:
    """Source train and val, as pretraining reads them."""
    src = ingested_dir(params, root, "source")
    return store.load_split(src, "train"), store.load_split(src, "val")


def run(params: Params, root: Path = Path(".")) -> dict:
    out = output_dir(params, root)
    src = ingested_dir(params, root, "source")
    key = input_key(params, root)
    if distributed.from_main(outputs.is_current(out, key)):  # several processes: the first one's reading
        log.info("pretrain: up to date (%s)", out)
        return {"path": str(out), "digest": outputs.digest(out), "cached": True}
    card = store.read_card(src)
    train, val = splits(params, root)
    p = params.pretrain
    cfg = ModelConfig(p.model, card["channels"], card["image_size"], card["classes"], {"domain": card["domain"], "role": "source"},
                      input_size=p.input_size)
    path = weights_file(p.weights, root)
    if path is not None:
        why = unwatched(path, "pretrain.weights_dep", p.weights_dep, p.weights, root)
        if why:
            log.warning("pretrain: %s", why)  # (this stage's logger: it is pretrain that says it)
    seed_everything(params.seed)  # the initial weights are part of what the seed fixes
    model, began = start(cfg, p.weights, root)
    why_new = f": {began['head_why']}" if began.get("head_why") else ""  # a file of other classes says which
    if began["weights"] is not None:
        log.info("pretrain: %s starts from %s (classifier %s)", p.model, p.weights,
                 f"kept: one output per source class, matched {began['head_classes']}" if began["head"] == "kept" else "new" + why_new)
    if p.epochs == 0 and began.get("head") != "kept":
        raise head_refused(p.weights, len(cfg.classes), began.get("head_why", ""))
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
        evaluate_start=began.get("head") == "kept",  # a source model given whole competes as epoch 0
        desc="pretrain",
    )
    cfg.extra.update({"source_val_acc": res.best_val_acc, "best_epoch": res.best_epoch, "selection": "source " + res.selection,
                      "init": began})
    cfg.extra["processes"] = distributed.world()
    if distributed.is_main():  # in several processes (torchrun) every copy holds the same model: one writes
        with outputs.atomic_dir(out, "pretrain", key) as tmp:
            save(model, cfg, tmp)
            (tmp / "history.json").write_text(json.dumps(res.history, indent=2))
    distributed.barrier()
    log.info("pretrain: %s source val acc %.4f (epoch %d)", p.model, res.best_val_acc, res.best_epoch)
    return {"path": str(out), "digest": outputs.digest(out), "cached": False, "source_val_acc": res.best_val_acc}
