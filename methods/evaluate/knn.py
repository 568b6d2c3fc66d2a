"""Cosine-similarity k-nearest-neighbour classification on frozen features (paper 001 §4.3).

kNN needs no training and no hyperparameter beyond k, so it complements the linear probe: it
asks whether same-class samples are already close on the unit sphere, the geometry the
contrastive losses shape.

Legend: N train (memory) samples, M test queries, Q queries in one chunk, D feature size,
C classes, K neighbours.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["knn_accuracy", "knn_predict"]

ArrayLike = np.ndarray | torch.Tensor


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def knn_predict(
    train_X: ArrayLike,
    train_y: ArrayLike,
    test_X: ArrayLike,
    *,
    k: int = 20,
    temperature: float | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predict a class per query from its k most cosine-similar train samples.

    Vote: with ``temperature=None`` each neighbour casts one vote (majority); otherwise a
    neighbour with similarity s votes exp(s / temperature), the weighting of instance-
    discrimination kNN monitors. Ties between classes go to the smallest class id (deterministic,
    independent of neighbour order). ``k`` larger than the train set uses every train sample.
    Queries are processed ``chunk_size`` at a time, so memory stays O(chunk_size · N).

    Returns:
        (M,) int64 predicted class ids (the values found in ``train_y``).
    """
    if k <= 0:
        raise ValueError(f"k: must be positive, got {k}")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature: must be positive or None, got {temperature}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: must be positive, got {chunk_size}")
    train_ND = F.normalize(_as_tensor(train_X).float(), dim=1)
    test_MD = F.normalize(_as_tensor(test_X).float(), dim=1)
    train_N = _as_tensor(train_y).long()
    if train_ND.ndim != 2 or test_MD.ndim != 2 or train_ND.shape[1] != test_MD.shape[1]:
        raise ValueError(
            f"test_X: expected (M, {train_ND.shape[-1]}) like train_X, got {tuple(test_MD.shape)}"
        )
    if train_N.shape != (train_ND.shape[0],) or train_N.numel() == 0:
        raise ValueError(f"train_y: expected shape ({train_ND.shape[0]},) and non-empty")
    # Sorted unique class ids: argmax's first-maximum rule then means "smallest class id wins".
    classes_C, train_idx_N = torch.unique(train_N, sorted=True, return_inverse=True)
    K = min(k, train_ND.shape[0])
    preds: list[torch.Tensor] = []
    for start in range(0, test_MD.shape[0], chunk_size):
        sim_QN = test_MD[start : start + chunk_size] @ train_ND.T
        sim_QK, nn_QK = sim_QN.topk(K, dim=1)
        if temperature is None:
            weight_QK = torch.ones_like(sim_QK)
        else:
            weight_QK = torch.exp(sim_QK / temperature)
        votes_QC = torch.zeros(sim_QK.shape[0], classes_C.numel())
        votes_QC.scatter_add_(1, train_idx_N[nn_QK], weight_QK)
        preds.append(classes_C[votes_QC.argmax(dim=1)])
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def knn_accuracy(
    train_X: ArrayLike,
    train_y: ArrayLike,
    test_X: ArrayLike,
    test_y: ArrayLike,
    *,
    k: int = 20,
    temperature: float | None = None,
) -> float:
    """Top-1 accuracy of the cosine kNN classifier of :func:`knn_predict` on the test split."""
    test_M = _as_tensor(test_y).long()
    pred_M = knn_predict(train_X, train_y, test_X, k=k, temperature=temperature)
    if test_M.shape != pred_M.shape or test_M.numel() == 0:
        raise ValueError(f"test_y: expected shape {tuple(pred_M.shape)} and non-empty")
    return float((pred_M == test_M).double().mean())
