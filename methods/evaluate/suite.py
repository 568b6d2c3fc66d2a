"""The downstream suite run after pretraining: linear probe, kNN and retrieval on frozen features.

Paper 001 §4.3 evaluates BMA-Memory by (i) linear evaluation on h^v for image classification and
h^s for sound classification, (ii) a kNN classifier on the same features and (iii) sound → image
retrieval Rank-1..5 on the projections z^s, z^v (Table 3). ``run_downstream`` embeds both splits
once with the frozen method and returns flat, tracker-ready metric names:

    {prefix}image_{fam}_linear_{acc,precision,recall,f1}   {prefix}image_{fam}_knn_acc
    {prefix}sound_{fam}_linear_{acc,precision,recall,f1}   {prefix}sound_{fam}_knn_acc
    {prefix}retrieval_s2i_rank{k}                          k = 1..retrieval_ks

where ``fam`` is an embed family (``f`` encoder output, ``h`` representation, ``z`` projection);
image tasks read ``{fam}_v`` and sound tasks ``{fam}_s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import Dataset

from methods.evaluate.features import extract_features
from methods.evaluate.knn import knn_accuracy
from methods.evaluate.linear_probe import linear_probe
from methods.evaluate.plots import confusion_matrix_figure
from methods.evaluate.retrieval import retrieval_rank_k

__all__ = ["FEATURE_FAMILIES", "DownstreamResult", "EvalConfig", "run_downstream"]

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
    linear_max_iter: int = 1000
    knn: bool = True
    knn_k: int = 20
    retrieval: bool = True
    retrieval_ks: int = 5  # report Rank-1 .. Rank-retrieval_ks
    # 0: evaluate after the last epoch only; k: also a quick cosine-kNN probe on h every k epochs
    # (image_h_knn_acc, sound_h_knn_acc), the signal an early-stopping scheduler reads.
    every_epochs: int = 0

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
        for name in ("linear", "knn", "retrieval"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        for name in ("batch_size", "linear_max_iter", "knn_k", "retrieval_ks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if isinstance(self.every_epochs, bool) or not isinstance(self.every_epochs, int) or self.every_epochs < 0:
            raise ValueError(f"every_epochs: expected an integer >= 0, got {self.every_epochs!r}")
        if isinstance(self.linear_C, bool) or not isinstance(self.linear_C, (int, float)) or not (
            self.linear_C > 0
        ):
            raise ValueError(f"linear_C: expected a positive number, got {self.linear_C!r}")


@dataclass
class DownstreamResult:
    """Flat metrics plus the linear probes' confusion matrices (rows: true class id)."""

    metrics: dict[str, float] = field(default_factory=dict)
    confusions: dict[str, np.ndarray] = field(default_factory=dict)

    def figures(self, class_names: Sequence[str]) -> dict[str, Figure]:
        """One confusion-matrix figure per entry of ``confusions``, keyed like it.

        A matrix smaller than ``class_names`` (the highest class ids absent from both splits) is
        padded with zeros so every row keeps its dataset name.
        """
        figs: dict[str, Figure] = {}
        for name, confusion_CC in self.confusions.items():
            C = confusion_CC.shape[0]
            if len(class_names) < C:
                raise ValueError(
                    f"class_names: {len(class_names)} names, but '{name}' has {C} classes"
                )
            padded = np.zeros((len(class_names), len(class_names)), dtype=confusion_CC.dtype)
            padded[:C, :C] = confusion_CC
            figs[name] = confusion_matrix_figure(padded, class_names, title=name)
        return figs


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


def run_downstream(
    method: nn.Module,
    *,
    train_set: Dataset,
    test_set: Dataset,
    cfg: EvalConfig,
    device: torch.device | str | None = None,
    prefix: str = "",
    num_classes: int | None = None,
) -> DownstreamResult:
    """Run the enabled protocols of ``cfg`` on frozen features and return flat metrics.

    The probes and kNN fit on ``train_set`` and score on ``test_set``; retrieval uses only
    ``test_set`` (its sounds query its images). A modality absent from the dataset items (e.g. a
    sound-only transfer set) skips its tasks, and retrieval needs both modalities. The method's
    weights, buffers and per-module train/eval modes are unchanged afterwards.

    Args:
        device: where the method already lives; ``None`` means its parameters' device.
        prefix: prepended to every metric and confusion name, e.g. ``"transfer_"``.
        num_classes: confusion matrix size (default: largest class id seen + 1).
    """
    needs_train = (cfg.linear or cfg.knn) and bool(cfg.features)
    test_keys = _item_keys(test_set, "test_set")
    train_keys = _item_keys(train_set, "train_set") if needs_train else test_keys
    test = extract_features(method, test_set, batch_size=cfg.batch_size, device=device)
    train = (
        extract_features(method, train_set, batch_size=cfg.batch_size, device=device)
        if needs_train
        else {}
    )
    for split, feats in (("test_set", test), ("train_set", train)):
        if feats and "label" not in feats:
            raise ValueError(f"{split}: items carry no 'label'; downstream evaluation needs labels")
    if num_classes is None:
        num_classes = int(max(int(f["label"].max()) for f in (test, train) if f)) + 1

    result = DownstreamResult()
    if needs_train:
        for modality, suffix in _MODALITIES:
            if modality not in test_keys:
                continue
            if modality not in train_keys:
                raise ValueError(
                    f"train_set: items carry no '{modality}' but test_set does; "
                    f"probe on a train split with the same modalities"
                )
            for fam in cfg.features:
                key = f"{fam}_{suffix}"
                test_X = _family_features(test, key=key, split="test_set", method=method)
                train_X = _family_features(train, key=key, split="train_set", method=method)
                if test_X is None or train_X is None:
                    continue
                name = f"{prefix}{modality}_{fam}"
                if cfg.linear:
                    probe = linear_probe(
                        train_X, train["label"], test_X, test["label"],
                        C=cfg.linear_C, max_iter=cfg.linear_max_iter, num_classes=num_classes,
                    )
                    result.metrics[f"{name}_linear_acc"] = probe.accuracy
                    result.metrics[f"{name}_linear_precision"] = probe.precision
                    result.metrics[f"{name}_linear_recall"] = probe.recall
                    result.metrics[f"{name}_linear_f1"] = probe.f1
                    result.confusions[f"{name}_linear"] = probe.confusion
                if cfg.knn:
                    result.metrics[f"{name}_knn_acc"] = knn_accuracy(
                        train_X, train["label"], test_X, test["label"], k=cfg.knn_k
                    )

    if cfg.retrieval and {"image", "sound"} <= test_keys:
        z_s = _family_features(test, key="z_s", split="test_set", method=method)
        z_v = _family_features(test, key="z_v", split="test_set", method=method)
        ranks = retrieval_rank_k(
            z_s, test["label"], z_v, test["label"], ks=tuple(range(1, cfg.retrieval_ks + 1))
        )
        for k, accuracy in ranks.items():
            result.metrics[f"{prefix}retrieval_s2i_rank{k}"] = accuracy
    return result
