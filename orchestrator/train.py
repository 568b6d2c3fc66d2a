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
import random
import tempfile
import traceback
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient

from methods.base import Batch, Method
from methods.data import AVDataset, DataConfig, build_dataset
from methods.distributed import convert_global_batchnorm
from methods.evaluate import run_downstream
from methods.evaluate.protocol import evaluate_splits
from methods.evaluate.suite import held_out_config, quick_probe_config
from methods.metric_names import HEADLINE_METRICS, OPTIONAL_HEADLINE_METRICS, TRANSFER_PREFIX, VALIDATION_PREFIX
from methods.registry import build_method
from orchestrator import checkpoint as ckpt
from orchestrator import environment
from orchestrator import export
from orchestrator import system_metrics
from orchestrator import tracking
from orchestrator.config import ExperimentConfig
from orchestrator.hosts import RayTrainHost, TrialHost
from orchestrator.loaders import DeviceAugment, Loader, build_pretraining_data, to_device
from orchestrator.signals import quiet_worker_sigterm
from orchestrator.worker_spec import WorkerSpec


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


def train_loop_per_worker(loop_config: dict[str, WorkerSpec]) -> None:
    """Entry point that Ray Train runs on every worker (its loop config holds the ``spec``)."""
    run_loop(loop_config["spec"], RayTrainHost, entered=time.time())


def train_in_trial(spec: WorkerSpec, run_dir: str, *, tune: bool = True) -> None:
    """Entry point of a single worker that trains in its own process (a Tune trial, or the Ray
    task of a single-worker run when ``tune`` is false): its checkpoints in ``run_dir``."""
    cfg = spec.config
    run_loop(spec, lambda: TrialHost(run_dir, keep=cfg["train"]["checkpoints_to_keep"],
                                            gpu=bool(cfg["resources"]["gpu"]), tune=tune), entered=time.time())


def run_loop(spec: WorkerSpec, make_host, *, entered: float) -> None:
    """Train one run (or one worker's part of it) with the host ``make_host()`` builds.

    An error that the same code raises again on the same data ends the run at once. Ray Train
    and Tune restart a worker group or a trial whatever the error, so the failing attempt records
    it on the MLflow run (``tracking.record_failure``); a restarted attempt finds it and returns
    without training, and the driver fails the run with that line. Lost workers, nodes and
    connections are retried from the last checkpoint as before."""
    quiet_worker_sigterm()
    client = MlflowClient(spec.tracking_uri)
    run_id = spec.run_id
    if tracking.recorded_failure(client, run_id):
        return  # a previous attempt failed deterministically; the driver reports it
    host = None
    try:
        host = make_host()
        _train_loop(spec, host, entered)
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


def warm_dataset(data_cfg: DataConfig) -> AVDataset:
    if data_cfg.manifest or not data_cfg.cache_in_memory:
        return build_dataset(data_cfg)
    if data_cfg not in _WARM_DATA:
        _WARM_DATA.clear()  # one dataset at a time: a pool can take a good part of the memory
        _WARM_DATA[data_cfg] = build_dataset(data_cfg)
    return _WARM_DATA[data_cfg]


def _train_loop(spec: WorkerSpec, host: RayTrainHost | TrialHost, entered: float) -> None:
    """One attempt in four phases: set up, restore, train epoch by epoch, finish."""
    attempt = Attempt(spec, host)
    attempt.restore(spec.init_checkpoint)
    timing = attempt.begin(_startup_timing(spec, entered), entered)
    monitor = system_metrics.start_monitor(attempt.cfg, spec.tracking_uri, attempt.run_id,
                                           attempt.nodes, attempt.rank)
    try:
        for epoch in range(attempt.start_epoch, attempt.cfg.train.epochs):
            metrics = attempt.train_epoch(epoch)
            t_report = time.perf_counter()
            attempt.save(epoch, metrics)
            timing["checkpoint_time_s"] += time.perf_counter() - t_report
        attempt.finish(timing)
    finally:
        system_metrics.stop_monitor(monitor)


class Attempt:
    """What one attempt of a run (one worker's part of it) trains with, phase by phase.

    The constructor sets up: config, seeds, data, method, DDP model, optimiser, loaders, LR
    schedule and the node tags. ``restore`` continues from the newest usable checkpoint (or
    initialises from ``train.init_from``), ``begin`` opens the metric outbox and the augmentation,
    ``train_epoch`` runs one epoch's steps, ``save`` reports the epoch with its checkpoint, and
    ``finish`` runs (or finds) the downstream evaluation. The order of these steps is the order in
    which random numbers are drawn: a change in it changes every result of a seed."""

    def __init__(self, spec: WorkerSpec, host: RayTrainHost | TrialHost) -> None:
        # Validated by the driver (or the trial) that sent it: the dataset is built once, below.
        cfg = self.cfg = ExperimentConfig.from_dict(spec.config, checked=True)
        self.run_id: str = spec.run_id
        self.sweep_trial = spec.sweep_trial
        self.host, self.rank, self.world = host, host.rank, host.world
        torch.set_num_threads(cfg.resources.cpus_per_worker)
        seed_everything(cfg.seed * 1000 + self.rank)
        self.device = host.device
        self.data = warm_dataset(cfg.data)
        self.model = self._build_model(cfg, host, self.data)
        self.method = _unwrap(self.model)
        self.optimizer = _build_optimizer(cfg, self.model.parameters())
        pools = build_pretraining_data(cfg, self.method, self.data)
        unpaired_batch = cfg.train.unpaired_batch_size or cfg.train.batch_size
        self.loaders = {
            key: Loader(pool, batch=(cfg.train.batch_size if key == "main" else unpaired_batch) // self.world,
                        world=self.world, rank=self.rank, seed=cfg.seed + i, workers=cfg.train.data_workers)
            for i, (key, pool) in enumerate(pools.items())
        }
        self.client = MlflowClient(spec.tracking_uri) if self.rank == 0 else None
        # [multi-node] Record which Ray nodes this attempt's workers run on (tags avlab.nodes and
        # avlab.node_history), so a sweep on a cluster shows where each trial ran and was restarted.
        nodes = self.nodes = _worker_nodes(self.world)
        if self.client is not None:
            tracking.tag_nodes(self.client, self.run_id, nodes)
            environment.tag_run(self.client, self.run_id, self.device)  # where the numbers are computed
            # The pools as read: a share of the pairs or a multiple of them (data.paired_fraction,
            # data.unpaired_*_per_pair) or a manifest's rows size them, not the data.*_size params.
            info = self.data.info()
            tracking.set_tags(self.client, self.run_id, {f"pool.{name}": getattr(info, f"{name}_size")
                                                         for name in ("paired", "unpaired_sound", "unpaired_image")})
        self.usage = system_metrics.Usage(cfg.resources.cpus_per_worker, self.device, gpu=cfg.tracking.system_metrics)
        self.steps = len(self.loaders["main"])
        if cfg.train.max_steps_per_epoch:
            self.steps = min(self.steps, cfg.train.max_steps_per_epoch)
        self.scheduler = _build_scheduler(cfg, self.optimizer, self.steps)
        self.start_epoch, self.global_step, self.held_metrics = 0, 0, []

    @staticmethod
    def _build_model(cfg: ExperimentConfig, host: RayTrainHost | TrialHost, data: AVDataset) -> torch.nn.Module:
        method = build_method(cfg.method_name, cfg.method, data.info())
        method.configure_training(cfg.train.epochs)
        if cfg.train.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if host.world > 1 and cfg.train.sync_batchnorm:
            # BatchNorm over the global batch: torch's SyncBatchNorm on GPUs, ours on CPU workers.
            if cfg.resources.gpu:
                method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
            else:
                method = convert_global_batchnorm(method)
        return host.prepare_model(method, find_unused_parameters=method.may_leave_parameters_unused(),
                                  broadcast_buffers=method.ddp_broadcast_buffers())

    def restore(self, init_checkpoint: str | None) -> None:
        """Continue from the newest usable checkpoint, or start from ``train.init_from``'s."""
        checkpoint = self.host.latest_checkpoint()
        if checkpoint is None:
            if init_checkpoint:
                copied, total = ckpt.initialise_from(self.method, init_checkpoint, self.device)
                if self.rank == 0:
                    say(f"initialised {copied} of {total} tensors from {ckpt.state_file(init_checkpoint)}")
            return
        state = ckpt.load_latest(checkpoint, self.device, warn=say if self.rank == 0 else None)
        identity = self.cfg.identity()
        # A checkpoint of another configuration or run: the same on every attempt, so the run
        # fails once with this line (a CheckpointError is deterministic), never retried.
        if state.get("identity") not in (None, identity):
            raise ckpt.CheckpointError(
                f"checkpoint {state['_dir']}: written by another configuration (identity {state['identity']}, "
                f"this run is {identity}); resume it with the code and config that wrote it, or start a new run")
        if state.get("mlflow_run_id") not in (None, self.run_id):
            raise ckpt.CheckpointError(f"checkpoint {state['_dir']}: belongs to MLflow run "
                                       f"{state['mlflow_run_id']}, not {self.run_id}")
        self.method.load_state_dict(state["model"])
        self.method.load_extra_state(state["extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch, self.global_step = state["epoch"] + 1, state["global_step"]
        self.held_metrics = state.get("tracking_outbox", [])
        _set_rng_state(state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0])
        for key, loader in self.loaders.items():
            if key in state["loaders"]:
                loader.load_state(state["loaders"][key])
        if self.rank == 0:
            say(f"resumed from {ckpt.state_file(state['_dir'])} "
                f"(epoch {self.start_epoch}/{self.cfg.train.epochs} done)")
            if state["_skipped"]:
                tracking.set_tags(self.client, self.run_id, {"checkpoint_skipped": " | ".join(state["_skipped"])})

    def begin(self, timing: dict[str, float], entered: float) -> dict[str, float]:
        """Open the metric outbox, the unpaired streams and the augmentation; returns ``timing``
        with the set-up time, to which the epochs add their checkpoint time."""
        client, cfg = self.client, self.cfg
        # Epochs whose metrics are already in MLflow (a restart after the log, before the checkpoint
        # landed) are trained again but not logged again: the history gets no repeated steps.
        self.logged_through = tracking.last_logged_epoch(client, self.run_id) if client is not None else -1
        # Epoch metrics go through an outbox: a tracking server that is away holds up neither the
        # training nor the checkpoints, and what it missed is sent when it is back (or by a restart).
        self.outbox = tracking.Outbox(client, self.run_id, self.held_metrics) if client is not None else None
        self.unpaired_iters = {k: l.forever() for k, l in self.loaders.items() if k != "main"}
        self.augment = DeviceAugment(cfg)
        # bf16: the forward pass (losses included) under autocast; backward follows the forward's
        # dtypes, and weights, gradients and optimiser state stay fp32, so no loss scaling is needed.
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=cfg.train.precision == "bf16")
        # Where this attempt's wall time goes (logged with the evaluation, so users see cost next
        # to accuracy): launch -> worker process -> function entered -> training starts.
        timing["setup_time_s"] = time.time() - entered
        timing["checkpoint_time_s"] = 0.0
        return timing

    def _batch(self, raw: Batch, epoch: int) -> Batch:
        batch = self.augment.paired_batch(to_device(raw, self.device), epoch)
        for key, it in self.unpaired_iters.items():
            unpaired = to_device(next(it), self.device)  # its loader's epoch is the batch's epoch
            batch.update(self.augment.unpaired_views(key, unpaired, self.loaders[key].epoch))
        if self.cfg.train.channels_last:
            batch = to_device(batch, self.device, channels_last=True)
        return batch

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch's steps; returns its metrics (mean loss terms over steps and workers, speed,
        LR, and the quick kNN probe on rank 0 when ``eval.every_epochs`` asks for it)."""
        cfg, model, optimizer = self.cfg, self.model, self.optimizer
        model.train()
        self.loaders["main"].set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()
        self.usage.begin()
        for step, raw in enumerate(self.loaders["main"].loader):
            if step >= self.steps:
                break
            self.usage.step(step)
            batch = self._batch(raw, epoch)
            with self.autocast:
                out = model(batch)
            optimizer.zero_grad(set_to_none=True)
            out.metrics["loss"].backward()
            optimizer.step()
            self.scheduler.step()
            self.global_step += 1
            self.method.after_step(batch, out)
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0) + v.detach()
        elapsed = time.perf_counter() - t0
        usage = self.usage.end()
        diagnostics = self.method.on_epoch_end(epoch) or {}
        metrics = _epoch_metrics(sums, self.steps, self.world)
        metrics.update(diagnostics)
        if not math.isfinite(metrics.get("loss", 0.0)):
            # Checked once an epoch (the sums are already on the host), before anything is saved.
            raise NonFiniteLoss(f"the training loss is {metrics['loss']} in epoch {epoch}: training diverged; "
                                f"lower optim.lr (now {cfg.optim.lr:g}) or check the data")
        metrics["pairs_per_s"] = self.steps * cfg.train.batch_size / elapsed
        metrics["epoch_time_s"] = elapsed
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["epoch"] = epoch
        metrics.update(usage)
        every = cfg.eval.every_epochs
        if self.rank == 0 and every and (epoch + 1) % every == 0 and epoch + 1 < cfg.train.epochs:
            metrics.update(quick_knn(cfg, self.method, self.data, self.device))
        return metrics

    def save(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log the epoch's metrics (rank 0) and report them with the epoch's checkpoint."""
        if self.rank == 0:
            if epoch > self.logged_through:
                self.outbox.log(metrics, step=epoch)
            _print_epoch(epoch, self.cfg.train.epochs, metrics)
        state = {
            "identity": self.cfg.identity(),
            "model": self.method.state_dict(),
            "extra": self.method.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "loaders": {k: l.state() for k, l in self.loaders.items() if k != "main"},
            "mlflow_run_id": self.run_id,
            "tracking_outbox": self.outbox.pending if self.outbox is not None else [],
        }
        _report_with_checkpoint(self.host, metrics, state, epoch)

    def finish(self, timing: dict[str, float]) -> None:
        """Rank 0 runs the downstream evaluation (or finds it logged by an earlier attempt);
        every worker reports the final result."""
        final: dict[str, Any] = {"epoch": self.cfg.train.epochs - 1}
        if self.rank == 0:
            client = self.client
            self.outbox.flush()  # every epoch's metrics are in the store before the evaluation is looked up
            done = tracking.logged_evaluation(client, self.run_id)
            if not export.has_encoders(client, self.run_id):  # before the evaluation marks the run done
                timing["export_time_s"] = export.log_encoders(client, self.run_id, self.cfg, self.method, self.data,
                                                              models=not self.sweep_trial)
            if done is not None:  # evaluated before a restart: report it, don't repeat it
                say("downstream evaluation already logged; not repeated")
                final.update(done)
            else:
                timing.update(tracking.training_cost(client, self.run_id))
                final.update(evaluate_and_log(self.cfg, self.method, self.data, client, self.run_id,
                                              self.device, extra=timing))
        self.host.report(final)


# [multi-node] --------------------------------------------------------------------------------
def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every worker, in rank order (one collective across the workers). A loop
    run outside Ray (a test, a notebook) is on no Ray node: it says ``local`` instead of asking
    for a runtime context, which would start a Ray instance just to name it."""
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    if world == 1:
        return [node]
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes
# -----------------------------------------------------------------------------------------------


def _startup_timing(spec: WorkerSpec, entered: float) -> dict[str, float]:
    """Under Ray Train, ``launch_time_s``: launch -> this module starts importing on the worker
    (Ray Train's controller, worker processes, process group); ``import_time_s``: -> training
    function entered. In a trial's own process the trial measured both itself (its actor's start
    and its imports: zero for a trial that Tune gave a reused, warm actor)."""
    if spec.import_time_s is not None:
        return {"launch_time_s": spec.launch_time_s or 0.0, "import_time_s": spec.import_time_s}
    out = {"import_time_s": max(entered - _IMPORTED_AT, 0.0)}
    if spec.launched_at is not None:
        out["launch_time_s"] = max(_IMPORTED_AT - spec.launched_at, 0.0)
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


def quick_knn(cfg: ExperimentConfig, method: Method, data: AVDataset, device: torch.device) -> dict[str, float]:
    """Cosine-kNN accuracy on h during pretraining, on the validation split (for schedulers that
    stop weak trials early: they choose, so they never read the test split)."""
    result = run_downstream(method, train_set=data.pool("train"), test_set=data.pool("val"),
                            cfg=quick_probe_config(cfg.eval), device=device, prefix=VALIDATION_PREFIX)
    return dict(result.metrics)


def evaluate_and_log(
    cfg: ExperimentConfig,
    method: Method,
    data: AVDataset,
    client: MlflowClient,
    run_id: str,
    device: torch.device,
    extra: dict[str, float] | None = None,
) -> dict[str, float]:
    """Downstream evaluation on frozen features (docs/spec.md §6); logs metrics and confusion matrices,
    with ``extra`` (the run's cost) in the same batch."""
    t0 = time.perf_counter()
    result = evaluate_splits(method, data, cfg.eval, device=device, val="val")
    metrics = dict(result.metrics)
    if len(data.pool("transfer_train")) > 0 and len(data.pool("transfer_test")) > 0:
        # The transfer split has no folds (nor a validation split of its own): under `folds` it
        # gets the validation protocol, on rows carved from transfer_train.
        transfer = evaluate_splits(method, data, held_out_config(cfg.eval), train="transfer_train",
                                   test="transfer_test", device=device, prefix=TRANSFER_PREFIX)
        metrics.update(transfer.metrics)
        result.unconverged += transfer.unconverged
    if cfg.eval.val_metrics:
        # The same probes scored on the validation split: what a choice reads (never the test numbers).
        val = evaluate_splits(method, data, held_out_config(cfg.eval), test="val", device=device,
                              prefix=VALIDATION_PREFIX, val="val")
        metrics.update(val.metrics)
        result.unconverged += val.unconverged
    if result.unconverged:
        # Numbers of a half-fitted classifier: said on the console and tagged on the run.
        names = ", ".join(result.unconverged)
        say(f"warning: {len(result.unconverged)} probe(s) stopped at their max_iter before converging "
            f"(raise eval.linear_max_iter / eval.svm_max_iter): {names}")
        tracking.set_tags(client, run_id, {"probes_not_converged": names[:4000]})
    metrics.update(extra or {})
    metrics["eval_time_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="avlab-plots-") as plots:
        result.write_figures(data.class_names, plots)
        client.log_artifacts(run_id, plots, "plots")
    # eval_time_s arrives with the metrics, last: a run that has it has finished its evaluation.
    tracking.log_metrics(client, run_id, metrics, step=max(cfg.train.epochs - 1, 0))
    summary = ", ".join(f"{k}={metrics[k]:.3f}" for k in (*HEADLINE_METRICS, *OPTIONAL_HEADLINE_METRICS) if k in metrics)
    say(f"downstream: {summary}")
    return metrics
