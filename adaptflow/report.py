"""What a person looks at after a run: PNG plots, DVC plot data, and a one-page report.

Everything here is drawn from the evaluation record that ``adaptflow.stages.evaluate`` builds (a plain
dict, also written as ``evaluation.json``), so the report says exactly what the metrics files say — no
number is computed twice. The HTML page is self-contained (plots inlined as base64 PNG): it opens from
``reports/``, from an MLflow artifact view, or from a mail attachment, with no network.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from adaptflow.calibration import Reliability

PLOTS = "plots"  # PNGs, declared as one DVC image plot
DVC_PLOTS = "dvc_plots"  # JSON data + vega-lite templates for `dvc plots show/diff`

def by_run_template(width: int, height: int, scale: dict, under: tuple[dict, ...] = ()) -> dict[str, Any]:
    """A vega-lite template for "one line per run" plots. DVC fills the ``<DVC_METRIC_*>`` anchors; the
    ``run`` column (strategy/seedN) colours the lines and ``rev`` dashes them, so `dvc plots diff` of two
    revisions stays legible. ``under``: layers drawn beneath the lines."""
    line = {"mark": {"type": "line", "point": True, "tooltip": {"content": "data"}},
            "encoding": {
                "x": {"field": "<DVC_METRIC_X>", "type": "quantitative", "title": "<DVC_METRIC_X_LABEL>", "scale": scale},
                "y": {"field": "<DVC_METRIC_Y>", "type": "quantitative", "title": "<DVC_METRIC_Y_LABEL>", "scale": scale},
                "color": {"field": "run", "type": "nominal"},
                "strokeDash": {"field": "rev", "type": "nominal"},
            }}
    spec = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "data": {"values": "<DVC_METRIC_DATA>"},
            "title": "<DVC_METRIC_TITLE>", "width": width, "height": height}
    return {**spec, "layer": [*under, line]} if under else {**spec, **line}


# Learning curves; reliability with the diagonal of perfect calibration under the lines.
DIAGONAL = {"mark": {"type": "rule", "strokeDash": [4, 4], "color": "gray"},
            "encoding": {"x": {"datum": 0}, "y": {"datum": 0}, "x2": {"datum": 1}, "y2": {"datum": 1}}}
BY_RUN_TEMPLATE = by_run_template(360, 260, {"zero": False})
RELIABILITY_TEMPLATE = by_run_template(300, 300, {"domain": [0, 1]}, under=(DIAGONAL,))
TEMPLATES = {"template_by_run.json": BY_RUN_TEMPLATE, "template_reliability.json": RELIABILITY_TEMPLATE}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display, and no GUI toolkit import
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def confusion_png(cm: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=6, color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def reliability_png(rel: Reliability, title: str, path: Path) -> None:
    """Accuracy against confidence per bin (bars) over the diagonal of perfect calibration, with the share
    of images per bin below: a gap above the diagonal is under-confidence, below it over-confidence."""
    plt = _plt()
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4, 4.6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    width = rel.edges[1] - rel.edges[0]
    centers = (rel.edges[:-1] + rel.edges[1:]) / 2
    filled = rel.count > 0
    acc, conf = rel.accuracy[filled], rel.confidence[filled]
    ax.bar(centers[filled], acc, width=width * 0.95, color="#4c72b0", edgecolor="black", linewidth=0.4, label="accuracy")
    ax.bar(centers[filled], np.abs(conf - acc), bottom=np.minimum(acc, conf), width=width * 0.95, fill=False,
           hatch="//", edgecolor="#c44e52", linewidth=0.8, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {rel.ece:.3f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    total = max(int(rel.count.sum()), 1)
    axc.bar(centers, rel.count / total, width=width * 0.95, color="gray")
    axc.set_xlabel("confidence (top-label probability)")
    axc.set_ylabel("share", fontsize=8)
    _save(fig, path)


def learning_png(histories: dict[int, list[dict]], title: str, path: Path) -> None:
    """Train loss and the checkpoint-selection metric per epoch, one line per seed, the chosen epoch marked."""
    plt = _plt()
    if not any(histories.values()):  # e.g. source_only: nothing was trained
        fig, ax = plt.subplots(figsize=(7, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}\nno epochs: this strategy trains nothing", ha="center", va="center", fontsize=9, color="gray")
        _save(fig, path)
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(7, 2.8))
    for seed, rows in histories.items():
        metric = selection_metric(rows)
        ep = [r["epoch"] for r in rows]
        a1.plot(ep, [as_float(r.get("train_loss")) for r in rows], marker=".", label=f"seed {seed}")
        if metric:
            vals = [as_float(r.get(metric)) for r in rows]
            a2.plot(ep, vals, marker=".", label=f"seed {seed}")
            a2.set_ylabel(metric)
    a1.set_xlabel("epoch")
    a1.set_ylabel("train loss")
    a2.set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def summary_png(strategies: dict[str, dict], baselines: Iterable[str], candidate: str | None, path: Path, chance: float | None = None) -> None:
    """Mean target test accuracy ± std over seeds per strategy; baselines grey, candidate highlighted; chance
    (always answering the commonest test class) as a dashed line."""
    plt = _plt()
    names = list(strategies)
    means = [strategies[s]["test_acc"] for s in names]
    stds = [strategies[s]["test_acc_std"] or 0.0 for s in names]  # one seed: no spread to draw
    base = set(baselines)
    colors = ["#999999" if s in base else ("#dd8452" if s == candidate else "#4c72b0") for s in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(names) + 1.5), 3))
    ax.bar(names, means, yerr=stds, color=colors, capsize=4)
    for i, (m, sd) in enumerate(zip(means, stds)):
        ax.text(i, m + sd + 0.01, f"{m:.3f}", ha="center", va="bottom", fontsize=7)
    if chance is not None:
        ax.axhline(chance, color="k", ls="--", lw=1)
        ax.text(len(names) - 0.5, chance + 0.01, f"chance {chance:.3f}", ha="right", va="bottom", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("target test accuracy")
    ax.set_title("mean ± std over seeds (grey: baselines, orange: candidate)", fontsize=8)
    ax.tick_params(axis="x", labelsize=8, rotation=20)
    _save(fig, path)


def selection_metric(history: list[dict]) -> str | None:
    """The per-epoch metric a learning curve shows: val accuracy when there is one, else the label-free
    selection score the run logged (``sel_*``)."""
    keys = [k for r in history for k in r]
    if "val_acc" in keys:
        return "val_acc"
    return next((k for k in keys if k.startswith("sel_")), None)


def as_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


# --- DVC plots ----------------------------------------------------------------------------------------


def write_dvc_plots(directory: Path, learning: list[dict], reliability_rows: list[dict], confusion_rows: list[dict],
                    summary_rows: list[dict]) -> None:
    """The data files ``dvc.yaml`` declares as plots (JSON lists of records: numbers stay numbers), and the
    templates they use."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("learning_curves.json", learning), ("reliability.json", reliability_rows),
                       ("confusion_candidate.json", confusion_rows), ("test_acc.json", summary_rows)):
        (directory / name).write_text(json.dumps(rows))
    for name, content in TEMPLATES.items():
        (directory / name).write_text(json.dumps(content, indent=1))


# --- the one-page report ------------------------------------------------------------------------------


def pm(mean: float | None, std: float | None, n: int, digits: int = 4) -> str:
    """``mean ± std`` when there is more than one seed, else the single value."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    if n > 1 and std is not None and not math.isnan(std):
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def at_or_below_chance(acc: float, chance: float) -> bool:
    """An accuracy no better than always answering the commonest test class (rounded: a tie is no better)."""
    return round(acc - chance, 9) <= 0


def chance_line(label: str, share: float, below: list[str], note: str = "") -> str:
    """The sentence the table and the report say chance in, with the strategies at or below it."""
    return (f"Chance: always answering {label!r}, the commonest test class, scores {share:.4f}"
            + (f"; at or below it: {', '.join(below)}{note}." if below else "."))


def signed(mean: float | None, std: float | None, n: int) -> str:
    """A gain, ``+mean ± std`` when there is more than one seed, else the single value; "—" when missing."""
    if mean is None or math.isnan(mean):
        return "—"
    s = f"{mean:+.4f}"
    return f"{s} ± {std:.4f}" if n > 1 and std is not None and not math.isnan(std) else s


def tables(ev: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The report's tables as (header, rows) of strings, shared by the HTML and markdown renderings."""
    gain_cols = [f"gain vs {b}" for b in ev["reference_baselines"]]
    im = bool(ev.get("label_free"))  # target.k = 0: the label-free score chose, and gets its column
    side_head = ["strategy", "role", "seeds", *(["pool IM (chose)"] if im else []), "val acc", "test acc", "test macro-F1", "test ECE",
                 *gain_cols, "negative transfer", "checkpoint chosen by"]
    side = []
    for s, m in ev["strategies"].items():
        n = m["n_seeds"]
        gains = ["—" if b == s else signed(m.get(f"gain_over_{b}"), m.get(f"gain_over_{b}_std"), n) for b in ev["reference_baselines"]]
        neg = "—" if m.get("negative_transfer") is None else (
            f"{'YES' if m['negative_transfer'] else 'no'} ({m['negative_transfer_seeds']}/{n} seeds below)")
        test = pm(m["test_acc"], m["test_acc_std"], n) + (" (at or below chance)" if m.get("below_chance") else "")
        side.append([s, m["role"], str(n), *([pm(m.get("pool_im"), m.get("pool_im_std"), n)] if im else []), pm(m["val_acc"], m["val_acc_std"], n),
                     test, pm(m["test_macro_f1"], m["test_macro_f1_std"], n), pm(m["test_ece"], m["test_ece_std"], n), *gains, neg,
                     ev["checkpoint_selection"].get(s, "")])
    run_head = ["run", "val acc", "test acc", "test acc 95% interval", "test macro-F1", "test ECE", "test NLL", "pool IM", "best epoch"]
    run_rows = [[k, f"{r['val_acc']:.4f}", f"{r['test_acc']:.4f}", _interval(r.get("test_acc_ci95")), f"{r['test_macro_f1']:.4f}", f"{r['test_ece']:.4f}",
                 _fmt(r["test_nll"], 4), _fmt(r.get("pool_im"), 4), "—" if r.get("best_epoch") is None else str(r["best_epoch"])]
                for k, r in ev["runs"].items()]
    classes = ev["classes"]
    recall_head = ["strategy", *classes]
    recall_rows = [[s, *(_fmt(m["recall"].get(c)) for c in classes)] for s, m in ev["strategies"].items()]
    return {"side": (side_head, side), "runs": (run_head, run_rows), "recall": (recall_head, recall_rows)}


def _interval(ci: list | None) -> str:
    return "n/a" if not ci or any(v is None for v in ci) else f"{ci[0]:.3f}–{ci[1]:.3f}"


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _headline(ev: dict) -> list[str]:
    c = ev["candidate"]
    lines = [f"Target **{ev['target_domain']}** (test set {ev['test_data_hash']}), source **{ev['source_domain']}**; "
             f"{ev['n_test']} test and {ev['n_val']} val images; seeds {', '.join(map(str, ev['seeds']))}."]
    if c is None:
        lines.append("No candidate: no strategy other than the baselines (and oracle) ran.")
    else:
        m = ev["strategies"][c]
        gains = "; ".join(f"{signed(m.get(f'gain_over_{b}'), m.get(f'gain_over_{b}_std'), m['n_seeds'])} over {b}" for b in ev["reference_baselines"])
        lines.append(f"Candidate: **{c}** (seed {ev['candidate_seed']}), chosen on {ev['candidate_rule']}. "
                     f"Test accuracy {pm(m['test_acc'], m['test_acc_std'], m['n_seeds'])}" + (" over seeds" if m["n_seeds"] > 1 else "")
                     + (f"; transfer gain {gains}." if gains else "."))
        run = ev["runs"].get(f"{c}/seed{ev['candidate_seed']}", {})
        if run.get("test_acc") is not None:
            lines.append(f"The model register gates (seed {ev['candidate_seed']}): test accuracy {run['test_acc']:.4f}, 95% interval "
                         f"{_interval(run.get('test_acc_ci95'))} over the {ev['n_test']} test images (the ± over seeds holds training "
                         "randomness only: every seed has the same splits and labeled set).")
    diverged = [f"{k} (epoch {r['diverged_at']})" for k, r in ev["runs"].items() if r.get("diverged_at")]
    if diverged:
        lines.append(f"Training diverged (a loss that was no longer finite) in {', '.join(diverged)}: each stopped there and kept its "
                     "best checkpoint before it; lower the learning rate.")
    idle = [k for k, r in ev["runs"].items() if r.get("pseudo_label_rate_max") == 0]
    if idle:
        lines.append(f"FixMatch trained nothing in {', '.join(idle)}: no pool image reached its confidence threshold in any epoch "
                     "(pseudo_label_rate 0), so those runs are their other parts alone.")
    chance = ev.get("chance")  # (an evaluation written before it was recorded has none)
    if chance:
        below = [s for s, m in ev["strategies"].items() if m.get("below_chance")]
        lines.append(chance_line(chance["class"], chance["test_acc"], below, " (a gain over one of them says little)"))
    if ev["negative_transfer"]:
        lines.append(f"Negative transfer (mean test accuracy below scratch): {', '.join(ev['negative_transfer'])}.")
    data = ev.get("target_data")  # (an evaluation written before it was recorded has none)
    if data:
        left = ", ".join(f"{n} {why}" for why, n in data["left_out"].items())
        lines.append(f"Target data: {data['n_images']} images kept; left out: {left} (each file with its reason in {data['listed_in']}).")
    return lines


def _plot_groups(ev: dict) -> list[tuple[str, list[str]]]:
    p = ev["plots"]
    return [("Test accuracy by strategy", [p["summary"]]), ("Learning curves", list(p["learning"].values())),
            ("Reliability diagrams (target test)", list(p["reliability"].values())),
            ("Confusion matrices (target test)", list(p["confusion"].values()))]


def render_markdown(ev: dict) -> str:
    """The report as markdown, images linked relative to the evaluate directory."""
    out = [f"# adaptflow evaluation — {ev['target_domain']}", "", *(_headline(ev)), ""]
    titles = {"side": "Side by side (mean ± std over seeds)", "runs": "Every run", "recall": "Per-class recall on target test (mean over seeds)"}
    for key, (head, rows) in tables(ev).items():
        out += [f"## {titles[key]}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out.append("")
    out += ["## How every number was chosen", ""] + [f"- **{k}**: {v}" for k, v in ev["selection_rules"].items()] + [""]
    for title, files in _plot_groups(ev):
        out += [f"## {title}", ""] + [f"![{Path(f).stem}]({f})" for f in files] + [""]
    return "\n".join(out)


def _md_inline(text: str) -> str:
    """The two bits of markdown the headline uses (**bold**), escaped for HTML."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(path.stem)}</figcaption></figure>'


def render_html(ev: dict, base: Path) -> str:
    """One self-contained page: headline, tables, selection rules, every plot (read from ``base``)."""
    css = ("body{font:14px system-ui,sans-serif;margin:24px}table{border-collapse:collapse;margin:8px 0 20px}"
           "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}th{background:#f3f3f3}"
           "td:first-child,th:first-child{text-align:left}td:last-child{white-space:normal;text-align:left;min-width:16em}"
           "figure{display:inline-block;margin:4px}figure img{max-width:460px}figcaption{font-size:11px;color:#555;text-align:center}"
           ".yes{color:#b00;font-weight:bold}")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>adaptflow — {html.escape(ev['target_domain'])}</title>",
           f"<style>{css}</style></head><body>", f"<h1>adaptflow evaluation — {html.escape(ev['target_domain'])}</h1>"]
    out += [f"<p>{_md_inline(line)}</p>" for line in _headline(ev)]
    titles = {"side": "Side by side (mean ± std over seeds)", "runs": "Every run", "recall": "Per-class recall on target test (mean over seeds)"}
    for key, (head, rows) in tables(ev).items():
        out.append(f"<h2>{titles[key]}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
        for r in rows:
            cells = "".join(f"<td class='yes'>{html.escape(c)}</td>" if c.startswith("YES") else f"<td>{html.escape(c)}</td>" for c in r)
            out.append(f"<tr>{cells}</tr>")
        out.append("</table>")
    out.append("<h2>How every number was chosen</h2><ul>")
    out += [f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in ev["selection_rules"].items()]
    out.append("</ul>")
    for title, files in _plot_groups(ev):
        out.append(f"<h2>{html.escape(title)}</h2>" + "".join(_img(base / f) for f in files))
    out.append("</body></html>")
    return "\n".join(out)
