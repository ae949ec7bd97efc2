"""The registered model's predict: file paths are read in the caller's process, never when MLflow serves."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from adaptflow import serving_model

SERVED = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"


@pytest.fixture
def model():
    m = serving_model.ImageClassifier()
    m.cfg = {"classes": ["a", "b"], "image_size": 8, "in_chans": 1, "input_size": None}
    torch.manual_seed(0)
    m.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)).eval()
    return m


@pytest.fixture
def png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(buf, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize(("served", "switch", "reads"), [
    (None, None, True), ("true", None, False), ("True", None, False), ("false", None, True),
    (None, "0", False), ("true", "1", True), ("true", "0", False), ("true", "no", False), (None, " Off ", False), ("true", "yes", True),
])
def test_reads_paths_follows_the_serving_mark_and_the_switch(monkeypatch, served, switch, reads):
    for name, value in ((SERVED, served), ("ADAPTFLOW_READ_PATHS", switch)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert serving_model.reads_paths() is reads


def test_served_predict_refuses_paths_and_answers_base64(model, png, monkeypatch):
    monkeypatch.delenv("ADAPTFLOW_READ_PATHS", raising=False)
    monkeypatch.delenv(SERVED, raising=False)
    local = model.predict(None, pd.DataFrame({"image": [str(png)]}))
    monkeypatch.setenv(SERVED, "true")  # what `mlflow models serve` sets in its worker
    # an MlflowException: the server answers it with the message and a 400, without its own stack trace
    with pytest.raises(MlflowException, match="image 0: not base64 image bytes .*reads no file paths when served") as exc:
        model.predict(None, pd.DataFrame({"image": [str(png)]}))
    assert exc.value.get_http_status_code() == 400
    served = model.predict(None, pd.DataFrame({"image": [base64.b64encode(png.read_bytes()).decode()]}))
    pd.testing.assert_frame_equal(served, local)
    assert local["confidence"].dtype == np.float64  # as the signature declares (double); proba_* are float32 ("float")
    assert all(local[c].dtype == np.float32 for c in local.columns if c.startswith("proba_"))


@pytest.mark.parametrize("switch", ["false-ish", "", "2"])
def test_a_switch_value_it_does_not_know_is_refused_not_taken_as_yes(monkeypatch, switch):
    monkeypatch.setenv(SERVED, "true")
    monkeypatch.setenv("ADAPTFLOW_READ_PATHS", switch)
    with pytest.raises(ValueError, match="ADAPTFLOW_READ_PATHS=.*use 1 .* or 0"):
        serving_model.reads_paths()


def test_a_bad_image_is_named_by_its_position(model, png, monkeypatch):
    monkeypatch.delenv("ADAPTFLOW_READ_PATHS", raising=False)
    monkeypatch.delenv(SERVED, raising=False)
    good = base64.b64encode(png.read_bytes()).decode()
    bad = base64.b64encode(b"not an image at all").decode()
    with pytest.raises(ValueError, match=r"^image 1: not an existing path, and base64 of no readable image \(UnidentifiedImageError"):
        model.predict(None, pd.DataFrame({"image": [good, bad]}))  # in the caller's process: the error as it is
    monkeypatch.setenv(SERVED, "true")
    with pytest.raises(MlflowException, match=r"image 1: base64 of no readable image \(UnidentifiedImageError"):
        model.predict(None, pd.DataFrame({"image": [good, bad]}))


def test_a_column_of_images_as_mlflow_leaves_it_is_that_many_images(model, png):
    """{"image": [a, b]} (a dict, or the served "inputs" format) reaches predict as one row holding the list."""
    from mlflow.models.utils import _enforce_schema

    from adaptflow import tracking

    b64 = base64.b64encode(png.read_bytes()).decode()
    one = model.predict(None, pd.DataFrame({"image": [b64]}))
    enforced = _enforce_schema({"image": [b64, str(png), b64]}, tracking._signature(["a", "b"]).inputs)
    assert len(enforced) == 1  # what MLflow hands predict: one row, its cell the list
    out = model.predict(None, enforced)
    assert len(out) == 3 and (out["label"] == one["label"][0]).all()
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # a nested list of numbers stays one image
    assert len(model.predict(None, pd.DataFrame({"image": [pixels.tolist()]}))) == 1
    with pytest.raises(ValueError, match="shape"):  # among several rows, one image per row: output rows match input rows
        model.predict(None, pd.DataFrame({"image": [b64, [b64, b64]]}))
