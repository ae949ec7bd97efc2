"""Pure helpers of the evaluate and register stages: candidate choice, transfer gains over seeds, selection
rules, the promotion gate, lineage inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from adaptflow.data import store
from adaptflow.params import BASELINES, STRATEGIES
from adaptflow.stages.evaluate import best_row, choose_candidate, paired_gains, selection_rules, summarise, to_markdown
from adaptflow.stages.register import gate, majority


def rows(**by_strategy) -> pd.DataFrame:
    """rows(scratch=(val_acc, test_acc), ...) → the per-strategy summary evaluate builds (one seed each)."""
    runs = pd.DataFrame([{"strategy": s, "seed": 0, "val_acc": v, "test_acc": t, "test_macro_f1": t} for s, (v, t) in by_strategy.items()])
    return summarise(runs)


BASE = list(BASELINES)


def test_choose_candidate_ignores_baselines():
    r = rows(scratch=(0.99, 0.9), source_only=(0.98, 0.9), linear_probe=(0.6, 0.95), finetune=(0.7, 0.5))
    # the baselines have the best val, the test accuracy is irrelevant: finetune wins on val
    assert choose_candidate(r, BASE) == "finetune"


def test_choose_candidate_ties_take_list_order():
    r = rows(scratch=(0.1, 0.1), linear_probe=(0.8, 0.1), finetune=(0.8, 0.9))
    assert choose_candidate(r, BASE) == "linear_probe"
    r2 = rows(scratch=(0.1, 0.1), finetune=(0.8, 0.1), linear_probe=(0.8, 0.9))
    assert choose_candidate(r2, BASE) == "finetune"


def test_choose_candidate_ties_broken_by_val_nll():
    runs = pd.DataFrame([
        {"strategy": "scratch", "seed": 0, "val_acc": 1.0, "val_nll": 0.01, "test_acc": 0.9},
        {"strategy": "fixmatch", "seed": 0, "val_acc": 1.0, "val_nll": 0.20, "test_acc": 0.9},
        {"strategy": "dann", "seed": 0, "val_acc": 0.99, "val_nll": 0.001, "test_acc": 0.9},
        {"strategy": "dann+fixmatch", "seed": 0, "val_acc": 1.0, "val_nll": 0.05, "test_acc": 0.1},
    ])
    # saturated val accuracy: the lower val NLL wins, never the test numbers, never a baseline
    assert choose_candidate(summarise(runs), BASE) == "dann+fixmatch"
    assert best_row(runs[runs.strategy != "scratch"].set_index("strategy"), "val_acc") == "dann+fixmatch"


def test_choose_candidate_none_without_non_baselines():
    assert choose_candidate(rows(scratch=(0.5, 0.5), source_only=(0.6, 0.6)), BASE) is None


def test_choose_candidate_with_custom_baselines():
    r = rows(scratch=(0.9, 0.1), source_only=(0.5, 0.5), finetune=(0.7, 0.7))
    assert choose_candidate(r, ["source_only"]) == "scratch"
    assert choose_candidate(r, []) == "scratch"


@pytest.mark.parametrize("winner", [s for s in STRATEGIES if s not in BASELINES and s != "oracle"])
def test_choose_candidate_every_non_baseline(winner):
    vals = {s: (0.5, 0.5) for s in STRATEGIES}
    vals[winner] = (0.9, 0.1)
    assert choose_candidate(rows(**vals), BASE) == winner


def test_summarise_means_and_stds_over_seeds():
    runs = pd.DataFrame([
        {"strategy": "scratch", "seed": 0, "val_acc": 0.5, "test_acc": 0.6, "test_macro_f1": 0.6},
        {"strategy": "scratch", "seed": 1, "val_acc": 0.7, "test_acc": 0.8, "test_macro_f1": 0.8},
        {"strategy": "finetune", "seed": 0, "val_acc": 0.9, "test_acc": 0.9, "test_macro_f1": 0.9},
    ])
    s = summarise(runs)
    assert list(s.index) == ["scratch", "finetune"]
    assert s.loc["scratch", "val_acc"] == pytest.approx(0.6) and s.loc["scratch", "n_seeds"] == 2
    assert s.loc["scratch", "test_acc_std"] == pytest.approx(0.1414213, abs=1e-6)
    assert np.isnan(s.loc["finetune", "test_acc_std"])  # one seed has no spread: not 0


def test_a_seed_missing_a_number_leaves_the_mean_missing_not_the_other_seeds_mean():
    runs = pd.DataFrame([{"strategy": "finetune", "seed": k, "val_acc": 0.5, "test_acc": 0.5, "pool_im": im} for k, im in enumerate((0.95, 0.95, np.nan))]
                        + [{"strategy": "dann", "seed": k, "val_acc": 0.5, "test_acc": 0.5, "pool_im": 0.93} for k in range(3)])
    s = summarise(runs)
    assert np.isnan(s.loc["finetune", "pool_im"]) and np.isnan(s.loc["finetune", "pool_im_std"]) and s.loc["finetune", "n_seeds"] == 3
    assert choose_candidate(s, BASE, by="pool_im") == "dann"  # not the strategy whose third seed scored nothing
    assert np.isnan(paired_gains(runs, "dann", metric="pool_im").loc["finetune", "mean"])  # nor a gain over two of three seeds


def test_oracle_is_never_the_candidate():
    r = rows(scratch=(0.5, 0.5), oracle=(1.0, 1.0), finetune=(0.8, 0.8))
    assert choose_candidate(r, BASE) == "finetune"


def test_markdown_marks_candidate():
    runs = pd.DataFrame([{"strategy": s, "seed": 0, "val_acc": v, "test_acc": t, "test_macro_f1": t} for s, v, t in (("scratch", 0.5, 0.6), ("finetune", 0.8, 0.75))])
    md = to_markdown(summarise(runs), "finetune", {"scratch": "sel", "finetune": "sel"}, vs_scratch=paired_gains(runs, "scratch"))
    assert "| finetune **(candidate)** |" in md
    assert "| +0.1500 |" in md and "| scratch | 1 |" in md and "± 0.0000" not in md  # one seed: its value alone


def test_markdown_names_chance_and_who_is_at_or_below_it():
    runs = seeded(scratch=[0.10, 0.12], finetune=[0.60, 0.70])
    md = to_markdown(summarise(runs), "finetune", {}, vs_scratch=paired_gains(runs, "scratch"), chance=("2", 0.149))
    assert "Chance: always answering '2', the commonest test class, scores 0.1490; at or below it: scratch." in md
    assert "the seeds vary training only (one split, one labeled set)" in md


def test_markdown_gain_vs_scratch_is_the_paired_gain_with_its_std():
    runs = seeded(scratch=[0.50, 0.60, 0.70], finetune=[0.60, 0.55, 0.90])
    md = to_markdown(summarise(runs), "finetune", {}, vs_scratch=paired_gains(runs, "scratch"))
    std = pd.Series([0.10, -0.05, 0.20]).std()
    assert f"| {(0.10 - 0.05 + 0.20) / 3:+.4f} ± {std:.4f} |" in md and "paired by seed" in md
    assert "| scratch | 3 | 0.5000 ± 0.0000 | 0.6000 ± 0.1000 | 0.6000 ± 0.1000 | — |" in md


# --- gate ---------------------------------------------------------------------------------------------


def test_gate_promotes_when_beating_everything():
    ok, reasons = gate(0.9, {"scratch": 0.7, "source_only": 0.5}, 0.85, margin=0.05)
    assert ok is True
    assert len(reasons) == 3
    assert all(r.startswith("beats") for r in reasons)


def test_gate_first_champion():
    ok, reasons = gate(0.9, {"scratch": 0.7, "source_only": 0.5}, None, margin=0.0)
    assert ok
    assert "no current champion" in reasons


@pytest.mark.parametrize("failing", BASELINES)
def test_gate_rejects_when_a_baseline_is_not_beaten(failing):
    accs = {b: 0.5 for b in BASELINES}
    accs[failing] = 0.88
    ok, reasons = gate(0.9, accs, None, margin=0.05)
    assert not ok
    bad = [r for r in reasons if r.startswith("does not beat")]
    assert len(bad) == 1 and failing in bad[0]


def test_gate_says_which_baselines_it_did_not_check():
    ok, reasons = gate(0.2, {}, None, margin=0.0, unchecked=["scratch", "source_only"])
    assert ok and reasons[0] == "not checked against scratch, source_only (not in evaluate.baselines; register.require_baselines: false)"
    ok, reasons = gate(0.9, {"source_only": 0.5}, None, margin=0.0, unchecked=["scratch"])
    assert ok and reasons[0].startswith("not checked against scratch (") and reasons[1].startswith("beats source_only")


def test_gate_checks_chance_even_with_no_baselines():
    # baselines dropped (require_baselines: false): a model below always-answer-the-commonest-class is still refused
    ok, reasons = gate(0.28, {}, None, margin=0.0, unchecked=["scratch", "source_only"], chance=("circle", 0.40))
    assert not ok
    assert reasons[1] == ("does not beat chance (0.2800 vs 0.4000 for always answering the most common test class, 'circle'; "
                          "margin 0.0)")
    ok, reasons = gate(0.41, {}, None, margin=0.0, unchecked=["scratch", "source_only"], chance=("circle", 0.40))
    assert ok and reasons[1].startswith("beats chance (0.4100 vs 0.4000")


def test_gate_chance_takes_the_margin_and_a_tie_does_not_beat():
    assert not gate(0.45, {"scratch": 0.1}, None, margin=0.1, chance=("3", 0.40))[0]
    assert not gate(0.40, {"scratch": 0.1}, None, margin=0.0, chance=("3", 0.40))[0]
    assert gate(0.51, {"scratch": 0.1}, None, margin=0.1, chance=("3", 0.40))[0]


def test_gate_chance_is_beaten_by_the_registered_model_too():
    # the strategy's mean over seeds beats chance, the seed that would be registered does not
    ok, reasons = gate(0.45, {"scratch": 0.1}, None, margin=0.0, chance=("3", 0.40), model_test_acc=0.38)
    assert not ok and reasons[0] == ("does not beat chance (the lower of the mean 0.4500 and this model's 0.3800: 0.3800 vs 0.4000 "
                                     "for always answering the most common test class, '3'; margin 0.0)")
    assert gate(0.45, {"scratch": 0.1}, None, margin=0.0, chance=("3", 0.40), model_test_acc=0.41)[0]


def test_gate_baselines_are_beaten_by_the_registered_model_too():
    # seeds at 0.99, 0.99, 0.80: the mean 0.9267 beats scratch's 0.92, the seed val chose (0.80) does not
    ok, reasons = gate(0.9267, {"scratch": 0.92, "source_only": 0.5}, None, margin=0.0, model_test_acc=0.80)
    assert not ok and reasons[0] == "does not beat scratch (this model's, below the strategy's mean 0.9267: 0.8000 vs 0.9200, margin 0.0)"
    assert reasons[1].startswith("beats source_only (this model's, below")
    ok, reasons = gate(0.9267, {"scratch": 0.92}, None, margin=0.0, model_test_acc=0.99)  # above the mean: the mean decides, as before
    assert ok and reasons[0] == "beats scratch (0.9267 vs 0.9200, margin 0.0)"


def test_majority_is_the_commonest_test_class_and_its_share():
    split = store.Split(images=np.zeros((5, 1, 2, 2), np.uint8), labels=np.array([2, 0, 2, 1, 2]), classes=["a", "b", "c"])
    assert majority(split) == ("c", 0.6)
    tie = store.Split(images=np.zeros((4, 1, 2, 2), np.uint8), labels=np.array([1, 0, 1, 0]), classes=["a", "b"])
    assert majority(tie) == ("a", 0.5)
    with pytest.raises(ValueError, match="no image"):
        majority(store.Split(images=np.zeros((0, 1, 2, 2), np.uint8), labels=np.array([], np.int64), classes=["a"]))


def test_gate_margin_is_required():
    assert gate(0.80, {"scratch": 0.70}, None, margin=0.0)[0]
    assert not gate(0.80, {"scratch": 0.70}, None, margin=0.2)[0]
    assert not gate(0.70, {"scratch": 0.70}, None, margin=0.0)[0]  # a tie does not beat


def test_gate_rejects_when_champion_not_beaten():
    ok, reasons = gate(0.9, {"scratch": 0.5, "source_only": 0.5}, 0.9, margin=0.0)
    assert not ok
    assert any(r.startswith("does not beat current champion") for r in reasons)
    assert sum(r.startswith("does not beat") for r in reasons) == 1


def test_gate_champion_margin_not_applied():
    # the margin is over the baselines; the champion only has to be beaten
    ok, _ = gate(0.91, {"scratch": 0.5}, 0.90, margin=0.2)
    assert ok


def test_gate_reasons_name_every_failure():
    ok, reasons = gate(0.4, {"scratch": 0.5, "source_only": 0.6}, 0.7, margin=0.0)
    assert not ok
    joined = "\n".join(r for r in reasons if r.startswith("does not beat"))
    assert "scratch" in joined and "source_only" in joined and "champion" in joined
    assert "0.4000" in joined and "0.6000" in joined


# --- transfer gains over seeds, label-free choice, selection rules --------------------------------------


def seeded(**by_strategy) -> pd.DataFrame:
    """seeded(scratch=[test_acc at seed 0, seed 1, ...], ...) → per-run rows as evaluate builds them."""
    return pd.DataFrame([{"strategy": s, "seed": k, "val_acc": 0.5, "test_acc": t, "test_macro_f1": t}
                         for s, accs in by_strategy.items() for k, t in enumerate(accs)])


def test_paired_gains_mean_std_and_negative_seeds():
    runs = seeded(scratch=[0.50, 0.60, 0.70], finetune=[0.60, 0.55, 0.90])
    g = paired_gains(runs, "scratch")
    assert g.loc["finetune", "mean"] == pytest.approx((0.10 - 0.05 + 0.20) / 3)
    assert g.loc["finetune", "std"] == pytest.approx(pd.Series([0.10, -0.05, 0.20]).std())
    assert g.loc["finetune", "negative_seeds"] == 1
    assert g.loc["scratch", "mean"] == 0.0 and g.loc["scratch", "negative_seeds"] == 0
    assert list(g.index) == ["scratch", "finetune"]


def test_paired_gain_equals_difference_of_means():
    runs = seeded(scratch=[0.5, 0.7], source_only=[0.4, 0.3], finetune=[0.9, 0.6])
    s = summarise(runs)
    for ref in ("scratch", "source_only"):
        g = paired_gains(runs, ref)
        assert g.loc["finetune", "mean"] == pytest.approx(s.loc["finetune", "test_acc"] - s.loc[ref, "test_acc"])


def test_choose_candidate_label_free_uses_pool_score():
    r = summarise(pd.DataFrame([
        {"strategy": "scratch", "seed": 0, "val_acc": 0.9, "test_acc": 0.9, "pool_im": 0.9},
        {"strategy": "linear_probe", "seed": 0, "val_acc": 0.9, "test_acc": 0.1, "pool_im": 0.2},
        {"strategy": "finetune", "seed": 0, "val_acc": 0.1, "test_acc": 0.5, "pool_im": 0.6},
    ]))
    assert choose_candidate(r, BASE) == "linear_probe"  # by val
    assert choose_candidate(r, BASE, by="pool_im") == "finetune"  # no target labels: val may not choose


def test_selection_rules_name_every_reported_number():
    rules = selection_rules("the rule", label_free=False, references=["scratch", "source_only"])
    for key in ("candidate", "val acc", "test ECE", "mean ± std", "gain vs scratch", "gain vs source_only", "negative transfer", "oracle"):
        assert key in rules, key
    assert rules["candidate"] == "the rule"
    assert "no val label chose anything; shown for reference" in selection_rules("r", label_free=True, references=[])["val acc"]


def test_markdown_at_k0_shows_the_label_free_score_that_chose_and_no_scratch_column():
    runs = pd.DataFrame([{"strategy": s, "seed": 0, "val_acc": 0.1143, "test_acc": t, "test_macro_f1": t, "pool_im": im}
                         for s, t, im in (("source_only", 0.14, 0.0011), ("dann+fixmatch", 0.14, 0.0149))])
    md = to_markdown(summarise(runs), "dann+fixmatch", {}, by="pool_im")
    assert md.startswith("| strategy | seeds | pool IM (chose) | val acc | test acc | test macro-F1 | checkpoint chosen by |")
    assert "| dann+fixmatch **(candidate)** | 1 | 0.0149 | 0.1143 |" in md and "gain vs scratch" not in md
    header, rule, *body = md.splitlines()[:4]
    assert header.count("|") == rule.count("|") == body[0].count("|")


def test_markdown_labels_oracle_as_reported_only():
    r = rows(scratch=(0.5, 0.6), oracle=(1.0, 1.0), finetune=(0.8, 0.75))
    md = to_markdown(r, "finetune", {})
    assert "| oracle (oracle: reported only) |" in md


# --- register helpers -----------------------------------------------------------------------------------


def test_dvc_lock_hashes(tmp_path):
    from adaptflow.stages.register import dvc_lock_hashes

    assert dvc_lock_hashes(tmp_path) is None
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  ingest@target:\n    cmd: adaptflow stage ingest --role target\n"
        "    outs:\n    - path: data/ingested/target\n      hash: md5\n      md5: abc.dir\n"
        "  evaluate:\n    cmd: adaptflow stage evaluate\n    outs:\n    - path: reports/evaluate\n      md5: def.dir\n")
    lock = dvc_lock_hashes(tmp_path)
    assert lock["stages"] == {"ingest@target": {"data/ingested/target": "abc.dir"}, "evaluate": {"reports/evaluate": "def.dir"}}
    assert len(lock["sha256"]) == 64


def test_orchestrator_prefect_dvc_or_direct(monkeypatch):
    from adaptflow.stages.register import orchestrator

    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert orchestrator(None) == {"kind": "direct"}
    assert orchestrator("f-123") == {"kind": "prefect", "prefect_flow_run_id": "f-123"}
    monkeypatch.setenv("DVC_STAGE", "register")
    assert orchestrator(None)["kind"] == "dvc" and orchestrator(None)["dvc_stage"] == "register"


def test_register_does_not_import_mlflow_at_module_level():
    import subprocess
    import sys

    code = "import sys, adaptflow.stages.register, adaptflow.stages.evaluate, adaptflow.report; print('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_the_champion_is_scored_only_on_test_images_it_never_saw():
    import pandas as pd

    from adaptflow.stages.register import unseen_test

    # content: the decoded pixels (what splits); sha1: the stored pixels, which another image_size changes
    test = pd.DataFrame({"content": ["a", "b", "c", "d"], "sha1": ["A", "B", "C", "D"]})
    rows, note = unseen_test(test, {"content": ["x", "y"], "sha1": ["X", "Y"]})  # trained on other images: all of test, no note
    assert rows.tolist() == [0, 1, 2, 3] and note is None
    rows, note = unseen_test(test, {"content": ["b", "d", "z"], "sha1": ["B2", "D2", "Z"]})  # re-split; stored at another size
    assert rows.tolist() == [0, 2] and note.startswith("champion and candidate compared on the 2 of 4 test images") and "(2 it had" in note
    assert "stored-pixel" not in note
    # another file of one image (an L and an RGB copy): its decoded content differs, its stored pixels match one it had
    rows, note = unseen_test(test, {"content": ["c2"], "sha1": ["C"]})
    assert rows.tolist() == [0, 1, 3] and "(1 it had" in note
    rows, note = unseen_test(test, {"sha1": ["B", "Z"]})  # recorded before content hashes: matched by stored pixels, said so
    assert rows.tolist() == [0, 2, 3] and "recorded by stored-pixel hash only" in note
    rows, note = unseen_test(test, {"sha1": ["Z"]})
    assert rows.tolist() == [0, 1, 2, 3] and "recorded by stored-pixel hash only" in note
    for missing in (None, {}, {"other": []}):  # registered before this was recorded
        rows, note = unseen_test(test, missing)
        assert rows.tolist() == [0, 1, 2, 3] and "not recorded" in note
    rows, note = unseen_test(test, {"content": list(test.content), "sha1": []})
    assert rows.tolist() == [0, 1, 2, 3] and "flatters the champion" in note


def test_register_reuse_needs_the_same_key_store_and_a_version(tmp_path, monkeypatch):
    from adaptflow import orchestrate
    from adaptflow.stages.register import reusable

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "reports" / "registry.json"
    uri = orchestrate.tracking_uri(tmp_path)
    ident = orchestrate.Identity("register", "k1", out)
    assert reusable(out, "k1", uri) is None and not orchestrate.is_current(ident, tmp_path)  # nothing recorded
    out.parent.mkdir()
    out.write_text("{not json")
    assert reusable(out, "k1", uri) is None
    out.write_text(json.dumps({"key": "k1", "tracking_uri": uri, "version": "3"}))
    assert reusable(out, "k1", uri)["version"] == "3"
    assert reusable(out, "k2", uri) is None and reusable(out, "k1", "http://127.0.0.1:5000") is None
    assert not orchestrate.is_current(ident, tmp_path)  # the record is right but the local store is gone
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert orchestrate.is_current(ident, tmp_path)
    out.write_text(json.dumps({"key": "k1", "tracking_uri": uri, "version": None}))  # a failed registration
    assert reusable(out, "k1", uri) is None and not orchestrate.is_current(ident, tmp_path)


def test_a_test_set_picks_the_champion_once(monkeypatch):
    """A passing gate is held when the champion was registered on this same test set (a re-run with other
    params or code on the same data) or under a DVC experiment; a new test set gates afresh."""
    from adaptflow import tracking
    from adaptflow.stages import register

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    tags = {"1": {"test_set": "aaa111"}, "2": {"test_data_hash": "aaa111"}, "3": {"test_set": "aaa111"}}  # 2: before test_set was recorded
    monkeypatch.setattr(tracking, "version_tags", lambda name, v: tags[v])
    monkeypatch.setattr(tracking, "find_versions", lambda name, want: sorted((v for v, t in tags.items() if want.items() <= t.items()), key=int, reverse=True))
    assert register.hold("m", "3", None, "ccc333") is None  # the first gate on a test set is promoted
    assert register.hold("m", "3", "1", "bbb222") is None  # new target data: a new test set
    held = register.hold("m", "3", "1", "aaa111")
    assert held.startswith("held: champion (version 1) was registered on this same test set (test_set aaa111)")
    assert "on val (adaptflow registry show m)" in held and "adaptflow registry promote m 3" in held
    assert register.hold("m", "3", "2", "bbb222") is None  # nothing recorded to compare with
    # no champion, or one from another test set, but version 1's gate (passed or failed) read this test set already
    for champion in (None, "2"):
        held = register.hold("m", "3", champion, "aaa111")
        assert held.startswith("held: version(s) 1 were gated on this same test set (test_set aaa111) before"), held
    tags.update({str(v): {"test_set": "aaa111"} for v in range(4, 11)})
    assert "version(s) 10, 9, 8, 7, 6 and 4 more were gated" in register.hold("m", "11", None, "aaa111")
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-lamb")
    for champion in (None, "1"):
        assert register.hold("m", "3", champion, "bbb222").startswith("held: DVC experiment 'tidy-lamb' never moves champion")


def test_promote_refuses_what_no_held_gate_stands_behind(monkeypatch):
    from adaptflow import aliases, tracking
    from adaptflow.stages import register

    tags = {"1": {"gate": "rejected", "gate_reasons": "does not beat scratch (0.5 vs 0.6, margin 0.0)"},
            "2": {"gate": register.HELD, "gate_reasons": "no current champion; held: …", register.GATED_AGAINST: "none"}}
    moves = []
    monkeypatch.setattr(tracking, "version_exists", lambda name, v: v in tags)
    monkeypatch.setattr(tracking, "version_tags", lambda name, v: tags[v])
    where = {"champion": None, "challenger": "2"}
    monkeypatch.setattr(tracking, "alias_version", lambda name, alias: where[alias])

    def move(name, alias, v, **kw):
        moves.append((alias, v, kw["expected"]))
        if kw["expected"] != where[alias]:
            raise aliases.AliasConflict(name, alias, kw["expected"], where[alias])
        where[alias] = v

    monkeypatch.setattr(tracking, "move_alias", move)
    monkeypatch.setattr(tracking, "set_version_tags", lambda name, v, t: tags[v].update(t))
    monkeypatch.setattr(tracking, "missing_model", lambda name: None if name == "m" else f"{name}: no such registered model (did you mean m?)")
    monkeypatch.setattr(tracking, "alias_history", lambda name, alias=None: [])  # (else MLflow's default store: an mlflow.db in the cwd)
    with pytest.raises(register.PromoteRefused, match="no such registered version"):
        register.promote("m", "9")
    with pytest.raises(register.PromoteRefused, match=r"^n: no such registered model \(did you mean m\?\)$"):
        register.promote("n", "9")
    with pytest.raises(register.PromoteRefused, match=r"its gate was 'rejected'.*does not beat scratch"):
        register.promote("m", "1")
    assert register.promote("m", "2")["previous_champion"] is None
    # champion moves, and challenger, which named the same version, is removed
    assert moves == [("champion", "2", None), ("challenger", None, "2")] and where == {"champion": "2", "challenger": None}
    assert tags["2"]["gate"] == "promoted"
    assert tags["2"]["gate_reasons"] == "no current champion; held: …; then promoted by hand (adaptflow registry promote)"
    again = register.promote("m", "2")  # already champion: nothing moves, and it says so
    assert again["already"] and len(moves) == 3 and moves[-1] == ("challenger", None, "2") and where["challenger"] is None
    where["challenger"] = "2"  # a promotion that stopped before removing challenger: the retry finishes it
    assert register.promote("m", "2")["already"] and where["challenger"] is None
    tags["3"] = {"gate": register.HELD, "gate_reasons": "beats version 2", register.GATED_AGAINST: "2"}
    where["challenger"] = "4"  # challenger moved on to another version: it stays there
    assert register.promote("m", "3")["previous_champion"] == "2" and where == {"champion": "3", "challenger": "4"}


def test_rollback_goes_back_to_a_former_champion_only(monkeypatch):
    from adaptflow import aliases, tracking
    from adaptflow.stages import register

    tags = {v: {"gate": "promoted"} for v in ("1", "2")} | {"3": {"gate": "rejected"}}
    moves = [aliases.AliasMove(1, "champion", None, "1", 100.0, "gate passed", "me"),
             aliases.AliasMove(2, "challenger", None, "3", 150.0, "gate rejected", "me"),
             aliases.AliasMove(3, "champion", "1", "2", 200.0, "gate passed", "me")]
    where = {"champion": "2"}
    monkeypatch.setattr(tracking, "version_exists", lambda name, v: v in tags)
    monkeypatch.setattr(tracking, "version_tags", lambda name, v: tags[v])
    monkeypatch.setattr(tracking, "alias_version", lambda name, alias: where.get(alias))
    monkeypatch.setattr(tracking, "alias_history", lambda name, alias=None: [m for m in moves if alias in (None, m.alias)])
    monkeypatch.setattr(tracking, "set_version_tags", lambda name, v, t: tags[v].update(t))
    monkeypatch.setattr(tracking, "delete_version_tag", lambda name, v, key: tags[v].pop(key, None))
    monkeypatch.setattr(tracking, "missing_model", lambda name: None)

    def move(name, alias, v, **kw):
        if kw["expected"] != where.get(alias):
            raise aliases.AliasConflict(name, alias, kw["expected"], where.get(alias))
        moves.append(aliases.AliasMove(len(moves) + 1, alias, where.get(alias), v, 300.0, kw["reason"], "me", kw["context"]))
        where[alias] = v

    monkeypatch.setattr(tracking, "move_alias", move)
    with pytest.raises(register.PromoteRefused, match="--reason: say why"):
        register.rollback("m", " ")
    with pytest.raises(register.PromoteRefused, match="version 3 was never made champion by adaptflow: only a former champion"):
        register.rollback("m", "bad", to="3")
    with pytest.raises(register.PromoteRefused, match="version 9: no such registered version"):
        register.rollback("m", "bad", to="9")
    # promote names the way back for a former champion
    with pytest.raises(register.PromoteRefused, match=r"it was champion before: to go back to it, adaptflow registry rollback m --to 1"):
        register.promote("m", "1")
    done = register.rollback("m", "v2 mislabels blurry scans")  # default: the version v2 replaced
    assert done == {"model_name": "m", "version": "1", "previous_champion": "2"} and where["champion"] == "1"
    assert moves[-1].reason == "rolled back by hand (adaptflow registry rollback) from version 2: v2 mislabels blurry scans"
    assert tags["2"]["rolled_back"] == "v2 mislabels blurry scans" and tags["2"]["gate"] == "promoted"
    with pytest.raises(register.PromoteRefused, match="version 1, and the alias history shows no version before it: give --to"):
        register.rollback("m", "again")  # v1 was the first champion (the rollback that put it back is not a promotion)
    where["challenger"] = "2"  # e.g. its weights came back in a run and were gated again: champion and challenger never name one version
    assert register.rollback("m", "v2 was fine after all", to="2")["version"] == "2"
    assert "rolled_back" not in tags["2"] and tags["1"]["rolled_back"] == "v2 was fine after all"  # champion again: not rolled back
    assert where["challenger"] is None and moves[-1].reason == "version 2 made champion again by a rollback (adaptflow registry rollback)"
    # a version made champion outside adaptflow (a noticed move) passed no gate: never a rollback's target
    tags["5"] = {"gate": "rejected"}
    moves.append(aliases.AliasMove(len(moves) + 1, "champion", "2", "5", 400.0, "noticed", "outside adaptflow", {"outside": True}))
    where["champion"] = "5"
    with pytest.raises(register.PromoteRefused, match="shows no version before it .it was put there outside adaptflow.: give --to"):
        register.rollback("m", "x")
    move("m", "champion", "2", expected="5", reason="gate passed", context={})  # then a gate put 2 back
    with pytest.raises(register.PromoteRefused, match="version 5 was never made champion by adaptflow"):
        register.rollback("m", "x", to="5")
    # champion removed (outside adaptflow): only --to can put a former champion back
    where["champion"] = None
    with pytest.raises(register.PromoteRefused, match="m has no champion: give --to"):
        register.rollback("m", "x")
    assert register.rollback("m", "champion was deleted by mistake", to="1")["previous_champion"] is None and where["champion"] == "1"


def test_the_report_says_when_fixmatch_trained_nothing_and_where_chance_is():
    from adaptflow import report
    from adaptflow.stages.finetune import max_pseudo_label_rate

    assert max_pseudo_label_rate([{"pseudo_label_rate": 0.0}, {"pseudo_label_rate": 0.0}]) == 0
    assert max_pseudo_label_rate([{"pseudo_label_rate": 0.0}, {"pseudo_label_rate": 0.25}]) == 0.25
    assert max_pseudo_label_rate([{"train_loss": 1.0}]) is None  # no fixmatch in the run
    m = {"n_seeds": 1, "test_acc": 0.4, "test_acc_std": None, "below_chance": False}
    ev = {"target_domain": "t", "source_domain": "s", "test_data_hash": "h", "n_test": 208, "n_val": 73, "seeds": [0],
          "candidate": "dann+fixmatch", "candidate_seed": 0, "candidate_rule": "target val accuracy", "reference_baselines": [],
          "strategies": {"dann+fixmatch": m, "scratch": {**m, "test_acc": 0.11, "below_chance": True}}, "negative_transfer": None,
          "runs": {"dann+fixmatch/seed0": {"test_acc": 0.4087, "test_acc_ci95": [0.344, 0.477], "pseudo_label_rate_max": 0.0},
                   "scratch/seed0": {"test_acc": 0.11, "pseudo_label_rate_max": None}},
          "chance": {"class": "2", "test_acc": 0.149}}
    text = "\n".join(report._headline(ev))
    assert "FixMatch trained nothing in dann+fixmatch/seed0: no pool image reached its confidence threshold" in text
    assert "test accuracy 0.4087, 95% interval 0.344–0.477 over the 208 test images" in text
    assert "Chance: always answering '2', the commonest test class, scores 0.1490; at or below it: scratch" in text


def test_the_version_that_answers_for_weights_already_registered(monkeypatch):
    """Of the versions serving one candidate: the champion; else one whose verdict (rejected or held) was given
    against today's champion, or one rolled back; never a registration cut short (no verdict recorded), nor a
    promoted version no longer champion: those weights are gated anew."""
    from adaptflow import tracking
    from adaptflow.stages import register

    tags = {"1": {"gate": "promoted", "gated_against": "none"},  # the first champion, since replaced
            "2": {"gate": "rejected", "gated_against": "3"},
            "4": {"gate": "passed, held", "gated_against": "1"},
            "5": {},  # registered, then the run stopped before its gate was recorded
            "6": {"gate": "promoted", "gated_against": "1", "rolled_back": "misreads sevens"}}
    where = {"champion": "3"}
    monkeypatch.setattr(tracking, "alias_version", lambda name, alias: where.get(alias))
    monkeypatch.setattr(tracking, "version_tags", lambda name, v: tags[v])
    assert register.standing_version("m", ["3", "2"]) == "3"  # the champion itself
    assert register.standing_version("m", ["4", "2"]) == "2"  # 4 was gated against 1, no longer champion
    assert register.standing_version("m", ["5", "1", "4"]) is None  # every verdict stale or missing: gated anew
    assert register.standing_version("m", ["6"]) == "6"  # a rollback is not undone by a re-run
    where["champion"] = None  # the champion alias removed
    assert register.standing_version("m", ["1"]) is None and register.standing_version("m", ["5"]) is None


def test_the_report_names_a_run_whose_training_diverged():
    from adaptflow import report
    from adaptflow.stages.finetune import diverged_at

    nan = float("nan")
    assert diverged_at([{"epoch": 0, "train_loss": nan}, {"epoch": 1, "train_loss": 0.5}]) is None  # epoch 0 has no loss
    assert diverged_at([{"epoch": 0, "train_loss": nan}, {"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": float("inf")}]) == 2
    ev = {"target_domain": "t", "source_domain": "s", "test_data_hash": "h", "n_test": 10, "n_val": 5, "seeds": [0], "candidate": None,
          "strategies": {}, "negative_transfer": None, "runs": {"finetune/seed0": {"diverged_at": 2}, "scratch/seed0": {"diverged_at": None}}}
    assert "Training diverged (a loss that was no longer finite) in finetune/seed0 (epoch 2): each stopped there" in "\n".join(report._headline(ev))
