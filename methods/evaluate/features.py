"""Frozen-feature extraction for downstream evaluation.

Every downstream protocol of BMA-Memory (paper 001 §4.3: linear evaluation on h^v / h^s, kNN,
sound→image retrieval on z^s, z^v, Table 3) reads features of a *frozen* encoder. This module
runs a method over a dataset once, in order, and returns the stacked ``embed`` outputs, so that
every protocol sees the same numbers and none of them can touch the weights.

Legend: N dataset size, D feature size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["extract_features", "frozen_eval_mode"]


@contextmanager
def frozen_eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, and give each back its own mode on exit.

    Recording the mode per submodule (not just ``module.training``) matters: a method may keep a
    frozen part (e.g. a distillation teacher) in eval mode while the rest trains, and a blanket
    ``module.train(True)`` afterwards would silently switch that part's BatchNorm back on.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training


def _method_device(method: nn.Module) -> torch.device:
    for tensor in method.parameters():
        return tensor.device
    for tensor in method.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def extract_features(
    method: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
) -> dict[str, torch.Tensor]:
    """Embed a whole dataset with a frozen method, in dataset order.

    Args:
        method: a ``methods.base.Method`` (anything with ``embed(*, images, sounds)``); it must
            already live on ``device``. It is put in eval mode for the pass (BatchNorm uses its
            running statistics and does not update them) and each submodule's mode is restored
            afterwards; no parameter or buffer changes.
        dataset: items are dicts with ``image`` (3, S, S) and/or ``sound`` (1, F, T) and ``label``.
            A modality absent from the items is simply not embedded (e.g. a sound-only
            transfer set such as DCASE-2018).
        batch_size: items per forward pass.
        device: where batches are sent; ``None`` means the device of the method's parameters.
        num_workers: DataLoader workers.

    Returns:
        ``{key_ND: float32 CPU tensor}`` for every key ``embed`` returns (``h_v``, ``z_v``,
        ``h_s``, ``z_s``, maybe ``f_v``, ``f_s``), plus ``label`` (N,) int64 when items carry one.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    target = _method_device(method) if device is None else torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    chunks: dict[str, list[torch.Tensor]] = {}
    with frozen_eval_mode(method):
        for batch in loader:
            images = batch["image"].to(target) if "image" in batch else None
            sounds = batch["sound"].to(target) if "sound" in batch else None
            if images is None and sounds is None:
                raise ValueError("dataset: items carry neither 'image' nor 'sound'")
            out = method.embed(images=images, sounds=sounds)
            for key, value_BD in out.items():
                chunks.setdefault(key, []).append(value_BD.detach().float().cpu())
            if "label" in batch:
                chunks.setdefault("label", []).append(torch.as_tensor(batch["label"]).long().cpu())
    if not chunks:
        raise ValueError("dataset: is empty, nothing to embed")
    return {key: torch.cat(parts, dim=0) for key, parts in chunks.items()}
