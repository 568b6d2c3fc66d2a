"""How much memory a run needs, estimated before anything starts.

A config can ask for more than any machine holds (``method.memory_size=1e9`` is a terabyte of
memory slots; ``train.batch_size=1e7`` or ``base_width=1e5`` likewise). The method is built on
PyTorch's meta device, which records shapes and allocates nothing, and its encoders run one
per-worker batch there, so the estimate costs a fraction of a second whatever the sizes:

- parameters, their gradients and the optimiser's state (Adam: two moments; SGD: one buffer);
- buffers (memory banks, AVID's bank rows);
- the activations kept for the backward pass: every encoder layer's output for one worker's
  batch, counted once per encoder pass of a training step (BMA-Memory encodes the paired batch
  and two views of each unpaired pool).

The estimate is a lower bound (no allocator slack, no framework overhead), so a run it refuses
cannot fit; the error names the field that dominates the footprint.

Building the encoders imports torchvision, which costs seconds on a small machine before anything
runs; an estimate is therefore kept in avlab's user cache (``jobs.user_cache_dir()``), keyed by
the fields it reads and by the source of the code that computes it, and reused by the next command
with the same model, data shapes and batch. A manifest's shapes come from its files, so a run on
real data is always estimated afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from methods.data import dataset_info
from methods.registry import METHODS, build_method
from orchestrator import jobs
from orchestrator.config import ExperimentConfig
from orchestrator.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class Footprint:
    """Bytes one training worker needs, by term and by the config field that drives them."""

    parameters: int  # weights + gradients + optimiser state
    buffers: int
    activations: int
    by_field: dict[str, int]

    @property
    def total(self) -> int:
        return self.parameters + self.buffers + self.activations

    @property
    def dominant_field(self) -> str:
        return max(self.by_field, key=self.by_field.get)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _activation_bytes(encoder: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Sum of every leaf module's output for one meta batch of ``shape``."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += _tensor_bytes(output)

    # An in-place layer (ReLU(inplace=True)) writes over its input: no new memory.
    handles = [m.register_forward_hook(hook) for m in encoder.modules()
               if not list(m.children()) and not getattr(m, "inplace", False)]
    try:
        encoder(torch.empty(shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


def estimate(cfg: ExperimentConfig) -> Footprint:
    """The memory one training worker of ``cfg`` needs (see the module docstring)."""
    info = dataset_info(cfg.data)
    with torch.device("meta"):
        method = build_method(cfg.method_name, cfg.method, info)
    by_field: dict[str, int] = {}
    field_of = METHODS[cfg.method_name].method_cls.size_fields  # the method says what sizes its tensors

    def add(name: str, n: int) -> None:
        field = next((field_of[part] for part in name.split(".") if part in field_of), "method")
        by_field[field] = by_field.get(field, 0) + n

    # Weights and gradients, plus Adam's two moments or SGD's momentum buffer.
    per_weight = 2 + (2 if cfg.optim.name in ("adam", "adamw") else 1)
    parameters = 0
    for name, p in method.named_parameters():
        parameters += per_weight * _tensor_bytes(p)
        add(name, per_weight * _tensor_bytes(p))
    buffers = 0
    for name, b in method.named_buffers():
        buffers += _tensor_bytes(b)
        add(name, _tensor_bytes(b))

    workers = cfg.resources.workers
    batch = max(cfg.train.batch_size // workers, 1)
    unpaired_batch = max((cfg.train.unpaired_batch_size or cfg.train.batch_size) // workers, 1)
    uses_unpaired = METHODS[cfg.method_name].method_cls.uses_unpaired
    shapes = {"E_v": ((info.image_channels, info.image_size, info.image_size), info.unpaired_image_size),
              "E_s": ((info.sound_channels, info.n_mels, info.n_frames), info.unpaired_sound_size)}
    activations = 0
    method.train()
    for name, (sample_shape, unpaired_size) in shapes.items():
        encoder = getattr(method, name, None)
        if not isinstance(encoder, torch.nn.Module):
            continue
        # Activations grow linearly with the batch; BatchNorm in training mode refuses a batch of
        # one (a run with epochs=0 may have one), so a batch of two is measured and scaled.
        probe = max(batch, 2)
        nbytes = _activation_bytes(encoder, (probe, *sample_shape)) * batch // probe
        if cfg.train.precision == "bf16":
            nbytes //= 2  # autocast keeps the layers' outputs in bfloat16
        if uses_unpaired and unpaired_size > 0:
            nbytes += 2 * nbytes * unpaired_batch // batch  # two views of the unpaired pool
        activations += nbytes
        by_field["train.batch_size"] = by_field.get("train.batch_size", 0) + nbytes
    return Footprint(parameters=parameters, buffers=buffers, activations=activations, by_field=by_field)


def _code_fingerprint() -> str:
    """A hash of the source that an estimate depends on: the methods and this module."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted([*(root / "methods").rglob("*.py"), Path(__file__).resolve()]):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _cache_path(cfg: ExperimentConfig) -> Path | None:
    """Where ``cached_estimate`` keeps ``cfg``'s estimate; None for a run on a manifest."""
    if cfg.data.manifest:
        return None
    plain = cfg.to_dict()
    inputs = {"code": _code_fingerprint(), "method_name": cfg.method_name, "method": plain["method"],
              "data": {k: v for k, v in plain["data"].items() if k != "seed"},  # sizes, not which items
              "batch_size": cfg.train.batch_size,
              "unpaired_batch_size": cfg.train.unpaired_batch_size, "precision": cfg.train.precision,
              "optim": cfg.optim.name, "workers": cfg.resources.workers}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return jobs.user_cache_dir() / "footprint" / f"{key}.json"


def cached_estimate(cfg: ExperimentConfig) -> Footprint:
    """``estimate(cfg)``, read from avlab's user cache when the same inputs were estimated before
    (see the module docstring); a cache that cannot be read or written is passed by."""
    path = _cache_path(cfg)
    if path is not None:
        try:
            fp = Footprint(**json.loads(path.read_text()))
            if all(type(n) is int for n in (fp.parameters, fp.buffers, fp.activations, *fp.by_field.values())):
                return fp
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    fp = estimate(cfg)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
                json.dump(asdict(fp), tmp)
            os.replace(tmp.name, path)
        except OSError:
            pass
    return fp


def check_fits(cfg: ExperimentConfig, *, per_worker_bytes: int, where: str) -> Footprint:
    """Refuse ``cfg`` (ConfigError naming the dominant field and the estimate) when one worker
    needs more than ``per_worker_bytes``, the memory it can have ``where``."""
    fp = cached_estimate(cfg)
    if fp.total > per_worker_bytes:
        raise ConfigError(
            f"{fp.dominant_field}: the run needs at least {fp.total / GIB:.1f} GiB per worker (weights, gradients "
            f"and optimiser state {fp.parameters / GIB:.1f}, buffers {fp.buffers / GIB:.1f}, activations "
            f"{fp.activations / GIB:.1f}) and {where} has {per_worker_bytes / GIB:.1f} GiB per worker"
        )
    return fp


def machine_memory() -> int:
    """This machine's memory in bytes, or its container's limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit_file).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def local_budget(cfg: ExperimentConfig) -> tuple[int, str]:
    """Memory per worker on this machine: a GPU's with ``resources.gpu``, else the RAM, shared by
    the workers."""
    if cfg.resources.gpu and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "this machine's GPU"
    return machine_memory() // cfg.resources.workers, "this machine"
