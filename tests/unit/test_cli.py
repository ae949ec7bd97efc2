"""The command line's answers to wrong input: one ``error:`` line, exit status 2, no traceback, no work."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adaptflow.cli import app

PARAMS = str(Path(__file__).resolve().parents[2] / "params.yaml")


def _invoke(args: list[str]):
    res = CliRunner().invoke(app, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res


@pytest.mark.parametrize("args, message", [
    (["stage", "ingest", "--role", "both"], "--role: 'both' is not one of source, target"),
    (["stage", "finetune", "--strategy", "oracle"], "--strategy: 'oracle' is not in finetune.strategies"),
    (["stage", "finetune", "--seed", "7"], "--seed: 7 is not in finetune.seeds"),
    (["stage", "augment", "--seed", "0"], "--seed is for the finetune stage, not augment"),
    (["stage", "augment"], "data/ingested/source: no complete stage output here (run the upstream stage first)"),
    (["stage", "register"], "no complete stage output here (run the upstream stage first)"),
])
def test_stage_refuses_what_it_cannot_run(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    res = _invoke(args + ["--params", PARAMS])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()  # nothing written


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deploy_checks_the_schedule_and_the_server_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    res = _invoke(["deploy", "--cron", "every day", "--params", PARAMS])
    assert res.exit_code == 2 and "--cron: 'every day' is not a cron schedule" in res.output
    res = _invoke(["deploy", "--set", "orchestrate.cron=a b c d e", "--params", PARAMS])
    assert res.exit_code == 2 and "orchestrate.cron: 'a b c d e' is not a cron schedule" in res.output
    from prefect.settings import PREFECT_API_URL, temporary_settings  # read once by Prefect: set, not exported

    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{_closed_port()}/api"}):
        res = _invoke(["deploy", "--params", PARAMS])
    assert res.exit_code == 2 and "no Prefect server answers at PREFECT_API_URL" in res.output


def test_stage_refuses_upstream_outputs_made_from_other_params(tmp_path, monkeypatch):
    """`adaptflow stage X` alone reads what is on disk: made from other params, it is refused, naming the key."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\npreprocess: {image_size: 8, channels: 1}\n"
                                          "source: {domain: synth_digits, synth: {n: 60, size: 12}}\ntarget: {domain: uci_digits, k: 2}\n")
    assert _invoke(["stage", "ingest"]).exit_code == 0
    res = _invoke(["stage", "augment", "--set", "seed=1"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "data/ingested/source was made with seed=0, params now give 1" in res.output
    assert "data/ingested/target was made with seed=0, params now give 1" in res.output
    assert not (tmp_path / "data" / "augmented").exists()  # nothing done
    assert _invoke(["stage", "augment"]).exit_code == 0


def test_stage_refuses_an_ingest_of_raw_files_that_have_changed_since(tmp_path, monkeypatch):
    from tests.datafiles import make_imagefolder

    monkeypatch.chdir(tmp_path)
    folder = make_imagefolder(tmp_path / "raw", per_class=10, classes=3, mixed=False)
    (tmp_path / "params.yaml").write_text("seed: 0\npreprocess: {image_size: 8, channels: 1}\n"
                                          "source: {domain: synth_digits, synth: {n: 60, size: 12}}\ntarget: {domain: 'imagefolder:raw', k: 2}\n")
    assert _invoke(["stage", "ingest"]).exit_code == 0
    assert _invoke(["stage", "augment"]).exit_code == 0
    first = sorted((folder / "1").iterdir())[0]
    first.write_bytes(sorted((folder / "2").iterdir())[0].read_bytes())  # a relabelled image, same params
    res = _invoke(["stage", "augment"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "data/ingested/target was made from raw data that has changed since" in res.output
    assert "data/ingested/source" not in res.output  # the built-in source has not changed
    assert "will not notice" not in res.output  # not a DVC project: nothing about dvc.yaml's deps
    (tmp_path / ".dvc").mkdir()  # in one, `dvc repro` would find nothing to do: the refusal says what to set
    res = _invoke(["stage", "augment"])
    assert res.exit_code == 2 and "is outside target.raw (adaptflow/data): `dvc repro` will not notice changes to it; set target.raw: raw" in res.output
    (tmp_path / ".dvc").rmdir()
    monkeypatch.setenv("DVC_STAGE", "augment")  # under `dvc repro`, DVC compares raw files by content instead
    assert _invoke(["stage", "augment"]).exit_code == 0  # passes the check (and is up to date)
    monkeypatch.delenv("DVC_STAGE")
    assert _invoke(["stage", "ingest", "--role", "target"]).exit_code == 0
    assert _invoke(["stage", "augment"]).exit_code == 0


class _FakeModel:
    """Stands in for the registered pyfunc: labels each image by its width, and records each call's size."""

    def __init__(self):
        self.calls: list[int] = []

    def predict(self, frame):
        import pandas as pd
        from PIL import Image

        self.calls.append(len(frame))
        from adaptflow.serving_model import reads_paths

        assert reads_paths(), "the CLI's model must read the paths it is given"
        widths = [Image.open(p).width for p in frame["image"]]
        return pd.DataFrame({"label": [str(w) for w in widths], "confidence": [1.0] * len(widths)})


def test_predict_goes_a_batch_at_a_time_and_writes_the_csv_once(tmp_path, monkeypatch, png_bytes):
    from adaptflow import imaging, tracking

    fake = _FakeModel()
    monkeypatch.setattr(tracking, "load_model", lambda uri: fake)
    monkeypatch.setenv("ADAPTFLOW_READ_PATHS", "0")  # meant for a server: the CLI reads the files it was given
    checked = []
    real_to_pil = imaging.to_pil
    monkeypatch.setattr(imaging, "to_pil", lambda f: checked.append(f) or real_to_pil(f))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exported" / "model").mkdir(parents=True)  # a logged model's folder (loaded by the fake)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(7):
        (folder / f"{i}.png").write_bytes(png_bytes)
    (folder / "3.png").write_text("not an image")
    res = _invoke(["predict", "-m", "exported/model", str(folder), "-o", "out/pred.csv", "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    # 7 files, 3 a batch; the second batch fails on its unreadable file, is checked file by file (and only
    # it: the others are decoded once, by the model) and predicted again without that file
    assert fake.calls == [3, 3, 2, 1]
    assert checked == [folder / f"{i}.png" for i in (3, 4, 5)]
    assert f"skipped {folder / '3.png'}: not an image Pillow can read" in res.output
    table = (tmp_path / "out" / "pred.csv").read_text().splitlines()
    assert table[0] == "path,label,confidence" and len(table) == 1 + 6
    assert [line.split(",")[0] for line in table[1:]] == [str(folder / f"{i}.png") for i in (0, 1, 2, 4, 5, 6)]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left
    # the CLI reads paths while it predicts; this process keeps its own setting (a served model in a later
    # subprocess inherits it)
    assert os.environ["ADAPTFLOW_READ_PATHS"] == "0"
    assert "skipped 1 of 7 file(s) (listed above)" in res.output
    # --strict: the same predictions and CSV, and exit status 3 for a batch job to notice the skipped file
    strict = _invoke(["predict", "-m", "exported/model", str(folder), "-o", "out/strict.csv", "--strict"])
    assert strict.exit_code == 3 and "skipped 1 of 7 file(s) (listed above); --strict: exit status 3" in strict.output
    assert (tmp_path / "out" / "strict.csv").read_text() == (tmp_path / "out" / "pred.csv").read_text()
    assert _invoke(["predict", "-m", "exported/model", str(folder / "0.png"), "--strict"]).exit_code == 0  # nothing skipped

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("no")
    monkeypatch.delenv("ADAPTFLOW_READ_PATHS")
    res = _invoke(["predict", "-m", "exported/model", str(tmp_path / "bad"), "-o", "bad.csv"])
    assert res.exit_code == 2 and "none of the 1 file(s) is a readable image" in res.output
    assert not (tmp_path / "bad.csv").exists()
    assert "ADAPTFLOW_READ_PATHS" not in os.environ


def test_predict_reads_a_folder_as_ingest_reads_a_class_folder(tmp_path, monkeypatch, png_bytes):
    """Every file PIL decodes is an image whatever its name (ingest trained on .jfif and .tga too); hidden
    files are not read, and are named; a file that is no image is skipped with its reason."""
    from adaptflow import tracking

    fake = _FakeModel()
    monkeypatch.setattr(tracking, "load_model", lambda uri: fake)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exported" / "model").mkdir(parents=True)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / ".cache").mkdir()
    for name in ("a.png", "b.jfif", "c.TGA", "sub/d", ".hidden.png", ".cache/e.png"):
        (folder / name).write_bytes(png_bytes)
    (folder / "notes.txt").write_text("not an image")
    res = _invoke(["predict", "-m", "exported/model", str(folder)])
    assert res.exit_code == 0, res.output
    predicted = [line.split("\t")[0] for line in res.stdout.splitlines()]
    assert predicted == [str(folder / n) for n in ("a.png", "b.jfif", "c.TGA", "sub/d")]
    assert f"ignored {folder / '.hidden.png'}: hidden file" in res.output
    assert f"ignored {folder / '.cache'}: hidden folder (not read)" in res.output and "e.png" not in res.output  # once, not per file
    assert f"skipped {folder / 'notes.txt'}: not an image Pillow can read" in res.output


def test_predict_skips_a_name_that_is_not_utf8_and_keeps_one_line_per_file(tmp_path, monkeypatch, png_bytes):
    """A Latin-1 name (an old archive, a Windows share) is skipped and counted, not a traceback for the whole
    batch; a tab or newline in a name is escaped on stdout, so each line is still path, label, confidence."""
    from adaptflow import tracking

    fake = _FakeModel()
    monkeypatch.setattr(tracking, "load_model", lambda uri: fake)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exported" / "model").mkdir(parents=True)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "tab\there.png", "new\nline.png"):
        (folder / name).write_bytes(png_bytes)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:
        f.write(png_bytes)
    os.mkdir(os.path.join(os.fsencode(folder), b"sub\xff"))
    with open(os.path.join(os.fsencode(folder), b"sub\xff", b"b.png"), "wb") as f:
        f.write(png_bytes)
    res = _invoke(["predict", "-m", "exported/model", str(folder), "-o", "p.csv", "--strict"])
    assert res.exit_code == 3, res.output
    assert f"skipped {folder}/caf\\xe9.png: its name is not valid UTF-8 (not read; rename it)" in res.output
    assert f"skipped {folder}/sub\\xff: the folder's name is not valid UTF-8 (not read; rename it)" in res.output
    assert "skipped 2 of 5 file(s)" in res.output
    lines = res.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [f"{folder}/a.png", f"{folder}/new\\nline.png", f"{folder}/tab\\there.png"]
    assert all(len(line.split("\t")) == 3 for line in lines)
    import pandas as pd

    assert sorted(pd.read_csv(tmp_path / "p.csv").path) == sorted(str(folder / n) for n in ("a.png", "tab\there.png", "new\nline.png"))


def test_predict_does_not_blame_readable_images_for_a_model_failure(tmp_path, monkeypatch, png_bytes):
    from adaptflow import tracking

    class Broken:
        def predict(self, frame):
            raise RuntimeError("shape mismatch in the model")

    monkeypatch.setattr(tracking, "load_model", lambda uri: Broken())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exported" / "model").mkdir(parents=True)
    (tmp_path / "a.png").write_bytes(png_bytes)
    res = CliRunner().invoke(app, ["predict", "-m", "exported/model", str(tmp_path / "a.png"), "-o", str(tmp_path / "p.csv")])
    assert isinstance(res.exception, RuntimeError) and "skipped" not in res.output
    assert not (tmp_path / "p.csv").exists()


def test_predict_checks_its_output_before_loading_the_model(tmp_path, monkeypatch, png_bytes):
    from adaptflow import tracking

    loaded = []
    monkeypatch.setattr(tracking, "load_model", lambda uri: loaded.append(uri) or _FakeModel())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.png").write_bytes(png_bytes)
    for out, why in [(".", "is a folder"), ("a.png/p.csv", "a.png is a file")]:
        res = _invoke(["predict", "-m", "models:/m@champion", "a.png", "-o", out])
        assert res.exit_code == 2 and f"error: --output {out}" in res.output and why in res.output, res.output
    assert loaded == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # no probe, no store left


def test_predict_with_a_model_folder_that_is_not_there_says_so(tmp_path, monkeypatch, png_bytes):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.png").write_bytes(png_bytes)
    res = _invoke(["predict", "-m", str(tmp_path / "nomodel"), "a.png"])
    assert res.exit_code == 2 and "no such model folder (give a registered model, e.g. models:/NAME@champion" in res.output, res.output


@pytest.mark.parametrize("args", [["predict", "-m", "models:/m@champion", "a.png"], ["registry", "show", "m"],
                                  ["registry", "history", "m"]])
def test_read_only_commands_create_no_store_where_there_is_none(tmp_path, monkeypatch, png_bytes, args):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    (tmp_path / "a.png").write_bytes(png_bytes)
    res = _invoke(args)
    assert res.exit_code == 2 and f"no MLflow store at {tmp_path.resolve() / 'mlflow.db'}" in res.output, res.output
    assert "MLFLOW_TRACKING_URI" in res.output and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("args", [["predict", "-m", "models:/m@champion", "a.png"], ["registry", "show", "m"],
                                  ["registry", "history", "m"], ["registry", "promote", "m", "1"]])
def test_read_only_commands_against_a_tracking_server_that_does_not_answer_say_so(tmp_path, monkeypatch, png_bytes, args):
    """Not MLflow's minutes of silent retries, a traceback, or "no such registered model": one line, exit 2."""
    import time

    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    (tmp_path / "a.png").write_bytes(png_bytes)
    start = time.monotonic()
    res = _invoke(args)
    assert res.exit_code == 2 and f"no MLflow tracking server answers at {url} (" in res.output, res.output
    assert "no such registered model" not in res.output and time.monotonic() - start < 20


def test_run_checks_the_tracking_server_before_any_stage(tmp_path, monkeypatch):
    import flows.api
    import flows.transfer_pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flows.api, "start_in_background", lambda: (lambda: None))
    monkeypatch.setattr(flows.transfer_pipeline, "run_pipeline", lambda **k: pytest.fail("the flow started"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    res = _invoke(["run", "--params", PARAMS])
    assert res.exit_code == 2 and "no MLflow tracking server answers at http://127.0.0.1:" in res.output, res.output
    assert not (tmp_path / "data").exists()


def test_registry_show_and_history_default_to_this_projects_model(tmp_path, monkeypatch):
    from adaptflow import tracking

    asked = []
    monkeypatch.setattr(tracking, "configure", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "alias_history", lambda name, alias: asked.append(name) or [])
    monkeypatch.setattr(tracking, "model_aliases", lambda name: asked.append(name) or {"champion": "1"})
    monkeypatch.setattr(tracking, "find_versions", lambda name, tags: [])
    monkeypatch.setattr(tracking, "version_tags", lambda name, v: {"strategy": "finetune", "seed": "0", "test_acc": "0.9", "gate": "promoted"})
    monkeypatch.chdir(tmp_path)
    res = _invoke(["registry", "show"])
    assert res.exit_code == 2 and "give the registered model's NAME (no params.yaml here" in res.output
    (tmp_path / "params.yaml").write_text(Path(PARAMS).read_text())
    for args in (["registry", "show"], ["registry", "history"]):
        asked.clear()
        res = _invoke(args)
        assert res.exit_code == 0, res.output
        assert set(asked) == {"adaptflow-uci_digits"}, asked


def test_set_is_also_dvcs_capital_s(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = _invoke(["run", "--params", PARAMS, "-S", "finetune.lrr=0.1"])
    assert res.exit_code == 2 and "finetune.lrr" in res.output and "No such option" not in res.output, res.output


def test_registry_history_shows_a_removed_alias(monkeypatch):
    from adaptflow import aliases, tracking

    moves = [aliases.AliasMove(1, "challenger", None, "2", 100.0, "gate passed, held", "me@here:1"),
             aliases.AliasMove(2, "challenger", "2", None, 200.0, "version 2 promoted to champion by hand", "me@here:1")]
    monkeypatch.setattr(tracking, "configure", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "alias_history", lambda name, alias: moves)
    monkeypatch.setattr(tracking, "model_aliases", lambda name: {})  # challenger removed, as the history says
    res = _invoke(["registry", "history", "m", "--alias", "challenger"])
    assert res.exit_code == 0 and "   2 → -    me@here:1" in res.output, res.output
    res = _invoke(["registry", "history", "m", "--alias", "challenger", "--at", "1970-01-01T00:03:20"])
    assert res.exit_code == 0 and "m@challenger at 1970-01-01T00:03:20: no version (removed)" in res.output, res.output


def test_registry_show_lists_held_versions_by_what_chooses_among_them_never_test(monkeypatch):
    from adaptflow import tracking

    tags = {"1": {"strategy": "finetune", "seed": "0", "test_acc": "0.95", "gate": "promoted", "gate_reasons": "no current champion"},
            "2": {"strategy": "dann", "seed": "0", "val_acc": "0.9712345", "test_acc": "0.97", "gate": "passed, held", "gated_against": "1"},
            "3": {"strategy": "fixmatch", "seed": "1", "val_acc": "None", "pool_im": "0.81234", "test_acc": "0.96",
                  "gate": "passed, held", "gated_against": "1"},  # k = 0: no val labels
            "4": {"strategy": "coral", "seed": "0", "val_acc": "0.91", "test_acc": "0.99", "gate": "passed, held", "gated_against": "0"}}
    monkeypatch.setattr(tracking, "configure", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "model_aliases", lambda name: {"champion": "1", "challenger": "3"})
    monkeypatch.setattr(tracking, "alias_history", lambda name, alias=None: [])  # (no move recorded: warned, not refused)
    monkeypatch.setattr(tracking, "find_versions", lambda name, t: ["4", "3", "2"] if t == {"gate": "passed, held"} else [])
    monkeypatch.setattr(tracking, "version_tags", lambda name, v: tags[v])
    out = _invoke(["registry", "show", "m"]).output
    assert "champion    version 1  finetune seed 0  val_acc ?  test_acc 0.9500  gate promoted: no current champion" in out
    # a held challenger is chosen on val: no test score beside it
    assert "challenger  version 3  fixmatch seed 1  pool_im 0.8123 (label-free: no target val labels)  gate passed, held: " in out
    assert "held (gate passed; choose on these, not test, then: adaptflow registry promote m VERSION):" in out
    assert "  version 3  fixmatch seed 1  pool_im 0.8123 (label-free: no target val labels)  gated against 1" in out
    assert "  version 2  dann seed 0  val_acc 0.9712  gated against 1" in out
    assert out.index("\n  version 3 ") < out.index("\n  version 2 ")  # newest first
    # gated against a champion since replaced: listed apart, as promote would refuse it
    stale = out.index("held against an earlier champion (champion is now 1: promote refuses; to gate one anew, bring back its configuration")
    assert out.index("\n  version 4  coral seed 0  val_acc 0.9100  gated against 0") > stale > out.index("\n  version 2 ")
    assert "0.99" not in out and "0.96" not in out
    monkeypatch.setattr(tracking, "model_aliases", lambda name: {})
    monkeypatch.setattr(tracking, "find_versions", lambda name, t: [])
    monkeypatch.setattr(tracking, "missing_model", lambda name: None)
    res = _invoke(["registry", "show", "m"])
    assert res.exit_code == 2 and "error: m is registered but has no aliases (none set, or all removed) and no held versions" in res.output
    monkeypatch.setattr(tracking, "missing_model", lambda name: f"{name}: no such registered model (did you mean mm?)")
    res = _invoke(["registry", "show", "m"])
    assert res.exit_code == 2 and "error: m: no such registered model (did you mean mm?)" in res.output


def test_registry_commands_end_an_mlflow_error_with_one_line(monkeypatch):
    """A name MLflow refuses (a model URI given as the name) or a server that errs: MLflow's message, exit 2."""
    from mlflow.exceptions import MlflowException

    from adaptflow import tracking

    def refuse(name):
        raise MlflowException.invalid_parameter_value(f"Invalid name: '{name}'. Registered model name cannot contain '@'.")

    monkeypatch.setattr(tracking, "configure", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "model_aliases", refuse)
    monkeypatch.setattr(tracking, "find_versions", lambda name, t: [])
    for args in (["show", "models:/m@champion"], ["history", "models:/m@champion"]):
        monkeypatch.setattr(tracking, "alias_history", lambda name, alias=None: [])
        res = _invoke(["registry", *args])
        assert res.exit_code == 2 and res.output.startswith("error: Invalid name: 'models:/m@champion'."), res.output
        assert "Traceback" not in res.output


def test_run_says_when_register_was_reused_and_where_the_aliases_point_now(monkeypatch):
    from adaptflow import tracking
    from adaptflow.stages.register import summary

    monkeypatch.setattr(tracking, "configure", lambda root, create=True: "sqlite:///x")
    monkeypatch.setattr(tracking, "model_aliases", lambda name: {"champion": "3", "challenger": "4"})
    fresh = {"model_name": "m", "version": "1", "promoted": True, "reasons": ["beats scratch"], "cached": False}
    assert summary(fresh, Path(".")) == "registry: m version 1 promoted to champion: beats scratch"
    line = summary({**fresh, "cached": True}, Path("."))
    assert line.startswith("registry: nothing new to register (register reused): m version 1 came from an earlier run, promoted to champion then")
    assert line.endswith("aliases now: challenger → version 4, champion → version 3")
    from mlflow.exceptions import MlflowException

    def errs(name):
        raise MlflowException("the server answered 500")

    monkeypatch.setattr(tracking, "model_aliases", errs)  # the last line of a finished run: never its failure
    assert summary({**fresh, "cached": True}, Path(".")).endswith("aliases now: unknown (the server answered 500)")


def test_run_option_errors_name_the_option_typed(capsys):
    """`adaptflow run --task-runner bogus` blames --task-runner, not an override the user never wrote."""
    import typer

    from adaptflow import cli

    flags = cli._orchestrate_overrides("bogus", 0, None)
    with pytest.raises(typer.Exit):
        cli._load(Path(PARAMS), list(flags), flags)
    err = capsys.readouterr().err
    assert "--task-runner bogus: orchestrate.task_runner" in err and "--max-workers 0: orchestrate.max_workers" in err
    assert "--set" not in err
    flags = cli._orchestrate_overrides("threads", 2, None)
    with pytest.raises(typer.Exit):
        cli._load(Path(PARAMS), ["target.k=0", *flags], flags)
    err = capsys.readouterr().err
    assert "with --set target.k=0, --task-runner threads, --max-workers 2: finetune.strategies" in err and "orchestrate." not in err


def test_run_against_a_prefect_server_that_does_not_answer_says_so(tmp_path):
    """`adaptflow run` with PREFECT_API_URL at nothing: one error line and exit 2, not Prefect's traceback."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"}
    proc = subprocess.run([str(Path(sys.executable).parent / "adaptflow"), "run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: no Prefect server answers at PREFECT_API_URL=" in proc.stderr and "Traceback" not in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_refuses_a_plain_typo_before_starting_prefect(tmp_path, monkeypatch):
    """`adaptflow run` with a bad plain value: the error, exit 2, and no Prefect API server started for nothing."""
    import flows.api

    started = []
    monkeypatch.setattr(flows.api, "start_in_background", lambda: started.append(1) or (lambda: None))
    res = _invoke(["run", "--params", PARAMS, "--set", "finetune.epochs=0"])
    assert res.exit_code == 2 and "finetune.epochs: Input should be greater than or equal to 1" in res.output
    assert started == []


def test_run_under_torchrun_says_which_commands_train_in_several_processes(monkeypatch):
    """`torchrun … adaptflow run` would start one whole pipeline per process: refused, before any server starts."""
    import flows.api

    started = []
    monkeypatch.setattr(flows.api, "start_in_background", lambda: started.append(1) or (lambda: None))
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = _invoke(["run", "--params", PARAMS])
    assert res.exit_code == 2
    assert "adaptflow run is one process that runs the pipeline; under torchrun run the stages that train in several" in res.output
    assert started == []


def test_run_refuses_too_few_images_for_target_k_before_the_flow_starts(tmp_path, monkeypatch):
    """`adaptflow run --set target.k=300` on 1,797 UCI digits: refused from the listing, naming the classes and
    target.k, before the flow (and its Prefect run) starts; nothing is ingested."""
    import flows.api
    import flows.transfer_pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flows.api, "start_in_background", lambda: (lambda: None))
    monkeypatch.setattr(flows.transfer_pipeline, "run_pipeline", lambda **k: pytest.fail("the flow started"))
    res = _invoke(["run", "--params", PARAMS, "--set", "target.k=300"])
    assert res.exit_code == 2, res.output
    assert "target.domain: class(es) with too few images listed (before any is decoded)" in res.output
    assert "target.k=300 labeled train images" in res.output
    assert not (tmp_path / "data").exists()


def test_run_refuses_weights_with_another_classifier_as_the_source_model_before_the_flow(tmp_path, monkeypatch):
    """pretrain.epochs 0 keeps the file as the source model: a classifier of other classes is refused before any
    stage runs (it was refused by pretrain, after ingest and augment)."""
    import timm
    from safetensors.torch import save_file

    import flows.api
    import flows.transfer_pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flows.api, "start_in_background", lambda: (lambda: None))
    monkeypatch.setattr(flows.transfer_pipeline, "run_pipeline", lambda **k: pytest.fail("the flow started"))
    model = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=1000)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "in1k.safetensors"))
    res = _invoke(["run", "--params", PARAMS, "--set", "pretrain.model=test_resnet", "--set", "pretrain.weights=in1k.safetensors",
                   "--set", "pretrain.epochs=0"])
    assert res.exit_code == 2, res.output
    assert "pretrain.epochs: 0 uses pretrain.weights as the source model as they are, but in1k.safetensors has no classifier with one " \
           "output per source class (10)" in res.output
    assert not (tmp_path / "data").exists()


def test_run_that_loses_the_prefect_api_says_what_is_kept(tmp_path, monkeypatch):
    """A Prefect server stopped mid-run: one error line and exit 1, not the connection's traceback (the stages,
    which need no API, kept what they finished)."""
    import httpx

    import flows.api
    import flows.transfer_pipeline

    def lost(**kwargs):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flows.api, "start_in_background", lambda: (lambda: None))
    monkeypatch.setattr(flows.transfer_pipeline, "run_pipeline", lost)
    res = _invoke(["run", "--params", PARAMS])
    assert res.exit_code == 1, res.output
    assert "error: lost the Prefect API at " in res.output and "(ConnectError: [Errno 111] Connection refused)" in res.output
    assert "reports/registry.json says what register decided, if it ran" in res.output and "Traceback" not in res.output


def test_run_puts_back_the_sigterm_handler_it_found(monkeypatch, tmp_path):
    """``adaptflow run`` ends on SIGTERM through its exit hooks; called in a process of someone else's (a test
    session, a notebook), it leaves that process's own handler in place afterwards."""
    import signal

    def mine(signum, frame):
        pass

    monkeypatch.chdir(tmp_path)
    seen = []
    before = signal.signal(signal.SIGTERM, mine)
    try:
        monkeypatch.setattr("flows.api.start_in_background", lambda: seen.append(signal.getsignal(signal.SIGTERM)) or (lambda: None))
        res = _invoke(["run", "--params", PARAMS, "--set", "finetune.epochs=-1"])  # refused at params, after the handler
        assert res.exit_code == 2
        res = _invoke(["run", "--params", PARAMS, "--set", "target.k=300"])  # refused after the server started
        assert res.exit_code == 2 and len(seen) == 1 and seen[0] is not mine  # its own handler while it ran
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
