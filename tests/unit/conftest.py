"""Shared tiny fixtures for the unit suite: everything on CPU, a few images, a few epochs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from PIL import Image

from adaptflow import outputs
from adaptflow import params as params_mod
from adaptflow.data.store import Split
from adaptflow.models import ModelConfig, create, save

ROOT = Path(__file__).resolve().parents[2]
PARAMS_YAML = ROOT / "params.yaml"

settings.register_profile("unit", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.load_profile("unit")

CPU = torch.device("cpu")
SIZE = 16  # image side for the tiny model fixtures
SOURCE_CLASSES = ["0", "1", "2"]


@pytest.fixture(autouse=True)
def _small_torch():
    """Deterministic, cheap torch for every test.

    One intra-op thread: these models are tiny, and on a 2-core machine shared with other work, OpenMP threads
    spin-waiting for a busy core make a 0.1 s fit take 20 s. Set before every test because
    ``adaptflow.training.device()`` raises the thread count.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture
def params_path() -> Path:
    assert PARAMS_YAML.is_file(), PARAMS_YAML
    return PARAMS_YAML


def tiny_params(**finetune) -> params_mod.Params:
    """Params with a shrunk finetune section (tiny epochs/batches) and a tiny target augmentation."""
    ft = {"epochs": 2, "batch_size": 4, "unlabeled_batch_size": 4, "lr": 0.01, "linear_probe_epochs": 5, **finetune}
    return params_mod.from_dict(
        {
            "seed": 0,
            "preprocess": {"image_size": SIZE, "channels": 1},
            "pretrain": {"model": "test_resnet", "epochs": 1, "batch_size": 8},
            "augment": {"source": [], "target": [{"name": "RandomAffine", "degrees": 5}]},
            "finetune": ft,
        }
    )


def class_images(labels: np.ndarray, n_classes: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """uint8 N×1×size×size images whose brightness encodes the class (separable, with noise)."""
    rng = np.random.default_rng(seed)
    levels = np.linspace(20, 235, n_classes)
    base = levels[labels][:, None, None, None]
    noise = rng.integers(-15, 16, size=(len(labels), 1, size, size))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def make_split(per_class: int, classes: list[str], seed: int = 0, size: int = SIZE) -> Split:
    labels = np.repeat(np.arange(len(classes)), per_class).astype(np.int64)
    return Split(class_images(labels, len(classes), size, seed), labels, list(classes))


@pytest.fixture
def split_factory():
    return make_split


@pytest.fixture
def source_checkpoint(tmp_path) -> Path:
    """A tiny randomly initialised test_resnet source checkpoint (1 channel, 16×16, classes 0–2)."""
    torch.manual_seed(1)
    cfg = ModelConfig("test_resnet", 1, SIZE, list(SOURCE_CLASSES), {"role": "source"})
    d = tmp_path / "source_model"
    save(create(cfg), cfg, d)
    return d


def write_feature_cache(directory: Path, source_dir: Path, splits: dict[str, Split]) -> Path:
    """The files cache_features writes (NAME.npy, NAME_labels.npy for labeled/pool/val/test) plus a manifest."""
    from adaptflow.models import load
    from adaptflow.stages.cache_features import SPLITS, extract

    model, _ = load(source_dir, "cpu")
    with outputs.atomic_dir(directory, "cache_features", "test-key") as tmp:
        for name in SPLITS:
            s = splits.get(name) or splits["val"]
            np.save(tmp / f"{name}.npy", extract(model, s.images, 64, CPU))
            np.save(tmp / f"{name}_labels.npy", s.labels)
    return directory


@pytest.fixture
def png_bytes() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()



@pytest.fixture
def params_factory():
    return tiny_params


@pytest.fixture
def feature_cache_writer():
    return write_feature_cache
