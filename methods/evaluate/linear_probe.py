"""Linear evaluation on frozen features (paper 001 §4.3, "linear evaluation").

BMA-Memory measures representation quality by training a linear classifier on the frozen
representation h^v (image tasks) or h^s (sound tasks) and reporting top-1 accuracy, macro
precision / recall / F1 and the confusion matrix. The classifier is multinomial logistic
regression on standardised features, which is convex: a fixed ``seed`` and the same features give
the same numbers on every machine.

Legend: N samples, D feature size, C classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["ProbeResult", "classification_metrics", "linear_probe"]

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class ProbeResult:
    """Classification metrics of one probe.

    ``precision``, ``recall`` and ``f1`` are macro averages over the classes that occur in the
    test labels or the predictions (a class neither present nor predicted says nothing about the
    classifier); a 0/0 ratio counts as 0. ``confusion[i, j]`` counts test samples of class ``i``
    predicted as ``j``; rows and columns are class ids ``0..C-1``.
    """

    accuracy: float
    precision: float
    recall: float
    f1: float
    confusion: np.ndarray


def _to_numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_labels(name: str, y_N: np.ndarray) -> np.ndarray:
    if y_N.ndim != 1:
        raise ValueError(f"{name}: expected shape (N,), got {tuple(y_N.shape)}")
    if y_N.size and (not np.issubdtype(y_N.dtype, np.integer) or y_N.min() < 0):
        raise ValueError(f"{name}: class ids must be non-negative integers")
    return y_N.astype(np.int64)


def classification_metrics(
    y_true: ArrayLike, y_pred: ArrayLike, *, num_classes: int | None = None
) -> ProbeResult:
    """Top-1 accuracy, macro precision / recall / F1 and confusion matrix of fixed predictions.

    ``num_classes`` fixes the confusion matrix size (default: largest class id seen + 1), so a
    figure can label rows with the dataset's class names even when a class is absent.
    """
    true_N = _check_labels("y_true", _to_numpy(y_true))
    pred_N = _check_labels("y_pred", _to_numpy(y_pred))
    if true_N.shape != pred_N.shape or true_N.size == 0:
        raise ValueError(
            f"y_pred: expected the non-empty shape of y_true {true_N.shape}, got {pred_N.shape}"
        )
    seen = int(max(true_N.max(), pred_N.max())) + 1
    C = seen if num_classes is None else num_classes
    if C < seen:
        raise ValueError(f"num_classes: {C} is smaller than the largest class id + 1 ({seen})")
    precision, recall, f1, _ = precision_recall_fscore_support(
        true_N, pred_N, average="macro", zero_division=0
    )
    return ProbeResult(
        accuracy=float(accuracy_score(true_N, pred_N)),
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
        confusion=confusion_matrix(true_N, pred_N, labels=np.arange(C)),
    )


def linear_probe(
    train_X: ArrayLike,
    train_y: ArrayLike,
    test_X: ArrayLike,
    test_y: ArrayLike,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
    num_classes: int | None = None,
) -> ProbeResult:
    """Fit multinomial logistic regression on standardised train features, score on test.

    Paper 001 §4.3 trains a linear layer on frozen h^v / h^s; L2-regularised logistic regression
    (inverse strength ``C``, L-BFGS) is that layer trained to convergence. The scaler is fitted on
    the train split only, so no test statistics leak into the classifier. With two classes
    scikit-learn fits the equivalent binomial model.

    Args:
        train_X, test_X: (N, D) features; train_y, test_y: (N,) class ids in ``0..C-1``.
        num_classes: size of the confusion matrix (default: largest class id seen + 1).
    """
    train_ND = _to_numpy(train_X).astype(np.float64, copy=False)
    test_ND = _to_numpy(test_X).astype(np.float64, copy=False)
    train_N = _check_labels("train_y", _to_numpy(train_y))
    test_N = _check_labels("test_y", _to_numpy(test_y))
    if train_ND.ndim != 2 or train_ND.shape[0] != train_N.shape[0]:
        raise ValueError(f"train_X: expected ({train_N.shape[0]}, D), got {train_ND.shape}")
    if test_ND.ndim != 2 or test_ND.shape != (test_N.shape[0], train_ND.shape[1]):
        raise ValueError(
            f"test_X: expected ({test_N.shape[0]}, {train_ND.shape[1]}), got {test_ND.shape}"
        )
    if np.unique(train_N).size < 2:
        raise ValueError("train_y: a linear probe needs at least two classes in the train split")
    if C <= 0:
        raise ValueError(f"C: must be positive, got {C}")
    classifier = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=C, max_iter=max_iter, random_state=seed, solver="lbfgs"),
    )
    classifier.fit(train_ND, train_N)
    pred_N = classifier.predict(test_ND)
    if num_classes is None:
        num_classes = int(max(train_N.max(), test_N.max())) + 1
    return classification_metrics(test_N, pred_N, num_classes=num_classes)
