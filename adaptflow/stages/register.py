"""register: record the run in MLflow, register the candidate, and move ``champion`` only through the gate.

The candidate was chosen by evaluate on target val. The gate then reads target test once: the candidate
must beat ``scratch`` and ``source_only`` by ``register.margin`` and beat the current champion, re-scored on
the same test images (so a champion registered on other data is compared fairly). A candidate that fails
gets the ``challenger`` alias. The decision goes to the version's tags and to ``reports/registry.json``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

from adaptflow import outputs
from adaptflow.data import store
from adaptflow.params import Params
from adaptflow.stages.evaluate import output_dir as evaluate_dir
from adaptflow.stages.finetune import output_dir as adapted_dir
from adaptflow.stages.ingest import output_dir as ingested_dir
from adaptflow.stages.pretrain import output_dir as source_model_dir

log = logging.getLogger(__name__)


def output_path(params: Params, root: Path) -> Path:
    return Path(root) / params.paths.reports / "registry.json"


def gate(candidate_acc: float, baseline_accs: dict[str, float], champion_acc: float | None, margin: float) -> tuple[bool, list[str]]:
    """Whether the candidate may become champion, and why (one reason per check)."""
    ok, reasons = True, []
    for name, acc in baseline_accs.items():
        passed = round(candidate_acc - acc, 9) > margin  # rounded: "by exactly the margin" is not a float accident
        ok &= passed
        reasons.append(f"{'beats' if passed else 'does not beat'} {name} ({candidate_acc:.4f} vs {acc:.4f}, margin {margin})")
    if champion_acc is None:
        reasons.append("no current champion")
    else:
        passed = candidate_acc > champion_acc
        ok &= passed
        reasons.append(f"{'beats' if passed else 'does not beat'} current champion ({candidate_acc:.4f} vs {champion_acc:.4f} on this test set)")
    return ok, reasons


def git_info(root: Path) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown", "git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower()}


def _png_b64(image_chw: np.ndarray) -> str:
    from PIL import Image

    arr = image_chw[0] if image_chw.shape[0] == 1 else image_chw.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def run(params: Params, root: Path = Path(".")) -> dict:
    from adaptflow import tracking  # MLflow is imported only by the stage that needs it

    out = output_path(params, root)
    ev_dir, tgt, src = evaluate_dir(params, root), ingested_dir(params, root, "target"), ingested_dir(params, root, "source")
    names = list(params.finetune.strategies)
    upstream = [ev_dir, tgt, src, source_model_dir(params, root)] + [adapted_dir(params, root, s) for s in names]
    key = outputs.input_key("register", params.section_hash("register", "evaluate", "finetune.strategies"), upstream)
    name = params.registered_model_name()
    tracking_uri = tracking.configure(root)
    if out.is_file():
        previous = json.loads(out.read_text())
        if previous.get("key") == key and previous.get("tracking_uri") == tracking_uri and previous.get("version") and tracking.version_exists(name, previous["version"]):
            log.info("register: up to date (version %s of %s)", previous["version"], name)
            return {**previous, "cached": True}

    metrics = json.loads((ev_dir / "metrics.json").read_text())
    candidate = metrics["candidate"]
    per = metrics["strategies"]
    tgt_card, src_card = store.read_card(tgt), store.read_card(src)
    tags = {
        **git_info(Path(root)),
        "target_domain": tgt_card["domain"],
        "source_domain": src_card["domain"],
        "target_data_hash": tgt_card["data_hash"],
        "source_data_hash": src_card["data_hash"],
        "source_model_digest": outputs.digest(source_model_dir(params, root)),
    }
    test = store.load_split(tgt, "test")
    example = _png_b64(test.images[0])

    with tracking.start_run(f"pipeline[{tgt_card['domain']}]", tags=tags) as parent_id:
        tracking.log_params(params.to_dict())
        tracking.log_artifacts(ev_dir, "evaluate")
        tracking.log_artifacts(tgt / store.CARD, "dataset_cards/target")
        tracking.log_artifacts(src / store.CARD, "dataset_cards/source")
        run_ids, model_uris = {}, {}
        for s in names:
            with tracking.start_run(s, nested=True, tags={**tags, "strategy": s}) as rid:
                run_ids[s] = rid
                tracking.log_metrics({k: v for k, v in per[s].items() if isinstance(v, (int, float))})
                history = json.loads((adapted_dir(params, root, s) / "history.json").read_text())
                for row in history:
                    tracking.log_metrics({k: v for k, v in row.items() if k != "epoch" and v == v}, step=row["epoch"])
                if s not in params.evaluate.baselines:
                    model_uris[s] = tracking.log_image_model(adapted_dir(params, root, s), test.classes, example)

    decision: dict = {"key": key, "tracking_uri": tracking_uri, "model_name": name, "parent_run_id": parent_id, "run_ids": run_ids,
                      "candidate": candidate, "candidate_selection": metrics["candidate_selection"], "time": time.time()}
    if candidate is None:
        decision.update({"version": None, "promoted": False, "reasons": ["no non-baseline strategy ran"]})
    else:
        cand_acc = per[candidate]["test_acc"]
        champion = tracking.alias_version(name, "champion")
        champion_acc = None
        if champion is not None:
            pred = tracking.load_model(f"models:/{name}/{champion}").predict(pd.DataFrame({"image": [_png_b64(im) for im in test.images]}))
            champion_acc = float((pred["label"].to_numpy() == np.array(test.classes)[test.labels]).mean())
        promoted, reasons = gate(cand_acc, {b: per[b]["test_acc"] for b in params.evaluate.baselines}, champion_acc, params.register.margin)
        version = tracking.register(model_uris[candidate], name, {**tags, "strategy": candidate, "val_acc": per[candidate]["val_acc"],
                                                                   "test_acc": cand_acc, "selection": metrics["candidate_selection"]})
        tracking.set_version_tags(name, version, {"gate": "promoted" if promoted else "rejected", "gate_reasons": "; ".join(reasons)})
        tracking.set_alias(name, "champion" if promoted else "challenger", version)
        decision.update({"version": version, "promoted": promoted, "reasons": reasons, "previous_champion": champion,
                         "previous_champion_test_acc": champion_acc, "candidate_test_acc": cand_acc,
                         "champion": version if promoted else champion})
    outputs.atomic_write_text(out, json.dumps(decision, indent=2))
    log.info("register: %s version %s %s — %s", name, decision.get("version"), "→ champion" if decision["promoted"] else "not promoted", "; ".join(decision["reasons"]))
    return {**decision, "cached": False}
