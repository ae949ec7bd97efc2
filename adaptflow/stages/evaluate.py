"""evaluate: every strategy and seed on target test, side by side with the baselines.

The champion candidate is chosen here without the test split: the non-baseline strategy with the best mean
target **val** accuracy over seeds (ties: the lowest mean val NLL — a small val split saturates near 100 %),
and within it the seed with the best val accuracy. When the target has
no labels (``target.k`` = 0) the val labels are not the user's to use, so the candidate is chosen by a
label-free score on the unlabeled target pool instead. Test numbers are reported for every run, and as
mean ± std over seeds, but choose nothing; the strategies in ``NOT_CANDIDATES`` (``oracle``) are reported and
never chosen.

Writes, into ``reports/evaluate/``:
- ``metrics.json``: the numbers, for ``dvc metrics show/diff`` (per strategy, per run, transfer gains);
- ``evaluation.json``: the same plus the selection rule of every number and reliability bins (what the
  report, register and a reviewer read);
- ``comparison.csv`` (one row per run), ``comparison.md`` (the side-by-side table);
- ``report.html`` (one self-contained page) and ``report.md``;
- ``plots/*.png`` (confusion, reliability, learning curves, summary) and ``dvc_plots/`` (DVC plot data).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from adaptflow import calibration, outputs, report
from adaptflow.data import store
from adaptflow.data.store import Split
from adaptflow.models import load
from adaptflow.params import Params
from adaptflow.stages.finetune import output_dir as adapted_dir
from adaptflow.stages.finetune import diverged_at, max_pseudo_label_rate, runs
from adaptflow.stages.ingest import dropped
from adaptflow.stages.ingest import output_dir as ingested_dir
from adaptflow.stages.ingest import report_path as ingest_report
from adaptflow.training import predict_logits

log = logging.getLogger(__name__)

SELECTION = ("max mean target val accuracy over seeds among non-baseline strategies (ties: lowest mean val NLL, then list order); "
             "then the seed with max val accuracy (ties: lowest val NLL)")
SELECTION_LABEL_FREE = ("target.k = 0, so no target labels may choose: max mean information-maximisation score on the unlabeled "
                        "target pool over seeds among non-baseline strategies (ties: list order); then the seed with the max score")
NOT_CANDIDATES = ("oracle",)  # reported, never promoted
REFERENCES = ("scratch", "source_only")  # transfer gain is reported over each of these that ran
# Per-run numbers that are aggregated over seeds (mean and std).
METRICS = ("val_acc", "val_nll", "test_acc", "test_macro_f1", "test_ece", "test_nll", "val_ece", "pool_im")
# Candidate ties on a score are broken by this lower-is-better number when it was measured (a small val
# split saturates near 100 % accuracy; its NLL still tells the runs apart).
TIEBREAK = {"val_acc": "val_nll"}


def output_dir(params: Params, root: Path) -> Path:
    return Path(root) / params.paths.reports / "evaluate"


def run_key(strategy: str, seed: int) -> str:
    return f"{strategy}/seed{seed}"


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (ddof = 1) over seeds per strategy, in the strategies' order. A seed missing a number
    leaves its strategy's mean missing (NaN), never a mean of the other seeds under the same ``n_seeds``; one
    seed has no spread, so its std is NaN (null in JSON), not 0."""
    order = list(dict.fromkeys(runs["strategy"]))
    cols = [c for c in METRICS if c in runs.columns]
    g = runs.groupby("strategy", sort=False)[cols]
    mean = g.agg(lambda x: x.mean(skipna=False))
    std = g.agg(lambda x: x.std(ddof=1, skipna=False))
    out = mean.join(std, rsuffix="_std").join(g.size().rename("n_seeds"))
    return out.loc[order]


def choose_candidate(summary: pd.DataFrame, baselines: list[str], by: str = "val_acc") -> str | None:
    """The strategy with the best mean ``by`` score (target val accuracy unless the target has no labels),
    baselines (and oracle) excluded. ``summary`` is indexed by strategy with a ``by`` column."""
    pool = summary[~summary.index.isin(list(baselines) + list(NOT_CANDIDATES))]
    if pool.empty or pool[by].isna().all():
        return None
    return str(best_row(pool, by))


def best_row(table: pd.DataFrame, by: str):
    """Index of the row with the highest ``by``; ties go to the lowest ``TIEBREAK[by]`` (when that column
    exists), then to the first row."""
    top = table[table[by] == table[by].max()]
    tb = TIEBREAK.get(by)
    if len(top) > 1 and tb in top.columns and top[tb].notna().any():
        return top[tb].idxmin()
    return top.index[0]


def majority(split: Split) -> tuple[str, float]:
    """The split's most common class and its share of the split (the lowest label on a tie): chance, what
    always answering that class scores."""
    if len(split.labels) == 0:
        raise ValueError("the test split holds no image: there is nothing to score or gate on")
    counts = np.bincount(np.asarray(split.labels), minlength=len(split.classes))
    top = int(counts.argmax())
    return str(split.classes[top]), float(counts[top] / counts.sum())


def paired_gains(runs: pd.DataFrame, reference: str, metric: str = "test_acc") -> pd.DataFrame:
    """Per strategy: the mean and std over seeds of (strategy − ``reference``) in ``metric``, paired by seed,
    and on how many seeds the difference was negative. Pairing by seed takes out what the seed does to both
    (data order, initial head), so the std is the spread of the gain, not of either model (NaN for one seed)."""
    ref = runs[runs.strategy == reference].set_index("seed")[metric]
    diff = runs.assign(gain=runs[metric] - runs["seed"].map(ref))  # a seed missing either number: the gain is missing
    g = diff.groupby("strategy", sort=False)["gain"]
    out = pd.DataFrame({"mean": g.agg(lambda x: x.mean(skipna=False)), "std": g.agg(lambda x: x.std(ddof=1, skipna=False)),
                        "negative_seeds": g.apply(lambda x: int((x.round(9) < 0).sum()))})
    return out.reindex(list(dict.fromkeys(runs["strategy"])))


def to_markdown(summary: pd.DataFrame, candidate: str | None, selections: dict[str, str], rule: str = SELECTION, by: str = "val_acc",
                vs_scratch: pd.DataFrame | None = None, chance: tuple[str, float] | None = None) -> str:
    """The side-by-side table ``adaptflow run`` prints (mean ± std over seeds). ``by``: what chose the
    candidate; at ``pool_im`` (target.k = 0) the label-free score gets its own column, as the number that chose.
    ``vs_scratch``: :func:`paired_gains` against scratch, shown as its column (none without it)."""
    pm = lambda r, k: report.pm(r[k], r.get(k + "_std"), int(r["n_seeds"]))  # noqa: E731
    has_ece = "test_ece" in summary.columns
    has_scratch = vs_scratch is not None
    im = by == "pool_im"
    lines = ["| strategy | seeds |" + (" pool IM (chose) |" if im else "") + " val acc | test acc | test macro-F1 |" + (" test ECE |" if has_ece else "")
             + (" gain vs scratch |" if has_scratch else "") + " checkpoint chosen by |",
             "|---|---|" + ("---|" if im else "") + "---|---|---|" + ("---|" if has_ece else "") + ("---|" if has_scratch else "") + "---|"]
    for s, r in summary.iterrows():
        mark = " **(candidate)**" if s == candidate else (" (oracle: reported only)" if s in NOT_CANDIDATES else "")
        gain = f" {'—' if s == 'scratch' else report.signed(vs_scratch.loc[s, 'mean'], vs_scratch.loc[s, 'std'], int(r.n_seeds))} |" if has_scratch else ""
        ece = f" {pm(r, 'test_ece')} |" if has_ece else ""
        score = f" {pm(r, 'pool_im')} |" if im else ""
        lines.append(f"| {s}{mark} | {int(r.n_seeds)} |{score} {pm(r, 'val_acc')} | {pm(r, 'test_acc')} | {pm(r, 'test_macro_f1')} |{ece}{gain} {selections.get(s, '')} |")
    lines.append("")
    lines.append(f"Candidate chosen by: {rule}. Test accuracy chooses nothing. Values are mean ± std over seeds"
                 + (" (gain vs scratch: the per-seed difference, paired by seed)" if has_scratch else "")
                 + "; the seeds vary training only (one split, one labeled set)."
                 + (" At target.k = 0 the val labels chose nothing: val acc is shown for reference." if im else ""))
    if chance is not None:
        lines.append(report.chance_line(*chance, [str(s) for s, r in summary.iterrows() if report.at_or_below_chance(r.test_acc, chance[1])]))
    return "\n".join(lines) + "\n"


@dataclass
class RunScores:
    """One adapted model scored on target test, val and the unlabeled pool."""

    metrics: dict
    confusion: np.ndarray
    reliability: calibration.Reliability
    history: list[dict]


def _probs(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    if not len(images):
        return np.zeros((0, 0))
    return torch.softmax(predict_logits(model, images), dim=1).numpy().astype(np.float64)


def score_run(model: torch.nn.Module, test: Split, val: Split, pool: Split | None,
              n_bins: int = calibration.DEFAULT_BINS) -> tuple[dict, np.ndarray, calibration.Reliability]:
    """Every per-run number: accuracy, macro-F1, per-class recall, ECE, NLL on test; accuracy and ECE on val;
    the label-free IM score on the pool."""
    n_classes = len(test.classes)
    pt, pv = _probs(model, test.images), _probs(model, val.images)
    pred = pt.argmax(1)
    rel = calibration.reliability(pt, test.labels, n_bins)
    recall = calibration.per_class_recall(pred, test.labels, n_classes)
    m = {
        "val_acc": float((pv.argmax(1) == val.labels).mean()) if len(val) else float("nan"),
        "val_ece": calibration.expected_calibration_error(pv, val.labels, n_bins) if len(val) else float("nan"),
        "val_nll": calibration.nll(pv, val.labels) if len(val) else float("nan"),
        "test_acc": float((pred == test.labels).mean()),
        "test_macro_f1": calibration.macro_f1(pred, test.labels, n_classes),
        "test_ece": rel.ece,
        "test_nll": calibration.nll(pt, test.labels),
        "pool_im": calibration.information_maximisation(_probs(model, pool.images)) if pool is not None and len(pool) else None,
        "recall": {c: _clean(r) for c, r in zip(test.classes, recall)},
    }
    return m, calibration.confusion(pred, test.labels, n_classes), rel


def _clean(v: float | None) -> float | None:
    """JSON has no NaN: a missing number is null."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _role(s: str, candidate: str | None, baselines: list[str]) -> str:
    if s == candidate:
        return "candidate"
    if s in NOT_CANDIDATES:
        return "oracle (reported only)"
    return "baseline" if s in baselines else "strategy"


def selection_rules(candidate_rule: str, label_free: bool, references: list[str], n_bins: int = calibration.DEFAULT_BINS) -> dict[str, str]:
    """The selection rule of every number the report shows, in words."""
    rules = {
        "checkpoint (per run)": "chosen inside finetune by the strategy's own rule (column 'checkpoint chosen by'); the target test split is never loaded there",
        "candidate": candidate_rule,
        "val acc": ("accuracy of the chosen checkpoint on target val: target.k = 0, so no val label chose anything; shown for reference"
                    if label_free else "accuracy of the chosen checkpoint on target val, the split that chose it: optimistic by construction"),
        "test acc, macro-F1, per-class recall, ECE, NLL": "target test, scored once per run after every choice was made; they choose nothing here (register's gate reads them once)",
        "test ECE": f"top-label expected calibration error: {n_bins} equal-width confidence bins on [0, 1], count-weighted mean |accuracy − confidence|",
        "test NLL": "mean negative log-likelihood of the true class on target test",
        "test macro-F1": "unweighted mean of per-class F1 over the classes true or predicted at least once in target test",
        "pool IM": "information maximisation (H(mean p) − mean H(p)) / log C on the unlabeled target pool: label-free"
                   + ("; it chooses the candidate here" if label_free else "; shown for reference"),
        "mean ± std": "over finetune.seeds, which vary training only (initialisation, data order, augmentation): every seed has the "
                      "same splits and labeled set, drawn by `seed`, so the std leaves out which images were labeled and tested; "
                      "sample standard deviation (ddof = 1); a single seed shows its value alone",
        "95% interval": "Wilson score interval of one model's test accuracy over the n test images: how far it could move on "
                        "another test draw of that size",
        "chance": "always answering the test split's most common class; a strategy at or below it learned nothing usable",
        "oracle": f"strategies {list(NOT_CANDIDATES)} are reported but never the candidate: they are allowed labels the pipeline does not grant",
    }
    for b in references:
        rules[f"gain vs {b}"] = f"mean over seeds of the paired per-seed difference in test accuracy (strategy at seed s minus {b} at seed s), ± its std"
    rules["negative transfer"] = "mean test accuracy below scratch's (mean paired gain vs scratch < 0); 'k/N seeds' counts the seeds where it was below"
    return rules


def _history(directory: Path) -> list[dict]:
    path = directory / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def input_key(params: Params, root: Path) -> outputs.Key:
    """This stage's identity: its params, which runs it scores, whether the target has labels, and the
    digests of the target data and every adapted model (raises if one is not complete yet)."""
    upstream = [ingested_dir(params, root, "target")] + [adapted_dir(params, root, s, k) for s, k in runs(params)]
    return outputs.input_key("evaluate", params.sections("evaluate", "finetune.strategies", "finetune.seeds", "target.k"), upstream)


def run(params: Params, root: Path = Path(".")) -> dict:
    out = output_dir(params, root)
    tgt = ingested_dir(params, root, "target")
    pairs = runs(params)
    key = input_key(params, root)
    if outputs.is_current(out, key):
        log.info("evaluate: up to date (%s)", out)
        return {"path": str(out), "digest": outputs.digest(out), "cached": True, "metrics": json.loads((out / "metrics.json").read_text())}
    test, val = store.load_split(tgt, "test"), store.load_split(tgt, "val")
    pool = store.load_split(tgt, "train", labeled=False)
    label_free = params.target.k == 0
    rows, scored, selections = [], {}, {}
    for s, seed in pairs:
        d = adapted_dir(params, root, s, seed)
        model, cfg = load(d)
        m, cm, rel = score_run(model, test, val, pool, params.evaluate.ece_bins)
        m["best_epoch"] = cfg.extra.get("best_epoch")
        history = _history(d)
        rows.append({"strategy": s, "seed": seed, **{k: v for k, v in m.items() if k != "recall"}})
        scored[(s, seed)] = RunScores(m, cm, rel, history)
        selections.setdefault(s, cfg.extra.get("selection", ""))
    table = pd.DataFrame(rows).astype({c: float for c in METRICS})  # a missing number (None) is NaN
    summary = summarise(table)
    by = "pool_im" if label_free else "val_acc"
    candidate = choose_candidate(summary, params.evaluate.baselines, by=by)
    candidate_seed = None
    if candidate is not None:
        mine = table[table.strategy == candidate]
        candidate_seed = int(mine.loc[best_row(mine, by), "seed"])
    references = [b for b in REFERENCES if b in summary.index]
    gains = {b: paired_gains(table, b) for b in references}
    chance_class, chance_acc = majority(test)

    strategies = {}
    for s, r in summary.iterrows():
        m = {k: _clean(r[k]) for k in r.index if k != "n_seeds"}
        m.update({"n_seeds": int(r["n_seeds"]), "role": _role(s, candidate, params.evaluate.baselines)})
        for b, g in gains.items():
            m[f"gain_over_{b}"], m[f"gain_over_{b}_std"] = _clean(g.loc[s, "mean"]), _clean(g.loc[s, "std"])
        if "scratch" in gains and s != "scratch":
            m["negative_transfer"] = bool(round(gains["scratch"].loc[s, "mean"], 9) < 0)
            m["negative_transfer_seeds"] = int(gains["scratch"].loc[s, "negative_seeds"])
        else:
            m["negative_transfer"], m["negative_transfer_seeds"] = None, None
        per_seed = [scored[(s, k)].metrics["recall"] for k in params.finetune.seeds]
        m["recall"] = {c: _mean([rc[c] for rc in per_seed]) for c in test.classes}
        m["below_chance"] = None if m["test_acc"] is None else report.at_or_below_chance(m["test_acc"], chance_acc)
        strategies[s] = m
    run_metrics = {run_key(s, k): {"strategy": s, "seed": k, **{m: _clean(v) for m, v in sc.metrics.items() if m not in ("recall", "best_epoch")},
                                   "test_acc_ci95": [_clean(x) for x in calibration.wilson_interval(sc.metrics["test_acc"], len(test))],
                                   "pseudo_label_rate_max": max_pseudo_label_rate(sc.history), "diverged_at": diverged_at(sc.history),
                                   "best_epoch": sc.metrics["best_epoch"], "recall": sc.metrics["recall"]} for (s, k), sc in scored.items()}
    cand_gain = {f"over_{b}": strategies[candidate][f"gain_over_{b}"] for b in references} if candidate else {}
    cand_gain_std = {f"over_{b}": strategies[candidate][f"gain_over_{b}_std"] for b in references} if candidate else {}
    metrics = {
        "candidate": candidate,
        "candidate_seed": candidate_seed,
        "n_test": len(test),
        "n_val": len(val),
        "n_pool": len(pool),
        "test_data_hash": store.split_hash(tgt, "test"),  # the exact test set (images and labels) every number here is on
        "strategies": strategies,
        "runs": run_metrics,
        "transfer_gain": cand_gain,
        "transfer_gain_std": cand_gain_std,
        # null when there is no scratch to fall below (target.k = 0, or not run): not assessed, rather than none found
        "negative_transfer": [s for s, m in strategies.items() if m["negative_transfer"]] if "scratch" in gains else None,
        "chance": {"class": chance_class, "test_acc": chance_acc},  # always answering the test split's most common class
    }
    rule = SELECTION_LABEL_FREE if label_free else SELECTION
    plots = {"summary": f"{report.PLOTS}/summary.png",
             "learning": {s: f"{report.PLOTS}/learning_{s}.png" for s in strategies},
             "reliability": {run_key(s, k): f"{report.PLOTS}/reliability_{s}_seed{k}.png" for s, k in pairs},
             "confusion": {run_key(s, k): f"{report.PLOTS}/confusion_{s}_seed{k}.png" for s, k in pairs}}
    evaluation = {
        **metrics,
        "candidate_selection": rule,
        "candidate_rule": "the unlabeled target pool (label-free IM score)" if label_free else "target val accuracy",
        "label_free": label_free,
        "target_domain": params.target.domain,
        # what ingest left out of the target data, and where each file is listed with its reason
        "target_data": _left_out(store.read_card(tgt), params),
        "source_domain": params.source.domain,
        "classes": list(test.classes),
        "seeds": list(params.finetune.seeds),
        "baselines": list(params.evaluate.baselines),
        "reference_baselines": references,
        "checkpoint_selection": selections,
        "selection_rules": selection_rules(rule, label_free, references, params.evaluate.ece_bins),
        "ece_bins": params.evaluate.ece_bins,
        "reliability": {run_key(s, k): sc.reliability.rows() for (s, k), sc in scored.items()},
        "plots": plots,
    }
    with outputs.atomic_dir(out, "evaluate", key) as tmp:
        _write_plots(tmp, evaluation, scored, test.classes, params.evaluate.baselines)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (tmp / "evaluation.json").write_text(json.dumps(evaluation, indent=2))
        table.to_csv(tmp / "comparison.csv", index=False)
        (tmp / "comparison.md").write_text(to_markdown(summary, candidate, selections, rule, by, gains.get("scratch"), (chance_class, chance_acc)))
        (tmp / "report.md").write_text(report.render_markdown(evaluation))
        (tmp / "report.html").write_text(report.render_html(evaluation, tmp))
    log.info("evaluate: candidate %s seed %s (%s); report %s", candidate, candidate_seed, rule, out / "report.html")
    return {"path": str(out), "digest": outputs.digest(out), "cached": False, "metrics": metrics}


def _left_out(card: dict, params: Params) -> dict:
    """What ingest kept of the target data and left out, and where each file left out is listed."""
    return {"n_images": card["n_images"], "left_out": dropped(card), "listed_in": str(ingest_report(params, Path("."), "target"))}


def _write_plots(directory: Path, ev: dict, scored: dict[tuple[str, int], RunScores], classes: list[str], baselines: list[str]) -> None:
    """PNGs for people and the report; CSVs for `dvc plots`."""
    (directory / report.PLOTS).mkdir()
    p = ev["plots"]
    report.summary_png(ev["strategies"], baselines, ev["candidate"], directory / p["summary"], chance=ev["chance"]["test_acc"])
    learning, reliability = [], []
    for s in ev["strategies"]:
        histories = {k: sc.history for (s2, k), sc in scored.items() if s2 == s}
        report.learning_png(histories, f"{s}: learning curves (chosen by {ev['checkpoint_selection'].get(s, '?')})", directory / p["learning"][s])
        for k, hist in histories.items():
            metric = report.selection_metric(hist)
            for r in hist:
                learning.append({"run": run_key(s, k), "strategy": s, "seed": k, "epoch": r["epoch"],
                                 "train_loss": _clean(report.as_float(r.get("train_loss"))),
                                 "val_metric": _clean(report.as_float(r.get(metric))) if metric else None})
    for (s, k), sc in scored.items():
        rk = run_key(s, k)
        acc = sc.metrics["test_acc"]
        report.confusion_png(sc.confusion, classes, f"{rk}: test acc {acc:.3f}", directory / p["confusion"][rk])
        report.reliability_png(sc.reliability, f"{rk}: test reliability", directory / p["reliability"][rk])
        reliability += [{"run": rk, **row} for row in sc.reliability.rows() if row["count"]]
    confusion_rows = []
    if ev["candidate"] is not None:
        cm = scored[(ev["candidate"], ev["candidate_seed"])].confusion
        confusion_rows = [{"actual": classes[i], "predicted": classes[j]} for (i, j), n in np.ndenumerate(cm) for _ in range(int(n))]
    summary_rows = [{"strategy": s, "test_acc": m["test_acc"], "test_acc_std": m["test_acc_std"]} for s, m in ev["strategies"].items()]
    report.write_dvc_plots(directory / report.DVC_PLOTS, learning, reliability, confusion_rows, summary_rows)
