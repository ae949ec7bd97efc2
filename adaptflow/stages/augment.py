"""augment: the on-the-fly augmentation pipelines, resolved, previewed and (optionally) materialised.

Training applies ``augment.source`` / ``augment.target`` on the fly (see :func:`pipeline`): each role's
preset, ``downsample`` and explicit transforms resolve to one flat list of torchvision v2 specs. This
stage is the first to see both ingested roles, so it also

- records the resolved pipelines (``pipelines.json``) and renders a preview grid per role (first row the
  original images, the others augmented draws) so a person sees what the model will be trained on;
- refuses a source that holds target val or test images (:func:`check_no_overlap`): the source model would
  be trained on images it is then scored on;
- matches the label sets by name (``classes.json``): a target class unknown to the source is fine for
  fine-tuning (the head is re-initialised) but is reported, because the source-only baseline cannot
  predict it;
- materialises ``augment.n_views`` augmented copies of the small labeled target set
  (``views_target.npy`` + ``views_target.parquet``), deterministic by ``seed``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchvision.transforms import v2

from adaptflow import outputs
from adaptflow.data import store
from adaptflow.data.batch_augment import BatchAugment
from adaptflow.data.domains import check_shared_classes
from adaptflow.data.files import DataError
from adaptflow.data.transforms import build_pipeline
from adaptflow.params import ROLES, Params
from adaptflow.stages.ingest import output_dir as ingested_dir

log = logging.getLogger(__name__)

VIEWS = "views_target"


def pipeline(params: Params, role: str) -> v2.Transform:
    return build_pipeline(getattr(params.augment, role).specs())


def output_dir(params: Params, root: Path) -> Path:
    return Path(root) / params.paths.augmented


def class_match(source: list[str], target: list[str]) -> dict:
    """Source and target label sets matched by name, in the target's recorded order."""
    unknown = [c for c in target if c not in source]
    return {
        "source": list(source),
        "target": list(target),
        "shared": [c for c in target if c in source],
        "target_unknown_to_source": unknown,
        "source_unused": [c for c in source if c not in target],
        "source_head_reusable": not unknown,
    }


def views(pipe: v2.Transform, images: np.ndarray, n_views: int, seed: int) -> list[np.ndarray]:
    """``n_views`` augmented copies of ``images`` (uint8 N×C×H×W): the same seed gives the same bytes.

    The same batched augmentation training runs (:class:`BatchAugment`, parameters per image, all drawn
    from its own generator: the caller's RNG is left untouched).
    """
    augment = BatchAugment(pipe, seed)
    batch = torch.from_numpy(np.ascontiguousarray(images))
    return [augment(batch).numpy() for _ in range(n_views)]


def _grid(rows: list[np.ndarray], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(rows[0]), 1)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(max(n_cols * 0.8, 2.4), n_rows * 0.8 + 0.3), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c < len(row):
                img = row[c]
                ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255)
    fig.suptitle(f"{title} — row 1: originals; rows 2–{n_rows}: augmented draws", fontsize=7)
    fig.tight_layout(pad=0.1)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _preview_split(d: Path, role: str) -> store.Split:
    """The images a role trains on: source train; the labeled target set (the pool when target.k = 0)."""
    if role == "source":
        return store.load_split(d, "train")
    labeled = store.load_split(d, "train", labeled=True)
    return labeled if len(labeled) else store.load_split(d, "train")


def _materialise(params: Params, tmp: Path, tgt: Path) -> int:
    labeled = store.load_split(tgt, "train", labeled=True)
    n = params.augment.n_views
    if not n or not len(labeled):
        return 0
    meta = store.read_meta(tgt)
    rows = meta[(meta.split == "train") & meta.labeled].reset_index(drop=True)
    writer = store.ImageWriter(tmp, labeled.images.shape[1:], name=VIEWS + ".npy")
    for batch in views(pipeline(params, "target"), labeled.images, n, params.seed):
        for im in batch:
            writer.append(im)
    writer.finish()
    table = pd.DataFrame({
        "view": np.repeat(np.arange(n), len(rows)),
        "row": np.tile(np.arange(len(rows)), n),
        "source_index": np.tile(rows.source_index.to_numpy(), n),
        "label": np.tile(labeled.labels, n),
        "class_name": np.tile(rows.class_name.to_numpy(), n),
        "original_sha1": np.tile(rows.sha1.to_numpy(), n),
    })
    table.to_parquet(tmp / f"{VIEWS}.parquet", index=False)
    return writer.count


def overlap_path(params: Params, root: Path) -> Path:
    return Path(root) / params.paths.reports / "augment_overlap.json"


def check_no_overlap(params: Params, root: Path) -> None:
    """Refuse a source holding images pixel-identical (as stored) to target val or test images: pretraining on
    them would let every target number, and the checkpoint and candidate choices on val, see images the
    source model was trained on. Every such pair is listed in :func:`overlap_path`. Target train may share
    images with the source: nothing is scored on it."""
    src = store.read_meta(ingested_dir(params, root, "source"), ["item", "split", "sha1"])
    tgt = store.read_meta(ingested_dir(params, root, "target"), ["item", "split", "sha1"])
    held = tgt[tgt["split"].isin(["val", "test"])]
    shared = held.merge(src, on="sha1", suffixes=("_target", "_source"))
    path = overlap_path(params, root)
    pairs = [{"target": r.item_target, "target_split": r.split_target, "source": r.item_source, "source_split": r.split_source,
              "sha1": r.sha1} for r in shared.itertuples()]
    # Written when clean too, and then the same bytes whatever the data and domains: pretrain's DVC dependency
    # on the check (run it first), which new target data, another target or a preview setting leaves unchanged.
    record = json.dumps({"source": params.source.domain, "target": params.target.domain, "n_pairs": len(pairs), "pairs": pairs}
                        if pairs else {"n_pairs": 0, "pairs": []}, indent=2)
    if not (path.is_file() and path.read_text() == record):
        outputs.atomic_write_text(path, record)
    if shared.empty:
        return
    per_split = shared.drop_duplicates("item_target")["split_target"].value_counts().to_dict()
    first = pairs[0]
    raise DataError(
        f"the source ({params.source.domain}) holds {len(set(shared['item_source']))} image(s) identical to target "
        f"val/test images ({', '.join(f'{n} {s}' for s, n in sorted(per_split.items()))} of {params.target.domain}), e.g. source "
        f"{first['source']} = target {first['target']} ({first['target_split']}): the source model would be trained on images "
        f"it is then scored on. Remove them from the source or the target data; every pair is listed in {path}")


def input_key(params: Params, root: Path) -> outputs.Key:
    """This stage's identity: the augment params and seed, and the digests of both ingested roles."""
    upstream = [ingested_dir(params, root, r) for r in ROLES]
    return outputs.input_key("augment", params.sections("augment", "seed"), upstream)


def run(params: Params, root: Path = Path(".")) -> dict:
    out = output_dir(params, root)
    key = input_key(params, root)
    check_no_overlap(params, root)  # first, and even when up to date: it also writes the record DVC tracks
    cards = {r: store.read_card(ingested_dir(params, root, r)) for r in ROLES}
    match = class_match(cards["source"]["classes"], cards["target"]["classes"])
    # now, not after pretraining and the other strategies; also when up to date (the list may change, this key not)
    check_shared_classes(params.finetune.strategies, match["target"], match["source"], params.finetune.selection)
    if outputs.is_current(out, key):
        log.info("augment: up to date (%s)", out)
        return {"path": str(out), "digest": outputs.digest(out), "cached": True}
    if match["target_unknown_to_source"]:
        log.warning("augment: target class(es) %s are unknown to the source (%s): fine-tuning re-initialises the head; "
                    "the source_only baseline cannot predict them", match["target_unknown_to_source"], cards["source"]["domain"])
    native = cards["target"].get("native", {}).get("native_size")
    if native:
        log.info("augment: target native resolution %d px (augment.source.downsample: %s)", native, params.augment.source.downsample or "off")
    with outputs.atomic_dir(out, "augment", key) as tmp:
        resolved = {}
        for role in ROLES:
            specs = getattr(params.augment, role).specs()
            pipe = build_pipeline(specs)
            resolved[role] = {"specs": specs, "pipeline": repr(pipe)}
            split = _preview_split(ingested_dir(params, root, role), role)
            n = min(params.augment.preview_n, len(split), 16)
            if not n:
                continue
            pick = np.sort(np.random.default_rng(params.seed).choice(len(split), size=n, replace=False))
            _grid([split.images[pick]] + views(pipe, split.images[pick], 3, params.seed), tmp / f"preview_{role}.png", f"{role}: {cards[role]['domain']}")
        n_views = _materialise(params, tmp, ingested_dir(params, root, "target"))
        (tmp / "pipelines.json").write_text(json.dumps(resolved, indent=2))
        (tmp / "classes.json").write_text(json.dumps({**match, "target_native_size": native}, indent=2))
    log.info("augment: previews%s in %s", f" and {n_views} target views" if n_views else "", out)
    return {"path": str(out), "digest": outputs.digest(out), "cached": False, "n_views": n_views, "classes": match}
