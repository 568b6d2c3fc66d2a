"""Downstream evaluation on frozen features (paper 001 §4.3 and Table 3; docs/spec.md §6).

Linear probe and kNN on h^v / h^s, sound → image retrieval Rank-k on z^s, z^v, confusion-matrix
figures, and ``run_downstream`` that runs them all with flat metric names; optionally per-block
linear probes (AVID Table 1), a linear SVM for sound and per-clip averaging over sound crops.
"""

from methods.evaluate.features import (
    ForegroundImages,
    block_encoder,
    crop_windows,
    extract_block_features,
    extract_features,
    extract_sound_crop_features,
    frozen_eval_mode,
)
from methods.evaluate.knn import knn_accuracy, knn_predict
from methods.evaluate.linear_probe import (
    ProbeResult,
    classification_metrics,
    fit_linear_svm,
    fit_logistic_probe,
    linear_probe,
    linear_svm,
    predict_clips,
    solver_report,
)
from methods.evaluate.plots import confusion_matrix_figure, save_figure
from methods.evaluate.retrieval import first_hit_rank, retrieval_rank_k
from methods.evaluate.suite import FEATURE_FAMILIES, DownstreamResult, EvalConfig, run_downstream

__all__ = [
    "FEATURE_FAMILIES",
    "DownstreamResult",
    "EvalConfig",
    "ForegroundImages",
    "ProbeResult",
    "block_encoder",
    "classification_metrics",
    "confusion_matrix_figure",
    "crop_windows",
    "extract_block_features",
    "extract_features",
    "extract_sound_crop_features",
    "first_hit_rank",
    "fit_linear_svm",
    "fit_logistic_probe",
    "solver_report",
    "frozen_eval_mode",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "linear_svm",
    "predict_clips",
    "retrieval_rank_k",
    "run_downstream",
    "save_figure",
]
