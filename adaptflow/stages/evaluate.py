"""evaluate: every strategy on target test, side by side with the baselines.

The champion candidate is chosen here on target **val** (best val accuracy among the non-baseline
strategies); test numbers are reported for every strategy but choose nothing. Writes ``metrics.json``
(DVC metrics), ``comparison.csv`` / ``comparison.md`` and one confusion-matrix PNG per strategy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score

from adaptflow import outputs
from adaptflow.data import store
from adaptflow.models import load
from adaptflow.params import Params
from adaptflow.stages.finetune import output_dir as adapted_dir
from adaptflow.stages.ingest import output_dir as ingested_dir
from adaptflow.training import accuracy, predict_logits

log = logging.getLogger(__name__)

SELECTION = "max target val accuracy among non-baseline strategies (ties: list order)"


def output_dir(params: Params, root: Path) -> Path:
    return Path(root) / params.paths.reports / "evaluate"


def _confusion_png(cm: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=6, color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def choose_candidate(rows: pd.DataFrame, baselines: list[str]) -> str | None:
    """The non-baseline strategy with the best target val accuracy; ``rows`` is indexed by strategy."""
    pool = rows[~rows.index.isin(baselines)]
    if pool.empty:
        return None
    return str(pool["val_acc"].idxmax())


def compare(rows: pd.DataFrame, candidate: str | None, baselines: list[str]) -> dict:
    """Transfer gains of the candidate and the strategies that fall below scratch (negative transfer)."""
    gain = {}
    if candidate is not None:
        for b in baselines:
            gain[f"over_{b}"] = float(rows.loc[candidate, "test_acc"] - rows.loc[b, "test_acc"])
    negative = []
    if "scratch" in rows.index:
        negative = [s for s in rows.index if s != "scratch" and rows.loc[s, "test_acc"] < rows.loc["scratch", "test_acc"]]
    return {"transfer_gain": gain, "negative_transfer": negative}


def to_markdown(rows: pd.DataFrame, candidate: str | None) -> str:
    lines = ["| strategy | val acc | test acc | test macro-F1 | gain vs scratch | checkpoint chosen by |", "|---|---|---|---|---|---|"]
    scratch = rows.loc["scratch", "test_acc"] if "scratch" in rows.index else np.nan
    for s, r in rows.iterrows():
        mark = " **(candidate)**" if s == candidate else ""
        gain = f"{r.test_acc - scratch:+.4f}" if not np.isnan(scratch) else "n/a"
        lines.append(f"| {s}{mark} | {r.val_acc:.4f} | {r.test_acc:.4f} | {r.test_macro_f1:.4f} | {gain} | {r.selection} |")
    lines.append("")
    lines.append(f"Candidate chosen by: {SELECTION}. Test accuracy chooses nothing.")
    return "\n".join(lines) + "\n"


def run(params: Params, root: Path = Path(".")) -> dict:
    out = output_dir(params, root)
    tgt = ingested_dir(params, root, "target")
    names = list(params.finetune.strategies)
    upstream = [tgt] + [adapted_dir(params, root, s) for s in names]
    key = outputs.input_key("evaluate", params.section_hash("evaluate", "finetune.strategies"), upstream)
    if outputs.is_current(out, key):
        log.info("evaluate: up to date (%s)", out)
        return {"path": str(out), "digest": outputs.digest(out), "cached": True, "metrics": json.loads((out / "metrics.json").read_text())}
    test, val = store.load_split(tgt, "test"), store.load_split(tgt, "val")
    records, cms = {}, {}
    for s in names:
        model, cfg = load(adapted_dir(params, root, s))
        pred = predict_logits(model, test.images).argmax(1).numpy()
        records[s] = {
            "val_acc": accuracy(predict_logits(model, val.images), val.labels),
            "test_acc": float((pred == test.labels).mean()),
            "test_macro_f1": float(f1_score(test.labels, pred, average="macro")),
            "selection": cfg.extra.get("selection", ""),
        }
        cms[s] = confusion_matrix(test.labels, pred, labels=range(len(test.classes)))
    rows = pd.DataFrame.from_dict(records, orient="index")
    candidate = choose_candidate(rows, params.evaluate.baselines)
    metrics = {
        "strategies": records,
        "candidate": candidate,
        "candidate_selection": SELECTION,
        "n_test": len(test),
        "n_val": len(val),
        "test_data_hash": store.read_card(tgt)["data_hash"],
        **compare(rows, candidate, params.evaluate.baselines),
    }
    with outputs.atomic_dir(out, "evaluate", key) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        rows.rename_axis("strategy").to_csv(tmp / "comparison.csv")
        (tmp / "comparison.md").write_text(to_markdown(rows, candidate))
        for s, cm in cms.items():
            _confusion_png(cm, test.classes, f"{s}: test acc {records[s]['test_acc']:.3f}", tmp / f"confusion_{s}.png")
    log.info("evaluate: candidate %s (%s)", candidate, SELECTION)
    return {"path": str(out), "digest": outputs.digest(out), "cached": False, "metrics": metrics}
