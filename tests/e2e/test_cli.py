"""The `avlab run` contract: bad input exits 2 with one line naming the field, before Ray or
MLflow start (a two-worker run end to end is checked in test_resume.py, on its reference run)."""

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from methods.data.manifest import COLUMNS
from orchestrator.cli import main

from conftest import ROOT
SPACE = str(ROOT / "search_spaces" / "memory_size_fig6.yaml")  # a grid over method.memory_size


@pytest.mark.parametrize(
    "argv, field",
    [
        (["run", "method.memmory_size=10"], "method.memmory_size"),
        (["run", "train.epochs=two"], "train.epochs"),
        (["run", "method.memory_size=0"], "method.memory_size"),
        (["run", "method.memory_size=-5"], "method.memory_size"),
        (["run", "method.memory_temperature=0"], "method.memory_temperature"),
        (["run", "method.loss_temperature=-1"], "method.loss_temperature"),
        (["run", "method.name=simclr"], "method.name"),
        (["run", "--preset", "huge"], "preset"),
        (["run", "missing-run-file.yaml"], "run file"),
        (["run", "--workers", "0"], "resources.workers"),
        (["run", "method.name=avid", "data.paired_size=500"], "method.num_negatives"),
        (["run", "method.name=avid", "method.variant=self", "method.cma=true"], "method.variant"),
        (["run", "method.name=supervised", "method.pool=unpaired"], "method.pool"),
        # What the data or the schedule cannot serve, named by the method's check in full.
        (["run", "method.name=avid", "data.paired_size=1"], "data.paired_size"),
        (["run", "method.name=multissl", "data.binaural=false"], "data.binaural"),
        (["run", "method.name=multissl", "method.gap_slice_frames=100000"], "method.gap_slice_frames"),
        (["run", "method.name=multissl", "method.combination=incremental", "train.epochs=1"], "train.epochs"),
        # Probes that read what only the procedural binaural scenes carry.
        (["run", "eval.spatial_probe=true"], "eval.spatial_probe"),
        (["run", "eval.foreground_probe=true"], "eval.foreground_probe"),
        (["run", "optim.schedule=linear"], "optim.schedule"),
        (["run", "eval.sound_crops=0"], "eval.sound_crops"),
        (["run", "train.init_from=no-such-run"], "train.init_from"),
        (["run", "train.precision=fp16"], "train.precision"),
        # Non-finite numbers: NaN trains on NaN losses, infinity overflows the softmax.
        (["run", "method.memory_temperature=.nan"], "method.memory_temperature"),
        (["run", "method.memory_temperature=nan"], "method.memory_temperature"),
        (["run", "method.loss_temperature=.inf"], "method.loss_temperature"),
        (["run", "method.unpaired_weight=-.inf"], "method.unpaired_weight"),
        (["run", "optim.lr=1e999"], "optim.lr"),
        (["run", "optim.lr=inf"], "optim.lr"),
        (["run", f"optim.lr={10**400}"], "optim.lr"),
        (["run", "eval.linear_C=.nan"], "eval.linear_C"),
        # Credentials in a tracking URI would be written into <home>/jobs/*.json.
        (["run", "--tracking-uri", "http://alice:secret@127.0.0.1:5000"], "--tracking-uri"),
        (["run", "--tracking-uri", "postgresql://alice:secret@127.0.0.1/mlflow"], "--tracking-uri"),
        # Sizes that cannot fit this machine (the estimate runs on the meta device, allocating nothing).
        (["run", "method.memory_size=1000000000"], "method.memory_size"),
        (["run", "train.batch_size=10000000", "data.paired_size=10000000", "data.unpaired_sound_size=0",
          "data.unpaired_image_size=0"], "train.batch_size"),
        (["run", "method.image_encoder.base_width=100000", "method.sound_encoder.base_width=100000"],
         "method.image_encoder.base_width"),
        (["run", "train.data_workers=100000"], "train.data_workers"),
        # More than a local Ray on this machine has: the workers would wait for them forever.
        (["run", "resources.workers=64"], "resources.workers"),
        (["run", "resources.cpus_per_worker=4096"], "resources.cpus_per_worker"),
        pytest.param(["run", "resources.gpu=true"], "resources.gpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
        pytest.param(["run", "resources.gpu=0.25"], "resources.gpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
        # A share of a GPU is for one worker; DDP workers each need a whole one.
        (["run", "resources.gpu=0.5", "resources.workers=2"], "resources.gpu"),
        (["run", "resources.gpu=1.5"], "resources.gpu"),
        # Names that become folders stay inside the home.
        (["run", "tracking.experiment=../../../x"], "tracking.experiment"),
        (["run", "tracking.run_name=../ray/base"], "tracking.run_name"),
        (["sweep", SPACE, "--name", "../ray/base"], "--name"),
        (["resume", "../ray/base"], "NAME"),
        (["run", "seed=-1"], "seed"),
        (["run", f"seed={2**32}"], "seed"),
        (["run", "--tracking-uri", "foo://x"], "--tracking-uri"),
        (["sweep", SPACE, "--tracking-uri", "foo://x"], "--tracking-uri"),
        # Nothing listens there: Ray would retry it for minutes after the run was created.
        (["run", "--address", "127.0.0.1:1"], "--address"),
        (["sweep", SPACE, "--address", "127.0.0.1:1"], "--address"),
        (["run", "--address", "head-node"], "--address"),
        # The grid sets method.memory_size in every trial: the override would vanish without a word.
        (["sweep", SPACE, "method.memory_size=-5"], "method.memory_size"),
        (["sweep", SPACE, "seed=3"], "seed"),
        (["sweep", SPACE, "optim.lr=-1"], "optim.lr"),
    ],
)
def test_bad_input_exits_2_before_anything_starts(tmp_path, capsys, argv, field):
    import ray

    home = tmp_path / "home"
    code = main(["--home", str(home), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"avlab: error: {field}"), err
    assert not home.exists() or not any(home.iterdir())  # no MLflow store, no Ray results
    assert not ray.is_initialized()


HEADER = (",".join(COLUMNS) + "\n").encode()  # a manifest without rows


@pytest.mark.parametrize(
    "content, argv, start",
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", ["run", "FILE"], "run file: FILE is not UTF-8 text"),
        ("tracking:\n  experiment: café\n".encode("latin-1"), ["run", "FILE"], "run file: FILE is not UTF-8 text"),
        ("description: café\ngrid:\n  method.memory_size: [10]\n".encode("latin-1"), ["sweep", "FILE"],
         "search space: FILE is not UTF-8 text"),
        (b"seed: 1\nmethod: {name: bma}\nseed: 2\n", ["run", "FILE"],
         "run file: FILE is not valid YAML (duplicate key 'seed' on line 3)"),
        (b"grid:\n  method.memory_size: [10]\n  method.memory_size: [20]\n", ["sweep", "FILE"],
         "search space: FILE is not valid YAML (duplicate key 'method.memory_size' on line 3)"),
        (b"", ["run", "--home", "FILE"], "--home: FILE is a file"),
        (b"", ["data", "index", "folder", "FILE", "--out", "DIR", "--force"], "--out: DIR is a folder"),
        (HEADER, ["data", "check", "FILE"], "data.manifest: FILE: no rows"),
        # A value where a section belongs.
        (b"method: bma\n", ["run", "FILE"], "method: expected a section of key: value settings such as {name: bma}"),
        (b"train: 5\n", ["run", "FILE"], "train: expected a section of key: value settings, got 5"),
    ],
)
def test_bad_files_exit_2_naming_the_file(tmp_path, capsys, content, argv, start):
    """Binary, Latin-1 or ambiguous (a key given twice) run files and search spaces, a home that is
    a file, a manifest that is a folder or has no rows: one line naming the file, nothing created."""
    tmp_path = tmp_path.resolve()
    path = tmp_path / "input"
    path.write_bytes(content)
    names = {"FILE": str(path), "DIR": str(tmp_path)}
    code = main(["--home", str(tmp_path / "home"), *(names.get(a, a) for a in argv)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    expected = start.replace("FILE", str(path)).replace("DIR", str(tmp_path))
    assert len(err.splitlines()) == 1 and err.startswith(f"avlab: error: {expected}"), err
    assert list(tmp_path.iterdir()) == [path]


def test_commands_that_need_no_config_do_not_import_torch():
    """`--help`, `status`, `report` and `ui` read no experiment config: they start without torch,
    torchvision, scikit-learn or the config module (seconds on a small machine)."""
    code = (
        "import sys, orchestrator.cli, orchestrator.report, orchestrator.jobs, orchestrator.submit, orchestrator.ui\n"
        "orchestrator.cli.build_parser()\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'sklearn', 'methods', 'orchestrator.config') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_metrics_lists_what_a_configuration_logs(capsys):
    assert main(["metrics", "--preset", "tiny", "method.name=multissl"]) == 0
    names = capsys.readouterr().out.split()
    for name in ("loss_gap", "sound_h_spatial_acc", "retrieval_s2i_clip_rank1", "train_time_s", "pairs_per_s"):
        assert name in names
    assert "loss_pair" not in names and "l3_acc" not in names
    assert main(["metrics", "method.nme=l3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("avlab: error: method.nme: unknown config key"), err


def test_bad_run_file_contents(tmp_path, capsys):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("method:\n  memory_size: 100\n  loss_temperatur: 0.2\n")
    assert main(["--home", str(tmp_path / "h"), "run", str(run_file)]) == 2
    assert "method.loss_temperatur: unknown config key; did you mean method.loss_temperature?" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "avlab"
    out = subprocess.run([str(exe), "run", "trian.epochs=1"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "trian: unknown config key" in out.stderr
    assert not (tmp_path / "avlab-runs").exists()


@pytest.mark.slow
def test_avlab_storage_moves_checkpoints_to_shared_storage(tmp_path):
    """AVLAB_STORAGE (a shared folder or an s3:// URI on a cluster) holds Ray Train's checkpoints;
    the home keeps only MLflow and the job file, which records where the run's state lives."""
    import json

    home, storage = tmp_path / "home", tmp_path / "shared-storage"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AVLAB_STORAGE": str(storage)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(Path(sys.executable).parent / "avlab"), "run", "--home", str(home), "--ray-dashboard", "tracking.run_name=st",
        "train.epochs=1", "train.batch_size=64", "data.paired_size=128", "data.unpaired_sound_size=64",
        "data.unpaired_image_size=64", "data.train_size=100", "data.test_size=50", "data.transfer_train_size=0",
        "data.transfer_test_size=0", "method.memory_size=16",
        # The GPU settings also run on CPU: bf16 autocast and NHWC layout through a whole run.
        "train.precision=bf16", "train.channels_last=true",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[avlab] finished st" in out.stdout + out.stderr
    # Asked for, the local Ray's dashboard starts, on the loopback interface only.
    assert "[avlab] Ray dashboard: http://127.0.0.1:" in out.stdout
    assert list((storage / "st").glob("checkpoint_epoch*/checkpoint.pt"))
    assert not (home / "ray").exists() or not list((home / "ray").rglob("checkpoint.pt"))
    assert json.loads((home / "jobs" / "st.json").read_text())["storage"] == str(storage)


def test_deterministic_errors_are_told_apart_from_lost_workers():
    import torch.distributed as dist

    from orchestrator.train import NonFiniteLoss, is_deterministic

    for exc in (KeyError("label"), ValueError("x"), TypeError("x"), NonFiniteLoss("nan"), IndexError("i")):
        assert is_deterministic(exc), exc
    for exc in (dist.DistNetworkError("Connection closed by peer"), ConnectionResetError(), OSError("disk"),
                TimeoutError(), RuntimeError("[gloo] Connection closed by peer")):
        assert not is_deterministic(exc), exc


@pytest.mark.slow
def test_a_deterministic_error_fails_the_run_once_with_one_line(tmp_path):
    """A loss that diverges to NaN raises the same error on every attempt: the run fails at the
    first, with one line naming the cause and exit 1, is marked FAILED, keeps the traceback in
    failure.txt, and is not retried (one attempt tagged its nodes; one epoch line at most)."""
    from mlflow.tracking import MlflowClient

    home = tmp_path / "runs"
    # The raylet warns that its disk is "over 1% full" (as it does for real past 95 %); Ray streams
    # that to the driver's stderr, and the one-line error must still be the last line.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_local_fs_capacity_threshold": "0.01"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(Path(sys.executable).parent / "avlab"), "run", "--home", str(home), "tracking.run_name=diverges",
        "optim.name=sgd", "optim.lr=1e30", "train.epochs=2", "train.batch_size=64", "data.paired_size=128",
        "data.unpaired_sound_size=64", "data.unpaired_image_size=64", "data.train_size=100", "data.test_size=100",
        "data.transfer_train_size=0", "data.transfer_test_size=0", "method.memory_size=50",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("avlab: run diverges failed: NonFiniteLoss: the training loss is nan")
    # No traceback of the error and no retry (Ray may print its own tracebacks on a loaded machine).
    assert text.count("NonFiniteLoss") == 1 and "RETRY" not in text and "[avlab] epoch" not in text

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("avlab").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["avlab.failed"].startswith("NonFiniteLoss: the training loss is nan in epoch 0")
    assert "|" not in run.data.tags["avlab.node_history"]  # one attempt
    failure = client.download_artifacts(run.info.run_id, "failure.txt", str(tmp_path))
    assert "Traceback" in Path(failure).read_text()

    # Resuming it fails the same way at once, without starting Ray or training again.
    again = subprocess.run([cmd[0], "resume", "diverges", "--home", str(home)], cwd=tmp_path, capture_output=True,
                           text=True, env=env, timeout=600)
    assert again.returncode == 1, again.stderr[-2000:]
    assert again.stderr.strip().splitlines() == [out.stderr.strip().splitlines()[-1]]
    assert again.stdout == "" and client.get_run(run.info.run_id).info.status == "FAILED"

    # --retry-failed trains it again (its cause, in the config, is still there: it fails again, once).
    retried = subprocess.run([cmd[0], "resume", "diverges", "--retry-failed", "--home", str(home)], cwd=tmp_path,
                             capture_output=True, text=True, env=env, timeout=600)
    assert retried.returncode == 1, retried.stderr[-2000:]
    assert "retrying 1 failed run from its last checkpoint" in retried.stdout
    assert retried.stderr.strip().splitlines()[-1] == out.stderr.strip().splitlines()[-1]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED" and run.data.tags["avlab.failed"].startswith("NonFiniteLoss")
    assert run.data.tags["avlab.retries"] == "1" and run.data.tags["avlab.retried_failure"].startswith("NonFiniteLoss")
    assert run.data.tags["avlab.node_history"].count("|") == 1  # two attempts: the first, then the retry


# A weakref callback that sends its process a SIGTERM: the handler runs inside the callback.
CALLBACK_SENDS_SIGTERM = """
class Thing:
    pass

def callback(ref):
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(10000):  # the handler runs here, inside the callback
        pass
"""

# A Ray worker's SIGTERM handler (Ray's, by name and body) and a SIGTERM that lands while the main
# thread runs a weakref callback, where Python cannot raise the handler's SystemExit.
SIGTERM_IN_CALLBACK = """
import os, signal, sys, weakref
from ray._raylet import raise_sys_exit_with_custom_error_message

def sigterm_handler(signum, frame):
    raise_sys_exit_with_custom_error_message("The process receives a SIGTERM.", exit_code=1)

signal.signal(signal.SIGTERM, sigterm_handler)
if sys.argv[1] == "hook":
    from orchestrator.signals import quiet_worker_sigterm
    quiet_worker_sigterm()
""" + CALLBACK_SENDS_SIGTERM + """
thing = Thing()
ref = weakref.ref(thing, callback)
del thing
import time
time.sleep(3)  # a worker's main thread lives on (Ray's task loop)
print("carried on after the SIGTERM", flush=True)
"""


@pytest.mark.parametrize("hook", ["ray", "hook"])
def test_a_sigterm_inside_a_weakref_callback_exits_the_worker_without_a_traceback(hook):
    """Ray's handler alone: "Exception ignored" and a traceback on stderr, and the process carries
    on. With avlab's hook (installed in every trial, run task and Ray Train worker): the process
    exits with the handler's code once out of the callback, and prints nothing."""
    out = subprocess.run([sys.executable, "-c", SIGTERM_IN_CALLBACK, hook], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    if hook == "ray":
        assert out.returncode == 0 and "carried on" in out.stdout, out.stdout + out.stderr
        assert "Exception ignored" in out.stderr and "SystemExit" in out.stderr
    else:
        assert out.returncode == 1, out.stdout + out.stderr
        assert "carried on" not in out.stdout and "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr


# A driver inside sigterm_as_interrupt and a SIGTERM that lands while its main thread runs a weakref
# callback, where Python cannot raise the handler's KeyboardInterrupt.
DRIVER_SIGTERM_IN_CALLBACK = """
import os, signal, sys, time, weakref
from orchestrator.signals import sigterm_as_interrupt
""" + CALLBACK_SENDS_SIGTERM + """
try:
    with sigterm_as_interrupt():
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing
        time.sleep(3)  # the sweep's driver goes on waiting for its trials
        print("carried on after the SIGTERM", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_a_drivers_sigterm_inside_a_weakref_callback_still_interrupts_the_job():
    """Raised inside the callback, the KeyboardInterrupt would be printed as "Exception ignored"
    and lost (a sweep stopped by SIGTERM ran to its end); avlab's hook has it raised again once
    out of the callback, quietly."""
    out = subprocess.run([sys.executable, "-c", DRIVER_SIGTERM_IN_CALLBACK], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "interrupted", out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr


def _niceness(pid: int) -> int | None:
    """A process's nice value (field 19 of /proc/PID/stat), None when it has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[16])


@pytest.mark.slow
def test_a_run_beside_a_sweep_listens_on_loopback_only_and_both_finish_quietly(tmp_path):
    """Two avlab commands at once on one machine, each with its own local Ray: a run (with its
    dashboard) and a one-trial sweep. While both train, every process of both (driver, GCS,
    raylet, workers, agents, dashboard) listens on 127.0.0.1 only, as the socket table shows
    (before, Ray's servers listened on every interface). Both finish, each frees its own
    workers, and neither prints Ray Train's placement-group cleaner errors ("Found multiple
    active Ray instances", "Failed to query ... actor state") or a traceback. Ray's workers run
    at the commands' niceness, not reniced below Ray's daemons."""
    import faults

    small = ["train.epochs=3", "train.batch_size=64", "data.paired_size=256", "data.unpaired_sound_size=128",
             "data.unpaired_image_size=128", "data.train_size=100", "data.test_size=100",
             "data.transfer_train_size=0", "data.transfer_test_size=0"]
    space = tmp_path / "one.yaml"
    space.write_text("base:\n  preset: tiny\ngrid:\n  method.memory_size: [20]\nseeds: 1\n"
                     "metric: image_h_linear_acc\nmode: max\nresources: {workers: 1, cpus_per_worker: 1}\n")
    logs = {"run": tmp_path / "run.log", "sweep": tmp_path / "sweep.log"}
    procs = {
        "run": faults.start(["run", "--home", str(tmp_path / "a"), "--ray-dashboard", "tracking.run_name=lo",
                             "method.memory_size=50", *small], logs["run"], tmp_path),
        "sweep": faults.start(["sweep", str(space), "--name", "beside", "--home", str(tmp_path / "b"), *small],
                              logs["sweep"], tmp_path),
    }
    try:
        for key, proc in procs.items():
            faults.wait_for(lambda k=key: "[avlab] epoch 1/3" in logs[k].read_text(), timeout=600,
                            what=f"the {key}'s first epoch", proc=proc, log=logs[key])
        processes = {**faults.processes(procs["run"].pid), **faults.processes(procs["sweep"].pid)}
        sockets = faults.listening_sockets(processes)
        niceness = {pid: _niceness(pid) for pid, cmd in processes.items() if cmd.startswith("ray::")}
        codes = {k: p.wait(timeout=600) for k, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                faults.kill_node(p)
    texts = {k: log.read_text() for k, log in logs.items()}
    assert codes == {"run": 0, "sweep": 0}, {k: t[-3000:] for k, t in texts.items()}
    for text in texts.values():
        assert "multiple active Ray instances" not in text and "Failed to query" not in text
        assert "Traceback" not in text, text[-3000:]
    from mlflow.tracking import MlflowClient

    for home, experiment in ((tmp_path / "a", "avlab"), (tmp_path / "b", "avlab-sweeps")):
        client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert runs and all(r.info.status == "FINISHED" for r in runs)

    # Ray's workers (the run's task, the trial, idle workers) at this command's niceness: Ray
    # would renice them by +15, below its own daemons and the driver.
    assert any(processes[pid].startswith(("ray::avlab-run", "ray::ImplicitFunc")) for pid in niceness), niceness
    assert set(niceness.values()) <= {os.getpriority(os.PRIO_PROCESS, 0), None}, {
        processes[p][:40]: n for p, n in niceness.items()}
    assert sum("raylet" in processes[pid] for _, _, pid in sockets) >= 2  # the table was read, both Rays
    assert any("gcs_server" in processes[pid] for _, _, pid in sockets)
    exposed = [(host, port, processes[pid][:60]) for host, port, pid in sockets if host not in ("127.0.0.1", "::1")]
    # One known exception, documented in the README: torch.distributed's rendezvous store (a
    # TCPStore on the rank-0 training worker) binds every interface; torch offers no bind address.
    store = [s for s in exposed if s[2].startswith("ray::RayTrainWorker")]
    assert len(store) <= 2 and not [s for s in exposed if s not in store], exposed


def test_a_new_store_is_a_copy_of_the_migrated_empty_one_with_its_own_default_experiment(tmp_path, monkeypatch):
    """A new home's store starts from the empty store MLflow migrated once (cached per MLflow
    version), which holds no experiment; MLflow then adds the default experiment with this
    store's own artifact root. Without a writable cache folder the store is migrated in place."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    template = tracking.empty_store_template()
    assert template is not None and template.parent == tmp_path / "cache" / "avlab"
    with sqlite3.connect(template) as con:
        assert con.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)
    stores = {}
    for name, cache in (("copied", tmp_path / "cache"), ("migrated", tmp_path / "cache-file")):
        (tmp_path / "cache-file").write_text("not a folder")
        monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
        uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        tracking.prepare_store(uri)
        client = MlflowClient(uri)
        stores[name] = [(e.experiment_id, e.name, e.artifact_location) for e in client.search_experiments()]
        run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / name / "a")))
        client.log_metric(run.info.run_id, "loss", 1.0, step=0)
        assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0]
    assert stores["copied"] == stores["migrated"] == [("0", "Default", str(tmp_path / "mlruns" / "0"))]
    assert tracking.empty_store_template() is None  # XDG_CACHE_HOME is a file: nothing cached


def test_two_commands_creating_one_fresh_store_at_once_both_succeed(tmp_path):
    """MLflow's schema migration of a new SQLite store is not safe against a second process doing
    the same; avlab creates the store under a file lock."""
    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    code = ("import sys, time; from orchestrator.tracking import prepare_store; "
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); prepare_store(sys.argv[1]); "
            "from mlflow.tracking import MlflowClient; MlflowClient(sys.argv[1]).create_experiment(sys.argv[3])")
    start = time.time() + 8  # both import MLflow first, then create the store at the same moment
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, str(start), f"e{i}"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    from mlflow.tracking import MlflowClient

    names = {e.name for e in MlflowClient(uri).search_experiments()}
    assert {"e0", "e1", "e2"} <= names


def test_a_plain_mlflow_client_migrating_the_same_new_store_does_not_fail_avlab(tmp_path):
    """A plain MLflow client (no lock, unlike avlab's commands) creates and migrates a new store;
    avlab opens the same store while that migration is under way. MLflow's migration in avlab's
    process would trip over the other's half-made schema ("table ... already exists", "no such
    index ...", alembic's "expected to match one row"); avlab waits for the other one and opens the
    store, which ends whole (the plain client may fail its own half of the race under load)."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    db = tmp_path / "home" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    foreign = subprocess.Popen([sys.executable, "-c", "import sys; from mlflow.tracking import MlflowClient; "
                                "MlflowClient(sys.argv[1]).search_experiments()", uri],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (db.exists() and db.stat().st_size > 0):  # its migration has begun
        assert foreign.poll() is None and time.monotonic() < deadline, foreign.communicate()[0]
        time.sleep(0.005)
    tracking.prepare_store(uri)
    foreign.communicate(timeout=120)  # the plain client may lose the race itself: not avlab's to prevent
    client = MlflowClient(uri)
    assert [e.name for e in client.search_experiments()] == ["Default"]
    run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "a")))
    client.log_metric(run.info.run_id, "loss", 1.0, step=0)  # a whole store: avlab can write to it


def test_a_migrated_store_that_a_running_sweep_writes_opens_without_waiting_for_quiet(tmp_path):
    """Only a store whose schema is not yet at MLflow's version is left to go quiet before it is
    opened: `avlab status` beside a running sweep (which writes the store all the time) answers."""
    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    os.utime(tmp_path / "mlflow.db")  # written just now, as by a sweep's trials
    started = time.monotonic()
    client = tracking.open_store(uri, wait_s=60, quiet_s=30)
    assert time.monotonic() - started < 20
    assert [e.name for e in client.search_experiments()] == ["Default"]


@pytest.mark.parametrize("command", [["status", "some-sweep"], ["run", "train.epochs=0"]])
def test_a_store_that_is_not_an_mlflow_database_exits_2_naming_it_and_stays_as_it_was(tmp_path, capsys, command):
    home = tmp_path / "home"
    home.mkdir()
    (home / "mlflow.db").write_bytes(b"a disk error left this here\n" * 40)
    code = main([command[0], "--home", str(home), *command[1:]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == f"avlab: error: {home / 'mlflow.db'}: not an MLflow store that avlab can open (file is not a database)"
    assert (home / "mlflow.db").read_bytes() == b"a disk error left this here\n" * 40
    assert sorted(p.name for p in home.iterdir()) == ["mlflow.db", "mlflow.db.lock"] if command[0] == "run" else ["mlflow.db"]


HOLDER = """
import sys
import ray
from orchestrator.launch import init_ray
init_ray()
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_a_run_attaches_to_the_loopback_only_ray_of_another_avlab_command(tmp_path):
    """`--address 127.0.0.1:PORT` of a Ray that listens on loopback only (the local Ray that an
    avlab command starts): Ray would turn 127.0.0.1 into the machine's external address, where
    nothing answers, and retry it forever. The run attaches, trains and finishes."""
    import faults
    from conftest import AVLAB, TINY_RUN

    # Token authentication, as a local Ray has by default; the attaching command is given the token.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, env={**faults.env(), **auth, "PYTHONPATH": str(ROOT)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        address = holder.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        out = subprocess.run([AVLAB, "run", "--address", address, "--home", str(tmp_path / "home"), "tracking.run_name=att",
                              *TINY_RUN], cwd=tmp_path, env={**faults.env(), **auth}, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "Failed to connect to GCS" not in out.stderr
    finally:
        faults.kill_node(holder)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("avlab").experiment_id])
    assert run.info.status == "FINISHED" and "image_h_linear_acc" in run.data.metrics
