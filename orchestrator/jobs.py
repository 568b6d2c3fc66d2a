"""What ``avlab resume NAME`` needs to continue a run or a sweep: one JSON file per name.

``avlab run`` and ``avlab sweep`` write ``<home>/jobs/<NAME>.json`` once their MLflow run exists
and before any compute starts: the resolved config (or the whole search space), the MLflow run
id, the tracking URI and the Ray address. Ray's own state (the Tune experiment, the trainers'
checkpoint snapshots) lives under ``<home>/ray`` by the same name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FORMAT = 1


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
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    path = manifest_path(home, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # Key order kept: a search space's variants and grid keys come back in the order they were given.
    tmp.write_text(json.dumps({"format": FORMAT, "name": name, **manifest}, indent=2))
    os.replace(tmp, path)
    return path


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
    return manifest
