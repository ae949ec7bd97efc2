"""Backbones by name (timm), classifier heads, checkpoint I/O (safetensors + a JSON config)."""

from adaptflow.models.factory import (
    ModelConfig,
    check_weights,
    create,
    features,
    head_refused,
    input_size,
    load,
    save,
    set_head,
    start,
    weights_digest,
    weights_file,
)

__all__ = ["ModelConfig", "check_weights", "create", "features", "head_refused", "input_size", "load", "save", "set_head", "start", "weights_digest", "weights_file"]
