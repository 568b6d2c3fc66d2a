"""Linear classifiers on frozen features (paper 001 §4.3 "linear evaluation"; docs/spec.md §6).

BMA-Memory measures representation quality by training a linear classifier on the frozen
representation h^v (image tasks) or h^s (sound tasks) and reporting top-1 accuracy, macro
precision / recall / F1 and the confusion matrix. Two classifiers, both on features standardised
with the statistics of the train split only:

- ``linear_probe``: multinomial logistic regression, the paper's linear layer trained to
  convergence. It is convex, and its solver (L-BFGS) is run to a tight tolerance (``tol``,
  1e-10 by default, against scikit-learn's 1e-4): stopped early, its predictions move with
  last-bit changes of the features, which another CPU's SIMD kernels make (benchmarks/RESULTS.md,
  "Probe convergence"); run to the optimum, they do not.
- ``linear_svm``: one-vs-rest linear SVM (squared hinge, liblinear), the classic protocol for
  sound classification on frozen audio features (AVID, L3); its solver's tolerance too is tight.

Both report the solver's iterations and whether it converged (``ProbeResult.iterations``,
``converged``): a probe that ran out of iterations says so instead of reporting a half-fitted
classifier as a result.

Per-clip averaging (docs/spec.md §6): a test split given as (N, K, D), K crops of each clip, is classified
by averaging the per-crop class probabilities (logistic probe) or decision scores (SVM) over the
K crops of a clip before the argmax (``predict_clips``).

Legend: N samples (clips), K crops per clip, D feature size, C classes.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

# scikit-learn loads when a probe is fitted or scored: a command that only resolves configs
# (every `avlab` driver) does not pay its import (about 2 s on two cores).
if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

__all__ = [
    "ProbeResult",
    "classification_metrics",
    "fit_linear_svm",
    "fit_logistic_probe",
    "linear_probe",
    "linear_svm",
    "predict_clips",
    "solver_report",
]

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
    iterations: int = 0  # of the solver that fitted the classifier (0: fixed predictions, no solver)
    converged: bool = True  # False: the solver stopped at max_iter (or its line search failed)


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
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

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



def _train_split(train_X: ArrayLike, train_y: ArrayLike, *, C: float) -> tuple[np.ndarray, np.ndarray]:
    train_ND = _to_numpy(train_X).astype(np.float64, copy=False)
    train_N = _check_labels("train_y", _to_numpy(train_y))
    if train_ND.ndim != 2 or train_ND.shape[0] != train_N.shape[0]:
        raise ValueError(f"train_X: expected ({train_N.shape[0]}, D), got {train_ND.shape}")
    if np.unique(train_N).size < 2:
        raise ValueError("train_y: a linear probe needs at least two classes in the train split")
    if C <= 0:
        raise ValueError(f"C: must be positive, got {C}")
    return train_ND, train_N


LINEAR_TOL = 1e-10  # L-BFGS's gradient tolerance (scikit-learn's ``tol``) of the logistic probe
LINEAR_MAX_ITER = 10000
SVM_TOL = 1e-8  # liblinear's stopping tolerance of the SVM
SVM_MAX_ITER = 100000


def fit_logistic_probe(
    train_X: ArrayLike, train_y: ArrayLike, *, C: float = 1.0, max_iter: int = LINEAR_MAX_ITER,
    tol: float = LINEAR_TOL, seed: int = 0,
) -> Pipeline:
    """StandardScaler + L2 logistic regression (inverse strength ``C``, L-BFGS to gradient
    tolerance ``tol``), fitted on train. With two classes scikit-learn fits the equivalent
    binomial model. ``solver_report(classifier)`` gives its iterations and convergence.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_ND, train_N = _train_split(train_X, train_y, C=C)
    classifier = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=C, max_iter=max_iter, tol=tol, random_state=seed, solver="lbfgs"),
    )
    return _fit(classifier, train_ND, train_N)


def fit_linear_svm(
    train_X: ArrayLike, train_y: ArrayLike, *, C: float = 1.0, max_iter: int = SVM_MAX_ITER,
    tol: float = SVM_TOL, seed: int = 0,
) -> Pipeline:
    """StandardScaler + one-vs-rest linear SVM (L2 penalty, squared hinge), fitted on train.

    ``C`` is the SVM's inverse regularisation strength. scikit-learn picks the primal or dual
    liblinear solver from the data shape; ``seed`` fixes the dual solver's coordinate order.
    """
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    train_ND, train_N = _train_split(train_X, train_y, C=C)
    classifier = make_pipeline(
        StandardScaler(),
        LinearSVC(C=C, max_iter=max_iter, tol=tol, random_state=seed, multi_class="ovr"),
    )
    return _fit(classifier, train_ND, train_N)


def _fit(classifier: Pipeline, train_ND: np.ndarray, train_N: np.ndarray) -> Pipeline:
    """Fit, turning scikit-learn's ConvergenceWarning into ``solver_report``'s ``converged``."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        classifier.fit(train_ND, train_N)
    classifier.avlab_converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return classifier


def solver_report(classifier: Pipeline) -> tuple[int, bool]:
    """(iterations, converged) of a fitted probe's solver: the most iterations over its
    sub-problems (one per class for the one-vs-rest SVM), and False when scikit-learn warned that
    the solver did not converge."""
    iterations = int(np.max(classifier[-1].n_iter_))
    return iterations, bool(getattr(classifier, "avlab_converged", True))


def _class_scores(classifier: Pipeline, X_MD: np.ndarray) -> np.ndarray:
    """(M, C) per-class scores: probabilities when the classifier has them, else decision scores.

    A binary SVM returns one score s per sample (positive means ``classes_[1]``); it becomes
    (-s, s), whose argmax is sklearn's own binary decision, ties going to ``classes_[0]``.
    """
    if hasattr(classifier, "predict_proba"):
        return classifier.predict_proba(X_MD)
    score = classifier.decision_function(X_MD)
    return np.stack([-score, score], axis=1) if score.ndim == 1 else score


def predict_clips(classifier: Pipeline, test_X: ArrayLike) -> np.ndarray:
    """Class ids for (N, D) features, or for (N, K, D) crops averaged per clip.

    For crops, the per-crop scores of :func:`_class_scores` (probabilities of the logistic probe,
    decision scores of the SVM) are averaged over the K crops of each clip, then argmax. For the
    SVM this equals scoring the clip's mean crop feature, since scaler and SVM are affine.
    """
    X = _to_numpy(test_X).astype(np.float64, copy=False)
    if X.ndim == 2:
        return classifier.predict(X)
    if X.ndim != 3 or X.shape[1] == 0:
        raise ValueError(f"test_X: expected (N, D) features or (N, K, D) crops, got {X.shape}")
    N, K, D = X.shape
    scores_NC = _class_scores(classifier, X.reshape(N * K, D)).reshape(N, K, -1).mean(axis=1)
    return classifier.classes_[scores_NC.argmax(axis=1)]


def _score(
    classifier: Pipeline, test_X: ArrayLike, test_y: ArrayLike, *, train_y: ArrayLike,
    num_classes: int | None,
) -> ProbeResult:
    test_N = _check_labels("test_y", _to_numpy(test_y))
    X = _to_numpy(test_X)
    D = classifier.n_features_in_
    if X.ndim not in (2, 3) or X.shape[0] != test_N.shape[0] or X.shape[-1] != D or 0 in X.shape:
        raise ValueError(
            f"test_X: expected ({test_N.shape[0]}, {D}) or ({test_N.shape[0]}, K, {D}), "
            f"got {X.shape}"
        )
    pred_N = predict_clips(classifier, X)
    if num_classes is None:
        num_classes = int(max(_to_numpy(train_y).max(), test_N.max())) + 1
    iterations, converged = solver_report(classifier)
    return dataclasses.replace(classification_metrics(test_N, pred_N, num_classes=num_classes),
                               iterations=iterations, converged=converged)


def linear_probe(
    train_X: ArrayLike,
    train_y: ArrayLike,
    test_X: ArrayLike,
    test_y: ArrayLike,
    *,
    C: float = 1.0,
    max_iter: int = LINEAR_MAX_ITER,
    tol: float = LINEAR_TOL,
    seed: int = 0,
    num_classes: int | None = None,
) -> ProbeResult:
    """Fit multinomial logistic regression on standardised train features, score on test.

    Paper 001 §4.3 trains a linear layer on frozen h^v / h^s; L2-regularised logistic regression
    (inverse strength ``C``, L-BFGS) is that layer trained to convergence. The scaler is fitted on
    the train split only, so no test statistics leak into the classifier.

    Args:
        train_X: (N, D) features; train_y, test_y: (N,) class ids in ``0..C-1``.
        test_X: (N, D) features, or (N, K, D) crops whose probabilities are averaged per clip.
        num_classes: size of the confusion matrix (default: largest class id seen + 1).
    """
    classifier = fit_logistic_probe(train_X, train_y, C=C, max_iter=max_iter, tol=tol, seed=seed)
    return _score(classifier, test_X, test_y, train_y=train_y, num_classes=num_classes)


def linear_svm(
    train_X: ArrayLike,
    train_y: ArrayLike,
    test_X: ArrayLike,
    test_y: ArrayLike,
    *,
    C: float = 1.0,
    max_iter: int = SVM_MAX_ITER,
    tol: float = SVM_TOL,
    seed: int = 0,
    num_classes: int | None = None,
) -> ProbeResult:
    """Fit a one-vs-rest linear SVM on standardised train features, score on test.

    Same contract as :func:`linear_probe`; (N, K, D) test crops average decision scores per clip.
    """
    classifier = fit_linear_svm(train_X, train_y, C=C, max_iter=max_iter, tol=tol, seed=seed)
    return _score(classifier, test_X, test_y, train_y=train_y, num_classes=num_classes)
