"""The only module that talks to MLflow: runs, datasets, logged models, the registry and its aliases.

Default store: ``sqlite:///<root>/mlflow.db`` with artifacts in ``<root>/mlartifacts`` — no server needed.
``MLFLOW_TRACKING_URI`` (and optionally ``MLFLOW_REGISTRY_URI``) point it at a server instead.

Aliases move only through :func:`move_alias`: compare-and-set under a lock, with every move appended to
the registered model's history (see :mod:`adaptflow.aliases`). The lock is a file lock next to a local
sqlite database, and a registry-tag lease (plus a file lock for this machine's processes) for a server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the core logs; it does not print run URLs

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from filelock import FileLock  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.types.schema import AnyType, ColSpec, Schema  # noqa: E402

from adaptflow import aliases, machine  # noqa: E402
from adaptflow.orchestrate import NoStore, default_tracking_uri, mlflow_unreachable, store_root, tracking_uri  # noqa: E402
from adaptflow.outputs import file_digest  # noqa: E402

log = logging.getLogger(__name__)

EXPERIMENT = "adaptflow"
_PKG = Path(__file__).resolve().parent
# What the registered model imports, pinned to this environment's versions (the model's requirements).
_SERVING_REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "numpy", "pandas", "pillow", "mlflow")
_TAG_KEY = re.compile(r"[^\w.\- :/]")


def configure(root: Path = Path("."), create: bool = True) -> str:
    """Point MLflow at the project's store and make sure the experiment exists; return the tracking URI.

    ``create=False`` (commands that only read: predict, registry): a local store that is not there raises
    :class:`NoStore` instead of being created, empty, wherever the command happened to run."""
    root = store_root(root)
    uri = tracking_uri(root)
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    # mlflow.set_*_uri also export MLFLOW_*_URI into os.environ "for subprocesses": left there, the first
    # project's store would silently become every later configure()'s "user setting" in this process.
    why = mlflow_unreachable(root)
    if why:
        raise NoStore(why)
    with machine.environ_kept("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(registry)
    if not create:
        store = _local_store_path(registry)
        if store is not None and not store.exists():
            raise NoStore(f"no MLflow store at {store}: run this from the project's root (where `adaptflow run` made "
                          f"mlflow.db), or set MLFLOW_TRACKING_URI to the project's store or tracking server")
        return uri
    here = (root / "mlartifacts").as_uri()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        try:
            mlflow.create_experiment(EXPERIMENT, artifact_location=here if is_local(uri) else None)
        except MlflowException:  # created concurrently
            pass
    elif uri == default_tracking_uri(root) and experiment.artifact_location.rstrip("/") != here:  # the project's own store
        log.warning("the MLflow store %s keeps this project's artifacts in %s, outside the project (%s): a store copied or "
                    "moved from another folder. New runs and models write there, and the models registered here read from "
                    "there. To keep this project on its own, move mlflow.db and mlartifacts/ aside and start a new store",
                    uri, experiment.artifact_location, here)
    mlflow.set_experiment(EXPERIMENT)
    return uri


def is_local(uri: str) -> bool:
    """A store this machine opens directly (sqlite file, file store), as opposed to a tracking server."""
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def tag_key(key: str) -> str:
    """A string MLflow accepts as a tag/param/metric name (``ingest@target`` → ``ingest_target``)."""
    return _TAG_KEY.sub("_", key)


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


# --- runs -------------------------------------------------------------------------------------------


@contextmanager
def start_run(name: str, *, nested: bool = False, tags: dict[str, Any] | None = None) -> Iterator[str]:
    with mlflow.start_run(run_name=name, nested=nested, tags={tag_key(k): str(v) for k, v in (tags or {}).items()}) as run:
        yield run.info.run_id


def active_experiment_id() -> str:
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise RuntimeError("tracking.configure() was not called")
    return exp.experiment_id


def log_params(params: dict[str, Any], run_id: str | None = None) -> None:
    """Every (nested) key as a dotted param, in batches of 100 (MLflow's limit per call)."""
    items = list(_flatten(params).items())
    client, rid = MlflowClient(), run_id or mlflow.active_run().info.run_id
    from mlflow.entities import Param

    for i in range(0, len(items), 100):
        client.log_batch(rid, params=[Param(tag_key(k), str(v)[:6000]) for k, v in items[i : i + 100]])


def log_metrics(metrics: dict[str, float | None], step: int | None = None) -> None:
    clean = {tag_key(k): float(v) for k, v in metrics.items() if v is not None and v == v}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_history(rows: list[dict], run_id: str | None = None, skip: tuple[str, ...] = ("epoch",)) -> None:
    """Per-epoch rows (``{"epoch": 3, "train_loss": ..., "val_acc": ...}``) as stepped metrics, in one call
    per 1000 values rather than one per epoch."""
    rid = run_id or mlflow.active_run().info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(tag_key(k), float(v), now, int(r.get("epoch", i))) for i, r in enumerate(rows) for k, v in r.items()
               if k not in skip and isinstance(v, (int, float)) and v == v]
    client = MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i : i + 1000])


def set_tags(tags: dict[str, Any], run_id: str | None = None) -> None:
    if run_id is None:
        mlflow.set_tags({tag_key(k): str(v) for k, v in tags.items()})
    else:
        client = MlflowClient()
        for k, v in tags.items():
            client.set_tag(run_id, tag_key(k), str(v))


def log_artifacts(path: Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
    path = Path(path)
    if run_id is not None:
        client = MlflowClient()
        (client.log_artifacts if path.is_dir() else client.log_artifact)(run_id, str(path), artifact_path)
    elif path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path)


def log_dict(data: dict, artifact_file: str, run_id: str | None = None) -> None:
    if run_id is None:
        mlflow.log_dict(data, artifact_file)
    else:
        MlflowClient().log_dict(run_id, data, artifact_file)


def log_dataset(name: str, digest: str, path: Path, context: str, tags: dict[str, Any] | None = None) -> None:
    """Record a dataset version as an MLflow run input (metadata only: name, digest, where it lives) —
    the bytes stay in DVC, MLflow links the run to the exact version."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both readings are the local file source
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(path).resolve().as_uri())
    ds = MetaDataset(source=source, name=name, digest=str(digest)[:36])
    mlflow.log_input(ds, context=context, tags={k: str(v) for k, v in (tags or {}).items()})


def find_run(tags: dict[str, str]) -> str | None:
    """The newest finished run of the experiment carrying all ``tags``."""
    flt = " and ".join(_tag_terms(tags))
    found = MlflowClient().search_runs([active_experiment_id()], filter_string=flt, max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def _tag_terms(tags: dict[str, str]) -> list[str]:
    """Filter-string terms for runs or model versions carrying ``tags`` (values are ours: hashes, verdicts)."""
    return [f"tags.`{tag_key(k)}` = '{v}'" for k, v in tags.items()]


def record_run(name: str, tags: dict[str, Any], params: dict[str, Any], history: list[dict], artifacts: list[Path]) -> str:
    """Create a finished top-level run outside the active one (e.g. the source model's), return its id."""
    client = MlflowClient()
    run = client.create_run(active_experiment_id(), run_name=name, tags={tag_key(k): str(v) for k, v in tags.items()})
    rid = run.info.run_id
    try:
        log_params(params, run_id=rid)
        log_history(history, run_id=rid)
        for a in artifacts:
            if Path(a).exists():
                log_artifacts(Path(a), run_id=rid)
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    return rid


# --- models -----------------------------------------------------------------------------------------


def timm_config(checkpoint_dir: Path) -> dict:
    """What rebuilding the network needs without MLflow or adaptflow: the timm call, the input contract and
    timm's own pretrained config for the architecture."""
    import timm

    cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(cfg["arch"]).to_dict()
    except (AttributeError, RuntimeError, KeyError):
        pretrained_cfg = None
    return {
        "create_model": {"model_name": cfg["arch"], "pretrained": False, "in_chans": cfg["in_chans"], "num_classes": len(cfg["classes"])},
        "weights": "model.safetensors (torch state_dict; load with safetensors.torch.load_file + model.load_state_dict)",
        "classes": cfg["classes"],
        "input": {"size": [cfg["image_size"], cfg["image_size"]], "channels": cfg["in_chans"], "color": "L" if cfg["in_chans"] == 1 else "RGB",
                  "resize": "bilinear", "dtype": "uint8 0-255, then x / 127.5 - 1 (values in [-1, 1]), NCHW"},
        "output": "logits over classes, in this order; softmax for probabilities",
        "pretrained_cfg_of_arch": pretrained_cfg,
        "timm_version": version("timm"),
    }


def log_image_model(checkpoint_dir: Path, classes: list[str], example: str | None = None) -> str:
    """Log a checkpoint as a pyfunc model and return its URI.

    Models-from-code (``serving_model.py``) with ``imaging.py`` beside it: the model carries its own
    preprocessing and pinned requirements, and loading it unpickles nothing (weights are safetensors, the
    configs JSON). ``timm_config.json`` next to the weights says how to rebuild the network without MLflow.
    """
    checkpoint_dir = Path(checkpoint_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = Path(tmp) / "timm_config.json"
        tcfg.write_text(json.dumps(timm_config(checkpoint_dir), indent=2))
        with warnings.catch_warnings():  # "add type hints to predict": the signature below is the contract
            warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(_PKG / "serving_model.py"),
                code_paths=[str(_PKG / "imaging.py")],
                artifacts={"weights": str(checkpoint_dir / "model.safetensors"), "config": str(checkpoint_dir / "config.json"), "timm_config": str(tcfg)},
                signature=_signature(classes),
                input_example=None if example is None else pd.DataFrame({"image": [example]}),
                pip_requirements=_pins(),
            )
    return info.model_uri


def served_digest(checkpoint_dir: Path) -> str:
    """What a model logged from ``checkpoint_dir`` by :func:`log_image_model` serves, by content: the weights
    file (the classes travel in it), the network and input contract from ``config.json`` (not ``extra``: how it
    was trained), the serving code shipped with it and its pinned requirements. Two checkpoints with one digest
    answer every request alike, so registering the second would add a copy."""
    checkpoint_dir = Path(checkpoint_dir)
    cfg = json.loads((checkpoint_dir / "config.json").read_text())
    h = hashlib.sha256()
    h.update(file_digest(checkpoint_dir / "model.safetensors").encode())
    h.update(json.dumps({k: v for k, v in cfg.items() if k != "extra"}, sort_keys=True).encode())
    for f in ("serving_model.py", "imaging.py"):
        h.update((_PKG / f).read_bytes())
    h.update(json.dumps(_pins()).encode())
    return h.hexdigest()[:16]


def register(model_uri: str, name: str, tags: dict[str, Any]) -> str:
    mv = mlflow.register_model(model_uri, name, tags={tag_key(k): str(v) for k, v in tags.items()})
    return str(mv.version)


def find_versions(name: str, tags: dict[str, str]) -> list[str]:
    """The versions of ``name`` carrying all ``tags``, newest first. A name holding a quote, which would break
    the filter string, is compared here instead (over every model's versions with the tags); tag values are
    ours (hashes, verdicts)."""
    terms = ([] if "'" in name else [f"name = '{name}'"]) + _tag_terms(tags)
    found = MlflowClient().search_model_versions(filter_string=" and ".join(terms) or None)
    return [str(v) for v in sorted((int(v.version) for v in found if v.name == name), reverse=True)]


def load_run_dict(run_id: str, artifact_file: str) -> dict | None:
    """A JSON artifact of a run (None if it has none)."""
    try:
        found = mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact_file}")
    except (MlflowException, OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def alias_version(name: str, alias: str) -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_version_tags(name: str, version: str, tags: dict[str, Any]) -> None:
    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, version, tag_key(k), str(v))


def delete_version_tag(name: str, version: str, key: str) -> None:
    """Remove a version's tag; one it does not carry is no error."""
    try:
        MlflowClient().delete_model_version_tag(name, version, tag_key(key))
    except MlflowException as exc:
        if not _not_found(exc):
            raise


def seen_by(name: str, version: str, artifact_file: str) -> dict | None:
    """The dict ``artifact_file`` holds in the run that registered ``version`` (its ``parent_run_id`` tag), or
    None when that version has none (registered before it was recorded)."""
    run_id = version_tags(name, version).get("parent_run_id")
    return load_run_dict(run_id, artifact_file) if run_id else None


def version_tags(name: str, version: str) -> dict[str, str]:
    return dict(MlflowClient().get_model_version(name, version).tags)


def version_exists(name: str, version: str) -> bool:
    try:
        MlflowClient().get_model_version(name, version)
        return True
    except MlflowException:
        return False


def model_aliases(name: str) -> dict[str, str]:
    """alias → version of a registered model (empty if the model does not exist; any other failure, e.g. a
    server that errs, raises: it must not read as "no such model")."""
    try:
        return {a: str(v) for a, v in MlflowClient().get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        if _not_found(exc):
            return {}
        raise


def _not_found(exc: MlflowException) -> bool:
    """The registry answered that the model does not exist (not: it could not answer)."""
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def missing_model(name: str) -> str | None:
    """Why ``name`` is no registered model (with the names closest to it), or None when it is one."""
    import difflib

    client = MlflowClient()
    try:
        client.get_registered_model(name)
        return None
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    names = [m.name for m in client.search_registered_models(max_results=1000)]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"{name}: no such registered model" + (f" (did you mean {', '.join(close)}?)" if close else
                                                   f"; this store has {', '.join(sorted(names)[:8]) or 'none'}")


def load_model(uri: str) -> Any:
    return mlflow.pyfunc.load_model(uri)


# --- alias compare-and-set and history --------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _local_store_path(uri: str) -> Path | None:
    """The file or directory a local registry URI names (the lock goes next to it)."""
    if uri.startswith("sqlite:"):
        return Path(unquote(uri[len("sqlite:///"):]))  # sqlite:////abs/x.db → /abs/x.db; sqlite:///rel.db → rel.db
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    if "://" not in uri:
        return Path(uri)
    return None


class MlflowAliasStore:
    """:class:`adaptflow.aliases.AliasStore` over the MLflow registry in use."""

    def __init__(self, registry_uri: str | None = None, *, lease_ttl: float = 120.0, lease_settle: float = 0.3):
        self.uri = registry_uri or mlflow.get_registry_uri()
        self.client = MlflowClient(registry_uri=self.uri)
        self.lease_ttl, self.lease_settle = lease_ttl, lease_settle

    def get_alias(self, name: str, alias: str) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        self.client.delete_registered_model_alias(name, alias)

    def get_model_tags(self, name: str) -> dict[str, str]:
        try:
            return dict(self.client.get_registered_model(name).tags)
        except MlflowException:
            return {}

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self.client.set_registered_model_tag(name, key, value)

    def lock_path(self, name: str) -> Path:
        """A file lock next to a local store; for a server, one per (server, model) in the temp dir, which
        orders this machine's writers before they contend for the registry lease."""
        local = _local_store_path(self.uri)
        if local is not None:
            return local.parent / f"{local.name}.{_safe(name)}.alias.lock"
        digest = hashlib.sha256(f"{self.uri}|{name}".encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"adaptflow-alias-{digest}.lock"

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        path = self.lock_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path), timeout=300):
            if _local_store_path(self.uri) is not None:
                yield
                return
            lease = aliases.TagLease(
                lambda: self.get_model_tags(name),
                lambda value: self.client.set_registered_model_tag(name, aliases.LEASE_TAG, value),
                lambda: self.client.delete_registered_model_tag(name, aliases.LEASE_TAG),
                ttl=self.lease_ttl, settle=self.lease_settle,
            )
            with lease.held():
                yield


def move_alias(name: str, alias: str, version: str, *, expected: object, reason: str, context: dict | None = None) -> aliases.AliasMove | None:
    """Compare-and-set ``name@alias`` → ``version`` and record the move (see :func:`adaptflow.aliases.move`)."""
    move = aliases.move(MlflowAliasStore(), name, alias, version, expected=expected, reason=reason, context=context)
    if move is not None:
        log.info("registry: %s@%s %s → %s (%s)", name, alias, move.from_version or "none", move.to_version or "none (removed)", reason)
    return move


def alias_history(name: str, alias: str | None = None) -> list[aliases.AliasMove]:
    return aliases.history(MlflowAliasStore(), name, alias)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
