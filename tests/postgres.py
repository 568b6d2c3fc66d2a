"""A throw-away PostgreSQL cluster on loopback for the tests that track into a real database:
``initdb`` into a temporary folder, ``pg_ctl start`` on a free port (127.0.0.1 only, trust
authentication for its one user), stopped and removed afterwards. PostgreSQL refuses to run as
root, so under root the cluster runs as the ``postgres`` user."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faults

USER = "avlab"
MISSING = "needs PostgreSQL's server binaries (Debian: apt-get install postgresql)"


def binaries() -> dict[str, str] | None:
    """initdb, pg_ctl, psql and pg_dump, or None where the server binaries are not installed. Debian
    keeps the server's own tools off PATH, in /usr/lib/postgresql/VERSION/bin."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name)
    path = os.pathsep.join([os.environ.get("PATH", ""), *(str(v) for v in reversed(versions))])
    found = {name: shutil.which(name, path=path) for name in ("initdb", "pg_ctl", "psql", "pg_dump")}
    return found if all(found.values()) else None  # type: ignore[return-value]


def dump(uri: str) -> str:
    """The database's whole content as SQL (pg_dump), for looking for what must not be in it."""
    parts = urllib.parse.urlsplit(uri)
    out = subprocess.run([binaries()["pg_dump"], "-h", parts.hostname, "-p", str(parts.port), "-U", parts.username,
                          "-d", parts.path.lstrip("/")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _as_owner(owner: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", owner, "--", *argv] if owner else argv


@contextmanager
def cluster(databases: tuple[str, ...] = ("mlflow",)) -> Iterator[str]:
    """A running cluster with ``databases``; yields ``postgresql://avlab@127.0.0.1:PORT``. Its data
    lives in a folder of its own under the system's temporary folder (pytest's are private to
    root, where the ``postgres`` user cannot reach), removed afterwards."""
    tools = binaries()
    assert tools, "no PostgreSQL server binaries"
    owner = None
    if os.geteuid() == 0:
        owner = "postgres"
        pwd.getpwnam(owner)  # KeyError: no such user
    root = Path(tempfile.mkdtemp(prefix="avlab-pg-"))
    data = root / "pgdata"
    data.mkdir()
    if owner:
        shutil.chown(root, owner)
        shutil.chown(data, owner)
    port = faults.free_port()
    run = lambda argv: subprocess.run(_as_owner(owner, argv), capture_output=True, text=True, timeout=120)  # noqa: E731
    out = run([tools["initdb"], "-D", str(data), "-U", USER, "-A", "trust", "--no-sync"])
    assert out.returncode == 0, out.stderr[-2000:]
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off"
    out = run([tools["pg_ctl"], "-D", str(data), "-o", options, "-l", str(data / "server.log"), "-w", "start"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    try:
        for name in databases:
            made = subprocess.run([tools["psql"], "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-d", "postgres",
                                   "-c", f"CREATE DATABASE {name}"], capture_output=True, text=True, timeout=60)
            assert made.returncode == 0, made.stderr
        yield f"postgresql://{USER}@127.0.0.1:{port}"
    finally:
        run([tools["pg_ctl"], "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)
