"""augment: the on-the-fly augmentation pipelines, resolved and previewed.

Training applies ``augment.source`` / ``augment.target`` on the fly (see ``pipeline``). This stage checks
that each builds, records the resolved pipelines, and renders a preview grid per role (the first row is the
original images, the others augmented draws) so a person sees what the model will be trained on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from adaptflow import outputs
from adaptflow.data import store
from adaptflow.data.transforms import apply_per_sample, build_pipeline
from adaptflow.params import ROLES, Params
from adaptflow.stages.ingest import output_dir as ingested_dir

log = logging.getLogger(__name__)


def pipeline(params: Params, role: str) -> v2.Transform:
    return build_pipeline([t.model_dump() for t in getattr(params.augment, role)])


def output_dir(params: Params, root: Path) -> Path:
    return Path(root) / params.paths.augmented


def _grid(rows: list[np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(rows[0])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * 0.8, n_rows * 0.8), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255)
            ax.set_axis_off()
    axes[0][0].set_title("original", fontsize=7, loc="left")
    fig.tight_layout(pad=0.1)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(params: Params, root: Path = Path(".")) -> dict:
    out = output_dir(params, root)
    upstream = [ingested_dir(params, root, r) for r in ROLES]
    key = outputs.input_key("augment", params.section_hash("augment", "seed"), upstream)
    if outputs.is_current(out, key):
        log.info("augment: up to date (%s)", out)
        return {"path": str(out), "digest": outputs.digest(out), "cached": True}
    torch.manual_seed(params.seed)
    with outputs.atomic_dir(out, "augment", key) as tmp:
        resolved = {}
        for role in ROLES:
            pipe = pipeline(params, role)
            resolved[role] = repr(pipe)
            split = store.load_split(ingested_dir(params, root, role), "train", labeled=True if role == "target" else None)
            n = min(params.augment.preview_n, len(split), 16)
            pick = np.sort(np.random.default_rng(params.seed).choice(len(split), size=n, replace=False))
            originals = torch.from_numpy(np.ascontiguousarray(split.images[pick]))
            rows = [originals.numpy()] + [apply_per_sample(pipe, originals).numpy() for _ in range(3)]
            _grid(rows, tmp / f"preview_{role}.png")
        (tmp / "pipelines.json").write_text(json.dumps(resolved, indent=2))
    log.info("augment: previews in %s", out)
    return {"path": str(out), "digest": outputs.digest(out), "cached": False}
