"""The downstream suite run after pretraining: linear probe, kNN and retrieval on frozen features.

Paper 001 §4.3 evaluates BMA-Memory by (i) linear evaluation on h^v for image classification and
h^s for sound classification, (ii) a kNN classifier on the same features and (iii) sound → image
retrieval Rank-1..5 on the projections z^s, z^v (Table 3). ``run_downstream`` embeds both splits
once with the frozen method and returns flat, tracker-ready metric names:

    {prefix}image_{fam}_linear_{acc,precision,recall,f1}   {prefix}image_{fam}_knn_acc
    {prefix}sound_{fam}_linear_{acc,precision,recall,f1}   {prefix}sound_{fam}_knn_acc
    {prefix}retrieval_s2i_rank{k}                          k = 1..retrieval_ks
    {prefix}{image,sound}_z_mean_cos                       with retrieval: the projections' spread

where ``fam`` is an embed family (``f`` encoder output, ``h`` representation, ``z`` projection);
image tasks read ``{fam}_v`` and sound tasks ``{fam}_s``. Optional protocols, off by default:

    {prefix}{image,sound}_block{k}_linear_{acc,precision,recall,f1}   block_probes; k = 1..4
    {prefix}sound_{fam}_svm_{acc,precision,recall,f1}                sound_svm
    {prefix}sound_{fam}_linear_clip_{acc,precision,recall,f1}        sound_crops > 1 and linear
    {prefix}sound_{fam}_svm_clip_{acc,precision,recall,f1}           sound_crops > 1 and sound_svm

- Per-block probes (AVID, paper 002, Table 1): the logistic probe on the globally average-pooled
  output of each stage of ``E_v`` / ``E_s`` (``forward_blocks``), not on ``embed``.
- Linear SVM: one-vs-rest, on features standardised with train statistics only.
- Per-clip averaging (docs/spec.md §6): each test sound is cut into ``sound_crops`` evenly spaced crops
  of T // 2 frames, each crop is embedded, and the classifier's probabilities (logistic) or
  decision scores (SVM) are averaged over a clip's crops before the argmax. The ``*_clip``
  classifiers are trained on the same kind of input: each training clip contributes the mean of
  its own crop features, so train and test features come from crops of the same length (and for
  the SVM, averaging crop scores equals scoring the mean crop feature). The metrics without
  ``_clip`` keep meaning one full-clip feature per test sound.

Every probe (``*_linear``, ``*_svm``, ``*_clip``) also stores its confusion matrix under its name,
and logs its solver's iterations (``*_linear_iters``, ``*_svm_iters``, ``*_spatial_iters``). The
solvers run to ``linear_tol`` / ``svm_tol`` (tight by default: methods/evaluate/linear_probe.py
says why); a probe whose solver stops at its ``max_iter`` first is listed in
``DownstreamResult.unconverged``, which the run prints and tags.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from methods.base import neutral_field
from methods.evaluate.features import (
    ForegroundImages,
    block_encoder,
    extract_block_features,
    extract_features,
    extract_sound_crop_features,
)
from methods.evaluate.knn import knn_accuracy
from methods.evaluate.linear_probe import (
    LINEAR_MAX_ITER,
    LINEAR_TOL,
    SVM_MAX_ITER,
    SVM_TOL,
    ProbeResult,
    linear_probe,
    linear_svm,
)
from methods.metric_names import FOREGROUND_PREFIX, PROBE_STATS, foreground_config, probes_foregrounds, rank_names
from methods.evaluate.plots import confusion_matrix_figure, write_confusion_pngs
from methods.evaluate.retrieval import retrieval_rank_k
from methods.evaluate.selection import Selection

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FEATURE_FAMILIES", "DownstreamResult", "EvalConfig", "quick_probe_config", "run_downstream"]

FEATURE_FAMILIES = ("f", "h", "z")
# Families every Method.embed must return for a modality it is given (methods/base.py); "f" is
# optional and skipped when a method does not expose it.
_REQUIRED_FAMILIES = ("h", "z")
_MODALITIES = (("image", "v"), ("sound", "s"))


@dataclass(frozen=True)
class EvalConfig:
    """Which downstream protocols run, and their few hyperparameters."""

    batch_size: int = 256
    features: tuple[str, ...] = ("h", "z")  # embed families to probe: subset of f, h, z
    linear: bool = True
    linear_C: float = 1.0  # inverse L2 strength of the logistic-regression probe
    linear_max_iter: int = LINEAR_MAX_ITER
    linear_tol: float = LINEAR_TOL  # L-BFGS gradient tolerance: tight, so last-bit changes move no prediction
    knn: bool = True
    knn_k: int = 20
    retrieval: bool = True
    retrieval_ks: int = 5  # report Rank-1 .. Rank-retrieval_ks
    # 0: evaluate after the last epoch only; k: also a quick cosine-kNN probe on h every k epochs
    # (image_h_knn_acc, sound_h_knn_acc), the signal an early-stopping scheduler reads.
    every_epochs: int = 0
    # Logistic probe on each encoder stage block1..block4 of E_v / E_s, globally average-pooled
    # (AVID Table 1); uses linear_C and linear_max_iter. Needs encoders with forward_blocks.
    block_probes: bool = False
    sound_svm: bool = False  # one-vs-rest linear SVM on standardised sound features
    svm_C: float = 1.0  # inverse regularisation strength of the SVM
    svm_max_iter: int = SVM_MAX_ITER
    svm_tol: float = SVM_TOL  # liblinear's stopping tolerance
    # > 1: also classify each test sound by averaging over this many time crops of T // 2 frames
    # (the *_clip metrics of the linear probe and the SVM); 1: full clips only.
    sound_crops: int = 1
    # Binaural scenes: a logistic probe predicting the main object's azimuth sector from each
    # feature family (``{modality}_{family}_spatial_acc`` / ``_f1``), and clip retrieval: each
    # test sound queries the test images and must find its own clip's image among the top k
    # (``retrieval_s2i_clip_rank{k}``). The spatial probe needs items with a ``sector``.
    spatial_probe: bool = False
    clip_retrieval: bool = False
    # Binaural scenes: the image protocols that are on (linear, kNN, block probes) again on each
    # item's foreground alone, image x mask: the objects on black, the input foreground alignment
    # trains on (``fg_image_*``). Needs items with a ``mask``.
    foreground_probe: bool = neutral_field(False)
    # How the probes are fitted and scored (docs/spec.md §6): "fixed" uses linear_C, knn_k and
    # svm_C as given; "validation" picks each from its grid on a stratified validation split of
    # validation_fraction carved from the training split (never the test split), then refits on the
    # whole training split (the chosen values are logged as *_linear_C, *_knn_k, *_svm_C);
    # "folds" is the field's k-fold protocol (ESC-50): the labelled rows of the train and test
    # splits grouped by their manifest fold 1..folds, each fold held out once with the others as
    # training split (selection as "validation" inside it); per-fold metrics end in _fold<k>, and
    # the plain names are the mean over the folds.
    protocol: str = "fixed"
    # Also score every probe on the dataset's validation split (fitted on train, as on test),
    # logged with the ``val_`` prefix: what a sweep that selects (an Optuna search, a scheduler)
    # and recipe screening read, so that the test split only reports. Needs data.val_size > 0
    # (or a manifest's val rows).
    val_metrics: bool = neutral_field(False)
    folds: int = 5
    validation_fraction: float = 0.2
    linear_C_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    knn_k_grid: tuple[int, ...] = (1, 5, 10, 20, 50)
    svm_C_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)

    def __post_init__(self) -> None:
        if isinstance(self.features, str) or not isinstance(self.features, (tuple, list)):
            raise ValueError(
                f"features: expected a list of families from {FEATURE_FAMILIES}, "
                f"got {self.features!r}"
            )
        object.__setattr__(self, "features", tuple(self.features))
        unknown = [fam for fam in self.features if fam not in FEATURE_FAMILIES]
        if unknown:
            raise ValueError(
                f"features: unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                f"use a subset of {list(FEATURE_FAMILIES)}"
            )
        if len(set(self.features)) != len(self.features):
            raise ValueError(
                f"features: duplicate families in {list(self.features)}; list each once"
            )
        for name in ("linear", "knn", "retrieval", "block_probes", "sound_svm", "spatial_probe", "clip_retrieval",
                     "foreground_probe", "val_metrics"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        for name in (
            "batch_size", "linear_max_iter", "knn_k", "retrieval_ks", "svm_max_iter", "sound_crops"
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name, most in (("linear_max_iter", 10**6), ("svm_max_iter", 10**7)):
            if getattr(self, name) > most:
                raise ValueError(f"{name}: expected at most {most}, got {getattr(self, name)!r}")
        for name in ("linear_tol", "svm_tol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1e-16 <= value <= 1e-2:
                raise ValueError(f"{name}: expected a number in [1e-16, 1e-2], got {value!r}")
        if isinstance(self.every_epochs, bool) or not isinstance(self.every_epochs, int) or self.every_epochs < 0:
            raise ValueError(f"every_epochs: expected an integer >= 0, got {self.every_epochs!r}")
        for name in ("linear_C", "svm_C"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0):
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or not 2 <= self.folds <= 20:
            raise ValueError(f"folds: expected an integer in 2..20, got {self.folds!r}")
        fraction = self.validation_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.05 <= fraction <= 0.5:
            raise ValueError(f"validation_fraction: expected a number in [0.05, 0.5], got {fraction!r}")
        for name, kind in (("linear_C_grid", float), ("knn_k_grid", int), ("svm_C_grid", float)):
            grid = getattr(self, name)
            if isinstance(grid, (str, bytes)) or not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 20:
                raise ValueError(f"{name}: expected a list of 1 to 20 values, got {grid!r}")
            ok = all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                     and (kind is float or float(v).is_integer()) for v in grid)
            if not ok or len(set(grid)) != len(grid):
                what = "positive integers" if kind is int else "positive finite numbers"
                raise ValueError(f"{name}: expected distinct {what}, got {list(grid)!r}")
            object.__setattr__(self, name, tuple(kind(v) for v in grid))


PROTOCOLS = ("fixed", "validation", "folds")


@dataclass
class DownstreamResult:
    """Flat metrics plus the linear probes' confusion matrices (rows: true class id)."""

    metrics: dict[str, float] = field(default_factory=dict)
    confusions: dict[str, np.ndarray] = field(default_factory=dict)
    unconverged: list[str] = field(default_factory=list)  # probes whose solver stopped at max_iter

    def add(self, other: DownstreamResult) -> None:
        """Take ``other``'s metrics, confusion matrices and unconverged probes."""
        self.metrics.update(other.metrics)
        self.confusions.update(other.confusions)
        self.unconverged += [n for n in other.unconverged if n not in self.unconverged]

    def padded_confusions(self, class_names: Sequence[str]) -> dict[str, np.ndarray]:
        """``confusions``, each as large as ``class_names``: a matrix smaller than that (the
        highest class ids absent from both splits) is padded with zeros so every row keeps its
        dataset name."""
        out: dict[str, np.ndarray] = {}
        for name, confusion_CC in self.confusions.items():
            C = confusion_CC.shape[0]
            if len(class_names) < C:
                raise ValueError(
                    f"class_names: {len(class_names)} names, but '{name}' has {C} classes"
                )
            padded = np.zeros((len(class_names), len(class_names)), dtype=confusion_CC.dtype)
            padded[:C, :C] = confusion_CC
            out[name] = padded
        return out

    def figures(self, class_names: Sequence[str]) -> dict[str, Figure]:
        """One confusion-matrix figure per entry of ``confusions``, keyed like it (padded as
        ``padded_confusions`` pads)."""
        return {name: confusion_matrix_figure(m, class_names, title=name)
                for name, m in self.padded_confusions(class_names).items()}

    def write_figures(self, class_names: Sequence[str], folder: str | Path) -> list[Path]:
        """The figures of ``figures`` as ``confusion_<name>.png`` files in ``folder``, drawn the
        faster way (``write_confusion_pngs``)."""
        return write_confusion_pngs(self.padded_confusions(class_names), class_names, folder)


def mean_pairwise_cosine(z_ND: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows: 1 when every sample maps to one
    point (a collapsed projection), about 0 for directions spread over the sphere."""
    n = z_ND.shape[0]
    if n < 2:
        return float("nan")
    u = torch.nn.functional.normalize(z_ND.double(), dim=1)
    total = u.sum(0)
    return float((total @ total - n) / (n * (n - 1)))  # sum_{i != j} u_i . u_j = |sum u|^2 - n


def _item_keys(dataset: Dataset, split: str) -> set[str]:
    try:
        return set(dataset[0].keys())
    except IndexError as exc:
        raise ValueError(f"{split}: is empty") from exc


def _family_features(
    feats: dict[str, torch.Tensor], *, key: str, split: str, method: nn.Module
) -> torch.Tensor | None:
    if key in feats:
        return feats[key]
    if key[0] in _REQUIRED_FAMILIES:
        raise ValueError(
            f"{split}: {type(method).__name__}.embed returned no '{key}' (got {sorted(feats)}); "
            f"every method must return h_* and z_* for each modality it is given"
        )
    return None


def _record(result: DownstreamResult, name: str, probe: ProbeResult) -> None:
    values = (probe.accuracy, probe.precision, probe.recall, probe.f1)
    result.metrics.update({f"{name}_{stat}": value for stat, value in zip(PROBE_STATS, values, strict=True)})
    result.confusions[name] = probe.confusion
    _solver(result, name, probe)


def _solver(result: DownstreamResult, name: str, probe: ProbeResult) -> None:
    result.metrics[f"{name}_iters"] = float(probe.iterations)
    if not probe.converged:
        result.unconverged.append(name)


def held_out_config(cfg: EvalConfig) -> EvalConfig:
    """How a split without folds is evaluated (the transfer and validation splits): ``cfg``, with
    the validation protocol in place of ``folds``."""
    return dataclasses.replace(cfg, protocol="validation") if cfg.protocol == "folds" else cfg


def quick_probe_config(cfg: EvalConfig) -> EvalConfig:
    """The cosine-kNN probe on h run every ``cfg.every_epochs`` epochs during pretraining (the
    signal an early-stopping scheduler reads; scored on the validation split, ``val_`` names):
    ``cfg`` with the other protocols off."""
    return dataclasses.replace(cfg, features=("h",), linear=False, knn=True, retrieval=False,
                               block_probes=False, sound_svm=False, sound_crops=1, protocol="fixed",
                               foreground_probe=False, val_metrics=False)


def run_downstream(
    method: nn.Module,
    *,
    train_set: Dataset,
    test_set: Dataset,
    cfg: EvalConfig,
    device: torch.device | str | None = None,
    prefix: str = "",
    num_classes: int | None = None,
    val_set: Dataset | None = None,
) -> DownstreamResult:
    """Run the enabled protocols of ``cfg`` on frozen features and return flat metrics.

    The probes and kNN fit on ``train_set`` and score on ``test_set``; retrieval uses only
    ``test_set`` (its sounds query its images). A modality absent from the dataset items (e.g. a
    sound-only transfer set) skips its tasks, and retrieval needs both modalities. The method's
    weights, buffers and per-module train/eval modes are unchanged afterwards. With
    ``cfg.block_probes`` the method must expose ``E_v`` / ``E_s`` with ``forward_blocks`` for
    the modalities probed; otherwise a ValueError naming ``eval.block_probes`` comes before any
    extraction.

    Args:
        device: where the method already lives; ``None`` means its parameters' device.
        prefix: prepended to every metric and confusion name, e.g. ``"transfer_"``.
        num_classes: confusion matrix size (default: largest class id seen + 1).
        val_set: the dataset's validation split; under ``protocol: validation`` the probes'
            hyperparameters are chosen on it (else on rows carved from ``train_set``).
    """
    plan = _Plan.of(method, train_set, test_set, cfg)
    use_val = val_set is not None and len(val_set) > 0 and cfg.protocol == "validation"
    feats = _Features.extract(method, train_set, test_set, cfg, plan, device, val_set if use_val else None)
    if num_classes is None:
        num_classes = int(max(int(y.max()) for y in (feats.test_y, feats.train_y) if y is not None)) + 1
    result = DownstreamResult()
    if plan.family_probes:
        _family_probes(result, method, cfg, plan, feats, prefix, num_classes)
    if cfg.block_probes:
        _block_probes(result, cfg, plan, feats, prefix, num_classes)
    _retrieval(result, method, cfg, plan, feats, prefix)
    if {"image", "sound"} <= plan.test_keys and hasattr(method, "held_out_scores"):  # the method's own task
        result.metrics.update({f"{prefix}{k}": v for k, v in method.held_out_scores(feats.test).items()})
    if plan.foreground:
        part = run_downstream(method, train_set=ForegroundImages(train_set), test_set=ForegroundImages(test_set),
                              cfg=foreground_config(cfg), device=device, prefix=f"{prefix}{FOREGROUND_PREFIX}",
                              num_classes=num_classes, val_set=ForegroundImages(val_set) if use_val else None)
        result.add(part)
    return result


@dataclass(frozen=True)
class _Plan:
    """Which protocols ``run_downstream`` runs on which modalities, checked before extraction."""

    test_keys: set[str]
    spatial: bool
    family_probes: bool
    modalities: list[tuple[str, str]]
    clip_probes: bool
    foreground: bool

    @classmethod
    def of(cls, method: nn.Module, train_set: Dataset, test_set: Dataset, cfg: EvalConfig) -> _Plan:
        test_keys = _item_keys(test_set, "test_set")
        spatial = cfg.spatial_probe and bool(cfg.features)
        if spatial and "sector" not in test_keys:
            raise ValueError("eval.spatial_probe: test items carry no 'sector' (azimuth sector); it needs binaural scenes")
        family_probes = (cfg.linear or cfg.knn or cfg.sound_svm or spatial) and bool(cfg.features)
        foreground = probes_foregrounds(cfg, test_keys)
        if foreground and "mask" not in test_keys:
            raise ValueError("eval.foreground_probe: test items carry no 'mask' (foreground mask); it needs binaural scenes")
        needs_train = family_probes or cfg.block_probes
        train_keys = _item_keys(train_set, "train_set") if needs_train else test_keys
        modalities: list[tuple[str, str]] = []
        if needs_train:
            for modality, suffix in _MODALITIES:
                if modality not in test_keys:
                    continue
                if modality not in train_keys:
                    raise ValueError(
                        f"train_set: items carry no '{modality}' but test_set does; "
                        f"probe on a train split with the same modalities"
                    )
                modalities.append((modality, suffix))
        if cfg.block_probes:
            for modality, _ in modalities:
                block_encoder(method, modality)  # fail before any extraction
        clip_probes = (
            cfg.sound_crops > 1 and (cfg.linear or cfg.sound_svm) and bool(cfg.features)
            and "sound" in test_keys
        )
        return cls(test_keys, spatial, bool(family_probes), modalities, bool(clip_probes), foreground)


@dataclass(frozen=True)
class _Features:
    """Frozen features of the two splits that the plan's protocols need, and their labels."""

    test: dict[str, torch.Tensor]
    train: dict[str, torch.Tensor]
    test_blocks: dict[str, torch.Tensor]
    train_blocks: dict[str, torch.Tensor]
    test_crops: dict[str, torch.Tensor]
    train_crops: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]  # the validation split's, where the probes' hyperparameters are chosen on it

    @classmethod
    def extract(cls, method: nn.Module, train_set: Dataset, test_set: Dataset, cfg: EvalConfig, plan: _Plan,
                device: torch.device | str | None, val_set: Dataset | None = None) -> _Features:
        def extract(
            fn: Callable[..., dict[str, torch.Tensor]], dataset: Dataset, run: bool, **kwargs: int
        ) -> dict[str, torch.Tensor]:
            if not run:
                return {}
            return fn(method, dataset, batch_size=cfg.batch_size, device=device, **kwargs)

        feats = cls(
            test=extract(extract_features, test_set, True),
            train=extract(extract_features, train_set, plan.family_probes),
            test_blocks=extract(extract_block_features, test_set, cfg.block_probes),
            train_blocks=extract(extract_block_features, train_set, cfg.block_probes),
            test_crops=extract(extract_sound_crop_features, test_set, plan.clip_probes, crops=cfg.sound_crops),
            train_crops=extract(extract_sound_crop_features, train_set, plan.clip_probes, crops=cfg.sound_crops),
            val=extract(extract_features, val_set, val_set is not None and plan.family_probes),
        )
        for split, f in (("test_set", feats.test), ("train_set", feats.train), ("train_set", feats.train_blocks),
                         ("val_set", feats.val)):
            if f and "label" not in f:
                raise ValueError(f"{split}: items carry no 'label'; downstream evaluation needs labels")
        return feats

    @property
    def test_y(self) -> torch.Tensor:
        return self.test["label"]

    @property
    def train_y(self) -> torch.Tensor | None:
        return (self.train or self.train_blocks).get("label")


def _linear_kwargs(cfg: EvalConfig, num_classes: int) -> dict[str, float]:
    return {"C": cfg.linear_C, "max_iter": cfg.linear_max_iter, "tol": cfg.linear_tol, "num_classes": num_classes}


def _family_probes(result: DownstreamResult, method: nn.Module, cfg: EvalConfig, plan: _Plan, feats: _Features,
                   prefix: str, num_classes: int) -> None:
    """Linear probe, kNN, sound SVM, spatial probe and per-clip probes on each feature family."""
    test, train, test_y, train_y = feats.test, feats.train, feats.test_y, feats.train_y
    select = Selection.of(cfg, train_y, num_classes, val_y=feats.val.get("label"))
    for modality, suffix in plan.modalities:
        for fam in cfg.features:
            key = f"{fam}_{suffix}"
            test_X = _family_features(test, key=key, split="test_set", method=method)
            train_X = _family_features(train, key=key, split="train_set", method=method)
            if test_X is None or train_X is None:
                continue
            val_X = _family_features(feats.val, key=key, split="val_set", method=method) if feats.val else None
            name = f"{prefix}{modality}_{fam}"
            linear_kwargs = _linear_kwargs(cfg, num_classes)
            svm_kwargs = {"C": cfg.svm_C, "max_iter": cfg.svm_max_iter, "tol": cfg.svm_tol, "num_classes": num_classes}
            if cfg.linear:
                linear_kwargs["C"] = select.linear_C(result, name, train_X, val_X)
                _record(result, f"{name}_linear",
                        linear_probe(train_X, train_y, test_X, test_y, **linear_kwargs))
            if cfg.knn:
                result.metrics[f"{name}_knn_acc"] = knn_accuracy(
                    train_X, train_y, test_X, test_y, k=select.knn_k(result, name, train_X, val_X)
                )
            if modality == "sound" and cfg.sound_svm:
                svm_kwargs["C"] = select.svm_C(result, name, train_X, val_X)
                _record(result, f"{name}_svm",
                        linear_svm(train_X, train_y, test_X, test_y, **svm_kwargs))
            if plan.spatial:
                probe = linear_probe(train_X, train["sector"], test_X, test["sector"],
                                     C=linear_kwargs["C"], max_iter=cfg.linear_max_iter, tol=cfg.linear_tol)
                result.metrics[f"{name}_spatial_acc"] = probe.accuracy
                result.metrics[f"{name}_spatial_f1"] = probe.f1
                _solver(result, f"{name}_spatial", probe)
            if modality == "sound" and plan.clip_probes:
                test_NKD = _family_features(feats.test_crops, key=key, split="test_set", method=method)
                train_NKD = _family_features(feats.train_crops, key=key, split="train_set", method=method)
                if test_NKD is None or train_NKD is None:
                    continue
                train_ND = train_NKD.mean(dim=1)
                if cfg.linear:
                    _record(result, f"{name}_linear_clip",
                            linear_probe(train_ND, train_y, test_NKD, test_y, **linear_kwargs))
                if cfg.sound_svm:
                    _record(result, f"{name}_svm_clip",
                            linear_svm(train_ND, train_y, test_NKD, test_y, **svm_kwargs))


def _block_probes(result: DownstreamResult, cfg: EvalConfig, plan: _Plan, feats: _Features, prefix: str,
                  num_classes: int) -> None:
    """A linear probe on each encoder block's pooled features (AVID Table 1)."""
    linear_kwargs = _linear_kwargs(cfg, num_classes)
    for modality, suffix in plan.modalities:
        for key in sorted(k for k in feats.test_blocks if k.endswith(f"_{suffix}")):
            block = key.removesuffix(f"_{suffix}")
            probe = linear_probe(feats.train_blocks[key], feats.train_y, feats.test_blocks[key], feats.test_y,
                                 **linear_kwargs)
            _record(result, f"{prefix}{modality}_{block}_linear", probe)


def _retrieval(result: DownstreamResult, method: nn.Module, cfg: EvalConfig, plan: _Plan, feats: _Features,
               prefix: str) -> None:
    """Sound -> image Rank-k by class (and by clip), and the projections' mean pairwise cosine."""
    if not {"image", "sound"} <= plan.test_keys:
        return
    test, test_y = feats.test, feats.test_y
    if cfg.retrieval:
        z_s = _family_features(test, key="z_s", split="test_set", method=method)
        z_v = _family_features(test, key="z_v", split="test_set", method=method)
        ranks = retrieval_rank_k(z_s, test_y, z_v, test_y, ks=tuple(range(1, cfg.retrieval_ks + 1)))
        result.metrics.update(zip(rank_names(prefix, cfg.retrieval_ks), ranks.values(), strict=True))
        for modality, z in (("image", z_v), ("sound", z_s)):
            result.metrics[f"{prefix}{modality}_z_mean_cos"] = mean_pairwise_cosine(z)
    if cfg.clip_retrieval:
        z_s = _family_features(test, key="z_s", split="test_set", method=method)
        z_v = _family_features(test, key="z_v", split="test_set", method=method)
        clip_N = torch.arange(z_s.shape[0])  # each clip is its own class: find the exact partner
        ranks = retrieval_rank_k(z_s, clip_N, z_v, clip_N, ks=tuple(range(1, cfg.retrieval_ks + 1)))
        result.metrics.update(zip(rank_names(prefix, cfg.retrieval_ks, clip=True), ranks.values(), strict=True))
