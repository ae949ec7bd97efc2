"""The only module that talks to MLflow: runs, logged models, the registry and its aliases.

Default store: ``sqlite:///<root>/mlflow.db`` with artifacts in ``<root>/mlartifacts`` — no server needed.
``MLFLOW_TRACKING_URI`` (and optionally ``MLFLOW_REGISTRY_URI``) point it at a server instead.
"""

from __future__ import annotations

import logging
import re
import os
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.types.schema import AnyType, ColSpec, Schema  # noqa: E402

log = logging.getLogger(__name__)

EXPERIMENT = "adaptflow"
_PKG = Path(__file__).resolve().parent
_SERVING_REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "numpy", "pandas", "pillow", "mlflow")


def configure(root: Path = Path(".")) -> str:
    """Point MLflow at the project's store and make sure the experiment exists; return the tracking URI."""
    root = Path(root).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        local = uri.startswith("sqlite:") or uri.startswith("file:")
        try:
            mlflow.create_experiment(EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri() if local else None)
        except MlflowException:  # created concurrently
            pass
    mlflow.set_experiment(EXPERIMENT)
    return uri


def _pins() -> list[str]:
    pins = []
    for name in _SERVING_REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins



def _signature(classes: list[str]) -> ModelSignature:
    outputs = [ColSpec("string", "label"), ColSpec("double", "confidence")]
    outputs += [ColSpec("float", f"proba_{c}") for c in classes]
    return ModelSignature(inputs=Schema([ColSpec(AnyType(), "image")]), outputs=Schema(outputs))


@contextmanager
def start_run(name: str, *, nested: bool = False, tags: dict[str, Any] | None = None) -> Iterator[str]:
    with mlflow.start_run(run_name=name, nested=nested, tags={k: str(v) for k, v in (tags or {}).items()}) as run:
        yield run.info.run_id


def log_params(params: dict[str, Any]) -> None:
    flat = _flatten(params)
    items = list(flat.items())
    for i in range(0, len(items), 100):
        mlflow.log_params({k: str(v)[:6000] for k, v in items[i : i + 100]})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    # MLflow metric names allow [\w-. :/] only: "dann+fixmatch.val_acc" → "dann_fixmatch.val_acc".
    mlflow.log_metrics({re.sub(r"[^\w\-. :/]", "_", k): float(v) for k, v in metrics.items() if v is not None}, step=step)


def log_artifacts(path: Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path)


def log_image_model(checkpoint_dir: Path, classes: list[str], example: str | None = None) -> str:
    """Log a checkpoint as a pyfunc model (models-from-code, preprocessing inside); return its URI."""
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(_PKG / "serving_model.py"),
        code_paths=[str(_PKG / "imaging.py")],
        artifacts={"weights": str(Path(checkpoint_dir) / "model.safetensors"), "config": str(Path(checkpoint_dir) / "config.json")},
        signature=_signature(classes),
        input_example=None if example is None else pd.DataFrame({"image": [example]}),
        pip_requirements=_pins(),
    )
    return info.model_uri


def register(model_uri: str, name: str, tags: dict[str, Any]) -> str:
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return str(mv.version)


def alias_version(name: str, alias: str) -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, version)


def set_version_tags(name: str, version: str, tags: dict[str, Any]) -> None:
    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))


def version_exists(name: str, version: str) -> bool:
    try:
        MlflowClient().get_model_version(name, version)
        return True
    except MlflowException:
        return False


def load_model(uri: str) -> Any:
    return mlflow.pyfunc.load_model(uri)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
