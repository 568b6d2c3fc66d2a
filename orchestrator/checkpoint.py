"""Training checkpoints: one file of state plus a checksum file that proves the file is whole.

A checkpoint directory holds ``checkpoint.pt`` (everything a worker needs to continue: model,
optimiser, LR schedule, method state, RNG states of every rank, epoch, step, data-sampler
positions, MLflow run id) and ``checkpoint.json`` (format, epoch, size and SHA-256 of the state
file). The checksum file is written last, each file through a temporary name and ``os.replace``, so a
directory without a checksum file, or whose state file does not match it, is a half-written or
damaged checkpoint and is never loaded as a whole one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import posixpath
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import ray.train

STATE_FILE = "checkpoint.pt"
CHECKSUM_FILE = "checkpoint.json"
FORMAT = 1
DIR_PATTERN = re.compile(r"^checkpoint_epoch(\d+)$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used, or written; the message names the file or folder."""


def dir_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:05d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# A file system that cannot take the checkpoint now will not take it on an immediate retry either.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _no_room(exc: BaseException) -> OSError | None:
    """The "no space left" (or quota, or file-size limit) error behind ``exc``, if any: torch
    reports a failed write of its archive as a RuntimeError whose context is the OSError."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def save(directory: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` and its checksum file into ``directory``; return the state file's path.

    A write that fails removes what it wrote (and ``directory`` if it made it), so no half-written
    checkpoint stays behind; a full disk (or quota, or file-size limit) is a ``CheckpointError``
    in one line naming the folder, which a retry would raise again until space is freed."""
    directory = Path(directory)
    made = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    try:
        _atomic_write_bytes(path, lambda f: torch.save(state, f))
        checksums = {"format": FORMAT, "epoch": state.get("epoch"), "bytes": path.stat().st_size,
                    "sha256": _sha256(path)}
        _atomic_write_bytes(directory / CHECKSUM_FILE, lambda f: f.write(json.dumps(checksums).encode()))
    except BaseException as exc:
        _remove_partial(directory, made)
        cause = _no_room(exc)
        if cause is None:
            raise
        raise CheckpointError(f"{directory}: checkpoint not written ({cause.strerror}); its partial files "
                              f"were removed") from None
    return path


def _remove_partial(directory: Path, made: bool) -> None:
    """Remove what a failed ``save`` wrote into ``directory``, and the folder if ``save`` made it."""
    if made:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for name in (STATE_FILE, CHECKSUM_FILE, STATE_FILE + ".tmp", CHECKSUM_FILE + ".tmp"):
        with contextlib.suppress(OSError):
            (directory / name).unlink()


def load(directory: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint directory, or raise ``CheckpointError`` naming the damaged file."""
    directory = Path(directory)
    path, checksum_path = directory / STATE_FILE, directory / CHECKSUM_FILE
    try:
        checksums = json.loads(checksum_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{checksum_path}: missing (the checkpoint was not completely written)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{checksum_path}: unreadable ({exc})") from None
    if not isinstance(checksums, dict) or checksums.get("format") != FORMAT:
        raise CheckpointError(f"{checksum_path}: unknown checkpoint format {checksums!r}")
    try:
        size = path.stat().st_size
    except OSError:
        raise CheckpointError(f"{path}: missing") from None
    if size != checksums.get("bytes"):
        raise CheckpointError(f"{path}: truncated or changed ({size} bytes, the checksum file says {checksums.get('bytes')})")
    if _sha256(path) != checksums.get("sha256"):
        raise CheckpointError(f"{path}: damaged (SHA-256 does not match its checksum file)")
    try:
        state = _load_weights_only(path, map_location)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing here
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: not a loadable avlab checkpoint ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(state).__name__}, not a dict)")
    missing = [k for k in ("model", "optimizer", "epoch", "rng", "loaders") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}")
    problem = _shape_problem(state)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return state


def _shape_problem(state: dict[str, Any]) -> str:
    """What is wrong with the types of a checkpoint's fields, or "" when they are what avlab
    writes: the right keys with garbage values must fail here, not inside a training worker."""
    model = state["model"]
    if not isinstance(model, dict) or not model:
        return "'model' is not a non-empty mapping of tensor names to tensors"
    bad = next((k for k, v in model.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        return f"'model' entry {bad!r} is not a named tensor"
    if not all(v.is_floating_point() or v.dtype in (torch.int64, torch.int32, torch.bool) for v in model.values()):
        return "'model' holds tensors of an unexpected dtype"
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        return f"'epoch' is {epoch!r}, not a non-negative integer"
    for key, kind in (("optimizer", dict), ("rng", list), ("loaders", dict)):
        if not isinstance(state[key], kind):
            return f"{key!r} is of type {type(state[key]).__name__}, not {kind.__name__}"
    return ""


def _load_weights_only(path: Path, map_location: Any) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, containers and numbers only, so a
    checkpoint from elsewhere cannot run code when it is read (the checksum file cannot vouch for
    that: whoever writes the file writes its checksum file)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "numpy" not in str(exc):
            raise
    # Checkpoints written before the numpy RNG state became a tensor hold one uint32 array: allow
    # exactly what rebuilds a plain numeric array, nothing that runs code.
    import numpy as np

    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


def epoch_of(name: str) -> int | None:
    match = DIR_PATTERN.match(name)
    return int(match.group(1)) if match else None


def init_checkpoint(init_from: str, home: Path) -> str:
    """The verified checkpoint folder that ``train.init_from`` names, as a string ("" for none)."""
    return str(resolve_init(init_from, home)) if init_from else ""


def resolve_init(value: str, home: Path) -> Path:
    """The checkpoint folder that ``train.init_from`` names, verified: the name of a run under
    ``<home>/ray`` (its newest usable checkpoint), a run's folder, a checkpoint folder, or its
    ``checkpoint.pt``. Raises ``ConfigError`` naming the field before any compute starts."""
    from orchestrator.config import ConfigError

    path = Path(value).expanduser()
    if path.is_file():
        candidates = [path.parent]
    elif (path / STATE_FILE).exists():
        candidates = [path]
    else:
        from orchestrator.tracking import storage_root

        # Runs are found by name in a local storage root; with s3:// storage give a local copy.
        root = storage_root(home)
        runs = Path(root) if "://" not in root else home / "ray"
        run_dir = path if path.is_dir() else runs / value
        candidates = sorted((p for p in run_dir.glob("checkpoint_epoch*") if epoch_of(p.name) is not None),
                            key=lambda p: epoch_of(p.name), reverse=True) if run_dir.is_dir() else []
        if not candidates:
            raise ConfigError(f"train.init_from: {value!r} is neither a checkpoint nor a run with checkpoints "
                              f"in {runs}")
    errors = []
    for directory in candidates:
        try:
            load(directory)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        return directory.resolve()
    raise ConfigError(f"train.init_from: no usable checkpoint: {'; '.join(errors)}")


def matching_weights(own: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """The tensors of ``weights`` that ``own`` (a state_dict) has under the same name and shape."""
    return {k: v for k, v in weights.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}


def state_file(directory: str) -> str:
    """The state file of the checkpoint ``directory`` (a storage path), as progress lines name it."""
    return posixpath.join(directory, STATE_FILE)


def load_latest(checkpoint: ray.train.Checkpoint, device: torch.device, *,
                warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The newest readable checkpoint: the run's latest, else the previous ones kept beside it.

    A damaged checkpoint is reported through ``warn`` (naming the file) and skipped; if none is
    readable the run stops rather than silently starting over. The state carries ``_dir`` (the
    checkpoint used) and ``_skipped`` (what was wrong with the newer ones)."""
    import pyarrow.fs
    import ray.train

    fs, latest = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, latest_name = posixpath.split(latest)
    candidates = [latest]
    latest_epoch = epoch_of(latest_name)
    if latest_epoch is not None:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(parent))
        older = [
            (epoch_of(i.base_name), i.path)
            for i in infos
            if i.type == pyarrow.fs.FileType.Directory and epoch_of(i.base_name) is not None
        ]
        candidates += [path for epoch, path in sorted(older, reverse=True) if epoch < latest_epoch]
    errors = []
    for path in candidates:
        with ray.train.Checkpoint(path, filesystem=fs).as_directory() as local:
            try:
                state = load(local, map_location=device)
            except CheckpointError as exc:
                # Name the file where it lives in storage, not in a temporary download.
                message = str(exc).replace(str(local), path)
                errors.append(message)
                if warn is not None:
                    warn(f"WARNING: unusable checkpoint: {message}; trying the previous one")
                continue
        state["_dir"], state["_skipped"] = path, errors
        return state
    # Every checkpoint is damaged: a retry would read the same files, so the run fails once.
    raise CheckpointError(f"no usable checkpoint in {parent}: " + "; ".join(errors))


def initialise_from(method: torch.nn.Module, directory: str, device: torch.device) -> tuple[int, int]:
    """``train.init_from``: copy every tensor of the checkpoint in ``directory`` whose name and
    shape match ``method``'s (encoders, heads), then let the method recompute what depends on
    them (``after_initialise_from``); returns (tensors copied, tensors of the method)."""
    own = method.state_dict()
    matched = matching_weights(own, load(directory, map_location=device)["model"])
    if not matched:
        raise RuntimeError(f"train.init_from: {directory} shares no weights with method {method.name}")
    method.load_state_dict(matched, strict=False)
    method.after_initialise_from()
    return len(matched), len(own)
