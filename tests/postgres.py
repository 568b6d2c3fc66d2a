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


class Cluster:
    """A PostgreSQL cluster of its own: ``uri`` is ``postgresql://avlab@127.0.0.1:PORT`` (append
    ``/DATABASE``); ``stop`` and ``start`` take it away and bring it back on the same data."""

    def __init__(self) -> None:
        tools = binaries()
        assert tools, "no PostgreSQL server binaries"
        self.tools, self.owner = tools, None
        if os.geteuid() == 0:
            self.owner = "postgres"
            pwd.getpwnam(self.owner)  # KeyError: no such user
        self.root = Path(tempfile.mkdtemp(prefix="avlab-pg-"))
        self.data = self.root / "pgdata"
        self.data.mkdir()
        if self.owner:
            shutil.chown(self.root, self.owner)
            shutil.chown(self.data, self.owner)
        self.port = faults.free_port()
        self.uri = f"postgresql://{USER}@127.0.0.1:{self.port}"
        out = self._run([tools["initdb"], "-D", str(self.data), "-U", USER, "-A", "trust", "--no-sync"])
        assert out.returncode == 0, out.stderr[-2000:]

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(_as_owner(self.owner, argv), capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data} -c fsync=off"
        out = self._run([self.tools["pg_ctl"], "-D", str(self.data), "-o", options, "-l", str(self.data / "server.log"),
                         "-w", "start"])
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    def stop(self) -> None:
        """Gone at once, as a crashed server is: open connections are cut, new ones refused."""
        self._run([self.tools["pg_ctl"], "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def create(self, name: str) -> str:
        """A new database ``name``; its URI."""
        made = subprocess.run([self.tools["psql"], "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", "postgres",
                               "-c", f"CREATE DATABASE {name}"], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        return f"{self.uri}/{name}"

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def running() -> Iterator[Cluster]:
    """A started ``Cluster``, stopped and removed afterwards. Its data lives in a folder of its own
    under the system's temporary folder (pytest's are private to root, where the ``postgres`` user
    cannot reach)."""
    server = Cluster()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@contextmanager
def cluster(databases: tuple[str, ...] = ("mlflow",)) -> Iterator[str]:
    """A running cluster with ``databases``; yields ``postgresql://avlab@127.0.0.1:PORT``."""
    with running() as server:
        for name in databases:
            server.create(name)
        yield server.uri
