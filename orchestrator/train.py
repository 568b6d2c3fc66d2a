"""The per-worker training loop that Ray Train runs on each DDP worker, and its launcher.

Per worker: build the data pools and the method, shard the pools with DistributedSampler,
train with DDP (gloo on CPU, NCCL on GPU), report losses and a checkpoint every epoch, then
rank 0 runs the downstream evaluation on frozen features and logs it to MLflow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from methods.base import Batch, Method
from methods.data import CLASS_NAMES, ProceduralAV
from methods.data.augment import SpecAugment, TwoViews, simclr_image_augment
from methods.distributed import convert_global_batchnorm
from methods.evaluate import run_downstream
from methods.registry import build_method
from orchestrator import tracking
from orchestrator.config import ExperimentConfig

CHECKPOINT_FILE = "checkpoint.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_pretraining_data(cfg: ExperimentConfig, method: Method) -> dict[str, Dataset]:
    """The pools one training step draws from: the pretraining pool and the unpaired views."""
    data = ProceduralAV(cfg.data)
    pools: dict[str, Dataset] = {"main": data.pool(method.pretrain_pool)}
    if method.uses_unpaired and cfg.data.unpaired_sound_size > 0:
        n_mels, n_frames = cfg.data.n_mels, cfg.data.n_frames
        spec = SpecAugment(freq_mask=max(1, n_mels // 5), time_mask=max(1, n_frames // 5))
        pools["usound"] = TwoViews(data.pool("unpaired_sound"), "sound", "usound", spec, seed=cfg.seed)
    if method.uses_unpaired and cfg.data.unpaired_image_size > 0:
        aug = simclr_image_augment(cfg.data.image_size)
        pools["uimage"] = TwoViews(data.pool("unpaired_image"), "image", "uimage", aug, seed=cfg.seed)
    return pools


class _Loader:
    """A sharded DataLoader over one pool that can be iterated forever (unpaired pools cycle)."""

    def __init__(self, dataset: Dataset, *, batch: int, world: int, rank: int, seed: int, workers: int):
        self.dataset = dataset
        self.sampler = DistributedSampler(
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
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def forever(self) -> Iterator[Batch]:
        while True:
            yield from self.loader
            self.set_epoch(self.epoch + 1)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _unwrap(model: torch.nn.Module) -> Method:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def _build_optimizer(cfg: ExperimentConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=0.9, weight_decay=o.weight_decay)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report (all metrics) at INFO from a logger named after its file path;
    the per-epoch line avlab prints says the same in one line."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point that Ray Train runs on every worker."""
    cfg = ExperimentConfig.from_dict(loop_config["config"])
    run_id: str = loop_config["mlflow_run_id"]
    tracking_uri: str = loop_config["tracking_uri"]
    _quiet_ray_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.resources.cpus_per_worker)
    seed_everything(cfg.seed * 1000 + rank)
    device = ray.train.torch.get_device()

    data = ProceduralAV(cfg.data)
    method = build_method(cfg.method_name, cfg.method, data.info())
    if world > 1 and cfg.train.sync_batchnorm:
        # BatchNorm over the global batch: torch's SyncBatchNorm on GPUs, ours on CPU workers.
        if cfg.resources.gpu:
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        else:
            method = convert_global_batchnorm(method)
    model = ray.train.torch.prepare_model(
        method,
        parallel_strategy_kwargs={"find_unused_parameters": method.may_leave_parameters_unused()},
    )
    optimizer = _build_optimizer(cfg, model.parameters())

    pools = build_pretraining_data(cfg, _unwrap(model))
    unpaired_batch = cfg.train.unpaired_batch_size or cfg.train.batch_size
    loaders = {
        key: _Loader(
            pool,
            batch=(cfg.train.batch_size if key == "main" else unpaired_batch) // world,
            world=world,
            rank=rank,
            seed=cfg.seed + i,
            workers=cfg.train.data_workers,
        )
        for i, (key, pool) in enumerate(pools.items())
    }

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location=device, weights_only=False)
        _unwrap(model).load_state_dict(state["model"])
        _unwrap(model).load_extra_state(state["extra"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        _set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        for key, loader in loaders.items():
            loader.set_epoch(state["loader_epochs"].get(key, start_epoch))

    client = MlflowClient(tracking_uri) if rank == 0 else None
    steps = len(loaders["main"])
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    unpaired_iters = {k: l.forever() for k, l in loaders.items() if k != "main"}

    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        loaders["main"].set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()
        for step, batch in enumerate(loaders["main"].loader):
            if step >= steps:
                break
            for it in unpaired_iters.values():
                batch.update(next(it))
            batch = _to_device(batch, device)
            out = model(batch)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            _unwrap(model).after_step(batch, out)
            for k, v in out.items():
                sums[k] = sums.get(k, 0) + v.detach()
        elapsed = time.perf_counter() - t0
        _unwrap(model).on_epoch_end(epoch)
        metrics = _epoch_metrics(sums, steps, world)
        metrics["pairs_per_s"] = steps * cfg.train.batch_size / elapsed
        metrics["epoch_time_s"] = elapsed
        metrics["epoch"] = epoch
        every = cfg.eval.every_epochs
        if rank == 0 and every and (epoch + 1) % every == 0 and epoch + 1 < cfg.train.epochs:
            metrics.update(quick_knn(cfg, _unwrap(model), data, device))
        if rank == 0:
            tracking.log_metrics(client, run_id, metrics, step=epoch)
            _print_epoch(epoch, cfg.train.epochs, metrics)
        _report_with_checkpoint(metrics, model, optimizer, epoch, rank, world, run_id, loaders)

    final: dict[str, Any] = {"epoch": cfg.train.epochs - 1}
    if rank == 0:
        final.update(evaluate_and_log(cfg, _unwrap(model), data, client, run_id, device))
    ray.train.report(final)


def _epoch_metrics(sums: dict[str, torch.Tensor], steps: int, world: int) -> dict[str, float]:
    """Mean of each loss term over the epoch's steps and over the workers (one collective)."""
    if not sums:
        return {}
    keys = sorted(sums)
    # On the loss device: NCCL reduces CUDA tensors only. One host sync per epoch, none per step.
    vec = torch.stack([sums[k].to(torch.float64) for k in keys])
    if world > 1:
        dist.all_reduce(vec)
    vec /= steps * world
    return {k: float(v) for k, v in zip(keys, vec.cpu())}


def say(message: str) -> None:
    """One progress line to the driver (Ray forwards a worker's stdout prints twice)."""
    sys.stderr.write(f"[avlab] {message}\n")
    sys.stderr.flush()


def _print_epoch(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
    terms = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("loss"))
    say(
        f"epoch {epoch + 1}/{epochs} {terms} "
        f"({metrics['pairs_per_s']:.0f} pairs/s, {metrics['epoch_time_s']:.1f} s)"
    )


def _report_with_checkpoint(metrics, model, optimizer, epoch, rank, world, run_id, loaders) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (model, optimiser, RNG, positions)."""
    rng = [None] * world
    if world > 1:
        dist.all_gather_object(rng, _rng_state())
    else:
        rng[0] = _rng_state()
    if rank != 0:
        ray.train.report(metrics)
        return
    state = {
        "model": _unwrap(model).state_dict(),
        "extra": _unwrap(model).extra_state(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "rng": rng,
        "loader_epochs": {k: l.epoch for k, l in loaders.items() if k != "main"},
        "mlflow_run_id": run_id,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT_FILE
        torch.save(state, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # never a half-written checkpoint file
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_epoch{epoch:05d}",
        )


def quick_knn(cfg: ExperimentConfig, method: Method, data: ProceduralAV, device: torch.device) -> dict[str, float]:
    """Cosine-kNN accuracy on h during pretraining (for schedulers that stop weak trials early)."""
    quick = dataclasses.replace(cfg.eval, features=("h",), linear=False, knn=True, retrieval=False)
    result = run_downstream(method, train_set=data.pool("train"), test_set=data.pool("test"), cfg=quick, device=device)
    return dict(result.metrics)


def evaluate_and_log(
    cfg: ExperimentConfig,
    method: Method,
    data: ProceduralAV,
    client: MlflowClient,
    run_id: str,
    device: torch.device,
) -> dict[str, float]:
    """Downstream evaluation on frozen features (SPEC §6); logs metrics and confusion matrices."""
    t0 = time.perf_counter()
    result = run_downstream(
        method, train_set=data.pool("train"), test_set=data.pool("test"), cfg=cfg.eval, device=device
    )
    metrics = dict(result.metrics)
    figures = result.figures(CLASS_NAMES[: cfg.data.num_classes])
    if cfg.data.transfer_train_size > 0 and cfg.data.transfer_test_size > 0:
        transfer = run_downstream(
            method,
            train_set=data.pool("transfer_train"),
            test_set=data.pool("transfer_test"),
            cfg=cfg.eval,
            device=device,
            prefix="transfer_",
        )
        metrics.update(transfer.metrics)
    metrics["eval_time_s"] = time.perf_counter() - t0
    step = max(cfg.train.epochs - 1, 0)
    tracking.log_metrics(client, run_id, metrics, step=step)
    for name, fig in figures.items():
        client.log_figure(run_id, fig, f"plots/confusion_{name}.png")
    summary = ", ".join(
        f"{k}={metrics[k]:.3f}"
        for k in ("image_h_linear_acc", "sound_h_linear_acc", "image_h_knn_acc", "retrieval_s2i_rank1")
        if k in metrics
    )
    say(f"downstream: {summary}")
    return metrics
