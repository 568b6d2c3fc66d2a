"""Job records: what ``avlab resume``, ``stop`` and ``status`` need to find a run or a sweep
again, one JSON file per name, ``<home>/jobs/<NAME>.json``.

``avlab run`` and ``avlab sweep`` claim the name, then write the record once their MLflow run
exists and before any compute starts: the resolved config (or the whole search space), the
MLflow run id, the tracking URI, the Ray address and the driver. Ray's own state (the Tune
experiment, the trainers' checkpoint snapshots) lives under ``<home>/ray`` by the same name.
Reading, writing, the format check and a moved home's paths are all here (``JobRecord``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.drivers import check_entry, driver_entry, is_live_driver
from orchestrator.errors import ConfigError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FORMAT = 1
# The file's keys that a record needs, by kind (the MLflow run's key differs: a sweep's is its parent run).
REQUIRED = {
    "run": {"tracking_uri": str, "mlflow_run_id": str, "config": dict},
    "sweep": {"tracking_uri": str, "parent_run_id": str, "space": dict, "max_concurrent": int},
}


@dataclass(frozen=True)
class JobRecord:
    """One job file, read and checked: a run (``config``) or a sweep (``space``, ``max_concurrent``,
    ``reuse_trials``). ``run_id`` is the run's MLflow run, or the sweep's parent run."""

    kind: str
    name: str
    run_id: str
    tracking_uri: str
    config: dict[str, Any] | None = None
    space: dict[str, Any] | None = None
    max_concurrent: int = 1
    reuse_trials: bool = False
    reuse_any_environment: bool = False
    address: str | None = None
    storage: str | None = None
    home: str | None = None
    driver: dict[str, Any] | None = None
    dry_run_s: float | None = None  # a sweep's --dry-run seconds (``orchestrator.dry_run``)

    @classmethod
    def from_json(cls, data: Any, path: Path) -> JobRecord:
        """The record a job file holds; ConfigError naming ``path`` for anything else."""
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("kind") not in REQUIRED:
            raise ConfigError(f"{path}: not an avlab job file (format {FORMAT}, kind run or sweep)")
        if data.get("reserved"):
            pid = (data.get("driver") or {}).get("pid") if isinstance(data.get("driver"), dict) else None
            raise ConfigError(f"{path}: {data.get('name')} is being created by another avlab command (pid {pid}) "
                              "and has no MLflow run yet; try again once it has started")
        kind = data["kind"]
        wrong = [key for key, typ in REQUIRED[kind].items() if type(data.get(key)) is not typ]
        if wrong:
            raise ConfigError(f"{path}: damaged avlab job file ({', '.join(wrong)} missing or of the wrong type)")
        return cls(
            kind=kind,
            name=data.get("name") if isinstance(data.get("name"), str) else path.stem,
            run_id=data["mlflow_run_id" if kind == "run" else "parent_run_id"],
            tracking_uri=data["tracking_uri"],
            config=data.get("config") if kind == "run" else None,
            space=data.get("space") if kind == "sweep" else None,
            max_concurrent=data.get("max_concurrent", 1) if kind == "sweep" else 1,
            reuse_trials=bool(data.get("reuse_trials", False)),
            reuse_any_environment=bool(data.get("reuse_any_environment", False)),  # absent in older files
            address=data.get("address"),
            storage=data.get("storage") if isinstance(data.get("storage"), str) else None,
            home=data.get("home") if isinstance(data.get("home"), str) else None,
            driver=data.get("driver"),
            dry_run_s=_seconds(data.get("dry_run_s"), path) if kind == "sweep" else None,
        )

    def to_json(self) -> dict[str, Any]:
        """The file's content (format 1: the keys that job files have always had)."""
        out: dict[str, Any] = {"format": FORMAT, "name": self.name, "kind": self.kind}
        if self.kind == "run":
            out.update(config=self.config, mlflow_run_id=self.run_id)
        else:
            out.update(space=self.space, parent_run_id=self.run_id, max_concurrent=self.max_concurrent,
                       reuse_trials=self.reuse_trials)
            if self.reuse_any_environment:  # written only when set: files stay as they were otherwise
                out["reuse_any_environment"] = True
            if self.dry_run_s is not None:
                out["dry_run_s"] = self.dry_run_s
        out.update(tracking_uri=self.tracking_uri, address=self.address, storage=self.storage, driver=self.driver,
                   home=self.home)
        return out

    def with_driver(self) -> JobRecord:
        """This record, driven by this process from now on (what `avlab stop` signals)."""
        return dataclasses.replace(self, driver=driver_entry())


def _seconds(value: Any, path: Path) -> float | None:
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 <= value <= 86400:
        raise ConfigError(f"{path}: damaged avlab job file (dry_run_s: {value!r} is not 0 to 86400 seconds)")
    return float(value)


def user_cache_dir() -> Path:
    """avlab's per-user cache, ``$XDG_CACHE_HOME/avlab`` (``~/.cache/avlab``): files derived from
    the installed code alone (an empty MLflow store, footprint estimates), never results."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "avlab"


def check_name(name: str, field: str) -> None:
    """Names become folder names under the Ray storage path: letters, digits, '.', '_', '-'."""
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"{field}: {name!r} is not a valid name; use letters, digits, '.', '_' and '-' "
                          "(starting with a letter or digit, at most 128 characters)")


def job_path(home: Path, name: str) -> Path:
    """Where the record of job ``name`` lives in ``home``."""
    return home / "jobs" / f"{name}.json"


def exists(home: Path, name: str) -> bool:
    return job_path(home, name).exists()


def write(home: Path, record: JobRecord) -> Path:
    """Write atomically: a crash leaves the old file or the new one, never half of one. The file
    records the home it was written in, so that a copy of the home finds its own store."""
    path = job_path(home, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    # Key order kept: a search space's variants and grid keys come back in the order they were given.
    tmp.write_text(json.dumps(dataclasses.replace(record, home=str(home)).to_json(), indent=2))
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
    path = job_path(home, name)
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


def follow_home(record: JobRecord, home: Path) -> JobRecord:
    """A record of a home that was copied or moved: its store and its checkpoints are the ones
    in ``home``, not the original home's, when they lay in the home that wrote the file.

    Where the job was written is its ``home`` entry or, in a job file that has none, the folder
    that its default ``storage`` (``<home>/ray``) names; a store or storage elsewhere (a shared
    folder, a tracking server) is left as it is."""
    origin, storage = record.home, record.storage
    if origin is None and storage is not None and storage.endswith("/ray"):
        origin = storage.removesuffix("/ray")
    if origin is None or Path(origin) == home:
        return record
    moved: dict[str, Any] = {"home": str(home)}
    if record.tracking_uri == f"sqlite:///{Path(origin) / 'mlflow.db'}":
        moved["tracking_uri"] = f"sqlite:///{home / 'mlflow.db'}"
    if storage == str(Path(origin) / "ray"):
        moved["storage"] = str(home / "ray")
    return dataclasses.replace(record, **moved)


def load(path: Path) -> JobRecord:
    """The record in the job file ``path``; ConfigError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    return JobRecord.from_json(data, path)


def read(home: Path, name: str) -> JobRecord:
    """The record of job ``name`` in ``home``, its paths following a moved home."""
    path = job_path(home, name)
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.exists() else []
        hint = f"; known: {', '.join(known[-10:])}" if known else ""
        raise ConfigError(f"NAME: no run or sweep named {name!r} in {home}{hint}")
    return follow_home(load(path), home)
