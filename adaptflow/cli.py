"""The ``adaptflow`` command: run the pipeline, run one stage (what DVC calls), predict with a model."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from adaptflow import params as params_mod

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Adapt a source-domain model to a target domain, prove it helped, register the winner.")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file (sections per stage)")
SetOpt = typer.Option(None, "--set", "-s", help="override a param: key=value, e.g. finetune.lr=0.01 (repeatable)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(path: Path, overrides: Optional[list[str]]) -> params_mod.Params:
    try:
        return params_mod.load(path, overrides)
    except params_mod.ParamsError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt, verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run the whole pipeline as a Prefect flow and print the comparison table."""
    _setup_logging(verbose)
    p = _load(params, set_)  # fail on a bad params value before Prefect starts
    from flows.transfer_pipeline import transfer_pipeline  # the orchestrator lives outside the core

    result = transfer_pipeline(params_path=str(params), overrides=list(set_ or []), root=str(Path.cwd()))
    typer.echo("")
    typer.echo((Path(p.paths.reports) / "evaluate" / "comparison.md").read_text())
    reg = result["register"]
    verdict = "promoted to champion" if reg.get("promoted") else "not promoted"
    typer.echo(f"registry: {reg.get('model_name')} version {reg.get('version')} {verdict}: {'; '.join(reg.get('reasons', []))}")


@app.command()
def stage(
    name: str = typer.Argument(..., help="ingest | augment | pretrain | cache_features | finetune | evaluate | register"),
    params: Path = ParamsOpt,
    set_: Optional[list[str]] = SetOpt,
    role: Optional[str] = typer.Option(None, help="ingest only: source or target (default: both)"),
    strategy: Optional[str] = typer.Option(None, help="finetune only: one strategy (default: all in params)"),
    seed: Optional[int] = typer.Option(None, help="finetune only: one seed of finetune.seeds (default: all)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run one stage in this process (what `dvc repro` calls)."""
    from adaptflow import stages

    _setup_logging(verbose)
    p = _load(params, set_)
    try:
        fn = stages.get(name)
    except ValueError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    if name == "ingest":
        for r in [role] if role else list(params_mod.ROLES):
            fn(p, Path.cwd(), role=r)
    elif name == "finetune":
        fn(p, Path.cwd(), strategy=strategy, seed=seed)
    else:
        fn(p, Path.cwd())


@app.command()
def predict(
    paths: list[Path] = typer.Argument(..., help="image files"),
    model: str = typer.Option(..., "--model", "-m", help="model URI, e.g. models:/adaptflow-uci_digits@champion"),
) -> None:
    """Print one predicted label per image (path<TAB>label<TAB>confidence)."""
    import pandas as pd

    from adaptflow import tracking

    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        typer.secho(f"error: no such file: {', '.join(missing)}", fg="red", err=True)
        raise typer.Exit(2)
    tracking.configure(Path.cwd())
    try:
        m = tracking.load_model(model)
    except Exception as exc:  # MLflow raises several types for a bad URI
        typer.secho(f"error: cannot load {model}: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    out = m.predict(pd.DataFrame({"image": [str(p.resolve()) for p in paths]}))
    for p, label, conf in zip(paths, out["label"], out["confidence"]):
        typer.echo(f"{p}\t{label}\t{conf:.4f}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
