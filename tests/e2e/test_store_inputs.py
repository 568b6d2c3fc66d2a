"""Where results go, checked before anything is created: the tracking URI (no secret in it, a
server that answers, a database driver that is installed), the home (writable, not a symlink
loop), and a checkpoint that the disk cannot take (one line, no half-written folder)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import faults
from conftest import ROOT, TINY_RUN
from orchestrator.cli import main

SPACE = str(ROOT / "search_spaces" / "memory_size_fig6.yaml")


def _one_error_line(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    out = capsys.readouterr()
    err = out.err.strip()
    assert len(err.splitlines()) == 1, out.err
    return code, err


def _everything_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- secrets in the tracking URI -------------------------------------------------------------------

@pytest.mark.parametrize("command", [["run", *TINY_RUN], ["sweep", SPACE]])
@pytest.mark.parametrize("uri", [
    "sqlite:///{tmp}/db/mlflow.db?password=s3cret",
    "postgresql://alice@127.0.0.1/mlflow?password=s3cret",
    "http://127.0.0.1:1/?token=s3cret",
    "mysql://alice@127.0.0.1/mlflow?sslmode=require&api_key=s3cret",
])
def test_a_secret_in_the_uri_query_is_refused_without_echoing_it(tmp_path, capsys, command, uri):
    uri = uri.format(tmp=tmp_path)
    code, err = _one_error_line(capsys, [command[0], "--home", str(tmp_path / "home"), "--tracking-uri", uri,
                                         *command[1:]])
    assert code == 2 and err.startswith("avlab: error: --tracking-uri: the URI carries credentials"), err
    assert "s3cret" not in err
    assert _everything_under(tmp_path) == []  # no home, no job file, no file named after the query


def test_a_secret_in_mlflow_tracking_uri_is_named_by_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db?password=s3cret")
    code, err = _one_error_line(capsys, ["run", "--home", str(tmp_path / "home"), *TINY_RUN])
    assert code == 2 and err.startswith("avlab: error: MLFLOW_TRACKING_URI: the URI carries credentials"), err
    assert "s3cret" not in err and _everything_under(tmp_path) == []


def test_a_sqlite_uri_with_a_query_is_refused_before_a_file_named_after_it_exists(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db?timeout=30"
    code, err = _one_error_line(capsys, ["run", "--home", str(tmp_path / "home"), "--tracking-uri", uri, *TINY_RUN])
    assert code == 2 and err.startswith("avlab: error: --tracking-uri: a sqlite URI takes no query"), err
    assert _everything_under(tmp_path) == []


@pytest.mark.parametrize("uri", ["postgresql://alice@db/mlflow?sslmode=require&sslkey=/etc/client.key",
                                 "sqlite:////data/mlflow.db", "http://127.0.0.1:5000/mlflow"])
def test_a_uri_without_secrets_passes_the_check(uri):
    from orchestrator import tracking

    assert tracking.check_tracking_uri(uri, "--tracking-uri") == uri


# --- a tracking server that does not answer ----------------------------------------------------------

@contextlib.contextmanager
def _silent_server():
    """A loopback port that accepts connections and never answers (a hung server); its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in [*held, listener]:
            conn.close()


def test_avlab_run_names_a_closed_tracking_server_port_in_seconds(tmp_path):
    """The whole command, as a user starts it (MLflow alone retried its first call for minutes)."""
    port = faults.free_port()
    t0 = time.monotonic()
    out = faults.run(["run", "--home", str(tmp_path / "home"), "--tracking-uri", f"http://127.0.0.1:{port}",
                      *TINY_RUN], cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - t0
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip() == (f"avlab: error: --tracking-uri: no tracking server answers at 127.0.0.1:{port} "
                                  "(connection refused); start it, or check the URI"), out.stderr
    assert elapsed < 60, elapsed  # the imports of a loaded machine, not MLflow's retries
    assert _everything_under(tmp_path) == []


@pytest.mark.parametrize("command", [["run", *TINY_RUN], ["sweep", SPACE], ["status", "s"], ["report", "s"]])
@pytest.mark.parametrize("server", ["closed", "silent"])
def test_a_tracking_server_that_does_not_answer_is_one_line_naming_the_uri(tmp_path, capsys, command, server):
    from orchestrator import tracking

    with contextlib.ExitStack() as stack:
        port = faults.free_port() if server == "closed" else stack.enter_context(_silent_server())
        t0 = time.monotonic()
        code, err = _one_error_line(capsys, [command[0], "--home", str(tmp_path / "home"),
                                             "--tracking-uri", f"http://127.0.0.1:{port}", *command[1:]])
        elapsed = time.monotonic() - t0
    reason = "connection refused" if server == "closed" else "timed out"
    assert code == 2 and err == (f"avlab: error: --tracking-uri: no tracking server answers at 127.0.0.1:{port} "
                                 f"({reason}); start it, or check the URI"), err
    assert elapsed < tracking.PROBE_TIMEOUT_S + 10, elapsed
    assert _everything_under(tmp_path) == []


def test_resume_names_the_job_file_whose_tracking_server_is_gone(tmp_path, capsys):
    from orchestrator import jobs

    home, port = tmp_path / "home", faults.free_port()
    path = jobs.write(home, jobs.JobRecord(kind="run", name="gone", config={}, run_id="0" * 32,
                                           tracking_uri=f"http://127.0.0.1:{port}"))
    before = path.read_bytes()
    code, err = _one_error_line(capsys, ["resume", "gone", "--home", str(home)])
    assert code == 2 and err.startswith(f"avlab: error: {path}: no tracking server answers at 127.0.0.1:{port}"), err
    assert path.read_bytes() == before and _everything_under(home) == ["jobs", "jobs/gone.json"]


# --- a database store without its driver -------------------------------------------------------------

# psycopg (postgresql://) is in the install; another PostgreSQL driver is not.
@pytest.mark.parametrize("uri", ["postgresql+pg8000://alice@127.0.0.1/mlflow", "mysql://alice@127.0.0.1/mlflow"])
def test_a_database_uri_without_its_driver_names_the_missing_package(tmp_path, capsys, uri):
    from sqlalchemy.engine import make_url

    try:
        make_url(uri).get_dialect().import_dbapi()
        pytest.skip(f"the driver of {uri} is installed here")
    except ImportError as exc:
        module = exc.name
    code, err = _one_error_line(capsys, ["run", "--home", str(tmp_path / "home"), "--tracking-uri", uri, *TINY_RUN])
    scheme = uri.split(":", 1)[0]
    assert code == 2 and err.startswith(f"avlab: error: --tracking-uri: a {scheme}:// store needs the Python "
                                        f"package {module!r}, which is not installed here"), err
    assert importlib.util.find_spec(module) is None
    assert _everything_under(tmp_path) == []


# --- the home ----------------------------------------------------------------------------------------

def _mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs with ``options`` on ``path`` (root only); False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def _unmount(path: Path) -> None:
    # Lazily: a cached MLflow store of the test process may still hold a file open there.
    subprocess.run(["umount", "--lazy", str(path)], capture_output=True, check=True)


@contextlib.contextmanager
def _read_only_view(source: Path, path: Path):
    """``source`` seen read-only at ``path``: a read-only bind mount as root (who ignores
    permissions), ``source`` itself without write permission otherwise; skips where neither works."""
    if os.geteuid() != 0:
        mode = source.stat().st_mode
        source.chmod(0o555)
        try:
            yield source
        finally:
            source.chmod(mode)
        return
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "--bind", str(source), str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root without permission to mount a read-only view")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, check=True)
        yield path
    finally:
        _unmount(path)


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty folder that nobody here can write."""
    (tmp_path / "empty").mkdir()
    with _read_only_view(tmp_path / "empty", tmp_path / "ro") as path:
        yield path


WRITERS = [
    ["run", *TINY_RUN],
    ["sweep", SPACE],
    ["resume", "some-run"],
    ["evaluate", "some-run"],
    ["reproduce", "--all"],
    ["submit", SPACE, "--address", "http://127.0.0.1:1"],
]


@pytest.mark.parametrize("command", WRITERS, ids=[c[0] for c in WRITERS])
@pytest.mark.parametrize("inside", [False, True], ids=["home", "new-home-in-it"])
def test_a_read_only_home_is_one_line_naming_home(read_only_dir, capsys, command, inside):
    home = read_only_dir / "home" if inside else read_only_dir
    code, err = _one_error_line(capsys, [command[0], "--home", str(home), *command[1:]])
    assert code == 2 and err.startswith(f"avlab: error: --home: {home} cannot be written"), err
    assert _everything_under(read_only_dir) == []


def test_a_read_only_home_still_serves_status(tmp_path, capsys):
    """Reading commands do not need to write: `status` on a read-only home reads its store."""
    from orchestrator import tracking

    tracking.prepare_store(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    with _read_only_view(tmp_path / "home", tmp_path / "ro") as home:
        code, err = _one_error_line(capsys, ["status", "no-such-sweep", "--home", str(home)])
    assert code == 2 and err == "avlab: error: sweep: no sweep named 'no-such-sweep' in this store", err


@pytest.mark.parametrize("command", [["run", *TINY_RUN], ["sweep", SPACE], ["status", "s"], ["report", "s"]])
def test_a_home_that_is_a_symlink_loop_is_one_line_naming_home(tmp_path, capsys, command):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    code, err = _one_error_line(capsys, [command[0], "--home", str(loop), *command[1:]])
    assert code == 2 and err == f"avlab: error: --home: {loop} cannot be used as the home (a symlink loop)", err
    assert _everything_under(tmp_path) == ["loop"]


def test_avlab_home_that_is_a_symlink_loop_is_named_by_the_variable(tmp_path, capsys, monkeypatch):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    monkeypatch.setenv("AVLAB_HOME", str(loop))
    code, err = _one_error_line(capsys, ["status", "s"])
    assert code == 2 and err.startswith("avlab: error: AVLAB_HOME: "), err


# --- a checkpoint the disk cannot take ---------------------------------------------------------------

SAVE_UNDER_LIMIT = """
import resource, signal, sys
import torch
from orchestrator import checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    checkpoint.save(sys.argv[1], {"model": {"w": torch.zeros(100000)}, "epoch": 3})
except checkpoint.CheckpointError as exc:
    print(exc)
    sys.exit(3)
"""


def _big_state():
    import torch

    return {"model": {"w": torch.zeros(200_000)}, "optimizer": {}, "epoch": 3, "rng": [], "loaders": {}}


@pytest.mark.parametrize("made", [True, False], ids=["new-folder", "existing-folder"])
def test_a_checkpoint_on_a_full_disk_is_one_error_and_leaves_nothing_half_written(tmp_path, made):
    """A real full disk: a 256 KiB tmpfs (root), which a 800 KB checkpoint does not fit."""
    import torch

    from orchestrator import checkpoint

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=256k"):
        pytest.skip("no permission to mount a small file system here (the file-size limit test covers it)")
    try:
        target = disk / "checkpoint_epoch00003"
        if not made:
            target.mkdir()
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.save(target, _big_state())
        assert str(info.value) == f"{target}: checkpoint not written (No space left on device); its partial " \
                                  "files were removed"
        assert _everything_under(disk) == ([] if made else ["checkpoint_epoch00003"])
        checkpoint.save(disk / "small", {**_big_state(), "model": {"w": torch.zeros(10)}})
        assert checkpoint.load(disk / "small")["epoch"] == 3  # the space came back: a checkpoint fits
    finally:
        _unmount(disk)


def test_a_checkpoint_over_the_file_size_limit_is_one_error_and_leaves_nothing(tmp_path):
    """The same failure without root: a real write refused by RLIMIT_FSIZE (EFBIG)."""
    target = tmp_path / "checkpoint_epoch00003"
    out = subprocess.run([sys.executable, "-c", SAVE_UNDER_LIMIT, str(target)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 3, out.stdout + out.stderr
    assert out.stdout.strip() == f"{target}: checkpoint not written (File too large); its partial files were removed"
    assert out.stderr == "" and _everything_under(tmp_path) == []
