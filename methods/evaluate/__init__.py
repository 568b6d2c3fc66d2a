"""Downstream evaluation on frozen features (paper 001 §4.3 and Table 3; SPEC §6).

Linear probe and kNN on h^v / h^s, sound → image retrieval Rank-k on z^s, z^v, confusion-matrix
figures, and ``run_downstream`` that runs them all with flat metric names.
"""

from methods.evaluate.features import extract_features, frozen_eval_mode
from methods.evaluate.knn import knn_accuracy, knn_predict
from methods.evaluate.linear_probe import ProbeResult, classification_metrics, linear_probe
from methods.evaluate.plots import confusion_matrix_figure, save_figure
from methods.evaluate.retrieval import first_hit_rank, retrieval_rank_k
from methods.evaluate.suite import FEATURE_FAMILIES, DownstreamResult, EvalConfig, run_downstream

__all__ = [
    "FEATURE_FAMILIES",
    "DownstreamResult",
    "EvalConfig",
    "ProbeResult",
    "classification_metrics",
    "confusion_matrix_figure",
    "extract_features",
    "first_hit_rank",
    "frozen_eval_mode",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "retrieval_rank_k",
    "run_downstream",
    "save_figure",
]
