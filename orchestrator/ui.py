"""`avlab ui`: the MLflow UI and tracking server on the project's store.

Runs ``mlflow server`` on ``<home>/mlflow.db`` (or the database ``--tracking-uri`` names, e.g. a
lab's PostgreSQL), bound to 127.0.0.1 unless ``--host`` says otherwise, and waits for it; Ctrl-C
stops it (exit 0). Experiments that avlab creates keep their artifacts under
``<home>/mlartifacts/<experiment>`` as file:// URIs, which the server reads directly, so plots and
reports open in the UI. A server that listens beyond loopback runs MLflow's basic-auth app: its
admin comes from ``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD`` in the
environment, and clients log in with ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.
Bad input (no store yet, a busy port, a host that cannot be bound, a login without its
credentials) exits 2 with one line before the server starts.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from orchestrator.errors import ConfigError

STOP_TIMEOUT_S = 15.0


def backend_store_uri(home: Path, tracking_uri: str | None) -> str:
    """The store the server reads: ``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > ``<home>/mlflow.db``.
    A server URI is refused (it already has a UI); a sqlite file must exist."""
    from orchestrator.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(home, tracking_uri)
    source = "--tracking-uri" if tracking_uri else ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "--home")
    if uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(f"{source}: {uri} is an MLflow server already; open it in a browser instead")
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            where = f"no avlab store at {home} (no mlflow.db yet)" if source == "--home" else f"no such database {db}"
            raise ConfigError(f"{source}: {where}; `avlab run` or `avlab sweep` creates it")
    return uri


def check_port_free(host: str, port: int) -> list[str]:
    """Bind ``host:port`` once, as the server will, so a busy port is reported before it starts;
    return the addresses ``host`` resolves to."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port: must be between 1 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host: cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
                raise ConfigError(f"--port: {port} is already in use on {host}; choose another "
                                  f"(--port {port % 65535 + 1}) or stop what listens there") from None
            raise ConfigError(f"--host: cannot listen on {host}:{port}: {exc.strerror}") from None
    return [info[4][0] for info in infos]


def is_loopback(addresses: list[str]) -> bool:
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


# MLflow's basic-auth app reads its first admin from these (and creates it on the first start);
# avlab refuses to start a login without them rather than fall back on a file.
ADMIN_ENV = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD")
MIN_PASSWORD = 12  # MLflow refuses to create a user with a shorter one


def check_login(host: str, env: Mapping[str, str]) -> None:
    """The admin credentials of a server with a login are in ``env``, non-empty; else a
    ConfigError naming the variables (never their values)."""
    missing = [name for name in ADMIN_ENV if not env.get(name)]
    if missing:
        why = (f"--host {host} listens beyond this machine, so the server runs with MLflow's login"
               if host else "--login asks for MLflow's login")
        raise ConfigError(f"{why}: set {' and '.join(missing)} in the environment (the server's admin, from a "
                          f"secret; clients log in with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
                          + (", or pass --no-login on a network you trust" if host else ""))
    if len(env[ADMIN_ENV[1]]) < MIN_PASSWORD:
        raise ConfigError(f"{ADMIN_ENV[1]}: MLflow's login takes passwords of at least {MIN_PASSWORD} characters; "
                          f"this one has {len(env[ADMIN_ENV[1]])}")


def login_config(store_uri: str, home: Path) -> str:
    """The basic-auth app's settings (an ini file's text, without credentials): its users live in
    the tracking database itself when that is a server database (their tables, ``users`` and
    ``roles``, and their migration table are the app's own), else in ``<home>/basic_auth.db``.
    Everyone logged in may read every experiment; what a user creates is theirs to change."""
    database = store_uri if not store_uri.startswith("sqlite:") else f"sqlite:///{home / 'basic_auth.db'}"
    return ("[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {database.replace('%', '%%')}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")


def url_for(host: str, port: int) -> str:
    """The address to open: a wildcard bind is reached on loopback; IPv6 literals need brackets."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def server_command(store_uri: str, home: Path, host: str, port: int, *, workers: int = 1,
                   login: bool = False) -> list[str]:
    """``mlflow server`` on the avlab store (``login``: behind MLflow's basic-auth app).

    ``--serve-artifacts --artifacts-destination <home>/mlartifacts``: avlab's experiments carry
    file:// artifact locations that the server reads directly (plots, reports, config.yaml);
    anything created through the UI itself gets its artifacts in the home too, not in the
    current directory. ``--workers 1`` by default: one person browsing needs one process (each
    costs a second of CPU and ~200 MB; the trials of a cluster's sweep may want more);
    ``--log-level warning`` keeps the access log off the terminal.
    """
    mlflow = Path(sys.executable).parent / "mlflow"
    launcher = [str(mlflow)] if mlflow.is_file() else [sys.executable, "-m", "mlflow"]
    return [
        *launcher, "server",
        "--backend-store-uri", store_uri,
        "--serve-artifacts", "--artifacts-destination", (home / "mlartifacts").as_uri(),
        "--host", host, "--port", str(port),
        "--workers", str(workers),
        *(["--app-name", "basic-auth"] if login else []),
        "--uvicorn-opts", "--log-level warning",
    ]


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local address: never through a proxy
    try:
        with opener.open(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class _Stop(BaseException):
    """SIGTERM, handled like Ctrl-C: a BaseException, as KeyboardInterrupt is, so that no
    ``except Exception`` on the way (a store that cannot be read, say) swallows the stop."""


def _raise_stop(signum, frame) -> None:
    raise _Stop


def _start(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, bool]:
    """The server process, and whether a Ctrl-C or SIGTERM came while it was being started. A stop
    raised inside ``Popen`` (after the fork, before it returns) would leave the server running with
    nobody holding it: during the start both signals are only noted, and acted on once the
    server can be stopped."""
    noted: list[int] = []
    handlers = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # Its own session: Ctrl-C reaches avlab only, which then stops the server in order.
        server = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return server, bool(noted)


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server (it forwards it to its uvicorn process), then SIGKILL to its process
    group if it has not exited in time."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(server.pid, signal.SIGKILL)  # whatever of its group is left
    except (ProcessLookupError, PermissionError):
        pass
    server.wait()


# MLflow 3's UI opens an experiment on its GenAI traces unless the page asks for the model-training
# view (a `workflowType` in the URL, else the browser's last choice); avlab's links ask for it.
RUNS_VIEW = "workflowType=machine_learning"


# How many sweeps get a link of their own when the UI starts (the most recent first).
SWEEP_LINKS = 10
# Varied parameters shown as columns of a sweep's view, at most.
MAX_VARIED = 4
# Parameters that differ between the trials of every sweep: not what it compared.
_PER_TRIAL = ("seed", "data.seed")


def varied_params(trials: list) -> list[str]:
    """The config parameters whose values differ between ``trials`` (the seed aside), in name order."""
    values: dict[str, set[str]] = {}
    for run in trials:
        for key, value in run.data.params.items():
            values.setdefault(key, set()).add(value)
    return sorted(k for k, v in values.items() if len(v) > 1 and k not in _PER_TRIAL)[:MAX_VARIED]


def sweep_view(parent_id: str, metric: str, mode: str, varied: list[str], plot_x: str = "") -> dict:
    """The MLflow experiment page's view state (search facets and UI state, as its share links
    carry them) that opens a sweep on what it compared: its trials alone (the parent run's
    children), ordered by the headline metric, with the configuration, the varied parameters,
    the seed and the metric as columns; in the chart view, a first section with the metric
    against the varied parameter (and per trial), then the other metrics, system metrics last."""
    x = plot_x or (varied[0] if varied else "")
    compared = "avlab-compared"
    charts = [{"uuid": "avlab-metric-per-trial", "type": "BAR", "metricKey": metric, "runsCountToCompare": 100,
               "metricSectionId": compared, "deleted": False, "isGenerated": False}]
    if x:
        charts.insert(0, {"uuid": "avlab-metric-against-x", "type": "SCATTER", "xaxis": {"key": x, "type": "PARAM"},
                          "yaxis": {"key": metric, "type": "METRIC"}, "runsCountToCompare": 100,
                          "metricSectionId": compared, "deleted": False, "isGenerated": False})
    sections = [{"uuid": compared, "name": "What was compared", "display": True, "isReordered": False,
                 "deleted": False, "isGenerated": False},
                {"uuid": "avlab-model-metrics", "name": "Model metrics", "display": True, "isReordered": False,
                 "deleted": False, "isGenerated": True},
                {"uuid": "avlab-system-metrics", "name": "System metrics", "display": True, "isReordered": False,
                 "deleted": False, "isGenerated": True}]
    columns = ["tags.`avlab.config_label`", *(f"params.`{k}`" for k in varied), "params.`seed`", f"metrics.`{metric}`"]
    return {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_id}'",
        "orderByKey": f"metrics.`{metric}`", "orderByAsc": mode == "min",
        "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
        "selectedColumns": columns, "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts, "compareRunSections": sections,
        # Kept in this order; sections the UI finds later (avlab's system/node<i>/...) go after them.
        "isAccordionReordered": True,
        "hideEmptyCharts": True, "useGroupedValuesInCharts": True, "groupBy": None, "groupsExpanded": {},
        "viewMaximized": False, "runListHidden": False, "columnOrder": [], "columnWidths": {},
    }


# MLflow's UI keeps a shared view of an experiment page in an experiment tag under this prefix, and
# opens it from a link that names the tag's key (what its "Share" button writes and copies).
SHARED_VIEW_TAG = "mlflow.sharedViewState."


def share_view(client, experiment_id: str, view: dict) -> str:
    """Store ``view`` as a shared view of the experiment (an experiment tag, keyed by the hash of
    its content, so the same view is written once however often the UI starts); its key."""
    import hashlib
    import json

    blob = json.dumps(view, separators=(",", ":"), sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()
    tags = client.get_experiment(experiment_id).tags
    if tags.get(SHARED_VIEW_TAG + key) != blob:
        client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, blob)
    return key


def view_link(url: str, experiment_id: str, key: str, mode: str = "TABLE") -> str:
    """The experiment's runs page opened on the shared view ``key``, as a table or as charts."""
    return (f"{url}/#/experiments/{experiment_id}/runs?{RUNS_VIEW}&compareRunsMode={mode}"
            f"&viewStateShareKey={key}")


def experiment_links(store_uri: str, url: str) -> list[str]:
    """One link per experiment of the store, opening on its runs, and for the most recent sweeps
    a link each that opens on what the sweep compared (``sweep_view``, stored as a shared view of
    the experiment), in the table and in charts."""
    from mlflow.tracking import MlflowClient

    from orchestrator.runs import children

    try:
        client = MlflowClient(store_uri)
        experiments = client.search_experiments()
    except Exception:  # noqa: BLE001 - a store the server can read but this client cannot: no links
        return []
    lines = [f"{e.name}: {url}/#/experiments/{e.experiment_id}?{RUNS_VIEW}"
             for e in sorted(experiments, key=lambda e: e.name) if e.name != "Default"]
    ids = [e.experiment_id for e in experiments if e.name != "Default"]
    if not ids:
        return lines
    try:
        sweeps = client.search_runs(ids, "tags.`avlab.kind` = 'sweep'", order_by=["attributes.start_time DESC"],
                                    max_results=SWEEP_LINKS + 1)
    except Exception:  # noqa: BLE001 - as above
        return lines
    for sweep in sweeps[:SWEEP_LINKS]:
        params = sweep.data.params
        metric = params.get("metric") or ""
        if not metric:
            continue
        name = sweep.data.tags.get("avlab.sweep_name", sweep.info.run_name)
        trials = children(client, sweep.info.run_id)
        view = sweep_view(sweep.info.run_id, metric, params.get("mode", "max"), varied_params(trials),
                          params.get("plot.x", ""))
        try:
            key = share_view(client, sweep.info.experiment_id, view)
        except Exception:  # noqa: BLE001 - a store this client may read but not write: the plain links only
            continue
        lines.append(f"sweep {name}: {view_link(url, sweep.info.experiment_id, key)}")
        lines.append(f"sweep {name}, charts: {view_link(url, sweep.info.experiment_id, key, 'CHART')}")
    if len(sweeps) > SWEEP_LINKS:
        lines.append("older sweeps: the avlab-sweeps link above lists them all (`avlab status NAME` for one)")
    return lines


def serve(store_uri: str, home: Path, host: str, port: int, *, workers: int = 1, login: bool = False) -> int:
    """Run the MLflow server on ``store_uri`` at ``host:port`` until Ctrl-C or SIGTERM (exit code
    0) or until it exits by itself (1); progress lines on stdout, errors on stderr. ``login``: with
    MLflow's basic-auth app (``check_login`` first), its settings in a private temporary file."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the server's store is --backend-store-uri
    # The GenAI job runner (a huey consumer with 5 workers) is of no use to avlab's runs, and a
    # local viewer has no reason to send usage data out; an explicit setting in the environment wins.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with tempfile.TemporaryDirectory(prefix="avlab-ui-") as private:
        if login:
            config = Path(private) / "basic_auth.ini"
            config.write_text(login_config(store_uri, home))
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
            # The login form's CSRF key: one for this server's workers, unless the site gives one.
            env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        return _serve(store_uri, home, host, port, workers, login, env)


def _serve(store_uri: str, home: Path, host: str, port: int, workers: int, login: bool, env: dict[str, str]) -> int:
    url = url_for(host, port)
    print(f"[avlab] starting the MLflow server on {store_uri}" + (" with MLflow's login" if login else ""),
          flush=True)
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    server, stopped = _start(server_command(store_uri, home, host, port, workers=workers, login=login), env)
    try:
        if stopped:
            raise _Stop
        while not _answers(url):
            if server.poll() is not None:
                print(f"avlab: error: the MLflow server exited with code {server.returncode} before it "
                      "answered (its output is above)", file=sys.stderr)
                return 1
            time.sleep(0.5)
        # The links with the line that says the UI is up, in one write: whoever waits for that
        # line (a person, a script) finds them there.
        links = "".join(f"[avlab]   {line}\n" for line in experiment_links(store_uri, url))
        sys.stdout.write(f"[avlab] MLflow UI at {url} (Ctrl-C stops it)\n{links}")
        sys.stdout.flush()
        code = server.wait()
        print(f"avlab: error: the MLflow server stopped with exit code {code}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        _stop(server)
        print("[avlab] MLflow UI stopped", flush=True)
        return 0
    finally:
        if server.poll() is None:  # any other way out
            _stop(server)
        signal.signal(signal.SIGTERM, previous)
