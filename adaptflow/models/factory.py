"""timm backbones by name and their checkpoints.

A checkpoint directory holds ``model.safetensors`` and ``config.json`` (:class:`ModelConfig`): enough to
rebuild the network with timm alone, without adaptflow or MLflow.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adaptflow.params import HUB  # noqa: F401  (pretrain.weights' name for the hub; re-exported)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CLASSES_METADATA = "adaptflow.classes"  # the classifier's classes, in output order, in the weights file's own metadata


@dataclass
class ModelConfig:
    arch: str  # timm model name
    in_chans: int
    image_size: int
    classes: list[str]
    extra: dict = field(default_factory=dict)  # strategy, selection rule, source checkpoint, ...
    input_size: int | None = None  # the side the network sees (None: image_size); resized on the device

    @property
    def side(self) -> int:
        return self.input_size or self.image_size

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def create(cfg: ModelConfig, pretrained: bool = False, **overlay: object) -> nn.Module:
    """A randomly initialised timm model for ``cfg``; ``pretrained`` with ``overlay`` (timm's
    ``pretrained_cfg_overlay``, e.g. a ``state_dict``) starts it from those weights instead (:func:`start`)."""
    extra = {"pretrained_cfg_overlay": overlay} if overlay else {}
    model = timm.create_model(cfg.arch, pretrained=pretrained, in_chans=cfg.in_chans, num_classes=cfg.num_classes, **extra)
    model.adaptflow_input_size = cfg.input_size  # read by input_size(); not a parameter, not saved in weights
    return model


WEIGHTS_KEY = "pretrain.weights"


def weights_file(weights: str | None, root: Path) -> Path | None:
    """``pretrain.weights`` as a file (relative paths against the project ``root``); None for a random start or
    the hub. A file that is not there raises :class:`DataError` naming the key."""
    from adaptflow.data.files import DataError

    if weights is None or weights == HUB:
        return None
    path = Path(weights) if Path(weights).is_absolute() else Path(root) / weights
    if not path.is_file():
        raise DataError(f"{WEIGHTS_KEY}: {path} is not a file; fix the path (relative paths are resolved against the project "
                        f"root {Path(root).resolve()}), or set {WEIGHTS_KEY}: null to start from a random initialisation")
    return path


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    from adaptflow.outputs import file_digest

    return file_digest(Path(path))


def weights_digest(weights: str | None, root: Path) -> str:
    """What the start depends on: the weights file's sha256 ("" for a random start, ``hub`` for the hub)."""
    path = weights_file(weights, root)
    if path is None:
        return "" if weights is None else HUB
    st = path.stat()
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _names(value: object) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, as timm reads them (safetensors; a torch checkpoint: the state dict,
    or the one under ``state_dict``/``model``, ``module.`` prefixes dropped), unpickling no code."""
    from adaptflow.data.files import DataError

    try:
        state = timm.models.load_state_dict(str(path))
        if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("it holds no state dict of tensors")
    except Exception as exc:  # noqa: BLE001 — a corrupt or foreign file
        first = (str(exc).strip().splitlines() or [""])[0]
        if "weights_only" in first:  # torch's refusal to unpickle anything but tensors
            first = "torch.load(weights_only=True) refused it: not a state dict of plain tensors, or not a torch file at all"
        raise DataError(f"{WEIGHTS_KEY}: {path} is not a weights file timm can read ({type(exc).__name__}: {first[:200]}); "
                        "give a .safetensors file or a torch state dict (.pth/.pt/.bin)") from None
    return state


def _mismatch(arch: str, blank: nn.Module, state: dict[str, torch.Tensor], path: Path) -> str | None:
    """Why ``state`` is not a ``arch``'s weights, or None. The classifier may differ (it is kept or replaced),
    and so may the first convolution's input channels (timm converts them); BatchNorm's batch counters may be
    absent (some exports drop them)."""
    cfg = blank.pretrained_cfg
    is_head = tuple(f"{h}." for h in _names(cfg.get("classifier")))
    stems = {f"{c}.weight" for c in _names(cfg.get("first_conv"))}
    own = {k: tuple(v.shape) for k, v in blank.state_dict().items() if not k.startswith(is_head)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = sorted((k for k in state if k not in own and not k.startswith(is_head)), key=lambda k: k.endswith("num_batches_tracked"))
    shapes = [k for k, shape in own.items() if k in state and tuple(state[k].shape) != shape
              and not (k in stems and state[k].ndim == 4 and state[k].shape[0] == shape[0] and state[k].shape[2:] == shape[2:])]
    if not (missing or extra or shapes):
        return None
    said = [f"{len(missing)} of its weights missing (e.g. {', '.join(missing[:3])})" if missing else "",
            f"{len(extra)} it does not have (e.g. {', '.join(extra[:3])})" if extra else "",
            f"{len(shapes)} of other shapes (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)} for {own[shapes[0]]})" if shapes else ""]
    return (f"{WEIGHTS_KEY}: {path} is not a {arch}'s weights: " + "; ".join(x for x in said if x)
            + ". Set pretrain.model to the architecture the file was saved from")


def _fitting_state(arch: str, in_chans: int, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The file's tensors and the architecture's timm config, once the file is known to hold ``arch``'s
    weights (the classifier aside); else :class:`DataError` naming the key."""
    from adaptflow.data.files import DataError

    state = _read_state(path)
    blank = timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=2)
    why = _mismatch(arch, blank, state, path)
    if why:
        raise DataError(why)
    return state, blank.pretrained_cfg


def hub_problem(arch: str) -> str | None:
    """Why timm cannot fetch ``arch``'s pretrained weights from the Hugging Face hub here, found in seconds
    rather than after the hub client's retries (about a minute offline), or None: timm knows no weights for
    it, or they are not in the local cache and the hub cannot be reached (``HF_HUB_OFFLINE`` is set, or its
    host does not resolve, or takes no connection within 5 s per address). Nothing is downloaded; behind a
    proxy (``HTTPS_PROXY``…) the hub is not probed, and weights timm fetches from a plain URL are not either.
    Weights in the cache pass: timm may still ask the hub for a newer revision before using them."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return f"timm has no pretrained weights for {arch}"
    if not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    # What timm's load_state_dict_from_hf asks for: the configured file (default pytorch_model.bin) and the
    # safetensors file it looks for first (x.bin → x.safetensors; pytorch_model.bin → model.safetensors).
    name = cfg.hf_hub_filename or "pytorch_model.bin"
    safe = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    names = [name, safe.get(name, name.removesuffix(".bin") + ".safetensors")]
    if any(isinstance(try_to_load_from_cache(repo, n, cache_dir=constants.HF_HUB_CACHE, revision=revision or None), str) for n in names):
        return None
    missing = f"{repo}'s weights are not in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        return f"{missing} and HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    if any(os.environ.get(v) for v in (f"{url.scheme.upper()}_PROXY", f"{url.scheme}_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        return f"{missing} and the hub at {host}:{port} cannot be reached ({exc})"
    return None


def _check_hub(arch: str) -> None:
    from adaptflow.data.files import DataError

    why = hub_problem(arch)
    if why:
        raise DataError(f"{WEIGHTS_KEY}={HUB}: {why}; download them where the hub is reachable and set {WEIGHTS_KEY} to the "
                        "file, or set pretrain.weights: null to start from a random initialisation")


def file_classes(path: Path) -> list[str] | None:
    """The classes a weights file's classifier outputs, in order, where the file says: an adaptflow checkpoint's
    safetensors metadata, or the ``config.json`` beside its ``model.safetensors`` (older checkpoints). None for a
    file that does not say (ImageNet weights, a foreign checkpoint). Metadata that is there but is no list of
    class names raises :class:`DataError` naming the key; a ``config.json`` without one is not read."""
    from adaptflow.data.files import DataError

    def names(value: object) -> list[str] | None:
        ok = isinstance(value, list) and value and all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in value)
        return [str(c) for c in value] if ok else None

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            named = (f.metadata() or {}).get(CLASSES_METADATA)
        if named is not None:
            try:
                classes = names(json.loads(named))
            except ValueError:
                classes = None
            if classes is None:
                raise DataError(f"{WEIGHTS_KEY}: {path}: its metadata {CLASSES_METADATA} is not a list of class names "
                                f"({named[:80]!r}); re-save the checkpoint, or drop the metadata to match its classifier by count")
            return classes
    beside = path.parent / CONFIG
    if path.name == WEIGHTS and beside.is_file():
        try:
            return names(json.loads(beside.read_text()).get("classes"))
        except (ValueError, AttributeError):
            return None
    return None


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names)} in all)" if len(names) > n else "")


def check_weights(arch: str, in_chans: int, weights: str | None, root: Path, as_is_for: list[str] | None = None) -> None:
    """Before any work: ``pretrain.weights`` names a file timm reads holding ``arch``'s weights (the
    classifier aside), or, for ``hub``, weights timm can fetch (:func:`hub_problem`: the local cache, or a
    hub that answers). ``as_is_for``: the source classes, where the file is to be the source model as it is
    (``pretrain.epochs: 0``): its classifier must be theirs. Raises :class:`DataError` naming the key."""
    if weights == HUB:
        return _check_hub(arch)  # (epochs 0 with hub: params refuse it)
    path = weights_file(weights, root)
    if path is not None:
        state, arch_cfg = _fitting_state(arch, in_chans, path)
        if as_is_for is not None:
            keep, why, _ = _head_fits(state, arch_cfg, path, as_is_for)
            if not keep:
                raise head_refused(weights, len(as_is_for), why)


def head_refused(weights: str, n_classes: int, why: str = "") -> Exception:
    """``pretrain.epochs: 0`` with weights whose classifier is not the source's: nothing would train one."""
    from adaptflow.data.files import DataError

    return DataError(f"pretrain.epochs: 0 uses pretrain.weights as the source model as they are, but {weights} has no classifier "
                     f"with one output per source class ({n_classes}){': ' + why if why else ''}; set pretrain.epochs to train one")


def _head_fits(state: dict, arch_cfg: dict, path: Path, classes: list) -> tuple[bool, str, list[str] | None]:
    """Whether the file's classifier serves ``classes`` as it is: one output per class and, where the file names
    its classes (:func:`file_classes`, returned too), the same ones; else why not (empty when the count alone
    differs)."""
    heads, named = _names(arch_cfg.get("classifier")), file_classes(path)
    if {state[f"{h}.weight"].shape[0] for h in heads if f"{h}.weight" in state} != {len(classes)}:
        return False, "", named
    card = [str(c) for c in classes]
    if named is not None and sorted(named) != sorted(card):
        return False, f"the file's classes ({_few(named)}) are not the source's ({_few(card)})", named
    return True, "", named


def start(cfg: ModelConfig, weights: str | None, root: Path) -> tuple[nn.Module, dict]:
    """The model pretraining starts from, and what it was started from.

    ``weights`` None: a random initialisation. A file (safetensors, or a torch checkpoint timm reads: a state
    dict, or one under ``state_dict``/``model``): timm loads it (``pretrained_cfg_overlay``), converting the
    first convolution between 1 and 3 input channels. The classifier is kept when it has one output per
    source class (the file is a source model already) and, where the file names its classes
    (:func:`file_classes`), they are the source's: its rows are then put in the dataset card's order; a file
    that names no classes is taken to be in the card's order. Otherwise the classifier is freshly initialised. ``hub``: timm's default pretrained weights (needs the Hugging Face hub). A file
    that is not ``cfg.arch``'s weights (:func:`check_weights`) raises :class:`DataError` naming the key."""
    from adaptflow.data.files import DataError

    if weights is None:
        return create(cfg), {"weights": None}
    if weights == HUB:
        _check_hub(cfg.arch)
        try:
            model = create(cfg, pretrained=True)
        except Exception as exc:  # noqa: BLE001 — no hub, no such weights: the reason is the message
            raise DataError(f"{WEIGHTS_KEY}={HUB}: timm could not fetch pretrained weights for {cfg.arch} ({type(exc).__name__}: "
                            f"{str(exc).strip()[:300]}); download them where the hub is reachable and set {WEIGHTS_KEY} to the "
                            "file") from None
        return model, {"weights": HUB, "head": "new"}
    path = weights_file(weights, root)
    state, arch_cfg = _fitting_state(cfg.arch, cfg.in_chans, path)
    heads = _names(arch_cfg.get("classifier"))
    keep_head, head_why, named = _head_fits(state, arch_cfg, path, cfg.classes)
    card = [str(c) for c in cfg.classes]
    if keep_head and named is not None and named != card:
        order = torch.tensor([named.index(c) for c in card])  # row i: the card's class i
        rows = {f"{h}.{w}" for h in heads for w in ("weight", "bias")}
        state = {k: v[order] if k in rows else v for k, v in state.items()}
    convs = _names(arch_cfg.get("first_conv"))
    file_chans = next((state[f"{c}.weight"].shape[1] for c in convs if f"{c}.weight" in state and state[f"{c}.weight"].ndim == 4), None)
    overlay: dict = {"state_dict": state, "num_classes": cfg.num_classes if keep_head else -1}
    if file_chans is not None:
        overlay["input_size"] = (int(file_chans), *tuple(arch_cfg.get("input_size") or (3, 224, 224))[1:])
    try:
        model = create(cfg, pretrained=True, **overlay)
    except Exception as exc:  # noqa: BLE001 — shapes that do not fit: the reason is the message
        raise DataError(f"{WEIGHTS_KEY}: {path} does not fit {cfg.arch} with {cfg.in_chans} input channel(s) and "
                        f"{cfg.num_classes} classes ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); set pretrain.model "
                        "to the architecture it was saved from") from None
    began = {"weights": str(weights), "sha256": weights_digest(weights, root), "head": "kept" if keep_head else "new",
             "file_in_chans": None if file_chans is None else int(file_chans)}
    if keep_head:
        began["head_classes"] = "by count (the file names no classes)" if named is None else "by name"
    elif head_why:
        began["head_why"] = head_why
    return model, began


@functools.lru_cache(maxsize=32)
def input_problem(arch: str, side: int, channels: int) -> str | None:
    """Why timm's ``arch`` cannot be built or take ``side``×``side`` inputs, or None. Only a model timm marks
    as built for one input size (ViT, Swin, …) is probed: one forward pass of a randomly initialised copy, on
    the CPU (many such models take other sizes; some do not)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch)
    except Exception as exc:  # noqa: BLE001 — e.g. a pretrained tag timm does not know
        return f"{arch}: {exc}"
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return None
    try:
        model = timm.create_model(arch, pretrained=False, in_chans=channels, num_classes=2).eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, side, side))
    except Exception as exc:  # noqa: BLE001 — whatever the model raises is the reason
        n = cfg.input_size[-1]
        return (f"{arch} cannot take {side}×{side} inputs ({type(exc).__name__}: {str(exc).strip()[:200]}); timm builds it for "
                f"{n}×{n}: set pretrain.input_size: {n} (images are resized on the device), or choose another model")
    return None


def input_size(model: nn.Module) -> int | None:
    """The side ``model`` takes its input at, when it differs from the stored images' (None: as stored)."""
    return getattr(model, "adaptflow_input_size", None)


def save(model: nn.Module, cfg: ModelConfig, directory: Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # The classes travel inside the file too: a model.safetensors copied alone still says what its outputs mean.
    save_file(state, str(directory / WEIGHTS), metadata={CLASSES_METADATA: json.dumps(list(cfg.classes))})
    (directory / CONFIG).write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True))


def load(directory: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    directory = Path(directory)
    cfg = ModelConfig(**json.loads((directory / CONFIG).read_text()))
    model = create(cfg)
    model.load_state_dict(load_file(str(directory / WEIGHTS), device="cpu"))
    return model.to(device).eval(), cfg


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled backbone features (the classifier's input)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def set_head(model: nn.Module, source_classes: list[str], target_classes: list[str]) -> bool:
    """Point the classifier at the target classes.

    Classes are matched by name: the source head's row of every target class the source knows is kept
    (in the target's order), so for those the model starts as the source classifier; rows of classes the
    source never saw are freshly initialised. Returns whether *every* target class was known.
    """
    head = model.get_classifier()
    known = [i for i, c in enumerate(target_classes) if c in source_classes]
    if not isinstance(head, nn.Linear) or not known:
        model.reset_classifier(len(target_classes))
        return False
    rows = torch.tensor([source_classes.index(target_classes[i]) for i in known])
    weight, bias = head.weight.data[rows].clone(), head.bias.data[rows].clone()
    model.reset_classifier(len(target_classes))
    new = model.get_classifier()
    new.weight.data[known] = weight
    new.bias.data[known] = bias
    return len(known) == len(target_classes)
