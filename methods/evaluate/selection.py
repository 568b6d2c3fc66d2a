"""Probe hyperparameters under ``eval.protocol`` (docs/spec.md §6): as configured (``fixed``),
or chosen on the dataset's validation split (``validation`` where the data has one), else on a
stratified validation split carved from the training rows (``validation``, ``folds``); never on
the test split."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from methods.evaluate.knn import knn_accuracy
from methods.evaluate.linear_probe import linear_probe, linear_svm

if TYPE_CHECKING:
    from methods.evaluate.suite import DownstreamResult, EvalConfig


@dataclass(frozen=True)
class Selection:
    """Each probe's hyperparameter: as configured (``protocol: fixed``), or the grid value with the
    best accuracy on the dataset's validation split (fitted on every training row; ``val_y``
    given), else on a stratified validation split of the training rows (fitted on the rest),
    logged as ``<name>_linear_C`` / ``_knn_k`` / ``_svm_C``; ties go to the earlier grid value."""

    cfg: EvalConfig
    train_y: torch.Tensor
    fit: torch.Tensor | None  # row indices the candidates are fitted on; None: no selection
    val: torch.Tensor | None  # carved validation rows; None with val_y or without selection
    num_classes: int
    val_y: torch.Tensor | None = None  # labels of the dataset's validation split, when it is the one

    @classmethod
    def of(cls, cfg: EvalConfig, train_y: torch.Tensor, num_classes: int,
           val_y: torch.Tensor | None = None) -> Selection:
        if cfg.protocol == "fixed":
            return cls(cfg, train_y, None, None, num_classes)
        if val_y is not None and len(val_y):
            return cls(cfg, train_y, torch.arange(len(train_y)), None, num_classes, val_y)
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

    def _rows(self, X: torch.Tensor, val_X: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(fit features, fit labels, held-out features, held-out labels) of the candidates."""
        if self.val_y is not None:
            if val_X is None:
                raise ValueError("eval.protocol: validation: the validation split's features are missing")
            return X, self.train_y, val_X, self.val_y
        return X[self.fit], self.train_y[self.fit], X[self.val], self.train_y[self.val]

    def _scorer(self, probe: Callable[..., Any], X: torch.Tensor, val_X: torch.Tensor | None,
                **kwargs: Any) -> Callable[[float], float]:
        """The held-out accuracy of ``probe`` at a grid value of C."""
        def score(c: float) -> float:
            fit_X, fit_y, held_X, held_y = self._rows(X, val_X)
            return probe(fit_X, fit_y, held_X, held_y, C=c, num_classes=self.num_classes, **kwargs).accuracy
        return score

    def linear_C(self, result: DownstreamResult, name: str, X: torch.Tensor, val_X: torch.Tensor | None = None) -> float:
        cfg = self.cfg
        return self._choose(result, f"{name}_linear_C", cfg.linear_C_grid, cfg.linear_C, self._scorer(
            linear_probe, X, val_X, max_iter=cfg.linear_max_iter, tol=cfg.linear_tol))

    def svm_C(self, result: DownstreamResult, name: str, X: torch.Tensor, val_X: torch.Tensor | None = None) -> float:
        cfg = self.cfg
        return self._choose(result, f"{name}_svm_C", cfg.svm_C_grid, cfg.svm_C, self._scorer(
            linear_svm, X, val_X, max_iter=cfg.svm_max_iter, tol=cfg.svm_tol))

    def knn_k(self, result: DownstreamResult, name: str, X: torch.Tensor, val_X: torch.Tensor | None = None) -> int:
        cfg, fit = self.cfg, self.fit
        grid = [k for k in cfg.knn_k_grid if fit is None or k <= len(fit)] or [min(cfg.knn_k_grid)]

        def score(k: float) -> float:
            fit_X, fit_y, held_X, held_y = self._rows(X, val_X)
            return knn_accuracy(fit_X, fit_y, held_X, held_y, k=int(k))
        return int(self._choose(result, f"{name}_knn_k", grid, cfg.knn_k, score))


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
