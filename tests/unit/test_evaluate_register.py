"""Pure helpers of the evaluate and register stages: candidate choice, transfer gains, the promotion gate."""

from __future__ import annotations

import pandas as pd
import pytest

from adaptflow.params import BASELINES, STRATEGIES
from adaptflow.stages.evaluate import choose_candidate, compare, summarise, to_markdown
from adaptflow.stages.register import gate


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


def test_compare_transfer_gain_and_negative_transfer():
    r = rows(scratch=(0.5, 0.60), source_only=(0.4, 0.30), linear_probe=(0.7, 0.55), finetune=(0.8, 0.75))
    out = compare(r, "finetune", BASE)
    assert out["transfer_gain"] == {"over_scratch": pytest.approx(0.15), "over_source_only": pytest.approx(0.45)}
    assert sorted(out["negative_transfer"]) == ["linear_probe", "source_only"]


def test_compare_negative_gain_for_bad_candidate():
    r = rows(scratch=(0.5, 0.8), source_only=(0.4, 0.3), finetune=(0.9, 0.7))
    out = compare(r, "finetune", BASE)
    assert out["transfer_gain"]["over_scratch"] == pytest.approx(-0.1)
    assert sorted(out["negative_transfer"]) == ["finetune", "source_only"]


def test_compare_equal_to_scratch_is_not_negative():
    r = rows(scratch=(0.5, 0.7), finetune=(0.9, 0.7))
    assert compare(r, "finetune", ["scratch"]) == {"transfer_gain": {"over_scratch": 0.0}, "negative_transfer": []}


def test_compare_without_candidate_or_scratch():
    r = rows(source_only=(0.4, 0.3), finetune=(0.9, 0.7))
    assert compare(r, None, BASE) == {"transfer_gain": {}, "negative_transfer": []}
    assert compare(r, "finetune", ["source_only"])["transfer_gain"] == {"over_source_only": pytest.approx(0.4)}


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
    assert s.loc["finetune", "test_acc_std"] == 0.0


def test_oracle_is_never_the_candidate():
    r = rows(scratch=(0.5, 0.5), oracle=(1.0, 1.0), finetune=(0.8, 0.8))
    assert choose_candidate(r, BASE) == "finetune"


def test_markdown_marks_candidate():
    r = rows(scratch=(0.5, 0.6), finetune=(0.8, 0.75))
    md = to_markdown(r, "finetune", {"scratch": "sel", "finetune": "sel"})
    assert "| finetune **(candidate)** |" in md
    assert "+0.1500" in md and "| scratch | 1 |" in md


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
