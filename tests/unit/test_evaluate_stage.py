"""The evaluate stage end to end on a hand-built project: tiny random models, a 3-class target store."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from adaptflow import outputs
from adaptflow import params as params_mod
from adaptflow.data import store
from adaptflow.models import ModelConfig, create, save
from adaptflow.stages import evaluate
from adaptflow.stages.finetune import output_dir as adapted_dir
from adaptflow.stages.ingest import output_dir as ingested_dir
from tests.unit.conftest import SIZE, class_images

CLASSES = ["a", "b", "c"]


def build_project(root, strategies=("scratch", "source_only", "finetune"), seeds=(0, 1), k=2, baselines=("scratch", "source_only")) -> params_mod.Params:
    p = params_mod.from_dict({
        "preprocess": {"image_size": SIZE, "channels": 1},
        "pretrain": {"model": "test_resnet"},
        "target": {"k": k},
        "finetune": {"strategies": list(strategies), "seeds": list(seeds)},
        "evaluate": {"baselines": list(baselines)},
    })
    splits = np.array(["train"] * 12 + ["val"] * 6 + ["test"] * 9)
    labels = np.concatenate([np.arange(12) % 3, np.arange(6) % 3, np.arange(9) % 3]).astype(np.int64)
    meta = pd.DataFrame({"label": labels, "class_name": [CLASSES[i] for i in labels], "split": splits,
                         "labeled": np.arange(len(labels)) < 6, "source_index": np.arange(len(labels)), "sha1": [str(i) for i in range(len(labels))]})
    with outputs.atomic_dir(ingested_dir(p, root, "target"), "ingest", "k") as tmp:
        store.write(tmp, class_images(labels, 3), meta, {
            "classes": CLASSES, "data_hash": "feedbeef", "domain": "uci_digits", "n_images": len(labels),
            "quarantined": [{"item": "b/cut.png", "class": "b", "reason": "truncated image"}], "ignored": [],
            "duplicates": {"removed": 3, "conflicting_class": 1, "label_conflicts": [{"item": "a/x.png"}]}})
    for i, s in enumerate(strategies):
        for seed in seeds:
            torch.manual_seed(10 * i + seed)
            cfg = ModelConfig("test_resnet", 1, SIZE, CLASSES, {"selection": f"rule of {s}", "best_epoch": None if s == "source_only" else 2})
            history = [] if s == "source_only" else [{"epoch": 0, "train_loss": float("nan"), "val_acc": 0.3, "val_loss": 1.1},
                                                     {"epoch": 1, "train_loss": 1.0, "val_acc": 0.4, "val_loss": 1.0},
                                                     {"epoch": 2, "train_loss": 0.8, "val_acc": 0.5, "val_loss": 0.9}]
            with outputs.atomic_dir(adapted_dir(p, root, s, seed), "finetune", "k") as tmp:
                save(create(cfg), cfg, tmp)
                (tmp / "history.json").write_text(json.dumps(history))
    return p


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_project")
    p = build_project(root)
    torch.set_num_threads(1)
    return root, p, evaluate.run(p, root)


def test_writes_every_output(evaluated):
    root, p, res = evaluated
    out = evaluate.output_dir(p, root)
    for f in ("metrics.json", "evaluation.json", "comparison.csv", "comparison.md", "report.html", "report.md",
              "plots/summary.png", "plots/learning_finetune.png", "plots/reliability_scratch_seed1.png", "plots/confusion_finetune_seed0.png",
              "dvc_plots/learning_curves.json", "dvc_plots/reliability.json", "dvc_plots/confusion_candidate.json",
              "dvc_plots/test_acc.json", "dvc_plots/template_by_run.json", "dvc_plots/template_reliability.json"):
        assert (out / f).is_file(), f
    assert outputs.read_manifest(out) is not None and res["cached"] is False


def test_metrics_per_strategy_and_run(evaluated):
    _, _, res = evaluated
    m = res["metrics"]
    assert m["candidate"] == "finetune" and m["candidate_seed"] in (0, 1)  # the only non-baseline
    assert set(m["runs"]) == {f"{s}/seed{k}" for s in ("scratch", "source_only", "finetune") for k in (0, 1)}
    for s, sm in m["strategies"].items():
        for key in ("val_acc", "test_acc", "test_macro_f1", "test_ece", "test_nll", "test_acc_std", "gain_over_scratch", "gain_over_source_only"):
            assert isinstance(sm[key], float) and not math.isnan(sm[key]), (s, key)
        assert set(sm["recall"]) == set(CLASSES) and sm["n_seeds"] == 2
    assert m["strategies"]["scratch"]["negative_transfer"] is None
    assert isinstance(m["strategies"]["finetune"]["negative_transfer"], bool)
    assert set(m["transfer_gain"]) == {"over_scratch", "over_source_only"}
    r = m["runs"]["finetune/seed0"]
    assert 0 <= r["test_ece"] <= 1 and r["best_epoch"] == 2 and m["runs"]["source_only/seed0"]["best_epoch"] is None
    # the means are the means of the runs
    accs = [m["runs"][f"finetune/seed{k}"]["test_acc"] for k in (0, 1)]
    assert m["strategies"]["finetune"]["test_acc"] == pytest.approx(np.mean(accs))


def test_evaluation_record_says_how_every_number_was_chosen(evaluated):
    root, p, _ = evaluated
    ev = json.loads((evaluate.output_dir(p, root) / "evaluation.json").read_text())
    assert ev["candidate_selection"] == evaluate.SELECTION
    assert ev["checkpoint_selection"]["finetune"] == "rule of finetune"
    assert {"candidate", "val acc", "test ECE", "gain vs scratch", "negative transfer"} <= set(ev["selection_rules"])
    assert sum(b["count"] for b in ev["reliability"]["finetune/seed0"]) == 9


def test_report_is_one_self_contained_page(evaluated):
    root, p, _ = evaluated
    out = evaluate.output_dir(p, root)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 + 3 + 6 + 6  # summary, learning per strategy, reliability + confusion per run
    for text in ("Side by side", "Per-class recall", "How every number was chosen", "finetune/seed1", "gain vs source_only"):
        assert text in page, text
    md = (out / "report.md").read_text()
    assert "![summary](plots/summary.png)" in md and "| finetune | candidate | 2 |" in md
    said = ("Target data: 27 images kept; left out: 1 quarantined, 2 exact duplicates removed, 2 copies excluded for a label conflict, "
            "0 ignored (each file with its reason in reports/ingest_target.json).")
    assert said in md and said in page  # what ingest left out, where the report is read


def test_dvc_plot_data_is_plain_records(evaluated):
    root, p, _ = evaluated
    d = evaluate.output_dir(p, root) / "dvc_plots"
    learning = json.loads((d / "learning_curves.json").read_text())
    assert {r["run"] for r in learning} == {f"{s}/seed{k}" for s in ("scratch", "finetune") for k in (0, 1)}  # source_only never trained
    assert all(set(r) >= {"epoch", "train_loss", "val_metric"} for r in learning)
    assert len(json.loads((d / "confusion_candidate.json").read_text())) == 9
    tmpl = json.loads((d / "template_by_run.json").read_text())
    assert tmpl["data"]["values"] == "<DVC_METRIC_DATA>" and tmpl["encoding"]["color"]["field"] == "run"


def test_second_run_is_cached(evaluated):
    root, p, res = evaluated
    again = evaluate.run(p, root)
    assert again["cached"] is True and again["digest"] == res["digest"]


def test_label_free_target_chooses_on_the_pool(tmp_path):
    try:
        from adaptflow.strategies import needs_labels
    except ImportError:
        pytest.skip("no label-free strategies in this tree")
    label_free = [s for s in params_mod.STRATEGIES if s not in ("source_only", "oracle") and not needs_labels(s)][:2]
    try:
        p = build_project(tmp_path, strategies=("source_only", *label_free), seeds=(0,), k=0, baselines=("source_only",))
    except params_mod.ParamsError as exc:
        pytest.skip(f"target.k = 0 is not allowed by this params schema: {exc}")
    res = evaluate.run(p, tmp_path)
    ev = json.loads((evaluate.output_dir(p, tmp_path) / "evaluation.json").read_text())
    assert ev["candidate_selection"] == evaluate.SELECTION_LABEL_FREE
    pool = {s: res["metrics"]["strategies"][s]["pool_im"] for s in label_free}
    assert res["metrics"]["candidate"] == max(pool, key=pool.get)  # the label-free score chose, not val accuracy


def test_report_command_prints_the_table_and_says_when_it_is_stale(evaluated, monkeypatch, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from adaptflow.cli import app

    root, p, _ = evaluated
    monkeypatch.chdir(root)
    (root / "params.yaml").write_text(yaml.safe_dump(p.to_dict()))
    res = CliRunner().invoke(app, ["report"])
    assert res.exit_code == 0 and "**(candidate)**" in res.output and "Test accuracy chooses nothing" in res.output, res.output
    assert "not current" not in res.output and f"report: {(root / 'reports/evaluate/report.html').resolve()}" in res.output
    stale = CliRunner().invoke(app, ["report", "--set", "evaluate.ece_bins=7"])
    assert stale.exit_code == 0 and "note: this evaluation is not current for these params and data" in stale.output
    assert "evaluate's own params or inputs differ" in stale.output
    # a change further up (the adapted models were made with another lr) is noted too, also with --json:
    # one adapted model's manifest records the finetune params it was made from, as finetune writes it
    made = root / "models/adapted/finetune/seed0" / outputs.MANIFEST
    manifest = json.loads(made.read_text())
    made.write_text(json.dumps({**manifest, "inputs": {"params": p.sections("finetune"), "upstream": {}}}))
    assert CliRunner().invoke(app, ["report"]).output.count("not current") == 0  # the same params: current
    upstream = CliRunner().invoke(app, ["report", "--json", "--set", "finetune.lr=0.5"])
    assert upstream.exit_code == 0 and "was made with finetune.lr=" in upstream.output, upstream.output
    numbers = CliRunner().invoke(app, ["report", "--json"])
    assert json.loads(numbers.output)["candidate"] == "finetune"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    none = CliRunner().invoke(app, ["report"])
    assert none.exit_code == 2 and "error: no evaluation in" in none.output and "run the pipeline first" in none.output
