"""The evaluation protocol over a dataset's splits (``eval.protocol``, docs/spec.md §6).

``evaluate_splits`` runs ``run_downstream`` the way ``cfg.protocol`` says:

- ``fixed`` / ``validation``: fit on the training split, score on the test split (with
  ``validation`` the suite picks each probe's hyperparameter on the dataset's validation split,
  or on one carved from the training split where the dataset has none: ``run_downstream`` does
  that);
- ``folds``: the labelled rows of both splits grouped by their fold 1..``cfg.folds``; each fold is
  held out once and the others are its training split; every metric is logged per fold
  (``<name>_fold<k>``) and as the mean over folds (``<name>``), the way ESC-50 results are
  reported. The confusion matrices are summed over the folds.

A dataset whose test split mixes image-only and sound-only rows (ESC-50 sounds beside a labelled
image set in one manifest) is evaluated per modality on the rows that carry it
(``eval_groups``); retrieval, which needs both, is then skipped.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from methods.evaluate.suite import DownstreamResult, EvalConfig, run_downstream


@dataclasses.dataclass
class _Group:
    train: Dataset
    test: Dataset
    train_folds: list[Any]
    test_folds: list[Any]


def _groups(data: Any, train: str, test: str) -> list[_Group]:
    make = getattr(data, "eval_groups", None)
    if make is None:  # the embedded datasets: one group, no folds
        return [_Group(data.pool(train), data.pool(test), [], [])]
    return [_Group(g.train, g.test, g.train_folds, g.test_folds) for g in make(train, test)]


def check_folds(data: Any, cfg: EvalConfig, *, train: str = "train", test: str = "test") -> None:
    """For ``protocol: folds``: every labelled row of the two splits carries a fold, and the folds
    are exactly 1..``cfg.folds``; ValueError naming the field otherwise. Reads the rows only."""
    if cfg.protocol != "folds":
        return
    split_folds = getattr(data, "split_folds", None)
    found = {None} if split_folds is None else set(split_folds(train)) | set(split_folds(test))
    if None in found:
        raise ValueError("eval.protocol: folds needs every train and test row of a manifest to carry its fold "
                         "(`avlab data index esc50` writes them); the embedded datasets have none")
    if found != set(range(1, cfg.folds + 1)):
        raise ValueError(f"eval.folds: {cfg.folds} folds expected (1..{cfg.folds}), the manifest's train and test "
                         f"rows carry {sorted(found)}")


def evaluate_splits(method: nn.Module, data: Any, cfg: EvalConfig, *, train: str = "train", test: str = "test",
                    device: torch.device | str | None = None, prefix: str = "",
                    val: str | None = None) -> DownstreamResult:
    """The downstream metrics of ``train`` -> ``test`` under ``cfg.protocol`` (module docstring);
    ``val``: the split ``validation`` chooses the probes' hyperparameters on (used when it has
    rows and the evaluation is one group), else rows carved from ``train``."""
    groups = _groups(data, train, test)
    val_set = data.pool(val) if val is not None and len(groups) == 1 else None
    num_classes = max(len(data.class_names), 1)
    result = DownstreamResult()
    for group in groups:
        sub = cfg if len(groups) == 1 else dataclasses.replace(cfg, retrieval=False, clip_retrieval=False)
        if cfg.protocol == "folds":
            part = _over_folds(method, group, sub, device, prefix, num_classes)
        else:
            part = run_downstream(method, train_set=group.train, test_set=group.test, cfg=sub, device=device,
                                  prefix=prefix, num_classes=num_classes, val_set=val_set)
        result.add(part)
    return result


def _over_folds(method: nn.Module, group: _Group, cfg: EvalConfig, device, prefix: str,
                num_classes: int) -> DownstreamResult:
    rows = ConcatDataset([group.train, group.test])
    folds = [*group.train_folds, *group.test_folds]
    per_fold: dict[str, list[float]] = {}
    result = DownstreamResult()
    for k in range(1, cfg.folds + 1):
        held = [i for i, f in enumerate(folds) if f == k]
        rest = [i for i, f in enumerate(folds) if f != k]
        part = run_downstream(method, train_set=Subset(rows, rest), test_set=Subset(rows, held), cfg=cfg,
                              device=device, prefix=prefix, num_classes=num_classes)
        for name, value in part.metrics.items():
            result.metrics[f"{name}_fold{k}"] = value
            per_fold.setdefault(name, []).append(value)
        result.unconverged += [f"{name}_fold{k}" for name in part.unconverged]
        for name, confusion in part.confusions.items():
            result.confusions[name] = result.confusions[name] + confusion if name in result.confusions else confusion
    for name, values in per_fold.items():
        if len(values) == cfg.folds:
            result.metrics[name] = statistics.fmean(values)
    return result
