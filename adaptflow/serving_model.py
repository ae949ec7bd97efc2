"""The registered model's own code (MLflow models-from-code), executed by MLflow when a model loads.

Self-contained on purpose: it needs torch, timm, safetensors, numpy, pandas, Pillow and MLflow, plus
``imaging.py`` which is shipped beside it in the model (``code_paths``). A consumer needs no adaptflow
install, and loading unpickles nothing: weights are safetensors, the config is JSON.

Input: a DataFrame with an ``image`` column (file paths, base64-encoded image bytes, raw bytes, or arrays
H×W / H×W×C; MLflow's signature check refuses anything but that column). Output: ``label``, ``confidence`` and one ``proba_<class>``
column per class.

File paths are read only in the caller's own process. Served (``mlflow models serve``, its Docker image,
``mlflow models predict``: MLflow marks those processes with ``_MLFLOW_IS_IN_SERVING_ENVIRONMENT``) the
model takes base64 and arrays only and touches no file, so a client cannot read the server's files or
probe which exist. ``ADAPTFLOW_READ_PATHS=0`` does the same for a server MLflow does not start;
``ADAPTFLOW_READ_PATHS=1`` lets a served model read paths (a server that shares its files with trusted
clients).
"""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pandas as pd
import timm
import torch
from mlflow.exceptions import MlflowException
from safetensors.torch import load_file

try:  # the copy shipped inside the model wins
    import imaging
except ImportError:  # pragma: no cover - inside the adaptflow repository
    from adaptflow import imaging


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        with open(context.artifacts["config"]) as f:
            self.cfg = json.load(f)
        model = timm.create_model(self.cfg["arch"], pretrained=False, in_chans=self.cfg["in_chans"], num_classes=len(self.cfg["classes"]))
        model.load_state_dict(load_file(context.artifacts["weights"], device="cpu"))
        self.model = model.eval()

    # The hint is documentation for MLflow too: a DataFrame hint turns off its type-hint schema inference
    # (the logged signature is the contract) without changing what predict accepts.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        images = as_images(model_input)
        classes = self.cfg["classes"]
        read_paths = reads_paths()
        try:
            batch = imaging.prepare_batch(images, self.cfg["image_size"], self.cfg["in_chans"], read_paths=read_paths)
        except ValueError as exc:
            if not serving():
                raise
            # MLflow's server answers an MlflowException with its message (a 400) and anything else with a
            # generic message and the server's stack trace: a client's bad image gets the first
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        probs = []
        with torch.no_grad():
            for i in range(0, len(batch), 256):
                x = imaging.model_input(torch.from_numpy(batch[i : i + 256]), self.cfg.get("input_size"))
                probs.append(torch.softmax(self.model(x).float(), dim=1).numpy())
        p = np.concatenate(probs) if probs else np.zeros((0, len(classes)), np.float32)
        # confidence as the signature declares it (double); the probabilities stay float32 ("float")
        out = pd.DataFrame({"label": [classes[i] for i in p.argmax(1)], "confidence": p.max(1).astype(np.float64) if len(p) else np.zeros(0)})
        for j, c in enumerate(classes):
            out[f"proba_{c}"] = p[:, j]
        return out


SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def as_images(model_input) -> list:
    """The images of an input, in order, one per row. The one exception: a single row whose cell is a list of
    strings or bytes holds that many images, which is how MLflow's schema check hands on ``{"image": [a, b]}``
    (a Python dict, or the served ``inputs`` format). A list of numbers stays one image (an array's rows)."""
    if isinstance(model_input, pd.DataFrame):
        cells = list(model_input["image"] if "image" in model_input.columns else model_input.iloc[:, 0])
    else:
        cells = list(model_input)
    only = cells[0] if len(cells) == 1 else None
    if isinstance(only, (list, tuple, np.ndarray)) and len(only) and all(isinstance(c, (str, bytes)) for c in only):
        return list(only)
    return cells


def reads_paths() -> bool:
    """Whether a string input may name a file. ``ADAPTFLOW_READ_PATHS`` decides when set (1/true/yes/on or
    0/false/no/off; any other value is refused, never taken as yes); otherwise yes, except in a process
    MLflow serves from."""
    switch = os.environ.get("ADAPTFLOW_READ_PATHS")
    if switch is not None:
        if switch.strip().lower() not in SWITCH:
            raise ValueError(f"ADAPTFLOW_READ_PATHS={switch!r}: use 1 (read file paths) or 0 (base64 and arrays only)")
        return SWITCH[switch.strip().lower()]
    return not serving()


def serving() -> bool:
    """Whether MLflow serves the model from this process (it marks them with ``_MLFLOW_IS_IN_SERVING_ENVIRONMENT``)."""
    return os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").strip().lower() in ("true", "1")


mlflow.models.set_model(ImageClassifier())
