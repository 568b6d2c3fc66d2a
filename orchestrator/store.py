"""The avlab home's SQLite MLflow store: created under a lock from a migrated template, opened
with a clear error for a file that is not a store (re-exported by ``orchestrator.tracking``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator import jobs
from orchestrator.errors import ConfigError


def prepare_store(uri: str) -> None:
    """Create the SQLite store of ``uri`` (if it is one) under a file lock beside it: two avlab
    commands that create one fresh store at once otherwise race in MLflow's schema migration.

    A new store starts as a copy of an empty store that MLflow migrated once for its version
    (``empty_store_template``): its schema migration takes about 3 s on two cores, the copy
    milliseconds. MLflow adds the default experiment, with this store's artifact root, on open."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with _locked(db.with_name(db.name + ".lock")):
        if not db.exists() or db.stat().st_size == 0:
            template = empty_store_template()
            if template is not None:
                tmp = db.with_name(f".{db.name}.tmp-{os.getpid()}")
                shutil.copyfile(template, tmp)
                os.replace(tmp, db)
        open_store(uri)  # creates and migrates the tables if new


def open_store(uri: str, *, wait_s: float = 60.0, quiet_s: float = 2.0) -> MlflowClient:
    """An MLflow client of ``uri`` whose store MLflow has opened (and, if new, migrated).

    A SQLite file that is not an MLflow store (damaged, or another program's) is a ConfigError
    naming the file, before anything runs; the file is left as it is. avlab's own commands create
    a store under a lock (``prepare_store``), but a plain MLflow client or server takes none: when
    one migrates the same new store at this moment, a second migration here trips over the
    other's half-made schema, in ways as many as the migration has steps ("table ... already
    exists", "no such index ...", alembic's "expected to match one row"). So a store whose schema
    is not at the installed MLflow's version while its file is being written (changed in the last
    ``quiet_s`` seconds) is first left to go quiet, and a failed open of such a file is tried
    again, every half second for up to ``wait_s`` seconds; a file nobody writes fails at once, and
    a migrated store (one a running sweep writes, say) opens without waiting."""
    from sqlalchemy.exc import DatabaseError

    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    deadline = time.monotonic() + wait_s

    def migrating() -> bool:
        return (db is not None and time.monotonic() < deadline and _written_within(db, quiet_s)
                and not _at_head(db))

    while migrating():
        time.sleep(0.5)
    while True:
        try:
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
            return client
        except Exception as exc:
            if migrating():
                time.sleep(0.5)
                continue
            if not isinstance(exc, DatabaseError):
                raise
            cause = str(getattr(exc, "orig", exc)).strip().splitlines()
            line = cause[0] if cause else type(exc).__name__
            raise ConfigError(f"{db or uri}: not an MLflow store that avlab can open ({line})") from None


def _at_head(db: Path) -> bool:
    """Whether the SQLite store ``db`` records the installed MLflow's newest schema version (True
    when that version cannot be read from MLflow: a store is then never waited for)."""
    import sqlite3

    try:
        from alembic.script import ScriptDirectory
        from mlflow.store.db.utils import _get_alembic_config

        head = ScriptDirectory.from_config(_get_alembic_config(f"sqlite:///{db}")).get_current_head()
    except Exception:
        return True
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=1)) as con:
            return con.execute("SELECT version_num FROM alembic_version").fetchall() == [(head,)]
    except Exception:  # no such table, not a database, locked: not (yet) a migrated store
        return False


def _written_within(path: Path, seconds: float) -> bool:
    """Whether ``path`` (or its SQLite journal) changed in the last ``seconds``."""
    now = time.time()
    for candidate in (path, path.with_name(path.name + "-journal"), path.with_name(path.name + "-wal")):
        try:
            if now - candidate.stat().st_mtime < seconds:
                return True
        except OSError:
            pass
    return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def empty_store_template() -> Path | None:
    """An empty MLflow SQLite store at the schema of the installed MLflow, without the default
    experiment (whose artifact location names the folder it was made in), kept under
    ``$XDG_CACHE_HOME/avlab`` (``~/.cache/avlab``) and made on first use; None when that folder
    cannot be written (the store is then migrated in place, as MLflow does)."""
    import sqlite3

    import mlflow

    root = jobs.user_cache_dir()
    template = root / f"mlflow-{mlflow.__version__}-empty.db"
    if template.exists():
        return template
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f"{template.name}.lock"):
            if template.exists():
                return template
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                fresh = Path(tmp) / "mlflow.db"
                MlflowClient(f"sqlite:///{fresh}").search_experiments(max_results=1)  # migrates
                with contextlib.closing(sqlite3.connect(fresh)) as con, con:
                    con.execute("DELETE FROM experiments WHERE experiment_id = 0")
                    left = con.execute("SELECT COUNT(*) FROM experiments").fetchone()[0]
                if left:
                    return None
                os.replace(fresh, template)
    except (OSError, sqlite3.Error):
        return None
    return template
