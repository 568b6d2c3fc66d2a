"""What ``avlab resume NAME`` needs to continue a run or a sweep: one JSON file per name.

``avlab run`` and ``avlab sweep`` write ``<home>/jobs/<NAME>.json`` once their MLflow run exists
and before any compute starts: the resolved config (or the whole search space), the MLflow run
id, the tracking URI and the Ray address. Ray's own state (the Tune experiment, the trainers'
checkpoint snapshots) lives under ``<home>/ray`` by the same name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.drivers import check_entry, driver_entry, is_live_driver
from orchestrator.errors import ConfigError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FORMAT = 1
# What `resume`, `stop` and `status` read of a job file, by kind.
REQUIRED_RUN = {"mlflow_run_id": str, "config": dict}
REQUIRED_SWEEP = {"parent_run_id": str, "space": dict, "max_concurrent": int}


def user_cache_dir() -> Path:
    """avlab's per-user cache, ``$XDG_CACHE_HOME/avlab`` (``~/.cache/avlab``): files derived from
    the installed code alone (an empty MLflow store, footprint estimates), never results."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "avlab"


def check_name(name: str, field: str) -> None:
    """Names become folder names under the Ray storage path: letters, digits, '.', '_', '-'."""
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"{field}: {name!r} is not a valid name; use letters, digits, '.', '_' and '-' "
                          "(starting with a letter or digit, at most 128 characters)")


def manifest_path(home: Path, name: str) -> Path:
    return home / "jobs" / f"{name}.json"


def exists(home: Path, name: str) -> bool:
    return manifest_path(home, name).exists()


def write(home: Path, name: str, manifest: dict[str, Any]) -> Path:
    """Write atomically: a crash leaves the old file or the new one, never half of one. The file
    records the home it was written in, so that a copy of the home finds its own store."""
    path = manifest_path(home, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    # Key order kept: a search space's variants and grid keys come back in the order they were given.
    tmp.write_text(json.dumps({"format": FORMAT, "name": name, **manifest, "home": str(home)}, indent=2))
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def reserved(home: Path, name: str, kind: str, field: str) -> Iterator[None]:
    """Claim ``name`` for a new job before its MLflow run is created, so that of two commands
    given one name, one starts and the other stops with one line naming ``field``.

    The claim is the job file itself, created exclusively (``O_EXCL``), holding the kind and this
    driver only; ``write`` replaces it with the whole job file once the MLflow run exists. When
    the block fails before that, the claim is withdrawn. A claim whose driver is gone (killed
    between the two) does not block the name."""
    path = manifest_path(home, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = {"format": FORMAT, "name": name, "kind": kind, "reserved": True, "driver": driver_entry()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            if not _stale_claim(path):
                raise ConfigError(f"{field}: a run or sweep named {name!r} already exists in {home}; "
                                  f"`avlab resume {name}` continues it, or choose another name") from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    else:
        raise ConfigError(f"{field}: another avlab command is creating {name!r} in {home}; choose another name")
    with os.fdopen(fd, "w") as out:
        json.dump(claim, out)
    try:
        yield
    except BaseException:
        if _claim_of_this_process(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stale_claim(path: Path) -> bool:
    """A claim left by a command that died before it created its MLflow run."""
    claim = _load(path)
    if not isinstance(claim, dict) or not claim.get("reserved"):
        return False
    try:
        return not is_live_driver(check_entry(claim.get("driver"), path))
    except ConfigError:
        return False


def _claim_of_this_process(path: Path) -> bool:
    claim = _load(path)
    return isinstance(claim, dict) and bool(claim.get("reserved")) and \
        (claim.get("driver") or {}).get("pid") == os.getpid()


def follow_home(manifest: dict[str, Any], home: Path) -> dict[str, Any]:
    """A job file of a home that was copied or moved: its store and its checkpoints are the ones
    in ``home``, not the original home's, when they lay in the home that wrote the file.

    Where the job was written is its ``home`` entry or, in a job file that has none, the folder
    that its default ``storage`` (``<home>/ray``) names; a store or storage elsewhere (a shared
    folder, a tracking server) is left as it is."""
    origin = manifest.get("home")
    storage = manifest.get("storage")
    if origin is None and isinstance(storage, str) and storage.endswith("/ray"):
        origin = storage.removesuffix("/ray")
    if not isinstance(origin, str) or Path(origin) == home:
        return manifest
    moved = dict(manifest)
    if manifest.get("tracking_uri") == f"sqlite:///{Path(origin) / 'mlflow.db'}":
        moved["tracking_uri"] = f"sqlite:///{home / 'mlflow.db'}"
    if storage == str(Path(origin) / "ray"):
        moved["storage"] = str(home / "ray")
    moved["home"] = str(home)
    return moved


def read(home: Path, name: str) -> dict[str, Any]:
    path = manifest_path(home, name)
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.exists() else []
        hint = f"; known: {', '.join(known[-10:])}" if known else ""
        raise ConfigError(f"NAME: no run or sweep named {name!r} in {home}{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("kind") not in ("run", "sweep"):
        raise ConfigError(f"{path}: not an avlab job file (format {FORMAT}, kind run or sweep)")
    if manifest.get("reserved"):
        pid = (manifest.get("driver") or {}).get("pid")
        raise ConfigError(f"{path}: {name} is being created by another avlab command (pid {pid}) and has no MLflow "
                          "run yet; try again once it has started")
    needed = {"tracking_uri": str, **(REQUIRED_RUN if manifest["kind"] == "run" else REQUIRED_SWEEP)}
    wrong = [key for key, kind in needed.items() if type(manifest.get(key)) is not kind]
    if wrong:
        raise ConfigError(f"{path}: damaged avlab job file ({', '.join(wrong)} missing or of the wrong type)")
    return follow_home(manifest, home)
