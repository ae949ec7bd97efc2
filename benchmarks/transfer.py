"""Transfer benchmark: every strategy, several label budgets k and seeds, mean ± std.

For each (k, seed) the pipeline's own stages run in-process — ingest → pretrain → cache_features →
finetune → evaluate — in their own work directory (the seed changes the splits, the k-shot subset, the
source pretraining, initial weights and augmentation draws). (k, seed) cells run in parallel processes.
Every checkpoint is chosen as the pipeline chooses it: on target val when k > 0, by the label-free
information-maximisation score when k = 0. Target test accuracy is reported and chooses nothing.

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (test accuracy vs k per strategy).

    python benchmarks/transfer.py                          # the full grid (a GPU makes it minutes)
    python benchmarks/transfer.py --k 10 --seeds 0 --jobs 1 --set finetune.epochs=5   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Iterator

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adaptflow.report import pm  # noqa: E402  (mean ± std, or the value alone for one seed)

LABELED = ["scratch", "source_only", "linear_probe", "finetune", "partial", "gradual_unfreeze", "l2sp",
           "dann", "coral", "mmd", "fixmatch", "dann+fixmatch"]
LABEL_FREE = ["source_only", "dann", "coral", "mmd", "fixmatch", "dann+fixmatch"]
TARGETS = {0: 0.93, 1: 0.93, 10: 0.98}  # issue targets: mean test accuracy of the val-chosen candidate


def cell(k: int, seed: int, overrides: list[str], work: str, oracle: bool) -> dict:
    """One (k, seed): the stages in-process; returns evaluate's metrics plus timing."""
    import torch

    # Every stage sizes its CPU threads from ADAPTFLOW_THREADS (else one per core): parallel cells must
    # not each take every core.
    os.environ["ADAPTFLOW_THREADS"] = os.environ.get("BENCH_THREADS", "2")
    torch.set_num_threads(int(os.environ["ADAPTFLOW_THREADS"]))
    from adaptflow import params as params_mod
    from adaptflow import stages
    from adaptflow.params import ROLES
    from adaptflow.stages.augment import check_no_overlap

    strategies = list(LABEL_FREE if k == 0 else LABELED) + (["oracle"] if oracle else [])
    base = [f"target.k={k}", f"seed={seed}", f"finetune.seeds=[{seed}]", f"finetune.strategies=[{','.join(strategies)}]",
            f"evaluate.baselines=[{'source_only' if k == 0 else 'scratch,source_only'}]"]
    p = params_mod.load(HERE.parent / "params.yaml", base + overrides)
    root = Path(work) / f"k{k}_seed{seed}"
    start = time.time()
    # The source side (ingest, pretrain) depends on the seed only, not on k: the cells of one seed share it.
    # The first one computes it; the others get a hard-linked copy, which the pipeline's own stage keys find
    # current and skip (if a key differed, the stage would simply run again).
    with _seed_lock(Path(work) / f"source_seed{seed}.lock"):
        shared = Path(work) / f"source_seed{seed}"
        outs = [Path(p.paths.ingested) / "source", Path(p.paths.source_model)]
        for rel in outs:
            if (shared / rel).is_dir() and not (root / rel).exists():
                shutil.copytree(shared / rel, root / rel, copy_function=os.link)
        for role in ROLES:
            stages.get("ingest")(p, root, role=role)
        # augment's check, as the pipeline runs it before pretrain: a source holding target val/test images
        # would have the source model trained on what every number here is scored on
        check_no_overlap(p, root)
        stages.get("pretrain")(p, root)
        for rel in outs:
            if not (shared / rel).exists():
                shutil.copytree(root / rel, shared / rel, copy_function=os.link)
    for name in ("cache_features", "finetune", "evaluate"):
        stages.get(name)(p, root)
    # the candidate and the rule that chose it, as evaluate (and so register) has them: target val accuracy
    # for k > 0, the label-free score on the target pool for k = 0
    report = root / p.paths.reports / "evaluate"
    metrics = {**json.loads((report / "metrics.json").read_text()),
               "candidate_selection": json.loads((report / "evaluation.json").read_text())["candidate_selection"]}
    card = json.loads((root / p.paths.ingested / "target" / "card.json").read_text())
    metrics.update({"k": k, "seed": seed, "seconds": time.time() - start,
                    "label_budget": {"train_labeled": k * len(card["classes"]), "val": metrics["n_val"] if k > 0 else 0}})
    return metrics


@contextlib.contextmanager
def _seed_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def summarise(cells: list[dict]) -> dict:
    out: dict = {}
    for k in sorted({c["k"] for c in cells}):
        mine = [c for c in cells if c["k"] == k]
        row = {}
        for s in mine[0]["strategies"]:
            vals = np.array([[c["strategies"][s]["val_acc"], c["strategies"][s]["test_acc"]] for c in mine])
            row[s] = {"val_acc": float(vals[:, 0].mean()), "test_acc": float(vals[:, 1].mean()),
                      "test_acc_std": float(vals[:, 1].std(ddof=1)) if len(vals) > 1 else None, "n": len(vals)}  # one seed: no spread
        cand = np.array([c["strategies"][c["candidate"]]["test_acc"] for c in mine])
        # Negative transfer, as evaluate flags it: mean test accuracy below scratch's at the same k.
        neg = sorted(s for s in row if "scratch" in row and s not in ("scratch", "oracle") and row[s]["test_acc"] < row["scratch"]["test_acc"])
        out[str(k)] = {"strategies": row, "negative_transfer": neg,
                       "candidate": {"picked": [c["candidate"] for c in mine], "test_acc": float(cand.mean()),
                                                        "test_acc_std": float(cand.std(ddof=1)) if len(cand) > 1 else None, "n": len(cand)},
                       "label_budget": {"train_labeled": mine[0]["label_budget"]["train_labeled"],  # val: per seed, in seed order
                                        "val": [c["label_budget"]["val"] for c in mine]},
                       "selection": mine[0].get("candidate_selection", "")}
    return out


def to_markdown(summary: dict, meta: dict) -> str:
    ks = list(summary)
    strategies = list(dict.fromkeys(s for k in ks for s in summary[k]["strategies"]))
    lines = [f"# Transfer benchmark: {meta['source']} → {meta['target']}", "",
             f"Seeds {meta['seeds']}; device {meta['device']}; overrides {meta['overrides'] or 'none'}; code {meta.get('commit', 'unknown')}.",
             "Target test accuracy, mean ± std over seeds (sample std, ddof 1); each seed also re-splits the target, so the",
             "std holds split as well as training variance. Checkpoints chosen on target val (k > 0) or by the",
             "label-free information-maximisation score on the unlabeled pool (k = 0); test chose nothing.", "",
             "| strategy | " + " | ".join(f"k={k}" for k in ks) + " | k=all |", "|---|" + "---|" * (len(ks) + 1)]
    fmt = lambda r: pm(r["test_acc"], r["test_acc_std"], r.get("n", 2)) if r else "—"  # noqa: E731
    for s in strategies:
        if s == "oracle":  # trained on every target train label: the k = all column, whatever k its cell ran at
            r = next(summary[k]["strategies"][s] for k in ks if s in summary[k]["strategies"])
            lines.append(f"| {s} | " + " | ".join("—" for _ in ks) + f" | {fmt(r)} |")
        else:
            lines.append(f"| {s} | " + " | ".join(fmt(summary[k]["strategies"].get(s)) for k in ks) + " | — |")
    lines += ["", "k = all: `oracle`, fine-tuned with every target train label; reported, never a candidate.", "",
              "## The candidate each run would register (chosen without test labels)", "",
              "| k | label budget (train + val) | picked per seed | test acc | target | met |", "|---|---|---|---|---|---|"]
    for k in ks:
        c, b = summary[k]["candidate"], summary[k]["label_budget"]
        target = TARGETS.get(int(k))
        met = "—" if target is None else ("yes" if c["test_acc"] >= target else f"no (short by {target - c['test_acc']:.4f})")
        vals = b["val"] if isinstance(b["val"], list) else [b["val"]]  # a list per seed (older results: one number)
        val = str(vals[0]) if len(set(vals)) == 1 else f"{min(vals)}–{max(vals)}"
        lines.append(f"| {k} | {b['train_labeled']} + {val} | {', '.join(c['picked'])} | {pm(c['test_acc'], c['test_acc_std'], c.get('n', len(c['picked'])))} | "
                     f"{'—' if target is None else f'{target:.2f}'} | {met} |")
    lines += ["", "## Negative transfer (mean test accuracy below `scratch` at the same k; k = 0 has no scratch)", ""]
    for k in ks:
        if k != "0":
            neg = summary[k].get("negative_transfer", [])
            lines.append(f"- k={k}: {', '.join(neg) if neg else 'none'}")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in summary)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap("tab20").colors
    for i, s in enumerate(dict.fromkeys(s for k in summary for s in summary[k]["strategies"])):
        pts = sorted((int(k), summary[k]["strategies"][s]) for k in summary if s in summary[k]["strategies"])
        if s == "oracle":  # every target train label (k = all): a reference line, not a point at some k
            r = pts[0][1]
            ax.axhline(r["test_acc"], color="k", ls="--", lw=1, label=f"oracle (k=all) {r['test_acc']:.3f}")
            continue
        ax.errorbar([p[0] for p in pts], [p[1]["test_acc"] for p in pts], yerr=[p[1]["test_acc_std"] or 0.0 for p in pts],
                    marker="o", capsize=3, label=s, color=colours[i % len(colours)])
    ax.set_xscale("symlog")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("labeled target images per class (k)")
    ax.set_ylabel("target test accuracy")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[0, 1, 5, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override key=value")
    ap.add_argument("--jobs", type=int, default=1, help="(k, seed) cells run in parallel")
    ap.add_argument("--no-oracle", action="store_true", help="skip the oracle (all target train labels)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "transfer")
    ap.add_argument("--resume", action="store_true", help="keep the cells already in <out>.cells.jsonl; run the rest")
    ap.add_argument("--workdir", type=Path, default=None, help="where stage outputs go (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = str(args.workdir or tempfile.mkdtemp(prefix="adaptflow-bench-"))
    # Every finished cell is appended here at once, so an interrupted run keeps what it measured and
    # ``--resume`` runs only the missing cells (same overrides required).
    done_path = args.out.with_suffix(".cells.jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cells = []
    if args.resume and done_path.exists():
        cells = [c for c in map(json.loads, done_path.read_text().splitlines())
                 if c["k"] in args.k and c["seed"] in args.seeds and c.get("overrides", []) == args.overrides]
        print(f"resuming: {len(cells)} cells already in {done_path}", flush=True)
    elif done_path.exists():
        done_path.unlink()
    commit = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    have = {(c["k"], c["seed"]) for c in cells}
    jobs = [(k, s) for k in args.k for s in args.seeds if (k, s) not in have]
    start = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(cell, k, s, args.overrides, work, not args.no_oracle and k == max(args.k)): (k, s) for k, s in jobs}
        for fut in as_completed(futures):
            k, s = futures[fut]
            c = {**fut.result(), "overrides": args.overrides, "commit": commit or "unknown"}
            cells.append(c)
            with done_path.open("a") as f:
                f.write(json.dumps(c) + "\n")
            print(f"k={k} seed={s} ({c['seconds']:.0f} s): candidate {c['candidate']} "
                  + ", ".join(f"{n} {m['test_acc']:.4f}" for n, m in c["strategies"].items()), flush=True)
    cells.sort(key=lambda c: (c["k"], c["seed"]))
    import torch

    from adaptflow.params import load

    p = load(HERE.parent / "params.yaml", args.overrides)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    # A resumed grid can hold cells measured by different commits: name each with the cells it ran.
    by_commit: dict[str, list[str]] = {}
    for c in cells:
        by_commit.setdefault(c.get("commit", "unknown"), []).append(f"k={c['k']}/seed {c['seed']}")
    meta = {"source": p.source.domain, "target": p.target.domain, "seeds": args.seeds, "k": args.k, "overrides": args.overrides,
            "commit": "; ".join(f"{h} ({', '.join(v)})" if len(by_commit) > 1 else h for h, v in by_commit.items()),
            "device": device, "machine": platform.platform(), "torch": torch.__version__, "wall_seconds": time.time() - start}
    summary = summarise(cells)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "cells": cells}, indent=2))
    md = to_markdown(summary, meta)
    args.out.with_suffix(".md").write_text(md)
    plot(summary, args.out.with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    main()
