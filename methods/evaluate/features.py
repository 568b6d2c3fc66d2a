"""Frozen-feature extraction for downstream evaluation.

Every downstream protocol of BMA-Memory (paper 001 §4.3: linear evaluation on h^v / h^s, kNN,
sound→image retrieval on z^s, z^v, Table 3) reads features of a *frozen* encoder. This module
runs a method over a dataset once, in order, and returns the stacked ``embed`` outputs, so that
every protocol sees the same numbers and none of them can touch the weights.

Two more passes serve the optional protocols of ``EvalConfig``:

- ``extract_block_features``: the globally average-pooled output of every encoder stage
  (block1..block4) of ``E_v`` / ``E_s``, for the per-block linear probes of AVID (paper 002,
  Table 1), which pool each stage's feature map and then probe it.
- ``extract_sound_crop_features``: ``embed`` of K evenly spaced time crops of every sound, for
  per-clip averaging (docs/spec.md §6).

Legend: N dataset size, B batch, K crops per clip, D feature size, C channels, F mel bins,
T frames, L crop frames.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "ForegroundImages",
    "block_encoder",
    "crop_windows",
    "extract_block_features",
    "extract_features",
    "extract_sound_crop_features",
    "frozen_eval_mode",
]

# Per batch: the batch dict and the target device -> {key: (B, ...) tensor}.
_BatchFeatures = Callable[[dict[str, torch.Tensor], torch.device], dict[str, torch.Tensor]]


class ForegroundImages(Dataset):
    """A binaural pool's items as their foreground alone: ``image`` x ``mask`` (the sounding objects
    on black, what foreground alignment's image encoder is trained on) with the item's ``label``;
    no sound, so only the image protocols run on it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.dataset[i]
        return {"image": item["image"] * item["mask"], "label": item["label"]}


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
def _extract(
    method: nn.Module,
    dataset: Dataset,
    batch_features: _BatchFeatures,
    *,
    batch_size: int,
    device: torch.device | str | None,
    num_workers: int,
) -> dict[str, torch.Tensor]:
    """Run ``batch_features`` over the dataset in order, in frozen eval mode; stack on CPU."""
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    target = _method_device(method) if device is None else torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    chunks: dict[str, list[torch.Tensor]] = {}
    with frozen_eval_mode(method):
        for batch in loader:
            if "image" not in batch and "sound" not in batch:
                raise ValueError("dataset: items carry neither 'image' nor 'sound'")
            for key, value in batch_features(batch, target).items():
                chunks.setdefault(key, []).append(value.detach().float().cpu())
            for key in ("label", "sector"):  # class ids; azimuth sectors of binaural scenes
                if key in batch:
                    chunks.setdefault(key, []).append(torch.as_tensor(batch[key]).long().cpu())
    if not chunks:
        raise ValueError("dataset: is empty, nothing to embed")
    return {key: torch.cat(parts, dim=0) for key, parts in chunks.items()}


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

    def embed(batch: dict[str, torch.Tensor], target: torch.device) -> dict[str, torch.Tensor]:
        images = batch["image"].to(target) if "image" in batch else None
        sounds = batch["sound"].to(target) if "sound" in batch else None
        return method.embed(images=images, sounds=sounds)

    return _extract(
        method, dataset, embed, batch_size=batch_size, device=device, num_workers=num_workers
    )


_ENCODERS = {"image": "E_v", "sound": "E_s"}


def block_encoder(method: nn.Module, modality: str) -> nn.Module:
    """The method's encoder for ``modality`` ("image": ``E_v``, "sound": ``E_s``).

    Raises a ValueError naming ``eval.block_probes`` when the method has no such encoder or the
    encoder has no ``forward_blocks``: per-block probes need the stages' feature maps.
    """
    name = _ENCODERS[modality]
    encoder = getattr(method, name, None)
    if not isinstance(encoder, nn.Module) or not callable(getattr(encoder, "forward_blocks", None)):
        raise ValueError(
            f"eval.block_probes: {type(method).__name__} has no {modality} encoder {name} with "
            f"forward_blocks(x); turn eval.block_probes off for this method"
        )
    return encoder


def _global_average_pool(name: str, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature map -> (B, C); an already pooled (B, C) passes through."""
    if x.ndim == 4:
        return x.mean(dim=(2, 3))
    if x.ndim == 2:
        return x
    raise ValueError(f"{name}: forward_blocks gave shape {tuple(x.shape)}, expected (B, C, H, W)")


def extract_block_features(
    method: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-stage features of the frozen encoders ``E_v`` / ``E_s`` for every item, in order.

    Each stage output of ``forward_blocks`` is globally average-pooled over its spatial (for
    sounds: mel x time) axes to (B, C), as AVID does before probing a block (paper 002, Table 1).
    Frozen eval mode and batching as in :func:`extract_features`.

    Returns:
        ``{"block{k}_v": (N, C_k), "block{k}_s": (N, C_k)}`` for the modalities the items carry
        and every block ``forward_blocks`` returns, plus ``label`` (N,) when items carry one.
    """
    suffixes = {"image": "v", "sound": "s"}

    def blocks(batch: dict[str, torch.Tensor], target: torch.device) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for modality, s in suffixes.items():
            if modality not in batch:
                continue
            encoder = block_encoder(method, modality)
            for block, x in encoder.forward_blocks(batch[modality].to(target)).items():
                out[f"{block}_{s}"] = _global_average_pool(f"{_ENCODERS[modality]}.{block}", x)
        return out

    return _extract(
        method, dataset, blocks, batch_size=batch_size, device=device, num_workers=num_workers
    )


def crop_windows(n_frames: int, crops: int) -> list[tuple[int, int]]:
    """``crops`` evenly spaced (start, stop) windows of L = max(1, T // 2) frames over T frames.

    The first window starts at frame 0 and the last ends at frame T; start_i = floor(i (T - L) /
    (K - 1)). Windows overlap when K L > T, and repeat when K > T - L + 1. One crop is the whole
    clip.
    """
    if crops < 1:
        raise ValueError(f"crops: must be >= 1, got {crops}")
    if n_frames < 1:
        raise ValueError(f"n_frames: must be >= 1, got {n_frames}")
    if crops == 1:
        return [(0, n_frames)]
    L = max(1, n_frames // 2)
    starts = [(i * (n_frames - L)) // (crops - 1) for i in range(crops)]
    return [(start, start + L) for start in starts]


def extract_sound_crop_features(
    method: nn.Module,
    dataset: Dataset,
    *,
    crops: int,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
) -> dict[str, torch.Tensor]:
    """``embed`` of ``crops`` time crops of every sound (see :func:`crop_windows`), in order.

    Each crop (B, 1, F, L) goes through ``method.embed(sounds=...)`` on its own, so memory stays
    that of one batch; encoders pool globally, so a shorter crop needs no other change. Images,
    if the items carry them, are ignored. Frozen eval mode and batching as in
    :func:`extract_features`.

    Returns:
        ``{key_NKD}`` for every sound key ``embed`` returns (``h_s``, ``z_s``, maybe ``f_s``),
        crops in time order, plus ``label`` (N,) when items carry one.
    """

    def embed_crops(batch: dict[str, torch.Tensor], target: torch.device) -> dict[str, torch.Tensor]:
        if "sound" not in batch:
            raise ValueError("dataset: items carry no 'sound'; sound crops need one")
        sound_B1FT = batch["sound"].to(target)
        per_crop: dict[str, list[torch.Tensor]] = {}
        for start, stop in crop_windows(sound_B1FT.shape[-1], crops):
            out = method.embed(images=None, sounds=sound_B1FT[..., start:stop])
            for key, value_BD in out.items():
                if key.endswith("_s"):
                    per_crop.setdefault(key, []).append(value_BD)
        return {key: torch.stack(values_KBD, dim=1) for key, values_KBD in per_crop.items()}

    return _extract(
        method, dataset, embed_crops, batch_size=batch_size, device=device, num_workers=num_workers
    )
