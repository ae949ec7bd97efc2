"""Transfer benchmark: the pipeline's stages over several seeds, mean ± std per strategy.

Runs ingest → … → evaluate in-process for each seed (the seed changes the splits, the k-shot subset, the
initial weights and the augmentation draws), in its own work directory, and writes
``benchmarks/results/transfer.json`` and ``transfer.md``. Test accuracy is reported, never used to choose:
every checkpoint and the candidate are chosen on target val, as in the pipeline.

    python benchmarks/transfer.py --seeds 0 1 2 [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from adaptflow import params as params_mod
from adaptflow import stages
from adaptflow.params import ROLES

HERE = Path(__file__).resolve().parent


def run_seed(seed: int, overrides: list[str], work: Path) -> dict:
    p = params_mod.load(HERE.parent / "params.yaml", overrides + [f"seed={seed}"])
    root = work / f"seed{seed}"
    start = time.time()
    for role in ROLES:
        stages.get("ingest")(p, root, role=role)
    for name in ("pretrain", "cache_features", "finetune", "evaluate"):
        stages.get(name)(p, root)
    metrics = json.loads((root / p.paths.reports / "evaluate" / "metrics.json").read_text())
    metrics["seconds"] = time.time() - start
    return metrics


def summarise(per_seed: dict[int, dict]) -> dict:
    strategies = list(next(iter(per_seed.values()))["strategies"])
    out = {}
    for s in strategies:
        for m in ("val_acc", "test_acc", "test_macro_f1"):
            vals = np.array([r["strategies"][s][m] for r in per_seed.values()])
            out.setdefault(s, {})[m] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    cand = np.array([r["strategies"][r["candidate"]]["test_acc"] for r in per_seed.values()])
    out["candidate (chosen on val)"] = {"test_acc": {"mean": float(cand.mean()), "std": float(cand.std(ddof=1)) if len(cand) > 1 else 0.0},
                                        "picked": [r["candidate"] for r in per_seed.values()]}
    return out


def to_markdown(summary: dict, seeds: list[int], overrides: list[str]) -> str:
    lines = [f"Seeds {seeds}; overrides {overrides or 'none'}; mean ± std (sample std) over seeds.", "",
             "| strategy | target val acc | target test acc | test macro-F1 |", "|---|---|---|---|"]
    for s, m in summary.items():
        if "val_acc" not in m:
            continue
        f = lambda k: f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}"  # noqa: E731
        lines.append(f"| {s} | {f('val_acc')} | {f('test_acc')} | {f('test_macro_f1')} |")
    c = summary["candidate (chosen on val)"]
    lines += ["", f"Candidate chosen on target val per seed: {c['picked']}; its test accuracy "
              f"{c['test_acc']['mean']:.4f} ± {c['test_acc']['std']:.4f}.",
              "Checkpoints: best target val accuracy per strategy. Test accuracy chose nothing."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override key=value")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "transfer")
    ap.add_argument("--workdir", type=Path, default=None, help="where stage outputs go (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="adaptflow-bench-"))
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = run_seed(seed, args.overrides, work)
        print(f"seed {seed}: " + ", ".join(f"{s} {m['test_acc']:.4f}" for s, m in per_seed[seed]["strategies"].items()), flush=True)
    summary = summarise(per_seed)
    result = {"seeds": args.seeds, "overrides": args.overrides, "machine": platform.platform(), "summary": summary,
              "per_seed": per_seed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = to_markdown(summary, args.seeds, args.overrides)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
