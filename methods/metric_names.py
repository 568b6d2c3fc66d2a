"""The one declaration of the downstream metric names (imports nothing, so commands that read no
config can use it without loading torch).

``run_downstream`` (``methods/evaluate/suite.py``) builds its metric names with the helpers here, and
``metric_names`` lists every name it can return for an evaluation config. Search-space
validation, the sweep's scheduler check, the report and the run summaries read these names
instead of spelling them again; each method declares its own training metrics
(``Method.training_metrics``). A test checks that what the suite logs is what is declared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

PROBE_STATS = ("acc", "precision", "recall", "f1")  # of every classifier probe (linear, SVM)
SPATIAL_STATS = ("acc", "f1")  # of the azimuth-sector probe
ENCODER_BLOCKS = ("block1", "block2", "block3", "block4")  # per-block probes (AVID Table 1)
MODALITIES = ("image", "sound")
TRANSFER_PREFIX = "transfer_"
VALIDATION_PREFIX = "val_"  # scored on the validation split: what choices read (eval.val_metrics, the quick probe)
FOREGROUND_PREFIX = "fg_"  # the image probes on each item's foreground alone (eval.foreground_probe)

# What the report and the run summaries show first, in this order.
HEADLINE_METRICS = (
    "image_h_linear_acc", "image_h_knn_acc", "sound_h_linear_acc", "sound_h_knn_acc",
    "retrieval_s2i_rank1", "retrieval_s2i_rank5",
)
# A sweep's metric when its search space names none (the report and the best trial read it too).
DEFAULT_METRIC = HEADLINE_METRICS[0]
# Shown too when a run logged them (binaural scenes: the spatial probe, clip retrieval).
OPTIONAL_HEADLINE_METRICS = ("sound_h_spatial_acc", "image_h_spatial_acc", "retrieval_s2i_clip_rank1",
                             "fg_image_h_linear_acc")


def probe_names(name: str) -> tuple[str, ...]:
    """``{name}_acc``, ``_precision``, ``_recall``, ``_f1``: what one classifier probe logs, and
    ``_iters``, its solver's iterations."""
    return (*(f"{name}_{stat}" for stat in PROBE_STATS), f"{name}_iters")


def rank_names(prefix: str, ks: int, *, clip: bool = False) -> tuple[str, ...]:
    """Sound -> image retrieval Rank-1..Rank-ks (by class, or ``clip``: the clip's own image)."""
    kind = "s2i_clip" if clip else "s2i"
    return tuple(f"{prefix}retrieval_{kind}_rank{k}" for k in range(1, ks + 1))


def foreground_config(cfg: Any) -> Any:
    """The protocols ``eval.foreground_probe`` runs again on the foregrounds: ``cfg``'s image probes
    (linear, kNN, block probes), without retrieval, the spatial probe or the sound protocols."""
    return dataclasses.replace(cfg, retrieval=False, clip_retrieval=False, spatial_probe=False, sound_svm=False,
                               sound_crops=1, foreground_probe=False)


def probes_foregrounds(cfg: Any, modalities: Iterable[str]) -> bool:
    """Whether ``eval.foreground_probe`` runs on items carrying ``modalities``: it is on, the items
    have images, and an image probe that it repeats is on."""
    return bool(getattr(cfg, "foreground_probe", False) and "image" in set(modalities)
                and (((cfg.linear or cfg.knn) and cfg.features) or cfg.block_probes))


def metric_names(cfg: Any, *, prefix: str = "", modalities: Iterable[str] = MODALITIES) -> tuple[str, ...]:
    """Every name ``run_downstream(..., cfg=cfg, prefix=prefix)`` can return when the evaluation
    items carry ``modalities`` (``cfg`` is an ``EvalConfig``). The ``f`` family is listed when
    ``cfg.features`` asks for it, though a method that exposes no ``f`` skips it."""
    present = [m for m in MODALITIES if m in set(modalities)]
    features = tuple(cfg.features)
    spatial = cfg.spatial_probe and bool(features)
    clip = cfg.sound_crops > 1 and (cfg.linear or cfg.sound_svm) and bool(features)
    names: list[str] = []
    for modality in present:
        for family in features:
            name = f"{prefix}{modality}_{family}"
            if cfg.linear:
                names += probe_names(f"{name}_linear")
            if cfg.knn:
                names.append(f"{name}_knn_acc")
            if modality == "sound" and cfg.sound_svm:
                names += probe_names(f"{name}_svm")
            if getattr(cfg, "protocol", "fixed") != "fixed":  # the hyperparameters chosen on validation
                names += [f"{name}_{chosen}" for chosen, on in (("linear_C", cfg.linear), ("knn_k", cfg.knn),
                                                                 ("svm_C", modality == "sound" and cfg.sound_svm)) if on]
            if spatial:
                names += [*(f"{name}_spatial_{stat}" for stat in SPATIAL_STATS), f"{name}_spatial_iters"]
            if modality == "sound" and clip:
                if cfg.linear:
                    names += probe_names(f"{name}_linear_clip")
                if cfg.sound_svm:
                    names += probe_names(f"{name}_svm_clip")
        if cfg.block_probes:
            for block in ENCODER_BLOCKS:
                names += probe_names(f"{prefix}{modality}_{block}_linear")
    if set(MODALITIES) <= set(present):
        if cfg.retrieval:
            names += rank_names(prefix, cfg.retrieval_ks)
            names += [f"{prefix}{modality}_z_mean_cos" for modality in MODALITIES]
        if cfg.clip_retrieval:
            names += rank_names(prefix, cfg.retrieval_ks, clip=True)
    if probes_foregrounds(cfg, present):
        inner = foreground_config(cfg)
        if inner.protocol == "folds":  # expanded per fold once, below
            inner = dataclasses.replace(inner, protocol="validation")
        names += metric_names(inner, prefix=f"{prefix}{FOREGROUND_PREFIX}", modalities=("image",))
    if getattr(cfg, "protocol", "fixed") == "folds":  # each fold's value, then their mean under the plain name
        names += [f"{name}_fold{k}" for name in list(names) for k in range(1, cfg.folds + 1)]
    return tuple(names)


def ordered(names: Sequence[str], first: Sequence[str] = HEADLINE_METRICS) -> list[str]:
    """``first`` (those in ``names``), then the rest of ``names`` in their order."""
    head = [n for n in first if n in names]
    return head + [n for n in names if n not in head]


def metric_range(name: str) -> tuple[float, float] | None:
    """The values a downstream metric can take: accuracies, precision / recall / F1 and Rank-k
    in [0, 1], a mean pairwise cosine in [-1, 1]; None for the rest (losses, costs)."""
    if name.endswith("_mean_cos"):
        return (-1.0, 1.0)
    stat = name.rsplit("_", 1)[-1]
    if stat in PROBE_STATS or (stat.startswith("rank") and stat[4:].isdigit()):
        return (0.0, 1.0)
    return None


def chance_level(name: str, *, num_classes: int, sectors: int) -> float | None:
    """What guessing scores on an accuracy: 1 / classes for a class probe or by-class Rank-1,
    1 / sectors for the azimuth probe, 1/2 for audio-visual correspondence; None otherwise (a
    Rank-k above 1, clip retrieval, precision / recall / F1)."""
    if name == "l3_acc":
        return 0.5
    if "_spatial_" in name:
        return 1.0 / sectors if name.endswith("_acc") else None
    if name.endswith("_acc") or name.endswith("retrieval_s2i_rank1"):
        return 1.0 / num_classes
    return None
