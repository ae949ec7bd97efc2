"""register: record the run in MLflow, register the candidate, and move ``champion`` only through the gate.

The candidate was chosen by evaluate on target val (strategy by mean val accuracy over seeds, then its
best-val seed). The gate then reads target test once: the candidate strategy's mean test accuracy over
seeds must beat ``scratch`` and ``source_only`` (means too) by ``register.margin``, and the candidate model
must beat the current champion re-scored on the same test images (so a champion registered on other data is
compared fairly). A candidate that fails
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
from adaptflow.stages.finetune import runs
from adaptflow.stages.ingest import output_dir as ingested_dir
from adaptflow.stages.pretrain import output_dir as source_model_dir

log = logging.getLogger(__name__)


def output_path(params: Params, root: Path) -> Path:
    return Path(root) / params.paths.reports / "registry.json"


def gate(
    candidate_acc: float,
    baseline_accs: dict[str, float],
    champion_acc: float | None,
    margin: float,
    candidate_model_acc: float | None = None,
) -> tuple[bool, list[str]]:
    """Whether the candidate may become champion, and why (one reason per check).

    ``candidate_acc`` and ``baseline_accs`` are the strategies' mean test accuracies over seeds;
    ``candidate_model_acc`` is the registered model's own (defaults to ``candidate_acc``), which is what
    the champion — one model — is compared with.
    """
    ok, reasons = True, []
    model_acc = candidate_acc if candidate_model_acc is None else candidate_model_acc
    for name, acc in baseline_accs.items():
        passed = round(candidate_acc - acc, 9) > margin  # rounded: "by exactly the margin" is not a float accident
        ok &= passed
        reasons.append(f"{'beats' if passed else 'does not beat'} {name} ({candidate_acc:.4f} vs {acc:.4f}, margin {margin})")
    if champion_acc is None:
        reasons.append("no current champion")
    else:
        passed = round(model_acc - champion_acc, 9) > 0
        ok &= passed
        reasons.append(f"{'beats' if passed else 'does not beat'} current champion ({model_acc:.4f} vs {champion_acc:.4f} on this test set)")
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
    pairs = runs(params)
    upstream = [ev_dir, tgt, src, source_model_dir(params, root)] + [adapted_dir(params, root, s, k) for s, k in pairs]
    key = outputs.input_key("register", params.section_hash("register", "evaluate", "finetune.strategies", "finetune.seeds"), upstream)
    name = params.registered_model_name()
    tracking_uri = tracking.configure(root)
    if out.is_file():
        previous = json.loads(out.read_text())
        if previous.get("key") == key and previous.get("tracking_uri") == tracking_uri and previous.get("version") and tracking.version_exists(name, previous["version"]):
            log.info("register: up to date (version %s of %s)", previous["version"], name)
            return {**previous, "cached": True}

    metrics = json.loads((ev_dir / "metrics.json").read_text())
    candidate, candidate_seed = metrics["candidate"], metrics["candidate_seed"]
    per = metrics["strategies"]  # mean over seeds per strategy
    per_run = {(r["strategy"], r["seed"]): r for r in metrics["runs"]}
    best_seed = {s: max((r for r in metrics["runs"] if r["strategy"] == s), key=lambda r: r["val_acc"])["seed"] for s in per}
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
        tracking.log_metrics({f"{s}.{k}": v for s, m in per.items() for k, v in m.items() if isinstance(v, (int, float))})
        run_ids, model_uris = {}, {}
        for s, seed in pairs:
            name_run = f"{s}[seed={seed}]"
            with tracking.start_run(name_run, nested=True, tags={**tags, "strategy": s, "seed": seed}) as rid:
                run_ids[name_run] = rid
                r = per_run[(s, seed)]
                tracking.log_metrics({k: r[k] for k in ("val_acc", "test_acc", "test_macro_f1")})
                history = json.loads((adapted_dir(params, root, s, seed) / "history.json").read_text())
                for row in history:
                    tracking.log_metrics({k: v for k, v in row.items() if k != "epoch" and v == v}, step=row["epoch"])
                # A loadable model for each non-baseline strategy's best-val seed (the registered one among them).
                if s not in params.evaluate.baselines and seed == best_seed[s]:
                    model_uris[s] = tracking.log_image_model(adapted_dir(params, root, s, seed), test.classes, example)

    decision: dict = {"key": key, "tracking_uri": tracking_uri, "model_name": name, "parent_run_id": parent_id, "run_ids": run_ids,
                      "candidate": candidate, "candidate_selection": metrics["candidate_selection"], "time": time.time()}
    if candidate is None:
        decision.update({"version": None, "promoted": False, "reasons": ["no non-baseline strategy ran"]})
    else:
        cand_mean = per[candidate]["test_acc"]
        cand_acc = per_run[(candidate, candidate_seed)]["test_acc"]
        champion = tracking.alias_version(name, "champion")
        champion_acc = None
        if champion is not None:
            pred = tracking.load_model(f"models:/{name}/{champion}").predict(pd.DataFrame({"image": [_png_b64(im) for im in test.images]}))
            champion_acc = float((pred["label"].to_numpy() == np.array(test.classes)[test.labels]).mean())
        promoted, reasons = gate(cand_mean, {b: per[b]["test_acc"] for b in params.evaluate.baselines}, champion_acc,
                                 params.register.margin, candidate_model_acc=cand_acc)
        version = tracking.register(model_uris[candidate], name, {**tags, "strategy": candidate, "seed": candidate_seed,
                                                                   "val_acc": per_run[(candidate, candidate_seed)]["val_acc"],
                                                                   "test_acc": cand_acc, "strategy_mean_test_acc": cand_mean,
                                                                   "selection": metrics["candidate_selection"]})
        tracking.set_version_tags(name, version, {"gate": "promoted" if promoted else "rejected", "gate_reasons": "; ".join(reasons)})
        tracking.set_alias(name, "champion" if promoted else "challenger", version)
        decision.update({"version": version, "promoted": promoted, "reasons": reasons, "previous_champion": champion,
                         "previous_champion_test_acc": champion_acc, "candidate_seed": candidate_seed,
                         "candidate_test_acc": cand_acc, "candidate_mean_test_acc": cand_mean,
                         "champion": version if promoted else champion})
    outputs.atomic_write_text(out, json.dumps(decision, indent=2))
    log.info("register: %s version %s %s — %s", name, decision.get("version"), "→ champion" if decision["promoted"] else "not promoted", "; ".join(decision["reasons"]))
    return {**decision, "cached": False}
