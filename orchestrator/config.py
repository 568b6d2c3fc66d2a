"""The typed experiment config: presets, YAML run files, ``key.path=value`` overrides, validation.

Everything is resolved into one frozen ``ExperimentConfig`` before Ray or MLflow start, and every
error is a ``ConfigError`` whose one-line message starts with the dotted path of the field.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from methods.base import IDENTITY_NEUTRAL, DataInfo, FieldError, neutral_field
from methods.data import DataConfig, dataset_info
from methods.evaluate import EvalConfig
from methods.registry import METHODS
from orchestrator.errors import ConfigError  # noqa: F401 - also imported from here
from orchestrator.jobs import check_name
from orchestrator.typed import build_dataclass, coerce, first_line, read_yaml_mapping, reject_unknown


MAX_DATA_WORKERS = 64


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "constant"  # learning rate per step: constant, or cosine decay to 0
    warmup_epochs: int = 0  # linear warm-up from 0 over this many epochs, then the schedule

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule: unknown schedule {self.schedule!r}; choose constant or cosine")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        if self.name not in ("adam", "adamw", "sgd"):
            raise ValueError(f"name: unknown optimiser {self.name!r}; choose adam, adamw or sgd")
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256  # global paired batch, split over the workers
    unpaired_batch_size: int = 0  # global unpaired batch per modality; 0 = batch_size
    max_steps_per_epoch: int = 0  # 0 = a full pass over the pretraining pool
    data_workers: int = 0  # DataLoader processes per training worker
    sync_batchnorm: bool = True  # BatchNorm statistics over the global batch under DDP
    checkpoints_to_keep: int = 2
    max_failures: int = 3  # lost workers (or a raised error) restarted from the last checkpoint
    init_from: str = ""  # start from these weights: a finished run's name, or a checkpoint folder/file
    precision: str = "fp32"  # fp32, or bf16: the forward pass under bfloat16 autocast (weights stay fp32)
    channels_last: bool = False  # images and convolution weights in NHWC memory layout (GPU tensor cores)
    # Augmentation of the paired data, on the training device: none (the papers' recipe for
    # BMA-Memory's L_pair), or light: images shifted by up to 1/8 of the side and flipped, sounds
    # louder or quieter by up to 6 dB. Without it a method can tell pairs apart by their exact
    # pixels and levels and memorise a small pool instead of learning what they share.
    paired_augment: str = "none"

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs: must be >= 0 (0 evaluates the initial weights), got {self.epochs}")
        for name in ("batch_size",):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("unpaired_batch_size", "max_steps_per_epoch", "data_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.data_workers > MAX_DATA_WORKERS:
            raise ValueError(f"data_workers: at most {MAX_DATA_WORKERS} DataLoader processes per training worker "
                             f"(each is a process with its own copy of the loader), got {self.data_workers}")
        if self.checkpoints_to_keep < 1:
            raise ValueError(f"checkpoints_to_keep: must be >= 1, got {self.checkpoints_to_keep}")
        if self.paired_augment not in ("none", "light"):
            raise ValueError(f"paired_augment: unknown recipe {self.paired_augment!r}; choose none or light")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: unknown precision {self.precision!r}; choose fp32 or bf16")
        if self.max_failures < -1:
            raise ValueError(f"max_failures: must be >= -1 (-1 = retry forever), got {self.max_failures}")


PLACEMENTS = ("pack", "strict_pack", "spread", "strict_spread")


@dataclass(frozen=True)
class ResourcesConfig:
    workers: int = 1  # DDP training workers (Ray Train)
    # true: one GPU per worker, NCCL backend. A fraction (0 < gpu < 1) for a single-worker run or
    # trial: that share of one GPU, so several small trials of a sweep train on one GPU at once.
    gpu: bool | float = False
    cpus_per_worker: int = 1
    # Where a multi-worker run's workers go (Ray Train's placement strategy): pack (Ray's default:
    # as few nodes as fit, others when those are full, so a group can straddle two nodes that
    # each have a trial on one GPU), strict_pack (all on one node; the run waits for one with
    # room), spread, strict_spread (one worker per node).
    placement: str = neutral_field("pack")

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.workers < 1:
            raise ValueError(f"workers: must be >= 1, got {self.workers}")
        if self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker: must be >= 1, got {self.cpus_per_worker}")
        if not isinstance(self.gpu, bool):
            if not 0 < self.gpu <= 1:
                raise ValueError(f"gpu: must be true, false or a share of one GPU in (0, 1], got {self.gpu:g}")
            if self.gpu < 1 and self.workers > 1:
                raise ValueError(f"gpu: a share of a GPU ({self.gpu:g}) is for single-worker trials; with "
                                 f"workers={self.workers} each DDP worker needs a whole GPU (gpu: true)")

    @property
    def gpu_share(self) -> float:
        """GPUs per worker: 0, a fraction of one, or 1."""
        return float(self.gpu) if not isinstance(self.gpu, bool) else (1.0 if self.gpu else 0.0)


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "avlab"  # MLflow experiment
    run_name: str = ""  # MLflow run name; empty = <method>-<preset>-<time>
    # Each encoder also as an MLflow model (pt2, with its signature) beside encoders.safetensors;
    # a sweep's trials leave it to `avlab export --best`, which makes it for the trial it registers.
    log_model: bool = True
    # MLflow system metrics (CPU, memory, GPU) per worker node, sampled every interval seconds.
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("experiment: must not be empty")
        interval = self.system_metrics_interval_s
        if not (math.isfinite(interval) and 1.0 <= interval <= 3600.0):
            raise ValueError(f"system_metrics_interval_s: must be in [1, 3600] seconds, got {interval}")
        # Both name folders under the home (artifacts, Ray storage), so neither may leave it.
        check_name(self.experiment, "experiment")
        if self.run_name:
            check_name(self.run_name, "run_name")


@dataclass(frozen=True)
class ExperimentConfig:
    """One fully resolved experiment. ``method`` is the config dataclass of ``method_name``."""

    preset: str
    method_name: str
    method: Any
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self, *, identity: bool = False) -> dict[str, Any]:
        """Plain nested dict that ``from_dict`` turns back into an equal config; ``identity``:
        without the fields at their neutral value (what ``identity`` hashes)."""
        out = _to_plain(self, identity=identity)
        out["method"] = {"name": out.pop("method_name"), **out["method"]}
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, checked: bool = False) -> ExperimentConfig:
        """The config ``raw`` (a ``to_dict``) describes. ``checked``: it comes from a config this
        program already validated (a worker's copy of the driver's), so the checks across
        sections, which read a manifest, are not repeated; each section still checks its fields."""
        return _build_experiment(raw, cross_field=not checked)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params."""
        return flatten(self.to_dict())

    def identity(self) -> str:
        """Content hash of the resolved config (seed included): equal configs, equal identity.

        A field added after configurations were run declares the value that reproduces the
        behaviour from before it (``IDENTITY_NEUTRAL`` in its metadata: ``methods.base.neutral_field``);
        at that value it is left out of the hash, so the identities of earlier runs, and with
        them their checkpoints, trial runs and reusable results, survive the upgrade."""
        blob = json.dumps(self.to_dict(identity=True), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _at_neutral(owner: Any, f: dataclasses.Field) -> bool:
    return IDENTITY_NEUTRAL in f.metadata and _to_plain(getattr(owner, f.name)) == _to_plain(f.metadata[IDENTITY_NEUTRAL])


def _to_plain(value: Any, *, identity: bool = False) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name), identity=identity) for f in dataclasses.fields(value)
                if not (identity and _at_neutral(value, f))}
    if isinstance(value, tuple):
        return [_to_plain(v, identity=identity) for v in value]
    return value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


# --- presets ---------------------------------------------------------------------------------

# Input shapes of the tiny and small presets: 32x32 images, 2 s at 8 kHz as 40x64 log-mels.
_TINY_DATA_SHAPES = {"image_size": 32, "sample_rate": 8000, "clip_seconds": 2.0, "n_mels": 40, "n_frames": 64}

# Every preset draws its data with the run's seed (data.seed: -1; docs/spec.md §8): the
# spread over seeds is then the spread of method, data and test split together, and a sweep's
# configurations of one seed share that seed's data, so comparisons stay paired.
_DATA_SEED_POLICY = {"seed": -1}

PRESETS: dict[str, dict[str, Any]] = {
    # Runs on two CPU cores in minutes: 32x32 images, 40x64 log-mels, width-16 encoders.
    "tiny": {
        "data": {
            **_TINY_DATA_SHAPES,
            # Many distinct pairs seen few times learn more here than few pairs seen many times.
            "paired_size": 8192, "unpaired_sound_size": 4096, "unpaired_image_size": 4096,
            "train_size": 1000, "test_size": 500, "val_size": 500,
            "transfer_train_size": 500, "transfer_test_size": 500, **_DATA_SEED_POLICY,
        },
        # Per-worker BatchNorm: on gloo the global-batch statistics cost ~40 % of the step here.
        "train": {"epochs": 4, "batch_size": 128, "sync_batchnorm": False},
        "optim": {"name": "adam", "lr": 1e-3},
    },
    # The tiny shapes and encoders with a budget at which the methods learn (benchmarks/RESULTS.md,
    # "small preset"): a run takes minutes on two CPU cores. Four times the tiny paired pool, and
    # the light paired augmentation: few, unaugmented pairs are memorised, not understood.
    "small": {
        "data": {
            **_TINY_DATA_SHAPES,
            "paired_size": 16384, "unpaired_sound_size": 4096, "unpaired_image_size": 4096,
            "train_size": 1000, "test_size": 500, "val_size": 500,
            "transfer_train_size": 500, "transfer_test_size": 500, **_DATA_SEED_POLICY,
        },
        "train": {"epochs": 4, "batch_size": 128, "sync_batchnorm": False, "paired_augment": "light"},
        "optim": {"name": "adam", "lr": 1e-3},
    },
    # The paper's sizes and hyperparameters (paper 001 §4.2, supp. Tables 6-7), for GPU clusters.
    "paper": {
        "data": {
            "image_size": 224, "sample_rate": 16000, "clip_seconds": 2.0, "n_mels": 150, "n_frames": 200,
            "paired_size": 6300, "unpaired_sound_size": 50000, "unpaired_image_size": 0,
            "train_size": 1900, "test_size": 800, "val_size": 800,
            "transfer_train_size": 1000, "transfer_test_size": 1000, **_DATA_SEED_POLICY,
            "cache_in_memory": False,
        },
        "train": {"epochs": 100, "batch_size": 256, "data_workers": 4},
        "optim": {"name": "adam", "lr": 2e-4},
    },
}

DEFAULT_METHOD = "bma"

# Sections whose keys are the fields of a dataclass.
_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "resources": ResourcesConfig,
    "tracking": TrackingConfig,
}
_TOP_LEVEL = ("preset", "seed", "method", *_SECTIONS)
SEED_LIMIT = 2**32  # numpy takes no negative seed, and the hashed augmentations keep 32 bits of it


# --- loading ---------------------------------------------------------------------------------


def load_run_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML run file into a nested dict (validation happens in ``resolve``)."""
    return read_yaml_mapping(path, "run file")


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b.c=value`` -> ("a.b.c", parsed YAML value)."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override: {text!r} is not of the form key.path=value")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def resolve(
    run: Mapping[str, Any] | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> ExperimentConfig:
    """Preset (``--preset`` > run file ``preset`` > tiny), then the run file, then overrides."""
    run = dict(run or {})
    name = preset or run.get("preset") or "tiny"
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    parsed = [parse_override(text) for text in overrides]
    method_name = _chosen_method(run, parsed)
    tree = copy.deepcopy(PRESETS[name])
    tree["method"] = {"name": method_name}
    if isinstance(method_name, str) and method_name in METHODS:  # else _build_experiment names it
        _deep_merge(tree, METHODS[method_name].presets[name], "")
    _deep_merge(tree, run, "")
    for key, value in parsed:
        _set_path(tree, key, value)
    tree["preset"] = name
    data = tree.get("data") if isinstance(tree.get("data"), Mapping) else {}
    _check_data_fields_act(bool(data.get("manifest")), {*flatten(run), *(key for key, _ in parsed)})
    return _build_experiment(tree)


# Data fields that act on one kind of dataset only: set for the other, they would change nothing
# while the run, a sweep's labels and a claim's rows said they did. data.paired_fraction and
# data.unpaired_<kind>_per_pair act on both.
PROCEDURAL_ONLY = ("paired_size", "unpaired_sound_size", "unpaired_image_size", "train_size", "test_size", "val_size",
                   "transfer_train_size", "transfer_test_size", "num_classes")
MANIFEST_ONLY = ("unpaired_sound_count", "unpaired_image_count", "cache_dir", "skip_bad", "cache_workers")


def _check_data_fields_act(manifest: bool, explicit: set[str]) -> None:
    """A data field set by the run file or an override must act on the data the run reads: the
    embedded datasets' pool sizes do nothing to a manifest's pools (its rows are the pools), and
    a manifest's counts do nothing to the embedded datasets. An unpaired multiple of the pairs
    replaces the pool's size or count, so the two are not set together."""
    if manifest:
        unused = [f for f in PROCEDURAL_ONLY if f"data.{f}" in explicit]
        if unused:
            raise ConfigError(f"data.{unused[0]}: sizes the embedded dataset's pools; with a manifest "
                              f"(data.manifest) the pools are its rows: vary data.paired_fraction or "
                              f"data.unpaired_sound_per_pair / unpaired_image_per_pair (they act on both kinds "
                              f"of data) instead")
    else:
        unused = [f for f in MANIFEST_ONLY if f"data.{f}" in explicit]
        if unused:
            raise ConfigError(f"data.{unused[0]}: acts on a manifest's pools, and this run reads the embedded "
                              f"dataset (no data.manifest): use data.paired_fraction and "
                              f"data.unpaired_sound_per_pair / unpaired_image_per_pair (they act on both kinds "
                              f"of data) or the pool sizes (data.paired_size, ...) instead")
    for kind in ("sound", "image"):
        if f"data.unpaired_{kind}_per_pair" in explicit:
            for other in (f"data.unpaired_{kind}_size", f"data.unpaired_{kind}_count"):
                if other in explicit:
                    raise ConfigError(f"data.unpaired_{kind}_per_pair: sizes the unpaired {kind} pool as a multiple "
                                      f"of the pairs, and {other} is set too: set one of them")


def _chosen_method(run: Mapping[str, Any], parsed: list[tuple[str, Any]]) -> Any:
    """method.name from the last override, else the run file, else the default."""
    for key, value in reversed(parsed):
        if key == "method.name":
            return value
    section = run.get("method")
    if isinstance(section, Mapping) and "name" in section:
        return section["name"]
    return DEFAULT_METHOD


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any], path: str) -> None:
    for key, value in extra.items():
        if not isinstance(key, str):
            raise ConfigError(f"{path or 'config'}: keys must be strings, got {key!r}")
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value, f"{path}{key}.")
        else:
            base[key] = copy.deepcopy(value)


def _set_path(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build_experiment(raw: Mapping[str, Any], *, cross_field: bool = True) -> ExperimentConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError("config: expected a mapping of sections")
    reject_unknown(raw, _TOP_LEVEL, "")
    preset = raw.get("preset", "tiny")
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    for section in ("method", *_SECTIONS):
        value = raw.get(section)
        if value is not None and not isinstance(value, Mapping):
            example = " such as {name: bma}" if section == "method" else ""
            raise ConfigError(f"{section}: expected a section of key: value settings{example}, got {value!r}")
    method_raw = dict(raw.get("method") or {})
    method_name = method_raw.pop("name", "bma")
    if method_name not in METHODS:
        raise ConfigError(f"method.name: unknown method {method_name!r}; choose one of {sorted(METHODS)}")
    entry = METHODS[method_name]
    method_cfg = build_dataclass(entry.config_cls, method_raw, "method")
    kwargs: dict[str, Any] = {
        "preset": preset,
        "method_name": method_name,
        "method": method_cfg,
        "seed": coerce(int, raw.get("seed", 0), "seed"),
    }
    if not 0 <= kwargs["seed"] < SEED_LIMIT:
        raise ConfigError(f"seed: must be an integer >= 0 and < 2**32, got {kwargs['seed']}")
    for section, cls in _SECTIONS.items():
        kwargs[section] = build_dataclass(cls, raw.get(section) or {}, section)
    if kwargs["data"].seed == -1:  # the data follows the run's seed: resolved here, so params and identity say which
        kwargs["data"] = dataclasses.replace(kwargs["data"], seed=kwargs["seed"])
    defaults = {k: v for k, v in entry.method_cls.data_defaults(kwargs["data"]).items() if k not in method_raw}
    if defaults:  # written into the config, so its dict and identity carry the value it runs with
        kwargs["method"] = build_dataclass(entry.config_cls, {**method_raw, **defaults}, "method")
    cfg = ExperimentConfig(**kwargs)
    if cross_field:
        _check_cross_field(cfg)
    return cfg


def _check_batchnorm_batches(cfg: ExperimentConfig, uses_unpaired: bool) -> None:
    """Every encoder normalises with BatchNorm, which in training needs more than one item per
    batch: one worker's share of a batch, or the global batch when the statistics are synced."""
    workers = cfg.resources.workers
    if cfg.train.epochs == 0 or (cfg.train.sync_batchnorm and workers > 1):
        return
    batches = [("batch_size", cfg.train.batch_size)]
    if uses_unpaired and cfg.train.unpaired_batch_size:
        batches.append(("unpaired_batch_size", cfg.train.unpaired_batch_size))
    for name, value in batches:
        if value // workers < 2:
            per = f" per worker (resources.workers={workers})" if workers > 1 else ""
            raise ConfigError(f"train.{name}: {value // workers} item a batch{per}; BatchNorm needs more than one "
                              f"item per batch in training: use at least {2 * workers}")


def _check_eval_splits(cfg: ExperimentConfig, info: Any) -> None:
    """The labelled splits the downstream probes read (``methods.evaluate``), checked before
    training rather than after it. The linear probe (and the SVM, block and spatial probes) fits
    on the train split and needs two classes there; every test class should be there too, or it
    can never be predicted: a manifest is held to that when it is read, and the procedural splits
    hold every class once they have ``data.num_classes`` items (the classes come in shuffled
    blocks of that size). kNN alone needs one item. The test split is scored: one item says all
    or nothing, and the projections' spread (``*_z_mean_cos``) needs two."""
    ev, manifest = cfg.eval, cfg.data.manifest
    classify = bool(ev.features) and (ev.linear or ev.sound_svm or ev.spatial_probe) or ev.block_probes
    fits = classify or (bool(ev.features) and ev.knn)
    if not classify:
        train_need, train_why = int(fits), "the kNN probe fits on it"
    elif manifest:
        train_need, train_why = 2, "the linear probe fits on it and needs two classes there"
    else:
        train_need = cfg.data.num_classes
        train_why = f"the linear probe fits on it and needs every class there ({train_need}, data.num_classes)"
    splits = [("train", "test")]
    if info.transfer_train_size > 0 and info.transfer_test_size > 0:  # else no transfer evaluation runs
        splits.append(("transfer_train", "transfer_test"))
    for train, test in splits:
        for split, need, why in ((train, train_need, train_why),
                                 (test, 2, "the probes score on it, and one item says all or nothing")):
            size = getattr(info, f"{split}_size")
            if size >= need:
                continue
            if manifest:
                raise ConfigError(f"data.manifest: {manifest}: its {split} split holds {size} row{'s' * (size != 1)}; "
                                  f"{why}: give it at least {need}")
            raise ConfigError(f"data.{split}_size: {size} item{'s' * (size != 1)}; {why}: use at least {need}")
    # What reads the validation split: it must have one (the test split is never read in its place).
    readers = [name for name, on in (("eval.val_metrics", ev.val_metrics),
                                     ("eval.every_epochs", ev.every_epochs > 0 and cfg.train.epochs > 1)) if on]
    if readers and info.val_size < 2:
        where = (f"data.manifest: {manifest}: its val split holds {info.val_size} rows" if manifest
                 else f"data.val_size: {info.val_size} items")
        raise ConfigError(f"{where}; {readers[0]} scores the validation split (choices are never made on the "
                          f"test split): give it at least 2" + ("" if manifest else ", e.g. data.val_size=500"))


def _check_cross_field(cfg: ExperimentConfig) -> None:
    workers = cfg.resources.workers
    if cfg.train.paired_augment != "none" and cfg.data.binaural:
        raise ConfigError(
            "train.paired_augment: shifting and flipping a binaural panorama breaks its alignment with "
            "the two ears; use none with data.binaural=true"
        )
    for name in ("batch_size", "unpaired_batch_size"):
        value = getattr(cfg.train, name)
        if value % workers:
            raise ConfigError(
                f"train.{name}: {value} is not divisible by resources.workers={workers}; "
                "the global batch is split evenly over the workers"
            )
    method_cls = METHODS[cfg.method_name].method_cls
    info = _check_data(cfg)
    try:
        method_cls.check_data(cfg.method, info)
        method_cls.check_schedule(cfg.method, cfg.train.epochs)
    except FieldError as exc:  # names its field in full
        raise ConfigError(first_line(exc)) from None
    except ValueError as exc:  # a method that names no field: its section
        raise ConfigError(f"method: {first_line(exc)}") from None
    _check_probes(cfg)
    _check_batchnorm_batches(cfg, method_cls.uses_unpaired)
    _check_eval_splits(cfg, info)  # a manifest without labelled splits is named for them first
    pool = method_cls.pretraining_pool(cfg.method)
    pool_size = getattr(info, f"{pool}_size")
    unpaired_batch = cfg.train.unpaired_batch_size or cfg.train.batch_size
    if cfg.train.epochs > 0 and method_cls.uses_unpaired:
        for kind in ("sound", "image"):
            size = getattr(info, f"unpaired_{kind}_size")
            if 0 < size < unpaired_batch:
                field_name = (f"unpaired_{kind}_per_pair" if getattr(cfg.data, f"unpaired_{kind}_per_pair") != -1
                              else f"unpaired_{kind}_count" if cfg.data.manifest else f"unpaired_{kind}_size")
                raise ConfigError(
                    f"data.{field_name}: the unpaired {kind} pool holds {size} items, fewer than one unpaired "
                    f"batch (train.unpaired_batch_size or train.batch_size = {unpaired_batch}); use 0 for none"
                )
    if cfg.train.epochs > 0 and pool_size < cfg.train.batch_size:
        where = (f"data.manifest: {cfg.data.manifest}: its {pool} pool holds {pool_size} item{'s' * (pool_size != 1)}"
                 if cfg.data.manifest else f"data.{pool}_size: {pool_size} items"
                 + (f" (data.paired_fraction={cfg.data.paired_fraction})" if pool == "paired"
                    and cfg.data.paired_fraction != 1 else ""))
        raise ConfigError(f"{where}, fewer than train.batch_size={cfg.train.batch_size}; "
                          "an epoch would have no full batch")


def check_evaluation(cfg: ExperimentConfig) -> DataInfo:
    """The checks across sections that the downstream evaluation of ``cfg`` needs, and none of
    training's (batch sizes, pools, schedules): the manifest is read and validated, the folds of
    ``eval.protocol: folds`` and the labels the probes read are there. Returns the data's info."""
    info = _check_data(cfg)
    _check_probes(cfg)
    return info


def _check_data(cfg: ExperimentConfig) -> DataInfo:
    try:
        info = dataset_info(cfg.data)  # a manifest is read and validated here
    except ValueError as exc:  # ManifestError: the message names the file, row and column
        raise ConfigError(f"data.manifest: {first_line(exc)}") from None
    if cfg.eval.protocol == "folds":
        from methods.data import build_dataset
        from methods.evaluate.protocol import check_folds

        if not cfg.data.manifest:
            raise ConfigError("eval.protocol: folds needs a manifest whose train and test rows carry their fold "
                              "(`avlab data index esc50` writes them); the embedded datasets have none")
        try:  # reads the manifest's rows, decodes nothing
            check_folds(build_dataset(cfg.data), cfg.eval)
        except ValueError as exc:
            raise ConfigError(first_line(exc)) from None
    return info


def _check_probes(cfg: ExperimentConfig) -> None:
    for name, what in (("spatial_probe", "azimuth sectors"), ("foreground_probe", "foreground masks")):
        if getattr(cfg.eval, name) and (not cfg.data.binaural or cfg.data.manifest):
            raise ConfigError(f"eval.{name}: only the procedural binaural scenes carry {what} "
                              "(data.binaural=true, no data.manifest); set it to false")


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _split_run_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """First item without '=' is the run file; the rest are key.path=value overrides."""
    run_file, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif run_file is None:
            run_file = item
        else:
            raise ConfigError(f"arguments: unexpected {item!r}; overrides are key.path=value")
    return run_file, overrides


def resolve_run_config(items: Sequence[str], *, preset: str | None, workers: int | None = None,
                       gpu: bool = False) -> ExperimentConfig:
    """The config of a run given on the command line: an optional run file, then
    ``key.path=value`` overrides, then ``--workers`` and ``--gpu``."""
    run_file, overrides = _split_run_args(items)
    run = load_run_file(run_file) if run_file else {}
    if workers is not None:
        overrides.append(f"resources.workers={workers}")
    if gpu:
        overrides.append("resources.gpu=true")
    return resolve(run, preset=preset, overrides=overrides)

