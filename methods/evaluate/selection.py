"""Probe hyperparameters under ``eval.protocol`` (docs/spec.md §6): as configured (``fixed``),
or chosen on a stratified validation split carved from the training rows (``validation``,
``folds``), never from the test split."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from methods.evaluate.knn import knn_accuracy
from methods.evaluate.linear_probe import linear_probe, linear_svm

if TYPE_CHECKING:
    from methods.evaluate.suite import DownstreamResult, EvalConfig


@dataclass(frozen=True)
class Selection:
    """Each probe's hyperparameter: as configured (``protocol: fixed``), or the grid value with the
    best accuracy on a stratified validation split of the training rows (fitted on the rest),
    logged as ``<name>_linear_C`` / ``_knn_k`` / ``_svm_C``; ties go to the earlier grid value."""

    cfg: EvalConfig
    train_y: torch.Tensor
    fit: torch.Tensor | None  # row indices the candidates are fitted on; None: no selection
    val: torch.Tensor | None
    num_classes: int

    @classmethod
    def of(cls, cfg: EvalConfig, train_y: torch.Tensor, num_classes: int) -> Selection:
        if cfg.protocol == "fixed":
            return cls(cfg, train_y, None, None, num_classes)
        fit, val = validation_split(train_y, cfg.validation_fraction)
        if not len(val):  # too few rows to hold any out: the configured values
            return cls(cfg, train_y, None, None, num_classes)
        return cls(cfg, train_y, fit, val, num_classes)

    def _choose(self, result: DownstreamResult, metric: str, grid: Sequence[float], default: float,
                score: Callable[[float], float]) -> float:
        if self.fit is None:
            chosen = default
        else:
            scores = [score(value) for value in grid]
            chosen = grid[max(range(len(grid)), key=lambda i: (scores[i], -i))]
        if self.cfg.protocol != "fixed":
            result.metrics[metric] = float(chosen)
        return chosen

    def linear_C(self, result: DownstreamResult, name: str, X: torch.Tensor) -> float:
        cfg, y, fit, val = self.cfg, self.train_y, self.fit, self.val
        return self._choose(result, f"{name}_linear_C", cfg.linear_C_grid, cfg.linear_C, lambda c: linear_probe(
            X[fit], y[fit], X[val], y[val], C=c, max_iter=cfg.linear_max_iter, tol=cfg.linear_tol, num_classes=self.num_classes).accuracy)

    def svm_C(self, result: DownstreamResult, name: str, X: torch.Tensor) -> float:
        cfg, y, fit, val = self.cfg, self.train_y, self.fit, self.val
        return self._choose(result, f"{name}_svm_C", cfg.svm_C_grid, cfg.svm_C, lambda c: linear_svm(
            X[fit], y[fit], X[val], y[val], C=c, max_iter=cfg.svm_max_iter, tol=cfg.svm_tol, num_classes=self.num_classes).accuracy)

    def knn_k(self, result: DownstreamResult, name: str, X: torch.Tensor) -> int:
        cfg, y, fit, val = self.cfg, self.train_y, self.fit, self.val
        grid = [k for k in cfg.knn_k_grid if fit is None or k <= len(fit)] or [min(cfg.knn_k_grid)]
        return int(self._choose(result, f"{name}_knn_k", grid, cfg.knn_k,
                                lambda k: knn_accuracy(X[fit], y[fit], X[val], y[val], k=int(k))))


def validation_split(y_N: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, validation rows) of a stratified split: each class with two or more rows gives
    round(fraction x its rows), at least one and never all, to the validation split; seeded."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(y_N)
    fit, val = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        n_val = min(max(int(round(len(rows) * fraction)), 1), len(rows) - 1) if len(rows) >= 2 else 0
        val.extend(rows[:n_val])
        fit.extend(rows[n_val:])
    return torch.as_tensor(np.sort(fit), dtype=torch.long), torch.as_tensor(np.sort(val), dtype=torch.long)
