"""What one training step reads: the pools a method trains on, loaders that shard them over the
DDP workers and resume mid-epoch at the saved batch, and the augmentations applied to whole
batches on the training device (each view a pure function of seed, epoch and index)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from methods.base import Batch, Method
from methods.data import build_dataset
from methods.data.batch_augment import BatchSimCLRAugment, BatchSpecAugment, PairedAugment, hashed_uniform
from orchestrator.config import ExperimentConfig


def build_pretraining_data(cfg: ExperimentConfig, method: Method, data: Any = None) -> dict[str, Dataset]:
    """The pools one training step draws from: the pretraining pool ("main") and, for methods
    that use them, the raw unpaired pools ("usound", "uimage"), whose two views
    ``DeviceAugment`` makes on the training device."""
    data = data if data is not None else build_dataset(cfg.data)
    pools: dict[str, Dataset] = {"main": data.pool(method.pretrain_pool)}
    info = data.info()
    if method.uses_unpaired and info.unpaired_sound_size > 0:
        pools["usound"] = data.pool("unpaired_sound")
    if method.uses_unpaired and info.unpaired_image_size > 0:
        pools["uimage"] = data.pool("unpaired_image")
    return pools


class DeviceAugment:
    """Augmentations applied to whole batches on the training device, each view a pure function
    of (seed, stream, epoch, index) (``methods.data.batch_augment``):

    - unpaired sounds: two SpecAugment views (masks up to a fifth of the bins and frames);
    - unpaired images: two SimCLR views;
    - paired data with ``train.paired_augment=light``: shifted / flipped images and a random gain.
    """

    STREAMS = {"image": 1, "sound": 2, "usound": 3, "uimage": 5}  # second views use stream + 1

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.seed = cfg.seed
        self.spec = BatchSpecAugment(freq_mask=max(1, cfg.data.n_mels // 5), time_mask=max(1, cfg.data.n_frames // 5))
        self.simclr = BatchSimCLRAugment(cfg.data.image_size)
        self.paired = PairedAugment() if cfg.train.paired_augment == "light" else None

    def _u(self, stream: int, epoch: int, index: torch.Tensor, k: int) -> torch.Tensor:
        return hashed_uniform(self.seed, stream, epoch, index, k)

    def unpaired_views(self, key: str, raw: Batch, epoch: int) -> Batch:
        """{"usound"/"uimage": view 1, "..._aug": view 2} from a raw unpaired batch."""
        x, index = (raw["sound"], raw["index"]) if key == "usound" else (raw["image"], raw["index"])
        aug = self.spec if key == "usound" else self.simclr
        s = self.STREAMS[key]
        return {
            key: aug(x, self._u(s, epoch, index, aug.draws())),
            f"{key}_aug": aug(x, self._u(s + 1, epoch, index, aug.draws())),
        }

    def paired_batch(self, batch: Batch, epoch: int) -> Batch:
        if self.paired is None:
            return batch
        index = batch["index"]
        out = dict(batch)
        if "image" in batch:
            u = self._u(self.STREAMS["image"], epoch, index, PairedAugment.DRAWS)
            out["image"] = self.paired.image(batch["image"], u)
        if "sound" in batch:
            out["sound"] = self.paired.sound(batch["sound"], self._u(self.STREAMS["sound"], epoch, index, PairedAugment.DRAWS))
        return out


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start part-way into an epoch (a resumed unpaired pool)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0  # samples of this rank's shard to skip, once

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class Loader:
    """A sharded DataLoader over one pool that can be iterated forever (unpaired pools cycle).

    Its position (epoch, batches consumed in that epoch) goes into every checkpoint, so a resumed
    run draws exactly the batches an uninterrupted one would have drawn."""

    def __init__(self, dataset: Dataset, *, batch: int, world: int, rank: int, seed: int, workers: int):
        self.dataset = dataset
        self.batch = batch
        self.sampler = ResumableSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.loader = DataLoader(
            dataset,
            batch_size=batch,
            sampler=self.sampler,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            # Worker seeds come from this generator, not from the global RNG that training uses;
            # samples and their augmentations are functions of (seed, epoch, index) anyway.
            generator=torch.Generator().manual_seed(seed),
        )
        self.epoch = 0
        self.consumed = 0  # batches of the current epoch already handed out
        self.set_epoch(0)  # a dataset kept warm from an earlier trial starts like a new one

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.consumed = 0
        self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state(self, state: dict[str, int]) -> None:
        self.set_epoch(state["epoch"])
        self.consumed = state["consumed"]
        # [resume fix] Saved right after the last batch of an epoch (the generator had not yet
        # moved on): continue with the next epoch, as the uninterrupted run does, instead of an
        # empty remainder of this one.
        if self.consumed >= len(self.loader):
            self.set_epoch(self.epoch + 1)
        self.sampler.start = self.consumed * self.batch

    def __len__(self) -> int:
        return len(self.loader)

    def forever(self) -> Iterator[Batch]:
        while True:
            empty = True
            for batch in self.loader:
                empty = False
                self.consumed += 1
                yield batch
            if empty:  # a pool smaller than one batch would otherwise spin here forever
                raise RuntimeError(f"a pool of {len(self.loader.dataset)} items yields no full batch of "
                                   f"{self.loader.batch_size} per worker")
            self.set_epoch(self.epoch + 1)


def to_device(batch: Batch, device: torch.device, *, channels_last: bool = False) -> Batch:
    """Copy a batch to the device (asynchronously from pinned memory); with ``channels_last``,
    image and log-mel batches (N, C, H, W) arrive in NHWC layout."""
    return {
        k: v.to(device, non_blocking=True, memory_format=torch.channels_last)
        if channels_last and v.dim() == 4 else v.to(device, non_blocking=True)
        for k, v in batch.items()
    }
