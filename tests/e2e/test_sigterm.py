"""One SIGTERM (what a process manager, a batch scheduler or `kill` sends once) stops `avlab ui`,
`run` and `sweep` at any moment of their start-up, and leaves no process behind: not the MLflow
server, not Ray's daemons or workers. Every process a command starts inherits a marker in its
environment, which is how the test finds what is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import store, ui

from conftest import AVLAB, ROOT, TINY_RUN, default_sigint


def _marked(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment holds ``marker``."""
    found = {}
    needle = f"AVLAB_TEST_MARK={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat[stat.rindex(")") + 2] != "Z":
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def _one_sigterm(argv: list[str], moment: float | str | Callable[[str, dict[int, str]], bool], cwd: Path) -> tuple[int, str]:
    """Start ``avlab ARGV``, send it one SIGTERM at ``moment`` (seconds after the start, a line of
    its output, or a condition on its output and processes), return its exit code and output
    once it has ended and nothing it started is left."""
    marker = uuid.uuid4().hex
    log = cwd / f"{marker}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AVLAB_TEST_MARK": marker}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([AVLAB, *argv], cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 300
        if isinstance(moment, float):
            time.sleep(moment)
        else:
            reached = (lambda text, _: moment in text) if isinstance(moment, str) else moment
            while not reached(log.read_text(), _marked(marker)):
                assert proc.poll() is None, f"exited ({proc.returncode}) before the moment:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"never reached the moment:\n{log.read_text()[-3000:]}"
                time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
        left = _marked(marker)
        end = time.monotonic() + 30
        while left and time.monotonic() < end:
            time.sleep(0.25)
            left = _marked(marker)
        assert not left, f"left behind: {left}\n{log.read_text()[-3000:]}"
        return code, log.read_text()
    finally:
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ray_started(_: str, processes: dict[int, str]) -> bool:
    return any("raylet" in cmd for cmd in processes.values())


def _trial_started(_: str, processes: dict[int, str]) -> bool:
    return any(cmd.startswith("ray::") for cmd in processes.values())


def _ended_quietly(code: int, out: str) -> None:
    assert code in (0, 130, -signal.SIGTERM), (code, out[-3000:])
    assert "Traceback" not in out, out[-3000:]


@pytest.fixture(scope="module")
def store_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("ui-home")
    store.prepare_store(f"sqlite:///{home / 'mlflow.db'}")
    return home


@pytest.mark.slow
@pytest.mark.parametrize("moment", [0.3, "starting the MLflow server", "MLflow UI at"])
def test_one_sigterm_stops_avlab_ui(tmp_path, store_home, moment):
    from faults import free_port

    code, out = _one_sigterm(["ui", "--home", str(store_home), "--port", str(free_port())], moment, tmp_path)
    _ended_quietly(code, out)
    if moment == "MLflow UI at":
        assert code == 0 and "[avlab] MLflow UI stopped" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("moment", [0.5, "[avlab] run ", _ray_started, _trial_started],
                         ids=["importing", "run-created", "ray-started", "task-started"])
def test_one_sigterm_stops_avlab_run(tmp_path, moment):
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    code, out = _one_sigterm(["run", "--home", str(home), *TINY_RUN, "train.epochs=3", "tracking.run_name=cut"],
                             moment, tmp_path)
    _ended_quietly(code, out)
    if (home / "mlflow.db").exists() and (home / "jobs" / "cut.json").exists():
        client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`avlab.run_name` = 'cut'")
        assert [r.info.status for r in runs] in (["KILLED"], ["FINISHED"]), [r.info.status for r in runs]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["[avlab] sweep ", _ray_started, _trial_started],
                         ids=["sweep-created", "ray-started", "trial-started"])
def test_one_sigterm_stops_avlab_sweep(tmp_path, moment):
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent("""\
        base: {preset: tiny}
        grid:
          method.memory_size: [16, 32]
        seeds: [0]
        metric: image_h_linear_acc
        mode: max
        max_concurrent: 1
        """))
    home = tmp_path / "home"
    code, out = _one_sigterm(["sweep", str(space), "--home", str(home), "--name", "cut", *TINY_RUN], moment, tmp_path)
    _ended_quietly(code, out)


def test_a_sigterm_while_the_ui_lists_experiments_is_not_swallowed(tmp_path):
    """The UI turns SIGTERM into an exception; reading the experiments for its links catches a
    store's errors, and must not catch the stop with them."""
    code = textwrap.dedent("""\
        import os, signal, socket, threading
        import mlflow.tracking  # imported before the timer starts: the signal lands in the request
        from orchestrator import ui
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts connections, never answers
        signal.signal(signal.SIGTERM, ui._raise_stop)
        threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        try:
            links = ui.experiment_links(f"http://127.0.0.1:{silent.getsockname()[1]}", "http://127.0.0.1:1")
            print("swallowed", links)
        except ui._Stop:
            print("stopped")
        """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert out.stdout.strip() == "stopped", out.stdout + out.stderr[-2000:]
    assert not issubclass(ui._Stop, Exception)
