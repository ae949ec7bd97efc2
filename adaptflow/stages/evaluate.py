"""evaluate: every strategy and seed on target test, side by side with the baselines.

The champion candidate is chosen here on target **val**: the non-baseline strategy with the best mean val
accuracy over seeds, and within it the seed with the best val accuracy. Test numbers are reported for every
run, and as mean ± std over seeds, but choose nothing. Writes ``metrics.json`` (DVC metrics),
``comparison.csv`` (one row per strategy and seed), ``comparison.md`` and confusion-matrix PNGs.
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
from adaptflow.stages.finetune import runs
from adaptflow.stages.ingest import output_dir as ingested_dir
from adaptflow.training import accuracy, predict_logits

log = logging.getLogger(__name__)

SELECTION = "max mean target val accuracy over seeds among non-baseline strategies (ties: list order); then the seed with max val accuracy"
NOT_CANDIDATES = ("oracle",)  # reported, never promoted


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


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per strategy (std is 0 for one seed), in the strategies' order."""
    order = list(dict.fromkeys(runs["strategy"]))
    g = runs.groupby("strategy", sort=False)[["val_acc", "test_acc", "test_macro_f1"]]
    out = g.mean().join(g.std(ddof=1).fillna(0.0), rsuffix="_std").join(g.size().rename("n_seeds"))
    return out.loc[order]


def choose_candidate(summary: pd.DataFrame, baselines: list[str]) -> str | None:
    """The strategy with the best mean target val accuracy, baselines (and oracle) excluded.

    ``summary`` is indexed by strategy with a ``val_acc`` column (the mean over seeds).
    """
    pool = summary[~summary.index.isin(list(baselines) + list(NOT_CANDIDATES))]
    if pool.empty:
        return None
    return str(pool["val_acc"].idxmax())


def compare(summary: pd.DataFrame, candidate: str | None, baselines: list[str]) -> dict:
    """Transfer gains of the candidate (mean test accuracy over seeds) and the strategies whose mean test
    accuracy falls below scratch (negative transfer)."""
    gain = {}
    if candidate is not None:
        for b in baselines:
            gain[f"over_{b}"] = float(summary.loc[candidate, "test_acc"] - summary.loc[b, "test_acc"])
    negative = []
    if "scratch" in summary.index:
        negative = [s for s in summary.index if s != "scratch" and summary.loc[s, "test_acc"] < summary.loc["scratch", "test_acc"]]
    return {"transfer_gain": gain, "negative_transfer": negative}


def to_markdown(summary: pd.DataFrame, candidate: str | None, selections: dict[str, str]) -> str:
    pm = lambda r, k: f"{r[k]:.4f} ± {r[k + '_std']:.4f}" if r["n_seeds"] > 1 else f"{r[k]:.4f}"  # noqa: E731
    lines = ["| strategy | seeds | val acc | test acc | test macro-F1 | gain vs scratch | checkpoint chosen by |",
             "|---|---|---|---|---|---|---|"]
    scratch = summary.loc["scratch", "test_acc"] if "scratch" in summary.index else np.nan
    for s, r in summary.iterrows():
        mark = " **(candidate)**" if s == candidate else ""
        gain = f"{r.test_acc - scratch:+.4f}" if not np.isnan(scratch) else "n/a"
        lines.append(f"| {s}{mark} | {int(r.n_seeds)} | {pm(r, 'val_acc')} | {pm(r, 'test_acc')} | {pm(r, 'test_macro_f1')} | {gain} | {selections[s]} |")
    lines.append("")
    lines.append(f"Candidate chosen by: {SELECTION}. Test accuracy chooses nothing. Values are mean ± std over seeds.")
    return "\n".join(lines) + "\n"


def run(params: Params, root: Path = Path(".")) -> dict:
    out = output_dir(params, root)
    tgt = ingested_dir(params, root, "target")
    pairs = runs(params)
    upstream = [tgt] + [adapted_dir(params, root, s, k) for s, k in pairs]
    key = outputs.input_key("evaluate", params.section_hash("evaluate", "finetune.strategies", "finetune.seeds"), upstream)
    if outputs.is_current(out, key):
        log.info("evaluate: up to date (%s)", out)
        return {"path": str(out), "digest": outputs.digest(out), "cached": True, "metrics": json.loads((out / "metrics.json").read_text())}
    test, val = store.load_split(tgt, "test"), store.load_split(tgt, "val")
    rows, cms, selections = [], {}, {}
    for s, seed in pairs:
        model, cfg = load(adapted_dir(params, root, s, seed))
        pred = predict_logits(model, test.images).argmax(1).numpy()
        rows.append({
            "strategy": s,
            "seed": seed,
            "val_acc": accuracy(predict_logits(model, val.images), val.labels),
            "test_acc": float((pred == test.labels).mean()),
            "test_macro_f1": float(f1_score(test.labels, pred, average="macro")),
        })
        selections[s] = cfg.extra.get("selection", "")
        cms[(s, seed)] = confusion_matrix(test.labels, pred, labels=range(len(test.classes)))
    table = pd.DataFrame(rows)
    summary = summarise(table)
    candidate = choose_candidate(summary, params.evaluate.baselines)
    candidate_seed = None
    if candidate is not None:
        mine = table[table.strategy == candidate]
        candidate_seed = int(mine.loc[mine["val_acc"].idxmax(), "seed"])
    metrics = {
        "strategies": {s: {**{k: float(r[k]) for k in ("val_acc", "test_acc", "test_macro_f1", "val_acc_std", "test_acc_std", "test_macro_f1_std")},
                           "n_seeds": int(r["n_seeds"]), "selection": selections[s]} for s, r in summary.iterrows()},
        "runs": rows,
        "candidate": candidate,
        "candidate_seed": candidate_seed,
        "candidate_selection": SELECTION,
        "n_test": len(test),
        "n_val": len(val),
        "test_data_hash": store.read_card(tgt)["data_hash"],
        **compare(summary, candidate, params.evaluate.baselines),
    }
    with outputs.atomic_dir(out, "evaluate", key) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        table.to_csv(tmp / "comparison.csv", index=False)
        (tmp / "comparison.md").write_text(to_markdown(summary, candidate, selections))
        for (s, seed), cm in cms.items():
            acc = table[(table.strategy == s) & (table.seed == seed)].test_acc.iloc[0]
            _confusion_png(cm, test.classes, f"{s} seed {seed}: test acc {acc:.3f}", tmp / f"confusion_{s}_seed{seed}.png")
    log.info("evaluate: candidate %s seed %s (%s)", candidate, candidate_seed, SELECTION)
    return {"path": str(out), "digest": outputs.digest(out), "cached": False, "metrics": metrics}
