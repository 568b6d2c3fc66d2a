"""`avlab ui`: the MLflow server on the store of a real sweep, looked at in a real browser
(Debian's Chromium driven by Playwright), and its bad-input contract (exit 2, one line)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.runs import SWEEP_EXPERIMENT

import faults
from conftest import AVLAB, ROOT, TINY_RUN, default_sigint

SCREENSHOT = ROOT / "test-artifacts" / "mlflow-ui.png"
TIMEOUT_MS = 30_000
SWEEP = "ui-sweep"
SPACE = (
    "description: 'avlab ui test: two memory sizes, one seed'\n"
    "base:\n  preset: tiny\n  config:\n    method: {name: bma}\n"
    "grid:\n  method.memory_size: [16, 32]\nseeds: 1\n"
    "metric: image_h_linear_acc\nmode: max\nresources: {workers: 1, cpus_per_worker: 1}\n"
    "max_concurrent: 2\nplot: {x: method.memory_size, log_x: true}\n"
)
TINY = [*TINY_RUN, "data.paired_size=256"]  # a trial in seconds
METRICS = ("image_h_linear_acc", "sound_h_linear_acc")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def _http_get(url: str, timeout: float = 5) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    with opener.open(url, timeout=timeout) as response:
        return response.read()


def test_ui_on_a_busy_port_or_without_a_store_exits_2_in_one_line(tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["ui", "--home", str(home)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("avlab: error: --home: no avlab store"), err

    home.mkdir()
    (home / "mlflow.db").touch()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--home", str(home), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"avlab: error: --port: {port} is already in use"), err


def test_ui_beyond_loopback_without_its_logins_admin_exits_2_in_one_line(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "mlflow.db").touch()
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert main(["ui", "--home", str(home), "--host", "0.0.0.0", "--port", str(faults.free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(
        "avlab: error: --host 0.0.0.0 listens beyond this machine, so the server runs with MLflow's login: set "
        "MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD in the environment"), err
    assert err.endswith("or pass --no-login on a network you trust"), err
    assert main(["ui", "--home", str(home), "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip() == "avlab: error: --workers: must be between 1 and 64, got 0"


@pytest.fixture(scope="module")
def chromium():
    """(Playwright's sync API, Debian's Chromium); Playwright's own browser download is not
    reachable from CI. Checked before the sweep runs, so a skip costs nothing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' (playwright)")
    path = shutil.which("chromium")
    if path:
        return sync_api, path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs Debian's chromium: `apt-get install chromium` (as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    out = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:  # stale package lists
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
        out = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    path = shutil.which("chromium")
    if not path:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"`apt-get install chromium` failed: {tail[0]}")
    return sync_api, path


@pytest.fixture(scope="module")
def sweep_home(tmp_path_factory) -> Path:
    """A real 2 configurations x 1 seed sweep (about a minute on two cores)."""
    root = tmp_path_factory.mktemp("ui")
    space = root / "tiny.yaml"
    space.write_text(SPACE)
    home = root / "home"
    out = subprocess.run([AVLAB, "sweep", str(space), "--name", SWEEP, "--home", str(home), *TINY],
                         capture_output=True, text=True, env=_env(), timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return home


@pytest.fixture
def ui_server(sweep_home, tmp_path):
    """`avlab ui` on the sweep's store; yields (url, process, log file); stopped with Ctrl-C."""
    port = faults.free_port()
    log_path = tmp_path / "ui.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([AVLAB, "ui", "--home", str(sweep_home), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=_env(), preexec_fn=default_sigint)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while f"MLflow UI at {url}" not in log_path.read_text():
            assert proc.poll() is None, f"avlab ui exited with {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"avlab ui did not answer in 180 s:\n{log_path.read_text()}"
            time.sleep(0.5)
        assert _http_get(f"{url}/health") == b"OK"
        yield url, proc, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _show_metric_column(page, metric: str) -> None:
    from playwright.sync_api import expect

    page.get_by_role("button", name="Columns", exact=True).click()
    page.get_by_placeholder("Search columns").fill(metric)
    page.get_by_role("dialog").get_by_text(metric, exact=True).click()
    page.keyboard.press("Escape")
    expect(page.get_by_role("columnheader", name=metric).first).to_be_visible(timeout=TIMEOUT_MS)


@pytest.mark.slow
def test_ui_shows_the_sweep_its_trials_metrics_and_plots_in_a_browser(chromium, sweep_home, ui_server, record_property):
    sync_api, chromium_path = chromium
    expect = sync_api.expect
    url, proc, log_path = ui_server

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{sweep_home / 'mlflow.db'}")
    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    children = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], "tags.`avlab.kind` = 'trial'")}
    parent_id = client.search_runs([exp.experiment_id], "tags.`avlab.kind` = 'sweep'")[0].info.run_id
    assert sorted(children) == [f"{SWEEP}/method.memory_size=16/seed0", f"{SWEEP}/method.memory_size=32/seed0"]
    child = children[f"{SWEEP}/method.memory_size=16/seed0"]
    plot = next(a.path for a in client.list_artifacts(child.info.run_id, "plots") if a.path.startswith("plots/confusion_"))
    # The run's file:// artifact location is served by the server itself.
    png = _http_get(f"{url}/get-artifact?path={plot}&run_uuid={child.info.run_id}")
    assert png.startswith(b"\x89PNG"), png[:100]

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            # The link `avlab ui` prints opens the experiment on its runs, not on GenAI traces.
            link = f"{url}/#/experiments/{exp.experiment_id}?workflowType=machine_learning"
            assert f"{SWEEP_EXPERIMENT}: {link}" in log_path.read_text()
            page.goto(link, timeout=60_000)
            parent = page.get_by_role("link", name=SWEEP, exact=True)
            expect(parent).to_be_visible(timeout=TIMEOUT_MS)
            close = page.get_by_role("button", name="Close").first  # the Assistant side panel
            if close.is_visible():
                close.click()

            # The parent row expands into the trials' child runs.
            page.get_by_role("row").filter(has=parent).get_by_role("button").first.click()
            for name in children:
                expect(page.get_by_role("link", name=name, exact=True)).to_be_visible(timeout=TIMEOUT_MS)

            # Downstream metrics as columns, with a value on each trial's row.
            for metric in METRICS:
                _show_metric_column(page, metric)
            cells = page.locator(f'[role="gridcell"][col-id="metrics.`{METRICS[0]}`"]')
            expect(cells).to_have_count(3, timeout=TIMEOUT_MS)  # parent (no value) + 2 trials
            values = [t.strip() for t in cells.all_inner_texts()]
            numbers = [float(v) for v in values if re.fullmatch(r"[0-9.]+", v)]
            assert len(numbers) == 2 and all(0 <= v <= 1 for v in numbers), values
            page.screenshot(path=str(SCREENSHOT))

            # A trial's confusion matrix opens from its Artifacts tab.
            page.get_by_role("link", name=child.info.run_name, exact=True).click()
            page.get_by_role("tab", name="Artifacts").click()
            page.get_by_text("plots", exact=True).click()
            page.get_by_text(Path(plot).name, exact=True).click()
            image = page.get_by_role("img", name=plot, exact=True)
            expect(image).to_be_visible(timeout=TIMEOUT_MS)
            page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=image.element_handle())
            page.screenshot(path=str(SCREENSHOT.with_name("mlflow-ui-artifact.png")))

            # The sweep's parent run shows the report as its description.
            page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{parent_id}?workflowType=machine_learning",
                      timeout=60_000)
            expect(page.get_by_text("No single best on image_h_linear_acc", exact=False).first
                   ).to_be_visible(timeout=TIMEOUT_MS)
            page.screenshot(path=str(SCREENSHOT.with_name("mlflow-ui-parent.png")))

            # The sweep's own link opens on what it compared: its trials alone (no parent row), with
            # the varied parameter and the headline metric as columns, best first.
            sweep_link = re.search(rf"sweep {SWEEP}: (\S+)", log_path.read_text()).group(1)
            page.goto(sweep_link, timeout=60_000)
            expect(page.get_by_text("2 matching runs")).to_be_visible(timeout=TIMEOUT_MS)
            metric = page.locator(f'[role="gridcell"][col-id="metrics.`{METRICS[0]}`"]')
            expect(metric).to_have_count(2, timeout=TIMEOUT_MS)
            shown = [float(v) for v in metric.all_inner_texts()]
            assert shown == sorted(shown, reverse=True), shown  # mode: max
            sizes = page.locator('[role="gridcell"][col-id="params.`method.memory_size`"]')
            assert sorted(t.strip() for t in sizes.all_inner_texts()) == ["16", "32"]
            page.screenshot(path=str(SCREENSHOT.with_name("mlflow-ui-sweep-table.png")))

            # Its charts lead with the metric against the varied parameter; system metrics come last.
            page.goto(re.search(rf"sweep {SWEEP}, charts: (\S+)", log_path.read_text()).group(1), timeout=60_000)
            compared = page.get_by_text("What was compared", exact=False).first
            expect(compared).to_be_visible(timeout=TIMEOUT_MS)
            expect(page.get_by_text(f"method.memory_size vs. {METRICS[0]}", exact=False).first).to_be_visible(
                timeout=TIMEOUT_MS)
            model = page.get_by_text("Model metrics", exact=False).first
            expect(model).to_be_visible(timeout=TIMEOUT_MS)
            assert compared.bounding_box()["y"] < model.bounding_box()["y"]
            system = page.get_by_text(re.compile(r"^system/node0")).first
            if system.count() and system.is_visible():
                assert system.bounding_box()["y"] > model.bounding_box()["y"]
            page.screenshot(path=str(SCREENSHOT.with_name("mlflow-ui-sweep-charts.png")))
        finally:
            if not SCREENSHOT.exists():  # a failed check: the page as it was
                page.screenshot(path=str(SCREENSHOT))
            browser.close()
            print(f"screenshot: {SCREENSHOT}")
            record_property("screenshot", str(SCREENSHOT))

    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(60) == 0, log_path.read_text()
    assert "[avlab] MLflow UI stopped" in log_path.read_text()
    with pytest.raises(OSError):
        _http_get(f"{url}/health", timeout=2)
