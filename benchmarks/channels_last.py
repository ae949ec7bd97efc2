"""Memory format on the CPU: adaptflow's own paths with ``ADAPTFLOW_CHANNELS_LAST=0`` and ``=1``, alternated.

Runs ``speed.py --quick`` (resnet10t at 32 px: cache_features' extractor and ``fit`` from a uint8 store, and
timm's bare loops) once per setting per round, the two settings alternating and the order flipping every
round, so that a machine whose speed drifts (a shared CPU) favours neither. Writes each round's images/s and the median ratio per column to
``<out>.json`` and ``<out>.md``.

    python benchmarks/channels_last.py --rounds 3 --out benchmarks/results/channels_last_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = {
    "b_adaptflow_cache_features_default_batch": "cache_features (b), its default batch",
    "d_adaptflow_finetune": "fit (d)",
    "d_adaptflow_finetune_augmented": "fit with the digits augmentation (d aug)",
    "a_timm_forward_default_batch": "timm forward (a), the same batch",
    "c_timm_train_step": "timm train step (c)",
}


def one(setting: str, work: Path, r: int) -> dict:
    out = work / f"cl{setting}_{r}"
    env = {**os.environ, "ADAPTFLOW_CHANNELS_LAST": setting}
    proc = subprocess.run([sys.executable, str(HERE / "speed.py"), "--quick", "--out", str(out)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"speed.py --quick with ADAPTFLOW_CHANNELS_LAST={setting} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.with_suffix(".json").read_text())["rows"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "channels_last_cpu")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"0": [], "1": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for setting in ("0", "1") if r % 2 == 0 else ("1", "0"):  # a drift favours neither setting
                runs[setting].append(one(setting, Path(tmp), r))
                print(f"round {r + 1}, ADAPTFLOW_CHANNELS_LAST={setting}: " +
                      ", ".join(f"{k} {runs[setting][-1][k]:.0f}" for k in COLUMNS), flush=True)
    ratio = {k: statistics.median(b[k] / a[k] for a, b in zip(runs["0"], runs["1"])) for k in COLUMNS}
    res = {"machine": platform.platform(), "cpus": os.cpu_count(), "model": "resnet10t at 32 px (speed.py --quick)", "runs": runs,
           "median_ratio_channels_last_over_contiguous": ratio}
    lines = ["# Channels-last on the CPU", "",
             f"`python benchmarks/channels_last.py --rounds {args.rounds}` on {res['machine']} ({res['cpus']} CPUs): "
             "`speed.py --quick` (resnet10t at 32 px, 2,048 images, batch 128; cache_features at its default batch) "
             "with `ADAPTFLOW_CHANNELS_LAST=0` and `=1`, alternated (0 first in odd rounds, 1 first in even ones). "
             "Images/s, higher is better.", "",
             "| column | " + " | ".join(f"round {r + 1}: 0 → 1" for r in range(args.rounds)) + " | median ratio 1/0 |",
             "|---|" + "---|" * args.rounds + "---:|"]
    for k, name in COLUMNS.items():
        cells = [f"{a[k]:.0f} → {b[k]:.0f}" for a, b in zip(runs["0"], runs["1"])]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio[k]:.2f} |")
    lines += ["", "The ratio is per round (the `1` run against the `0` run of the same round), then the median."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
