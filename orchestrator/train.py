"""The training loop: one function, run by Ray Train on each DDP worker, or in its own process by
a single-worker Tune trial or single-worker run (``orchestrator.hosts`` says how they differ).

Per worker: build the data pools and the method, shard the pools with DistributedSampler,
train with DDP (gloo on CPU, NCCL on GPU; no wrapper for one worker), report losses and a
checkpoint every epoch, then rank 0 runs the downstream evaluation on frozen features and logs
it to MLflow.
"""

from __future__ import annotations

import time

_IMPORTED_AT = time.time()  # before the imports below: the worker's import time starts here

import math
import posixpath
import random
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient

from methods.base import Batch, Method
from methods.data import BinauralScenes, ProceduralAV, build_dataset

if TYPE_CHECKING:
    from methods.data.real import ManifestAV
from methods.distributed import convert_global_batchnorm
from methods.evaluate import run_downstream
from methods.evaluate.suite import quick_probe_config
from methods.metric_names import HEADLINE_METRICS, OPTIONAL_HEADLINE_METRICS
from methods.registry import build_method
from orchestrator import checkpoint as ckpt
from orchestrator import tracking
from orchestrator.config import ExperimentConfig
from orchestrator.hosts import RayTrainHost, TrialHost
from orchestrator.loaders import DeviceAugment, Loader, build_pretraining_data, to_device

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _unwrap(model: torch.nn.Module) -> Method:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def _build_optimizer(cfg: ExperimentConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=0.9, weight_decay=o.weight_decay)


def _build_scheduler(cfg: ExperimentConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-step learning-rate factor: linear warm-up, then constant or cosine decay to 0."""
    warmup = cfg.optim.warmup_epochs * steps_per_epoch
    total = max(cfg.train.epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.optim.schedule == "cosine":
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state() -> dict[str, Any]:
    """Every generator's state in types a ``weights_only`` load accepts (no numpy arrays)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite: training diverged."""


def is_deterministic(exc: BaseException) -> bool:
    """Whether a retry would raise ``exc`` again: errors of the code or the data (a missing key,
    a wrong type or value, a diverged loss), not of a lost peer, connection or file system."""
    if isinstance(exc, (dist.DistError, OSError, ConnectionError, TimeoutError)):
        return False
    return isinstance(exc, (LookupError, TypeError, ValueError, AttributeError, ArithmeticError,
                            AssertionError, NotImplementedError, ckpt.CheckpointError))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point that Ray Train runs on every worker."""
    run_loop(loop_config, RayTrainHost, entered=time.time())


def train_in_trial(loop_config: dict[str, Any], run_dir: str, *, tune: bool = True) -> None:
    """Entry point of a single worker that trains in its own process (a Tune trial, or the Ray
    task of a single-worker run when ``tune`` is false): its checkpoints in ``run_dir``."""
    cfg = loop_config["config"]
    run_loop(loop_config, lambda: TrialHost(run_dir, keep=cfg["train"]["checkpoints_to_keep"],
                                            gpu=bool(cfg["resources"]["gpu"]), tune=tune), entered=time.time())


def run_loop(loop_config: dict[str, Any], make_host, *, entered: float) -> None:
    """Train one run (or one worker's part of it) with the host ``make_host()`` builds.

    An error that the same code raises again on the same data ends the run at once. Ray Train
    and Tune restart a worker group or a trial whatever the error, so the failing attempt records
    it on the MLflow run (``tracking.record_failure``); a restarted attempt finds it and returns
    without training, and the driver fails the run with that line. Lost workers, nodes and
    connections are retried from the last checkpoint as before."""
    client = MlflowClient(loop_config["tracking_uri"])
    run_id = loop_config["mlflow_run_id"]
    if tracking.recorded_failure(client, run_id):
        return  # a previous attempt failed deterministically; the driver reports it
    host = None
    try:
        host = make_host()
        _train_loop(loop_config, host, entered)
    except Exception as exc:
        if not is_deterministic(exc):
            raise
        rank, world = (host.rank, host.world) if host is not None else (0, 1)
        lines = str(exc).strip().splitlines()
        line = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip().removesuffix(":")
        tracking.record_failure(client, run_id, f"{line} (rank {rank})",
                                details="".join(traceback.format_exception(exc)))
        if world > 1:
            raise  # Ray Train stops the other ranks; the restarted group returns at once
        # One worker: return, so that nothing restarts it or prints the traceback (it is in the
        # run's failure.txt); the driver fails the run with the recorded line.


# Procedural datasets render each item once per process and keep it (``cache_in_memory``); a
# trial actor that Tune reuses for the next trial keeps the last dataset, so a sweep's trials on
# the same data do not render it again. Items are pure functions of (config, pool, index).
_WARM_DATA: dict[Any, Any] = {}


def warm_dataset(data_cfg: Any) -> Any:
    if data_cfg.manifest or not data_cfg.cache_in_memory:
        return build_dataset(data_cfg)
    if data_cfg not in _WARM_DATA:
        _WARM_DATA.clear()  # one dataset at a time: a pool can take a good part of the memory
        _WARM_DATA[data_cfg] = build_dataset(data_cfg)
    return _WARM_DATA[data_cfg]


def _train_loop(loop_config: dict[str, Any], host: RayTrainHost | TrialHost, entered: float) -> None:
    cfg = ExperimentConfig.from_dict(loop_config["config"])
    run_id: str = loop_config["mlflow_run_id"]
    tracking_uri: str = loop_config["tracking_uri"]
    rank, world = host.rank, host.world
    torch.set_num_threads(cfg.resources.cpus_per_worker)
    seed_everything(cfg.seed * 1000 + rank)
    device = host.device

    data = warm_dataset(cfg.data)
    method = build_method(cfg.method_name, cfg.method, data.info())
    method.configure_training(cfg.train.epochs)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if world > 1 and cfg.train.sync_batchnorm:
        # BatchNorm over the global batch: torch's SyncBatchNorm on GPUs, ours on CPU workers.
        if cfg.resources.gpu:
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        else:
            method = convert_global_batchnorm(method)
    model = host.prepare_model(
        method,
        find_unused_parameters=method.may_leave_parameters_unused(),
        broadcast_buffers=method.ddp_broadcast_buffers(),
    )
    optimizer = _build_optimizer(cfg, model.parameters())

    pools = build_pretraining_data(cfg, _unwrap(model), data)
    unpaired_batch = cfg.train.unpaired_batch_size or cfg.train.batch_size
    loaders = {
        key: Loader(
            pool,
            batch=(cfg.train.batch_size if key == "main" else unpaired_batch) // world,
            world=world,
            rank=rank,
            seed=cfg.seed + i,
            workers=cfg.train.data_workers,
        )
        for i, (key, pool) in enumerate(pools.items())
    }

    client = MlflowClient(tracking_uri) if rank == 0 else None
    # [multi-node] Record which Ray nodes this attempt's workers run on (tags avlab.nodes and
    # avlab.node_history), so a sweep on a cluster shows where each trial ran and was restarted.
    nodes = _worker_nodes(world)
    if rank == 0:
        _tag_nodes(client, run_id, nodes)
    steps = len(loaders["main"])
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    scheduler = _build_scheduler(cfg, optimizer, steps)

    start_epoch, global_step, held_metrics = 0, 0, []
    checkpoint = host.latest_checkpoint()
    if checkpoint is not None:
        state = load_latest_checkpoint(checkpoint, device, verbose=rank == 0)
        if state.get("identity") not in (None, cfg.identity()):
            raise RuntimeError(f"checkpoint {checkpoint.path}: written by another configuration "
                               f"(identity {state['identity']}, this run is {cfg.identity()})")
        if state.get("mlflow_run_id") not in (None, run_id):
            raise RuntimeError(f"checkpoint {checkpoint.path}: belongs to MLflow run {state['mlflow_run_id']}, "
                               f"not {run_id}")
        _unwrap(model).load_state_dict(state["model"])
        _unwrap(model).load_extra_state(state["extra"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        held_metrics = state.get("tracking_outbox", [])
        _set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        for key, loader in loaders.items():
            if key in state["loaders"]:
                loader.load_state(state["loaders"][key])
        if rank == 0:
            say(f"resumed from {checkpoint_file(state['_dir'])} (epoch {start_epoch}/{cfg.train.epochs} done)")
            if state["_skipped"]:
                tracking.set_tags(client, run_id, {"checkpoint_skipped": " | ".join(state["_skipped"])})

    elif loop_config.get("init_checkpoint"):
        _initialise_from(_unwrap(model), loop_config["init_checkpoint"], device, verbose=rank == 0)

    # Epochs whose metrics are already in MLflow (a restart after the log, before the checkpoint
    # landed) are trained again but not logged again: the history gets no repeated steps.
    logged_through = tracking.last_logged_epoch(client, run_id) if client is not None else -1
    # Epoch metrics go through an outbox: a tracking server that is away holds up neither the
    # training nor the checkpoints, and what it missed is sent when it is back (or by a restart).
    outbox = tracking.Outbox(client, run_id, held_metrics) if client is not None else None
    unpaired_iters = {k: l.forever() for k, l in loaders.items() if k != "main"}
    augment = DeviceAugment(cfg)
    # Where this attempt's wall time goes (logged with the evaluation, so users see cost next to
    # accuracy): launch -> worker process -> function entered -> training starts.
    timing = _startup_timing(loop_config, entered)
    timing["setup_time_s"] = time.time() - entered
    timing["checkpoint_time_s"] = 0.0
    # bf16: the forward pass (losses included) under autocast; backward follows the forward's dtypes,
    # and weights, gradients and optimiser state stay fp32, so no loss scaling is needed.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")

    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        loaders["main"].set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()
        for step, batch in enumerate(loaders["main"].loader):
            if step >= steps:
                break
            batch = augment.paired_batch(to_device(batch, device), epoch)
            for key, it in unpaired_iters.items():
                raw = to_device(next(it), device)  # its loader's epoch is the batch's epoch
                batch.update(augment.unpaired_views(key, raw, loaders[key].epoch))
            if cfg.train.channels_last:
                batch = to_device(batch, device, channels_last=True)
            with autocast:
                out = model(batch)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            scheduler.step()
            global_step += 1
            _unwrap(model).after_step(batch, out)
            for k, v in out.items():
                if not k.startswith("_"):  # "_"-keys carry tensors for after_step, not metrics
                    sums[k] = sums.get(k, 0) + v.detach()
        elapsed = time.perf_counter() - t0
        _unwrap(model).on_epoch_end(epoch)
        metrics = _epoch_metrics(sums, steps, world)
        if not math.isfinite(metrics.get("loss", 0.0)):
            # Checked once an epoch (the sums are already on the host), before anything is saved.
            raise NonFiniteLoss(f"the training loss is {metrics['loss']} in epoch {epoch}: training diverged; "
                                f"lower optim.lr (now {cfg.optim.lr:g}) or check the data")
        metrics["pairs_per_s"] = steps * cfg.train.batch_size / elapsed
        metrics["epoch_time_s"] = elapsed
        metrics["lr"] = scheduler.get_last_lr()[0]
        metrics["epoch"] = epoch
        every = cfg.eval.every_epochs
        if rank == 0 and every and (epoch + 1) % every == 0 and epoch + 1 < cfg.train.epochs:
            metrics.update(quick_knn(cfg, _unwrap(model), data, device))
        if rank == 0:
            if epoch > logged_through:
                outbox.log(metrics, step=epoch)
            _print_epoch(epoch, cfg.train.epochs, metrics)
        state = {
            "identity": cfg.identity(),
            "model": _unwrap(model).state_dict(),
            "extra": _unwrap(model).extra_state(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "global_step": global_step,
            "loaders": {k: l.state() for k, l in loaders.items() if k != "main"},
            "mlflow_run_id": run_id,
            "tracking_outbox": outbox.pending if outbox is not None else [],
        }
        t_report = time.perf_counter()
        _report_with_checkpoint(host, metrics, state, epoch)
        timing["checkpoint_time_s"] += time.perf_counter() - t_report

    final: dict[str, Any] = {"epoch": cfg.train.epochs - 1}
    if rank == 0:
        outbox.flush()  # every epoch's metrics are in the store before the evaluation is looked up
        done = tracking.logged_evaluation(client, run_id)
        if done is not None:  # evaluated before a restart: report it, don't repeat it
            say("downstream evaluation already logged; not repeated")
            final.update(done)
        else:
            timing.update(tracking.training_cost(client, run_id))
            final.update(evaluate_and_log(cfg, _unwrap(model), data, client, run_id, device, extra=timing))
    host.report(final)


# [multi-node] --------------------------------------------------------------------------------
def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every worker, in rank order (one collective across the workers)."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


def _tag_nodes(client: MlflowClient, run_id: str, nodes: list[str]) -> None:
    """``avlab.nodes``: the distinct nodes of this attempt's workers (in rank order);
    ``avlab.node_history``: every attempt's nodes, oldest first, joined by " | " (a restarted
    run shows where it ran before). Kept under MLflow's tag length by dropping the oldest."""
    here = ",".join(dict.fromkeys(nodes))
    previous = client.get_run(run_id).data.tags.get(f"{tracking.TAG_PREFIX}node_history", "")
    history = [*(h for h in previous.split(" | ") if h), here]
    while len(" | ".join(history)) > 4000 and len(history) > 1:
        history.pop(0)
    tracking.set_tags(client, run_id, {"nodes": here, "node_history": " | ".join(history)})
# -----------------------------------------------------------------------------------------------


def _initialise_from(method: Method, directory: str, device: torch.device, *, verbose: bool) -> None:
    """``train.init_from``: copy every tensor whose name and shape match (encoders, heads)."""
    weights = ckpt.load(directory, map_location=device)["model"]
    own = method.state_dict()
    matched = ckpt.matching_weights(own, weights)
    if not matched:
        raise RuntimeError(f"train.init_from: {directory} shares no weights with method {method.name}")
    method.load_state_dict(matched, strict=False)
    if verbose:
        say(f"initialised {len(matched)} of {len(own)} tensors from {checkpoint_file(directory)}")


def checkpoint_file(directory: str) -> str:
    return posixpath.join(directory, ckpt.STATE_FILE)


def load_latest_checkpoint(checkpoint: ray.train.Checkpoint, device: torch.device, *, verbose: bool = True) -> dict[str, Any]:
    """The newest readable checkpoint: Ray Train's latest, else the previous ones it kept.

    A damaged checkpoint is reported (naming the file) and skipped; if none is readable the run
    stops rather than silently starting over."""
    import pyarrow.fs

    fs, latest = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, latest_name = posixpath.split(latest)
    candidates = [latest]
    latest_epoch = ckpt.epoch_of(latest_name)
    if latest_epoch is not None:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(parent))
        older = [
            (ckpt.epoch_of(i.base_name), i.path)
            for i in infos
            if i.type == pyarrow.fs.FileType.Directory and ckpt.epoch_of(i.base_name) is not None
        ]
        candidates += [path for epoch, path in sorted(older, reverse=True) if epoch < latest_epoch]
    errors = []
    for path in candidates:
        with ray.train.Checkpoint(path, filesystem=fs).as_directory() as local:
            try:
                state = ckpt.load(local, map_location=device)
            except ckpt.CheckpointError as exc:
                # Name the file where it lives in storage, not in a temporary download.
                message = str(exc).replace(str(local), path)
                errors.append(message)
                if verbose:
                    say(f"WARNING: unusable checkpoint: {message}; trying the previous one")
                continue
        state["_dir"], state["_skipped"] = path, errors
        return state
    raise RuntimeError(f"no usable checkpoint in {parent}: " + "; ".join(errors))


def _startup_timing(loop_config: dict[str, Any], entered: float) -> dict[str, float]:
    """Under Ray Train, ``launch_time_s``: launch -> this module starts importing on the worker
    (Ray Train's controller, worker processes, process group); ``import_time_s``: -> training
    function entered. In a trial's own process the trial measured both itself (its actor's start
    and its imports: zero for a trial that Tune gave a reused, warm actor)."""
    if "import_time_s" in loop_config:
        return {"launch_time_s": loop_config.get("launch_time_s", 0.0), "import_time_s": loop_config["import_time_s"]}
    out = {"import_time_s": max(entered - _IMPORTED_AT, 0.0)}
    if loop_config.get("launched_at") is not None:
        out["launch_time_s"] = max(_IMPORTED_AT - loop_config["launched_at"], 0.0)
    return out


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


say = tracking.say  # one progress line to the driver


def _print_epoch(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
    terms = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("loss"))
    say(
        f"epoch {epoch + 1}/{epochs} {terms} "
        f"({metrics['pairs_per_s']:.0f} pairs/s, {metrics['epoch_time_s']:.1f} s)"
    )


def _report_with_checkpoint(host: RayTrainHost | TrialHost, metrics, state, epoch) -> None:
    """Every worker reports; rank 0 attaches the checkpoint with every rank's RNG states."""
    rng = [None] * host.world
    if host.world > 1:
        dist.all_gather_object(rng, _rng_state())
    else:
        rng[0] = _rng_state()
    if host.rank != 0:
        host.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save(tmp, {**state, "rng": rng})
        host.report(metrics, tmp, ckpt.dir_name(epoch))


def quick_knn(cfg: ExperimentConfig, method: Method, data: ProceduralAV | BinauralScenes | ManifestAV, device: torch.device) -> dict[str, float]:
    """Cosine-kNN accuracy on h during pretraining (for schedulers that stop weak trials early)."""
    result = run_downstream(method, train_set=data.pool("train"), test_set=data.pool("test"),
                            cfg=quick_probe_config(cfg.eval), device=device)
    return dict(result.metrics)


def evaluate_and_log(
    cfg: ExperimentConfig,
    method: Method,
    data: ProceduralAV | BinauralScenes | ManifestAV,
    client: MlflowClient,
    run_id: str,
    device: torch.device,
    extra: dict[str, float] | None = None,
) -> dict[str, float]:
    """Downstream evaluation on frozen features (docs/spec.md §6); logs metrics and confusion matrices,
    with ``extra`` (the run's cost) in the same batch."""
    t0 = time.perf_counter()
    result = run_downstream(
        method, train_set=data.pool("train"), test_set=data.pool("test"), cfg=cfg.eval, device=device
    )
    metrics = dict(result.metrics)
    figures = result.figures(data.class_names)
    if len(data.pool("transfer_train")) > 0 and len(data.pool("transfer_test")) > 0:
        transfer = run_downstream(
            method,
            train_set=data.pool("transfer_train"),
            test_set=data.pool("transfer_test"),
            cfg=cfg.eval,
            device=device,
            prefix="transfer_",
        )
        metrics.update(transfer.metrics)
    metrics.update(extra or {})
    metrics["eval_time_s"] = time.perf_counter() - t0
    for name, fig in figures.items():
        client.log_figure(run_id, fig, f"plots/confusion_{name}.png")
    # eval_time_s arrives with the metrics, last: a run that has it has finished its evaluation.
    tracking.log_metrics(client, run_id, metrics, step=max(cfg.train.epochs - 1, 0))
    summary = ", ".join(f"{k}={metrics[k]:.3f}" for k in (*HEADLINE_METRICS, *OPTIONAL_HEADLINE_METRICS) if k in metrics)
    say(f"downstream: {summary}")
    return metrics
