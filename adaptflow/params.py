"""params.yaml → validated, typed sections.

Every section belongs to one stage (or to the data of one role). Validation happens on load, before any
work: an unknown key or a bad value raises :class:`ParamsError` whose message names the dotted key, so
`finetune.lr: Input should be greater than 0` is the whole story.
"""

from __future__ import annotations

import copy
import re
import warnings
import zoneinfo
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from adaptflow.data.domains import BUILTIN_DOMAINS  # noqa: F401  (re-exported: the domain registry's one list)
from adaptflow.outputs import json_digest
from adaptflow.strategy_names import BASES, OBJECTIVES, needs_labels, parse, uses_pool

# Validation context of the first, plain pass (:func:`from_dict`): the checks that need torch, torchvision or
# timm (transform pipelines, model names and inputs) wait for the second pass, so a typo in a plain value is
# reported before those load (about 0.5 s instead of 4-9 s).
_PLAIN = {"plain": True}


def _plain(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("plain"))

ROLES = ("source", "target")
# Single-word strategies (bases, and objectives which start from finetune); combine with "+": dann+fixmatch.
STRATEGIES = BASES + OBJECTIVES
BASELINES = ("scratch", "source_only")
HUB = "hub"  # pretrain.weights: timm's default pretrained weights for the architecture, from the Hugging Face hub


class ParamsError(ValueError):
    """A params.yaml problem, reported with the dotted key that caused it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _true_is_not_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's true/false given where a number belongs is refused, not read as 1/0 (pydantic's lax mode)."""
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            annotation = cls.model_fields[info.field_name].annotation
            allowed = (annotation, *get_args(annotation))
            if bool not in allowed and Any not in allowed and any(t in allowed for t in (int, float)):
                raise ValueError(f"{str(value).lower()} is not a number")
        return value


class Paths(_Section):
    ingested: str = "data/ingested"
    augmented: str = "data/augmented"
    features: str = "data/features"
    source_model: str = "models/source"
    adapted: str = "models/adapted"
    reports: str = "reports"

    @field_validator("*")
    @classmethod
    def _inside_the_project(cls, value: str) -> str:
        """A stage output lives in the project: its runs find, version (DVC) and clean up only their own."""
        norm = value.strip().replace("\\", "/")
        parts = PurePosixPath(norm).parts
        if not parts or parts == (".",) or norm.startswith("/") or parts[0] == "~" or ":" in parts[0] or ".." in parts:
            raise ValueError(f"{value!r} is not a folder inside the project; give a relative path without '..' "
                             "(e.g. the default); to keep outputs on another disk, link a folder above them (e.g. models/) there")
        return value.strip()


class Preprocess(_Section):
    image_size: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 1


def _check_domain(value: str) -> str:
    # Grammar only (built-in name, imagefolder:PATH, csv:PATH): whether PATH exists depends on the project
    # root, which ingest knows; it checks before any work. Kept in one spelling (domains.canonical).
    from adaptflow.data.domains import canonical

    return canonical(value)


class SynthDigits(_Section):
    """The synth_digits domain's knobs, read when the role's domain is synth_digits."""

    n: int = Field(10_000, ge=10, le=10_000_000, description="images to render, balanced over the ten digits")
    size: int = Field(32, ge=8, le=256, description="rendered side in pixels (ingest then resizes to preprocess.image_size)")
    seed: int = Field(0, description="rendering seed: the same seed gives the same bytes")


class _Role(_Section):
    """A role's data: where its images come from, how much of them to keep, how to split them."""

    domain: str
    raw: str = Field("adaptflow/data", description="the path `dvc repro` watches for this role's raw data (dvc.yaml ingest deps): "
                     "set it to your imagefolder/csv data so a change to the files re-runs ingest")
    synth: SynthDigits = Field(default_factory=SynthDigits)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    limit: int | None = Field(None, ge=10, description="keep at most this many images (stratified, chosen by path and seed); for quick runs")

    _domain = field_validator("domain")(classmethod(lambda cls, v: _check_domain(v)))


class Source(_Role):
    domain: str = "mnist"


class Target(_Role):
    domain: str = "uci_digits"
    test_fraction: float = Field(0.3, gt=0, lt=0.8)
    k: int = Field(10, ge=0, description="labeled target train images per class (0: no target labels at all)")

    @model_validator(mode="after")
    def _fractions(self) -> "Target":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for train")
        return self


class TransformSpec(_Section):
    """One torchvision.transforms.v2 class by name and its keyword arguments (nested specs allowed)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str


class RoleAugment(_Section):
    """One role's on-the-fly augmentation: a named preset, then Downsample, then explicit v2 transforms."""

    preset: str = Field("none", description="none | light | digits | digits_strong | photo (adaptflow.data.transforms.PRESETS)")
    downsample: list[int] = Field(default_factory=list, description="sides to pass each image through and back "
                                  "(one drawn per image): the target's native resolution brings the source closer to it")
    transforms: list[TransformSpec] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _plain_list(cls, data: Any) -> Any:
        # A bare list of specs (the original form) means: no preset, no downsampling, these transforms.
        return {"transforms": data} if isinstance(data, list) else data

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str, info: ValidationInfo) -> str:
        if _plain(info):
            return v
        from adaptflow.data.transforms import PRESETS

        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {', '.join(PRESETS)}")
        return v

    @field_validator("downsample")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(s < 1 for s in v):
            raise ValueError(f"sides must be positive, got {v}")
        return v

    def specs(self) -> list[dict[str, Any]]:
        from adaptflow.data.transforms import role_specs

        return role_specs(self.preset, self.downsample, [t.model_dump() for t in self.transforms])

    @model_validator(mode="after")
    def _buildable(self, info: ValidationInfo) -> "RoleAugment":
        # Building the pipeline here turns a typo in a preset, a transform name or an argument into a
        # load-time error naming augment.<role>.
        if _plain(info):
            return self
        from adaptflow.data.transforms import build_pipeline

        try:
            build_pipeline(self.specs())
        except (TypeError, AttributeError) as exc:
            raise ValueError(str(exc)) from None
        return self


class Augment(_Section):
    # Not validated when left out (the default, preset none, is sound): a validated default would build its
    # pipeline, importing torch in the plain pass. The full pass checks every pipeline (_pipelines_keep_images).
    source: RoleAugment = Field(default_factory=RoleAugment.model_construct)
    target: RoleAugment = Field(default_factory=RoleAugment.model_construct)
    n_views: int = Field(0, ge=0, le=256, description="augmented copies of the labeled target set that the augment stage materialises")
    preview_n: int = Field(64, ge=1, le=1024)


class Pretrain(_Section):
    model: str = "resnet10t"
    # The side the network sees. null: the stored side (preprocess.image_size). Larger (e.g. 224 for a
    # resnet on a GPU) resizes each uint8 batch on the device: images stay decoded once, small, at ingest.
    input_size: int | None = Field(None, ge=8, le=1024)
    # What training starts from. null: a random initialisation. A local file (.safetensors, or a torch state
    # dict .pth/.pt/.bin; relative to the project root): weights of `model` — e.g. ImageNet weights, or your own
    # source model (its head is kept when it has one output per source class). `hub`: timm's default
    # pretrained weights for `model`, which needs the Hugging Face hub.
    weights: str | None = None
    weights_dep: str = Field("adaptflow/models", description="the path `dvc repro` watches for the weights (dvc.yaml pretrain deps): "
                             "set it to pretrain.weights so a changed file re-runs pretrain")
    epochs: int = Field(6, ge=0, description="0 with pretrain.weights: the weights are the source model as they are (no training)")
    batch_size: int = Field(128, ge=2, description="BatchNorm trains on no batch of one")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)

    @field_validator("weights")
    @classmethod
    def _weights_named(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("empty: name a weights file, `hub`, or null for a random initialisation")
        return v

    @model_validator(mode="after")
    def _zero_epochs_need_weights(self) -> "Pretrain":
        if self.epochs != 0:
            return self
        if self.weights is None:
            raise ValueError("epochs: 0 trains nothing, so it needs pretrain.weights (the source model as it is)")
        if self.weights == HUB:
            raise ValueError("epochs: 0 with weights: hub cannot work: the hub's classifier is not the source's; set epochs ≥ 1")
        return self

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str, info: ValidationInfo) -> str:
        if _plain(info):
            return v
        import timm

        if not timm.is_model(v):
            raise ValueError(f"{v!r} is not a timm model name (see timm.list_models())")
        return v


class CacheFeatures(_Section):
    batch_size: int = Field(512, ge=1)


class Partial(_Section):
    freeze_groups: int = Field(2, ge=0, description="parameter groups (stem, stage 1, ...) kept frozen")


class GradualUnfreeze(_Section):
    milestones: list[int] = Field(default_factory=lambda: [2, 4, 6, 8], min_length=1)


class L2SP(_Section):
    alpha: float = Field(0.01, ge=0)
    beta: float = Field(0.01, ge=0)


class Weighted(_Section):
    weight: float = Field(1.0, ge=0)


class FixMatch(_Section):
    threshold: float = Field(0.95, gt=0, le=1)
    weight: float = Field(1.0, ge=0)
    strong: list[TransformSpec] = Field(
        default_factory=lambda: [TransformSpec(name="RandAugment", num_ops=2, magnitude=10), TransformSpec(name="RandomErasing", p=0.5, scale=[0.02, 0.15])]
    )

    @field_validator("strong")
    @classmethod
    def _buildable(cls, specs: list[TransformSpec], info: ValidationInfo) -> list[TransformSpec]:
        if _plain(info):
            return specs
        from adaptflow.data.transforms import build_pipeline

        try:
            build_pipeline([t.model_dump() for t in specs])
        except (TypeError, AttributeError) as exc:
            raise ValueError(str(exc)) from None
        return specs


class Finetune(_Section):
    strategies: list[str] = Field(default_factory=lambda: ["scratch", "source_only", "finetune"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="one adapted model per strategy and seed")
    epochs: int = Field(30, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1, description="default: one pass over the labeled set (or the pool, for objectives that read it)")
    batch_size: int = Field(32, ge=2, description="BatchNorm trains on no batch of one")
    unlabeled_batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-3, gt=0)
    backbone_lr_scale: float = Field(0.1, gt=0, le=1)
    layer_decay: float | None = Field(None, gt=0, le=1, description="timm-style layer-wise LR decay for the backbone")
    weight_decay: float = Field(1e-4, ge=0)
    bn: Literal["train", "frozen", "adabn"] = "train"
    selection: Literal["auto", "val", "source_val", "im"] = "auto"
    source_weight: float = Field(1.0, ge=0, description="source cross-entropy weight in dann/coral/mmd")
    linear_probe_epochs: int = Field(200, ge=1)
    linear_probe_lr: float = Field(0.01, gt=0)
    partial: Partial = Field(default_factory=Partial)
    gradual_unfreeze: GradualUnfreeze = Field(default_factory=GradualUnfreeze)
    l2sp: L2SP = Field(default_factory=L2SP)
    dann: Weighted = Field(default_factory=Weighted)
    coral: Weighted = Field(default_factory=Weighted)
    mmd: Weighted = Field(default_factory=Weighted)
    fixmatch: FixMatch = Field(default_factory=FixMatch)

    @field_validator("strategies")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        seen: dict[tuple, str] = {}
        for s in v:
            base, objectives = parse(s)  # raises ValueError naming the bad part
            plain = "+".join(part.strip() for part in s.split("+"))
            if plain != s:  # the name becomes a folder, a run name and a table row: one spelling
                raise ValueError(f"{s!r}: write it {plain!r}")
            same = seen.get((base, frozenset(objectives)))
            if same is not None:
                raise ValueError("strategies must not repeat" + (f": {s!r} is the same strategy as {same!r}" if same != s else f" ({s!r})"))
            seen[(base, frozenset(objectives))] = s
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must not repeat")
        return v


class Evaluate(_Section):
    baselines: list[str] = Field(default_factory=lambda: list(BASELINES))
    ece_bins: int = Field(15, ge=1, le=100, description="equal-width confidence bins of the expected calibration error")


class Register(_Section):
    model_name: str = Field("adaptflow-{target}", description="the registered model's name; {target}: the target domain")
    margin: float = Field(0.0, ge=0, le=1, description="accuracy the candidate must beat each baseline by")
    require_baselines: bool = Field(True, description="the gate checks the candidate against scratch (when target.k > 0) "
                                    "and source_only, so evaluate.baselines must list them; false lets a run without them "
                                    "be promoted on the champion check alone (the version's reasons say so)")

    @field_validator("model_name")
    @classmethod
    def _registry_name(cls, v: str) -> str:
        try:
            name = v.format(target="t")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{v!r}: the one placeholder a model name takes is {{target}} ({type(exc).__name__}: {exc})") from None
        if not name.strip() or "/" in name or ":" in name:  # the registry's rule (models:/NAME@alias)
            raise ValueError(f"{v!r} is not a registry name: it must be non-empty and hold no '/' or ':'")
        return v


TASK_RUNNERS = ("sequential", "threads", "processes", "dask")


class Orchestrate(_Section):
    """How the stages are run (the Prefect flow's task runner, the lock, the schedule, the training processes),
    not what they compute: no stage reads this section, so changing it re-runs nothing (and DVC, whose
    dvc.yaml lists no orchestrate key, agrees). Training in several processes does change the weights a
    little (BatchNorm over each share, each process's own augmentation draws); its output still stands for
    the same stage inputs."""

    task_runner: Literal["sequential", "threads", "processes", "dask"] = Field(
        "sequential", description="how finetune runs (strategy × seed) fan out: sequential (deterministic), threads (parallel, but torch's "
        "global RNG is shared, so results vary run to run), processes (parallel and deterministic), dask (a cluster)")
    max_workers: int = Field(2, ge=1, description="parallel runs for threads / processes / a local Dask cluster")
    dask_address: str | None = Field(None, description="a running Dask scheduler, e.g. tcp://10.0.0.5:8786; null: a LocalCluster of max_workers processes")
    lock_timeout: float | None = Field(None, ge=0, description="seconds a run waits for another run in the same project (null: as long as it takes)")
    incoming: str = Field("data/incoming/{domain}", description="the scheduled run's watched folder of new target images ({domain}: the target folder's name)")
    cron: str = Field("0 2 * * *", description="the deployment's schedule (cron, in `timezone`)")
    timezone: str = "UTC"
    work_pool: str = Field("adaptflow", description="the Prefect work pool `adaptflow deploy` registers the deployment with")
    dvc_commit: bool = Field(True, description="after a Prefect run in a DVC repo, `dvc commit` its outputs so dvc.lock agrees")
    train_processes: int = Field(1, ge=1, description="processes for each training stage (pretrain, finetune), one per GPU, started with "
                                 "torch's launcher (torchrun --standalone) by the flow and by `adaptflow stage`; 1: in the calling process")

    @model_validator(mode="after")
    def _one_trainer_at_a_time(self) -> "Orchestrate":
        if self.train_processes > 1 and self.task_runner != "sequential":
            raise ValueError(f"train_processes: {self.train_processes} runs each training stage on {self.train_processes} processes "
                             f"(the machine's GPUs); task_runner must then be sequential, not {self.task_runner!r}, so that one stage at a "
                             "time holds them")
        return self

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not a time zone (an IANA name, e.g. UTC or Europe/Berlin)") from None
        return v

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"{v!r} is not a cron expression (five fields: minute hour day month weekday, e.g. '0 2 * * *')")
        return v


with warnings.catch_warnings():
    # "register" (the stage) shadows ABCMeta.register on the model class, which nothing here uses.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class _ParamsBase(_Section):
        register: Register = Field(default_factory=Register)

        @model_validator(mode="before")
        @classmethod
        def _register_section(cls, data: Any) -> Any:
            # The shadowed name makes pydantic take ABCMeta.register as the default, not the factory's Register():
            # a params file without a register section gets the section's defaults here instead.
            return {**data, "register": {}} if isinstance(data, dict) and "register" not in data else data


class Params(_ParamsBase):
    seed: int = 0
    paths: Paths = Field(default_factory=Paths)
    preprocess: Preprocess = Field(default_factory=Preprocess)
    source: Source = Field(default_factory=Source)
    target: Target = Field(default_factory=Target)
    augment: Augment = Field(default_factory=Augment)
    pretrain: Pretrain = Field(default_factory=Pretrain)
    cache_features: CacheFeatures = Field(default_factory=CacheFeatures)
    finetune: Finetune = Field(default_factory=Finetune)
    evaluate: Evaluate = Field(default_factory=Evaluate)
    orchestrate: Orchestrate = Field(default_factory=Orchestrate)

    @model_validator(mode="after")
    def _baselines_run(self) -> "Params":
        missing = [b for b in self.evaluate.baselines if b not in self.finetune.strategies]
        if missing:
            raise ValueError(f"evaluate.baselines {missing} must also be in finetune.strategies")
        unchecked = self.unchecked_baselines()
        if unchecked and self.register.require_baselines:
            raise ValueError(f"evaluate.baselines lacks {unchecked}: the registry gate would promote a model it never compared "
                             f"with {' or '.join(unchecked)}; add them (and to finetune.strategies), or set "
                             "register.require_baselines: false to promote on the champion check alone")
        if self.target.k == 0:
            blocked = [s for s in self.finetune.strategies if needs_labels(s)]
            if blocked:
                raise ValueError(f"finetune.strategies {blocked} need labeled target images but target.k is 0; "
                                 "drop them (and from evaluate.baselines) or raise target.k")
            if self.finetune.selection == "val":  # the store holds val labels; a k = 0 run promises not to read them
                raise ValueError("finetune.selection: val chooses checkpoints on target val labels, but target.k is 0 "
                                 "(no target labels at all); use auto or im (the label-free score on the unlabeled "
                                 "target pool) or source_val, or raise target.k")
        return self

    @model_validator(mode="after")
    def _batches_split(self) -> "Params":
        check_batches(self.training_batches(), self.orchestrate.train_processes)  # before any stage, not when one launches
        return self

    def trains(self, stage: str, strategy: str | None = None) -> bool:
        """Whether ``stage`` trains anything: pretrain with epochs > 0 (0: the weights file is the source model);
        finetune when a strategy (``strategy``, else any in params) is not source_only, which keeps the source model."""
        if stage == "pretrain":
            return self.pretrain.epochs > 0
        return stage == "finetune" and any(parse(s)[0] != "source_only" for s in ([strategy] if strategy else self.finetune.strategies))

    def training_batches(self, stage: str | None = None, strategy: str | None = None) -> dict[str, int]:
        """The batch sizes (params key → value) that training in several processes shares out: of pretrain and
        finetune when they train (:meth:`trains`), and finetune's unlabeled batch where a strategy (``strategy``,
        else any in params) reads the pool."""
        sizes = {"pretrain.batch_size": self.pretrain.batch_size} if stage in (None, "pretrain") and self.trains("pretrain") else {}
        if stage in (None, "finetune") and self.trains("finetune", strategy):
            sizes["finetune.batch_size"] = self.finetune.batch_size
            if any(uses_pool(s) for s in ([strategy] if strategy else self.finetune.strategies)):
                sizes["finetune.unlabeled_batch_size"] = self.finetune.unlabeled_batch_size
        return sizes

    @model_validator(mode="after")
    def _model_takes_its_input(self, info: ValidationInfo) -> "Params":
        if _plain(info):
            return self
        from adaptflow.models.factory import input_problem

        problem = input_problem(self.pretrain.model, self.pretrain.input_size or self.preprocess.image_size, self.preprocess.channels)
        if problem:
            raise ValueError(f"pretrain.model: {problem}")
        return self

    @model_validator(mode="after")
    def _pipelines_keep_images(self, info: ValidationInfo) -> "Params":
        if _plain(info):
            return self
        from adaptflow.data.transforms import image_problem

        c, size = self.preprocess.channels, self.preprocess.image_size
        pipelines = {"augment.source": self.augment.source.specs(), "augment.target": self.augment.target.specs()}
        if any("fixmatch" in parse(s)[1] for s in self.finetune.strategies):
            pipelines["finetune.fixmatch.strong"] = [t.model_dump() for t in self.finetune.fixmatch.strong]
        for key, specs in pipelines.items():
            problem = image_problem(specs, c, size)
            if problem:
                raise ValueError(f"{key}: {problem}")
        return self

    def sections(self, *names: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """The values of the named sections (dotted names reach inside: "augment.source"), leaving out the
        dotted keys in ``exclude``: the params part of a stage's identity, as plain JSON values."""
        data = {}
        for name in names:
            value: Any = self
            for part in name.split("."):
                value = getattr(value, part)
            data[name] = _dump(value)
        for dotted in exclude:
            section, _, key = dotted.rpartition(".")
            if isinstance(data.get(section), dict):
                data[section].pop(key, None)
        return data

    def section_hash(self, *names: str, exclude: tuple[str, ...] = ()) -> str:
        """Content hash of :meth:`sections`."""
        return json_digest(self.sections(*names, exclude=exclude))

    def unchecked_baselines(self) -> list[str]:
        """The baselines the registry gate should check but evaluate.baselines leaves out: scratch (when there
        are target labels to train it on) and source_only."""
        return [b for b in BASELINES if (self.target.k > 0 or b != "scratch") and b not in self.evaluate.baselines]

    def registered_model_name(self) -> str:
        target = self.target.domain.replace(":", "-").replace("/", "-")
        return self.register.model_name.format(target=target)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def check_batches(sizes: dict[str, int], procs: int) -> None:
    """Each batch size (params key → value) must split evenly into ``procs`` shares of at least 2 images
    (BatchNorm): equal shares make the averaged gradient the whole batch's, and let the alignment objectives
    gather every process's features. Raises ValueError naming the key."""
    for key, n in sizes.items():
        if procs > 1 and (n % procs or n < 2 * procs):
            raise ValueError(f"{key}: {n} does not split into {procs} equal shares of at least 2 images, one per "
                             f"process; use a multiple of {procs} (at least {2 * procs}) or fewer processes")


def _dump(v: Any) -> Any:
    if isinstance(v, list):
        return [_dump(x) for x in v]
    return v.model_dump(mode="json") if isinstance(v, BaseModel) else v


def _blamed(loc: str, origin: str, overrides: list[str]) -> str:
    """Where a bad value at ``loc`` came from: the ``--set`` that gave it (or gave a section above it), the
    file with the ``--set`` values given inside a section whose check failed, or the file."""
    keys = {".".join(parse_override(item)[0]): item for item in overrides}
    given = [item for k, item in keys.items() if loc == k or loc.startswith(k + ".")]
    if given:
        return f"--set {given[-1]}"
    inside = [item for k, item in keys.items() if not loc or k.startswith(loc + ".")]
    return f"{origin} with --set {', '.join(inside)}" if inside else origin


def _format(err: ValidationError, origin: str, overrides: list[str] | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml)"
        elif e["type"] == "list_type" and isinstance(e.get("input"), (str, int, float)):
            msg += f" (one item is a list too: write [{e['input']}])"
        elif e["type"] == "string_type" and isinstance(e.get("input"), dict) and len(e["input"]) == 1 and None in e["input"].values():
            msg = f"{next(iter(e['input']))}: names no path; write {next(iter(e['input']))}:PATH"
        if loc:
            lines.append(f"{_blamed(loc, origin, overrides or [])}: {loc}: {msg}")
        else:  # a check across sections: its message starts with the key it blames
            lead = re.match(r"[a-z_]+(?:\.[a-z_]+)+", msg)
            blame = _blamed(lead.group(0), origin, overrides or []) if lead else origin
            lines.append(f"{blame if blame != origin else _blamed('', origin, overrides or [])}: {msg}")
    return "\n".join(lines)


class _UniqueKeys(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last one, silently)."""


def _mapping_once(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in lines:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice (lines {lines[key]} and "
                                                    f"{key_node.start_mark.line + 1}): keep one", key_node.start_mark)
        lines[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_once)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`finetune.lr=0.01` → (["finetune", "lr"], 0.01); the value is read as YAML."""
    if "=" not in item:
        raise ParamsError(f"--set {item!r}: expected key=value, e.g. finetune.lr=0.01")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ParamsError(f"--set {item!r}: empty key")
    if not raw.strip():
        return parts, ""
    try:
        return parts, yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"--set {item!r}: {key.strip()}: the value is not valid YAML ({problem}); quote it, "
                          "or write a list as [a, b] and a mapping as {k: v}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides or []:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ParamsError(f"--set {item!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def from_dict(data: dict[str, Any], origin: str = "params", overrides: list[str] | None = None, plain_only: bool = False) -> Params:
    """Validated params; ``overrides``, the ``--set`` values already in ``data``, are named in an error
    about a key they gave. The plain checks run first, so their errors come without importing torch;
    ``plain_only`` stops there (a first look: transform pipelines and the model are not checked)."""
    try:
        plain = Params.model_validate(data, context=_PLAIN)
        return plain if plain_only else Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format(err, origin, overrides)) from None


def load(path: str | Path = "params.yaml", overrides: list[str] | None = None, plain_only: bool = False) -> Params:
    """Read, override and validate params; raise ParamsError naming the key on any problem. ``plain_only``:
    see :func:`from_dict`."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file (run from the project root or pass --params)")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeys)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if data is None:  # (a cut-off write, the wrong file): every value would be a built-in default, unlike params.yaml's
        raise ParamsError(f"{path}: the file is empty; give the project's params (the committed params.yaml), "
                          "or write {} to run on the built-in defaults")
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return from_dict(apply_overrides(data, overrides), origin=str(path), overrides=overrides, plain_only=plain_only)
