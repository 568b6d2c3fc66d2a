"""Training checkpoints: one file of state plus a manifest that proves the file is whole.

A checkpoint directory holds ``checkpoint.pt`` (everything a worker needs to continue: model,
optimiser, LR schedule, method state, RNG states of every rank, epoch, step, data-sampler
positions, MLflow run id) and ``checkpoint.json`` (format, epoch, size and SHA-256 of the state
file). The manifest is written last, each file through a temporary name and ``os.replace``, so a
directory without a manifest, or whose state file does not match it, is a half-written or
damaged checkpoint and is never loaded as a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "checkpoint.pt"
MANIFEST_FILE = "checkpoint.json"
FORMAT = 1
DIR_PATTERN = re.compile(r"^checkpoint_epoch(\d+)$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file."""


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


def save(directory: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` and its manifest into ``directory``; return the state file's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    _atomic_write_bytes(path, lambda f: torch.save(state, f))
    manifest = {"format": FORMAT, "epoch": state.get("epoch"), "bytes": path.stat().st_size, "sha256": _sha256(path)}
    _atomic_write_bytes(directory / MANIFEST_FILE, lambda f: f.write(json.dumps(manifest).encode()))
    return path


def load(directory: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint directory, or raise ``CheckpointError`` naming the damaged file."""
    directory = Path(directory)
    path, manifest_path = directory / STATE_FILE, directory / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: missing (the checkpoint was not completely written)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: unknown checkpoint format {manifest!r}")
    try:
        size = path.stat().st_size
    except OSError:
        raise CheckpointError(f"{path}: missing") from None
    if size != manifest.get("bytes"):
        raise CheckpointError(f"{path}: truncated or changed ({size} bytes, the manifest says {manifest.get('bytes')})")
    if _sha256(path) != manifest.get("sha256"):
        raise CheckpointError(f"{path}: damaged (SHA-256 does not match its manifest)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("model", "optimizer", "epoch", "rng", "loaders") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}")
    return state


def epoch_of(name: str) -> int | None:
    match = DIR_PATTERN.match(name)
    return int(match.group(1)) if match else None


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
