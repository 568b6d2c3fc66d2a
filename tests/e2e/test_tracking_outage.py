"""The tracking server goes away in the middle of a sweep: a real MLflow server on loopback is
stopped for several epochs while trials train, then started again on the same store. Training goes
on, every metric step arrives exactly once, every run ends FINISHED, and each trial says once
that the server is away and once that it is back, instead of a line per step or per retry."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import faults

OUTAGE_S = 25  # several epochs of the trial (about 3 s each)
EPOCHS = 8
SPACE = (
    "base:\n  preset: tiny\ngrid:\n  method.memory_size: [10]\nseeds: 1\n"
    "metric: image_h_linear_acc\nmode: max\nresources: {workers: 1, cpus_per_worker: 1}\nmax_concurrent: 1\n"
)
RUN = [
    f"train.epochs={EPOCHS}", "train.batch_size=64", "data.paired_size=640", "data.unpaired_sound_size=0",
    "data.unpaired_image_size=0", "data.train_size=100", "data.test_size=60", "data.transfer_train_size=0",
    "data.transfer_test_size=0",
]


class Server:
    """``mlflow server`` on 127.0.0.1 over one SQLite store, stoppable and restartable."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, faults.free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, env=faults.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        faults.wait_for(self.answers, timeout=300, what="the MLflow server to answer")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
        except OSError:
            return False
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # gone at once, as a crashed or rebooted server is
        self.proc.wait(timeout=30)
        faults.wait_for(lambda: not self.answers(), timeout=30, what="the MLflow server to stop")


# --- the outbox, against a real MLflow client -------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("outbox", artifact_location=str(tmp_path / "a")))
    return client, run.info.run_id


def test_the_outbox_holds_metrics_while_the_store_is_away_and_sends_each_once(store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from orchestrator import checkpoint as ckpt
    from orchestrator import tracking

    client, run_id = store
    away = tracking.Outbox(MlflowClient(f"http://127.0.0.1:{faults.free_port()}"), run_id)  # nothing listens there
    for epoch in range(3):
        away.log({"loss": 1.0 / (epoch + 1), "lr": 0.1}, step=epoch)
    err = capsys.readouterr().err
    assert err.count("unreachable (connection refused)") == 1 and err.count("\n") == 1, err
    assert [e["step"] for e in away.pending] == [0, 1, 2]
    with pytest.raises(tracking.TrackingUnavailable, match="3 metric batches wait"):
        away.flush(patience_s=0)

    # The held metrics travel in the checkpoint (loaded weights-only) to a restarted worker.
    ckpt.save(tmp_path / "ck", {"model": {"w": torch.zeros(1)}, "optimizer": {}, "epoch": 2, "rng": [],
                                "loaders": {}, "tracking_outbox": away.pending})
    held = ckpt.load(tmp_path / "ck")["tracking_outbox"]
    restarted = tracking.Outbox(client, run_id, held)
    restarted.flush(patience_s=0)
    assert restarted.pending == []
    # A batch sent again (its reply was lost) is stored once: same key, value, step and time.
    tracking.Outbox(client, run_id, held).flush(patience_s=0)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert capsys.readouterr().err == ""  # no outage seen by these two: nothing to say


def _one_reply_server(reply: bytes | str | None) -> int:
    """A loopback server that reads each request and sends ``reply`` (None: closes without one,
    as a tracking server stopped in the middle of a request does; "reset": resets the
    connection instead of closing it); its port."""
    import struct
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                if reply == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif reply is not None:
                    conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


@pytest.mark.parametrize("reply, reason", [
    (None, "the server closed the connection"),
    ("reset", "the server closed the connection"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: application/json\r\n\r\n{", "the server closed the connection"),
    (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy", "HTTP 503"),
    (b"garbage\r\n\r\n", "not an HTTP reply"),
    ("refused", "connection refused"),
])
def test_an_outage_is_named_by_its_cause_in_a_few_words(store, capsys, reply, reason):
    """The one warning line names why the server is unreachable, whatever the way it went away
    (a server stopped while it answered a request once gave a URL cut off in the middle, then
    urllib3's "ProtocolError" for a reset connection)."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    _, run_id = store
    port = faults.free_port() if reply == "refused" else _one_reply_server(reply)
    away = tracking.Outbox(MlflowClient(f"http://127.0.0.1:{port}"), run_id)
    away.log({"loss": 1.0}, step=0)
    err = capsys.readouterr().err
    assert err == (f"[avlab] tracking server 127.0.0.1:{port} unreachable ({reason}); training goes on "
                   "and its metrics are sent when it is back\n"), err
    assert [e["step"] for e in away.pending] == [0]


def test_the_outbox_raises_what_a_retry_would_not_fix(store):
    from mlflow.exceptions import MlflowException

    from orchestrator import tracking

    client, _ = store
    with pytest.raises(MlflowException, match="not found|does not exist|No run"):
        tracking.Outbox(client, "0" * 32).log({"loss": 1.0}, step=0)
    # Entries that are not what avlab writes are dropped, not sent.
    odd = [{"metrics": {"loss": "x"}, "step": 0, "timestamp": 1}, {"step": 1}, "junk"]
    assert tracking.Outbox(client, "0" * 32, odd).pending == []


def _trial_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("avlab-sweeps")
    if exp is None:
        return client, []
    runs = client.search_runs([exp.experiment_id])
    return client, [r for r in runs if r.data.tags.get("avlab.kind") == "trial"]


@pytest.mark.slow
def test_the_tracking_server_away_for_several_epochs_loses_and_repeats_nothing(tmp_path):
    server = Server(tmp_path)
    server.start()
    space, log = tmp_path / "space.yaml", tmp_path / "sweep.log"
    space.write_text(SPACE)
    home = tmp_path / "home"
    proc = faults.start(["sweep", str(space), "--name", "away", "--home", str(home),
                         "--tracking-uri", server.uri, *RUN], log, tmp_path)
    try:
        _outage_mid_sweep(server, proc, log)
    finally:
        if proc.poll() is None:
            faults.kill_node(proc)
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)


def _outage_mid_sweep(server: Server, proc: subprocess.Popen, log: Path) -> None:
    def first_epoch_logged() -> bool:
        client, runs = _trial_runs(server.uri)
        return any(client.get_metric_history(r.info.run_id, "loss") for r in runs)

    faults.wait_for(first_epoch_logged, timeout=300, what="the trial's first epoch in MLflow", proc=proc, log=log)
    server.stop()
    down = log.read_text()
    time.sleep(OUTAGE_S)
    during = log.read_text()[len(down):]
    server.start()
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]

    # Training went on while the server was away.
    assert re.search(r"epoch \d+/%d" % EPOCHS, during), during
    text = log.read_text()
    away = [line for line in text.splitlines() if "unreachable" in line]
    # Refused, or closed (or reset) mid-request when the server stopped while it answered one.
    assert re.search(r"unreachable \((connection refused|the server closed the connection)\)", away[0]), away
    back = [line for line in text.splitlines() if "is back after" in line]
    # One warning and one recovery line, not one per step or per retry.
    assert len(away) == 1 and len(back) == 1, text[-4000:]
    assert all(f"tracking server 127.0.0.1:{server.port}" in line for line in away + back)
    assert "Retrying (Retry(" not in text and "Traceback" not in text, text[-4000:]

    client, runs = _trial_runs(server.uri)
    assert len(runs) == 1
    for run in runs:
        assert run.info.status == "FINISHED", run.info
        for key in ("loss", "epoch_time_s", "lr"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == list(range(EPOCHS)), (key, steps)  # every step, exactly once
        assert 0 <= run.data.metrics["image_h_linear_acc"] <= 1
    parent = [r for r in client.search_runs([runs[0].info.experiment_id]) if r.data.tags.get("avlab.kind") == "sweep"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"


@pytest.mark.parametrize("text, reason", [
    # What urllib3 and MLflow printed for real outages (the first failed a suite run).
    ("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with exception "
     "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: /api/2.0/mlflow/runs/"
     "log-batch (Caused by ProtocolError('Connection aborted.', ConnectionResetError(104, "
     "'Connection reset by peer')))", "the server closed the connection"),
    ("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with exception "
     "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: /api/2.0/mlflow/runs/"
     "log-batch (Caused by NewConnectionError('<urllib3.connection.HTTPConnection object at 0x7f>: "
     "Failed to establish a new connection: [Errno 111] Connection refused'))", "connection refused"),
    ("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with exception "
     "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: /x (Caused by "
     "SSLError(SSLError(1, 'wrong version number')))", "SSLError"),
    ("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with exception oops",
     "oops"),
    # What psycopg says through SQLAlchemy when a PostgreSQL store is away (tests/e2e/test_postgres.py).
    ('(psycopg.OperationalError) connection failed: connection to server at "127.0.0.1", port 5432 failed: '
     "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?",
     "connection refused"),
    ("(psycopg.OperationalError) consuming input failed: server closed the connection unexpectedly",
     "the server closed the connection"),
])
def test_the_reason_never_carries_the_request_url(text, reason):
    from orchestrator import tracking

    assert tracking._reason(RuntimeError(text)) == reason


@pytest.mark.slow
def test_system_metrics_go_on_after_a_tracking_outage(tmp_path, monkeypatch):
    """The system-metrics monitor of a run outlives a stop of the tracking server (MLflow's own
    monitor ended for good at its first failed call): the steps sampled while the server was away
    arrive when it is back, and sampling goes on after it, every step exactly once."""
    from mlflow.tracking import MlflowClient

    from orchestrator import system_metrics
    from orchestrator.config import resolve

    # An outage longer than MLflow's retries of one call (minutes by default), in seconds.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = Server(tmp_path)
    server.start()
    cfg = resolve({}, preset="tiny", overrides=["tracking.system_metrics_interval_s=1"])
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("system")).info.run_id
    key = "system/node0/cpu_utilization_percentage"

    def steps() -> list[int]:
        return [m.step for m in client.get_metric_history(run_id, key)]

    monitor = system_metrics.start_monitor(cfg, server.uri, run_id, ["n"], 0)
    try:
        faults.wait_for(lambda: len(steps()) >= 2, timeout=60, what="two steps of system metrics")
        server.stop()
        time.sleep(4)  # several sampling intervals without a server
        held = [entry["step"] for entry in monitor.outbox.pending]
        assert len(held) >= 2, held  # steps were sampled during the outage, and held
        server.start()
        faults.wait_for(lambda: max(steps()) > max(held), timeout=60, what="system metrics after the outage")
        system_metrics.stop_monitor(monitor)
        logged = steps()
    finally:
        system_metrics.stop_monitor(monitor)
        os.killpg(server.proc.pid, signal.SIGKILL)
    assert logged == list(range(len(logged))), logged  # none lost, none twice
    assert monitor._process is None and monitor.outbox.pending == []
