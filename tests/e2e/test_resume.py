"""Preemption: checkpoints that prove they are whole, data loaders that resume mid-epoch, and real
faults (SIGKILL of a training worker, of the driver with its whole node, a damaged checkpoint)
after which a run ends exactly where an uninterrupted one ends, in one MLflow run."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import faults
from orchestrator import checkpoint as ckpt
from orchestrator.cli import main
from orchestrator.metrics import COST_METRICS, TIMING_METRICS, USAGE_METRICS

# Three epochs on two DDP workers; 16 steps per epoch, the unpaired pools (6 batches) wrap mid-epoch;
# the quick kNN probe after every epoch, and the whole evaluation (transfer split too) at the end.
RUN = [
    "--preset", "tiny", "--workers", "2",
    "train.epochs=3", "train.batch_size=64", "data.paired_size=1024", "data.unpaired_sound_size=384",
    "data.unpaired_image_size=384", "data.train_size=200", "data.test_size=100", "data.val_size=100",
    "data.transfer_train_size=60", "data.transfer_test_size=60", "method.memory_size=50", "eval.every_epochs=1",
]
TIMINGS = ("epoch_time_s", "pairs_per_s", *COST_METRICS, *TIMING_METRICS, *USAGE_METRICS)


# --- units ---------------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_every_kind_of_damage(tmp_path):
    state = {"model": {"w": torch.arange(6.0)}, "optimizer": {}, "epoch": 4, "rng": [torch.get_rng_state()],
             "loaders": {"usound": {"epoch": 2, "consumed": 3}}}
    path = ckpt.save(tmp_path / "c", state)
    loaded = ckpt.load(tmp_path / "c")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["loaders"] == state["loaders"]

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ckpt.CheckpointError, match=f"{path}: truncated"):
        ckpt.load(tmp_path / "c")
    path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # same size, one bit flipped
    with pytest.raises(ckpt.CheckpointError, match=f"{path}: damaged"):
        ckpt.load(tmp_path / "c")
    path.write_bytes(data)
    (tmp_path / "c" / ckpt.CHECKSUM_FILE).unlink()  # the writer died before the checksum file
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.json: missing"):
        ckpt.load(tmp_path / "c")
    ckpt.save(tmp_path / "d", {"model": {}, "epoch": 0})
    with pytest.raises(ckpt.CheckpointError, match="lacks optimizer, rng, loaders"):
        ckpt.load(tmp_path / "d")


def _state(epoch: int) -> dict:
    return {"model": {"w": torch.full((3,), float(epoch))}, "optimizer": {}, "epoch": epoch,
            "rng": [torch.get_rng_state()], "loaders": {}}


def test_a_single_worker_trial_keeps_whole_checkpoints_and_falls_back_past_a_damaged_one(tmp_path):
    """The checkpoints a single-worker trial writes itself (``TrialHost``): whole folders under the
    names Ray Train uses, the newest ``keep`` kept, and on resume the newest usable one, found by
    the loader that multi-worker runs use."""
    from orchestrator.hosts import TrialHost

    run_dir = tmp_path / "trials" / "sw-abc"
    host = TrialHost(str(run_dir), keep=2, gpu=False)
    assert host.latest_checkpoint() is None and host.device == torch.device("cpu")
    (run_dir / ".checkpoint_epoch00000.tmp-dead").mkdir()  # what a copy killed midway leaves
    for epoch in range(3):
        with __import__("tempfile").TemporaryDirectory() as tmp:
            ckpt.save(tmp, _state(epoch))
            host._persist(tmp, ckpt.dir_name(epoch))
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_epoch00001", "checkpoint_epoch00002"]
    latest = host.latest_checkpoint()
    assert latest.path.endswith("checkpoint_epoch00002")
    assert ckpt.load_latest(latest, torch.device("cpu"))["epoch"] == 2

    newest = run_dir / "checkpoint_epoch00002" / ckpt.STATE_FILE
    newest.write_bytes(newest.read_bytes()[:100])
    state = ckpt.load_latest(host.latest_checkpoint(), torch.device("cpu"))
    assert state["epoch"] == 1 and str(newest) in state["_skipped"][0] and "truncated" in state["_skipped"][0]
    with pytest.raises(ValueError, match="does not match"):
        host._persist(str(run_dir / "checkpoint_epoch00001"), "latest")


class _Indices(Dataset):
    def __init__(self, n):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": torch.tensor(i), "epoch": torch.tensor(self.epoch)}


# 6 and 12: right after the last batch of an epoch (6 batches per epoch here): the resumed
# loader must go on with the next epoch, not an empty remainder of this one.
@pytest.mark.parametrize("taken", [0, 3, 5, 6, 7, 11, 12])
def test_unpaired_loader_resumes_at_the_same_batch(taken):
    from orchestrator.loaders import Loader

    def loader():
        return Loader(_Indices(50), batch=4, world=2, rank=1, seed=7, workers=0)

    whole = loader().forever()
    expected = [next(whole) for _ in range(taken + 8)]
    first = loader()
    it = first.forever()
    for _ in range(taken):
        next(it)
    resumed = loader()
    resumed.load_state(json.loads(json.dumps(first.state())))  # through the checkpoint's format
    it = resumed.forever()
    for want in expected[taken:]:
        got = next(it)
        assert torch.equal(got["index"], want["index"]) and torch.equal(got["epoch"], want["epoch"])


def test_resume_names_bad_input_before_anything_starts(tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["resume", "nothing-here", "--home", str(home)]) == 2
    assert "NAME: no run or sweep named 'nothing-here'" in capsys.readouterr().err
    (home / "jobs").mkdir(parents=True)
    (home / "jobs" / "broken.json").write_text("{not json")
    assert main(["resume", "broken", "--home", str(home)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.json: unreadable" in err
    assert main(["run", "tracking.run_name=a/b", "--home", str(home)]) == 2
    assert "tracking.run_name: 'a/b' is not a valid name" in capsys.readouterr().err
    assert sorted(p.name for p in home.iterdir()) == ["jobs"]


# --- real faults ----------------------------------------------------------------------------------

def _only_run(home: Path, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("avlab").experiment_id])
    assert [r.info.run_name for r in runs] == [name]  # exactly one MLflow run
    return client, runs[0]


def _history(client, run, key="loss"):
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def _results(client, run) -> dict[str, float]:
    """Everything a run measured except wall-clock timings."""
    return {k: v for k, v in run.data.metrics.items() if k not in TIMINGS and not k.startswith("system/")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, never interrupted."""
    home = tmp_path_factory.mktemp("reference")
    out = faults.run(["run", "--home", str(home), "tracking.run_name=ref", *RUN], cwd=home)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, run = _only_run(home, "ref")
    assert run.info.status == "FINISHED" and [s for s, _ in _history(client, run)] == [0, 1, 2]
    return _history(client, run), _results(client, run), home, out.stdout + out.stderr


@pytest.mark.slow
def test_a_two_worker_run_logs_its_config_losses_probes_evaluation_and_checkpoints(reference):
    """The uninterrupted run end to end: one MLflow run with the config as params and tags, every
    loss term per epoch, the quick probe after every epoch, the downstream metrics and plots, and
    the checkpoints under the run's name; no Ray dashboard unless asked."""
    *_, home, text = reference
    assert "[avlab] epoch 3/3" in text and "[avlab] finished ref" in text
    assert "Ray dashboard" not in text  # not started unless asked (--ray-dashboard)
    client, run = _only_run(home, "ref")
    assert run.data.params["method.memory_size"] == "50" and run.data.params["resources.workers"] == "2"
    assert run.data.tags["avlab.method"] == "bma" and run.data.tags["avlab.preset"] == "tiny"
    for term in ("loss", "loss_pair", "loss_unpair_sound", "loss_unpair_image", "lr", "epoch_time_s", "cpu_pct"):
        assert [s for s, _ in _history(client, run, term)] == [0, 1, 2], term
    # the quick kNN probe on the validation split after epochs 0 and 1 (eval.every_epochs=1), then
    # the final evaluation on the test split
    assert [s for s, _ in _history(client, run, "val_image_h_knn_acc")] == [0, 1]
    assert [s for s, _ in _history(client, run, "image_h_knn_acc")] == [2]
    metrics = run.data.metrics
    assert metrics["train_cpu_pct"] > 0  # the epochs' CPU use, weighted by their length
    for key in ("image_h_linear_acc", "image_h_linear_f1", "image_h_knn_acc", "sound_h_linear_acc",
                "sound_h_knn_acc", "image_z_linear_acc", "retrieval_s2i_rank1", "retrieval_s2i_rank5",
                "transfer_sound_h_linear_acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["retrieval_s2i_rank5"] >= metrics["retrieval_s2i_rank1"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "config.yaml" in artifacts and "plots/confusion_image_h_linear.png" in plots
    # Ray Train kept the newest train.checkpoints_to_keep (2) per-epoch checkpoints under the run's name.
    assert sorted(p.name for p in (home / "ray" / "ref").glob("checkpoint_epoch*")) == [
        "checkpoint_epoch00001", "checkpoint_epoch00002"]


@pytest.mark.slow
def test_worker_sigkill_mid_epoch_restarts_from_checkpoint_and_ends_identical(tmp_path, reference):
    home, log = tmp_path / "home", tmp_path / "run.log"
    proc = faults.start(["run", "--home", str(home), "tracking.run_name=wk", *RUN], log, tmp_path)
    run_dir = home / "ray" / "wk"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    faults.wait_for(lambda: snapshot.exists() and "checkpoint_epoch00000" in snapshot.read_text(),
                    timeout=300, what="Ray Train to register the first checkpoint", proc=proc, log=log)
    time.sleep(1.0)  # into epoch 2 (about 5 s long)
    workers = faults.training_workers(proc.pid)
    assert len(workers) == 2, faults.processes(proc.pid)
    assert not (run_dir / "checkpoint_epoch00001").exists()  # epoch 2 is under way
    os.kill(workers[-1], signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]

    text = log.read_text()
    assert "resumed from" in text and "checkpoint_epoch00000/checkpoint.pt (epoch 1/3 done)" in text
    client, run = _only_run(home, "wk")
    history, results, *_ = reference
    assert run.info.status == "FINISHED"
    assert _history(client, run) == history  # no gap, no repeated step, same values
    assert _results(client, run) == results  # bit-identical downstream metrics


@pytest.mark.slow
def test_a_single_worker_run_killed_then_interrupted_is_restarted_and_resumed_from_its_checkpoints(tmp_path):
    """A one-worker run trains in one Ray task (no Ray Train controller, worker group or process
    group). Its process is SIGKILLed in the second epoch: Ray starts the task again, which
    resumes from the first epoch's checkpoint. Then Ctrl-C stops the run (KILLED), and
    `avlab resume` finishes it: one MLflow run, FINISHED, every step logged once, three attempts
    in its node history."""
    home, log = tmp_path / "home", tmp_path / "run.log"
    one = [*RUN, "--workers", "1", "data.paired_size=512", "data.unpaired_sound_size=192",
           "data.unpaired_image_size=192", "data.transfer_train_size=0", "data.transfer_test_size=0"]
    proc = faults.start(["run", "--home", str(home), "tracking.run_name=one", *one], log, tmp_path)
    run_dir = home / "ray" / "one"
    faults.wait_for(lambda: (run_dir / "checkpoint_epoch00000" / ckpt.CHECKSUM_FILE).exists(), timeout=300,
                    what="the first checkpoint", proc=proc, log=log)
    processes = faults.processes(proc.pid)
    assert not [cmd for cmd in processes.values() if cmd.startswith(("ray::RayTrainWorker", "ray::TrainController"))]
    (worker,) = [pid for pid, cmd in processes.items() if cmd.startswith("ray::avlab-run-one")]
    assert not (run_dir / "checkpoint_epoch00001").exists()  # epoch 2 is under way
    os.kill(worker, signal.SIGKILL)
    faults.wait_for(lambda: "checkpoint_epoch00000/checkpoint.pt (epoch 1/3 done)" in log.read_text(), timeout=300,
                    what="the restarted task to resume", proc=proc, log=log)

    # Then Ctrl-C: one line, exit 130, the run KILLED (not FAILED); `avlab resume` finishes it.
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 130, log.read_text()[-4000:]
    ours = [line for line in log.read_text().splitlines() if line.startswith("avlab:")]
    assert ours == ["avlab: run one interrupted; `avlab resume one` continues it from its last checkpoint"], ours
    client, run = _only_run(home, "one")
    assert run.info.status == "KILLED"
    faults.kill_node(proc)  # whatever of its Ray is left
    out = faults.run(["resume", "one", "--home", str(home)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]

    client, run = _only_run(home, "one")
    assert run.info.status == "FINISHED" and run.data.params["resources.workers"] == "1"
    for key in ("loss", "lr", "epoch_time_s"):
        assert [s for s, _ in _history(client, run, key)] == [0, 1, 2], key  # every step, once
    # The first attempt, its restart after the SIGKILL, and the resumed one after Ctrl-C.
    assert len(run.data.tags["avlab.node_history"].split(" | ")) == 3, run.data.tags["avlab.node_history"]
    # train.checkpoints_to_keep (2): the newest two, whole, and no temporary folder of the killed attempt.
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_epoch00001", "checkpoint_epoch00002"]


@pytest.mark.slow
def test_ray_stopped_then_node_lost_then_damaged_newest_checkpoint_resume_falls_back(tmp_path, reference):
    """Ray goes away under a run, then the whole node, then the disk damages the newest checkpoint.

    The raylet is killed mid-run (after the second checkpoint): the driver ends without avlab's
    traceback (when Ray raises, with one line and the command that continues it). The rest of
    the node is killed (driver, GCS, workers: what a lost head node leaves), and the newest
    checkpoint is truncated. ``avlab resume`` names the damaged file, falls back to the previous
    checkpoint and ends where an uninterrupted run ends; resuming the finished run changes nothing."""
    home, log = tmp_path / "home", tmp_path / "run.log"
    proc = faults.start(["run", "--home", str(home), "tracking.run_name=dk", *RUN], log, tmp_path)
    snapshot = home / "ray" / "dk" / "checkpoint_manager_snapshot.json"
    faults.wait_for(lambda: snapshot.exists() and "checkpoint_epoch00001" in snapshot.read_text(),
                    timeout=300, what="Ray Train to register the second checkpoint", proc=proc, log=log)
    (raylet,) = [pid for pid, cmd in faults.processes(proc.pid).items() if "/raylet/raylet " in cmd]
    # The raylet and the training workers go at once (without their raylet the workers would
    # train on, and finish, for a while).
    for pid in (raylet, *faults.training_workers(proc.pid)):
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=300) == 1, log.read_text()[-3000:]
    text = log.read_text()
    # When Ray raises in the driver, avlab says what happened in one line (Ray's core worker may
    # still log after it). Ray's core worker may also end the driver process itself, with no
    # Python exception to catch; either way no avlab traceback is printed.
    ours = [line for line in text.splitlines() if line.startswith("avlab:")]
    assert len(ours) <= 1, ours
    if ours:
        assert ours[0].startswith("avlab: Ray stopped under run dk (") and ours[0].endswith(
            "`avlab resume dk` continues it from its last checkpoint"), ours
    assert "File \"" + str(Path(ckpt.__file__).parent / "cli.py") not in text, text[-3000:]
    assert "checkpoint_epoch00002" not in text  # stopped in its third epoch
    faults.kill_node(proc)  # whatever of that Ray and node is left

    client, run = _only_run(home, "dk")
    # FAILED when the driver saw Ray stop, RUNNING when Ray's core worker ended it first.
    assert run.info.status in ("FAILED", "RUNNING") and [s for s, _ in _history(client, run)][:2] == [0, 1]
    newest = home / "ray" / "dk" / "checkpoint_epoch00001" / ckpt.STATE_FILE
    newest.write_bytes(newest.read_bytes()[:4096])  # a truncated copy, as a dying disk leaves it

    out = faults.run(["resume", "dk", "--home", str(home)], cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert f"WARNING: unusable checkpoint: {newest}: truncated" in text
    assert "checkpoint_epoch00000/checkpoint.pt (epoch 1/3 done)" in text
    client, run = _only_run(home, "dk")
    history, results, *_ = reference
    assert run.info.status == "FINISHED" and run.data.tags["avlab.resumed"] == "1"
    assert str(newest) in run.data.tags["avlab.checkpoint_skipped"]
    assert _history(client, run) == history  # no gap, no repeated step, same values
    assert _results(client, run) == results  # bit-identical downstream metrics

    again = faults.run(["resume", "dk", "--home", str(home)], cwd=tmp_path)
    assert again.returncode == 0 and "run dk already finished" in again.stdout
    _, same = _only_run(home, "dk")
    assert same.info.end_time == run.info.end_time and same.data.tags == run.data.tags


def test_init_from_resolves_runs_and_checkpoints_and_names_bad_ones(tmp_path):
    from orchestrator.config import ConfigError

    home = tmp_path / "home"
    for epoch in (0, 1):
        ckpt.save(home / "ray" / "pre" / ckpt.dir_name(epoch),
                  {"model": {"E_v.w": torch.ones(2)}, "optimizer": {}, "epoch": epoch, "rng": [], "loaders": {}})
    newest = home / "ray" / "pre" / ckpt.dir_name(1)
    assert ckpt.resolve_init("pre", home) == newest.resolve()
    assert ckpt.resolve_init(str(newest / ckpt.STATE_FILE), home) == newest.resolve()
    (newest / ckpt.STATE_FILE).write_bytes(b"not a checkpoint")
    assert ckpt.resolve_init("pre", home) == (home / "ray" / "pre" / ckpt.dir_name(0)).resolve()  # skips it
    with pytest.raises(ConfigError, match="train.init_from: 'nope' is neither a checkpoint nor a run"):
        ckpt.resolve_init("nope", home)
    with pytest.raises(ConfigError, match="train.init_from: no usable checkpoint"):
        ckpt.resolve_init(str(newest), home)
    own = {"E_v.w": torch.zeros(2), "E_v.b": torch.zeros(3), "head.w": torch.zeros(4)}
    assert ckpt.matching_weights(own, {"E_v.w": torch.ones(2), "E_v.b": torch.ones(5), "x": torch.ones(1)}).keys() == {"E_v.w"}
    assert main(["run", "train.init_from=nope", "--home", str(home)]) == 2


class _RunsACommand:
    """Unpickling this runs ``touch <marker>``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    """A pickle that calls os.system, with a manifest that matches it (whoever writes the file
    writes the manifest), must not run its command, neither when read nor through the CLI."""
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    ckpt.save(bad, {"model": {"E_v.w": torch.ones(2)}, "optimizer": {}, "epoch": 1, "rng": [],
                    "loaders": {}, "payload": _RunsACommand(marker)})
    with pytest.raises(ckpt.CheckpointError, match="not a loadable avlab checkpoint"):
        ckpt.load(bad)
    assert main(["run", f"train.init_from={bad}", "--home", str(tmp_path / "home")]) == 2
    err = capsys.readouterr().err
    assert "train.init_from" in err and str(bad) in err and "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "home" / "jobs").exists()  # refused before any run was created


@pytest.mark.parametrize("field, value, problem", [
    ("model", {"E_v.w": "weights"}, "'model' entry 'E_v.w' is not a named tensor"),
    ("model", {}, "'model' is not a non-empty mapping"),
    ("model", [torch.ones(2)], "'model' is not a non-empty mapping"),
    ("epoch", -3, "'epoch' is -3"),
    ("epoch", "one", "'epoch' is 'one'"),
    ("rng", {"python": 1}, "'rng' is of type dict, not list"),
    ("loaders", 7, "'loaders' is of type int, not dict"),
])
def test_init_from_with_the_right_keys_but_garbage_values_exits_2(tmp_path, capsys, field, value, problem):
    state = {"model": {"E_v.w": torch.ones(2)}, "optimizer": {}, "epoch": 1, "rng": [], "loaders": {}}
    ckpt.save(tmp_path / "c", {**state, field: value})
    with pytest.raises(ckpt.CheckpointError, match=problem.replace("(", r"\(")):
        ckpt.load(tmp_path / "c")
    assert main(["run", f"train.init_from={tmp_path / 'c'}", "--home", str(tmp_path / "home")]) == 2
    err = capsys.readouterr().err
    assert "train.init_from: no usable checkpoint" in err and problem in err
    assert not (tmp_path / "home" / "jobs").exists()


def test_checkpoints_hold_no_numpy_objects_and_older_ones_still_load(tmp_path):
    """The RNG states are stored as tensors and numbers, so ``weights_only`` needs no allow-list;
    a checkpoint from before (numpy's state as an array) still loads, with exactly numpy's
    plain-array globals allowed."""
    import random

    import numpy as np

    from orchestrator.train import _rng_state, _set_rng_state

    np.random.seed(5), random.seed(5), torch.manual_seed(5)
    state = _rng_state()
    ckpt.save(tmp_path / "new", {"model": {"w": torch.ones(1)}, "optimizer": {}, "epoch": 0, "rng": [state],
                                 "loaders": {}})
    expected = (np.random.rand(3), random.random(), torch.rand(2))
    _set_rng_state(torch.load(tmp_path / "new" / ckpt.STATE_FILE, weights_only=True)["rng"][0])
    assert (np.random.rand(3) == expected[0]).all() and random.random() == expected[1]
    assert torch.equal(torch.rand(2), expected[2])

    np.random.seed(5)
    old = {**state, "numpy": np.random.get_state()}
    ckpt.save(tmp_path / "old", {"model": {"w": torch.ones(1)}, "optimizer": {}, "epoch": 0, "rng": [old],
                                 "loaders": {}})
    _set_rng_state(ckpt.load(tmp_path / "old")["rng"][0])
    assert (np.random.rand(3) == expected[0]).all()


@pytest.mark.slow
def test_fine_tuning_trains_every_weight_from_a_finished_run(reference):
    """Supp. Table 1's protocol: the supervised method on the labelled split, started from the
    encoders of a finished self-supervised run (found by its name)."""
    _, _, home, _ = reference
    out = faults.run(["run", "--home", str(home), "tracking.run_name=ft", "tracking.experiment=finetune",
                      "method.name=supervised", "method.pool=train", "train.init_from=ref", "train.epochs=1",
                      *[o for o in RUN[4:] if not o.startswith(("train.epochs", "method.memory", "eval.every"))]],
                     cwd=home)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert f"from {home / 'ray' / 'ref' / 'checkpoint_epoch00002' / 'checkpoint.pt'}" in text
    initialised = int(text.split("initialised ")[1].split(" of ")[0])
    assert initialised > 100  # both encoders, not the classifiers the pretrained run lacks


@pytest.mark.slow
def test_a_run_resumes_after_an_upgrade_adds_an_option_and_refuses_another_configurations_checkpoint(
        tmp_path, monkeypatch, capsys):
    """The loop a one-worker run or trial trains in, in this process. A run that wrote a
    checkpoint resumes from it after an upgrade that adds an option at its neutral value (the
    config's identity is unchanged); a different configuration pointed at the same checkpoints
    fails once, with one line that names the checkpoint, instead of being retried."""
    import dataclasses

    import ray
    from mlflow.tracking import MlflowClient

    from methods import registry
    from orchestrator import tracking
    from methods.base import neutral_field
    from orchestrator.config import resolve
    from orchestrator.launch import init_ray
    from orchestrator.train import train_in_trial
    from orchestrator.worker_spec import WorkerSpec

    if not ray.is_initialized():
        init_ray()  # a trial records its node: the local, loopback-only Ray of an avlab command
    small = ["resources.workers=1", "train.epochs=1", "train.batch_size=32", "data.paired_size=64",
             "data.unpaired_sound_size=32", "data.unpaired_image_size=32", "data.train_size=40", "data.test_size=20",
             "data.transfer_train_size=0", "data.transfer_test_size=0", "method.memory_size=10",
             "eval.features=[h]", "eval.linear=false", "eval.retrieval=false", "tracking.log_model=false"]
    cfg = resolve(overrides=small)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("upgrade", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    run_dir = str(tmp_path / "run")

    def attempt(config) -> str:
        train_in_trial(WorkerSpec(config.to_dict(), run_id, uri), run_dir, tune=False)
        return capsys.readouterr().err  # the loop's progress lines go to stderr

    assert "epoch 1/1" in attempt(cfg) and not tracking.recorded_failure(client, run_id)

    # The upgrade: BMA-Memory gains an option whose default keeps the old behaviour.
    entry = registry.METHODS["bma"]
    upgraded = dataclasses.make_dataclass("BMAConfig", [("new_option", bool, neutral_field(False))],
                                          bases=(entry.config_cls,), frozen=True)
    monkeypatch.setitem(registry.METHODS, "bma", entry._replace(config_cls=upgraded))
    after = resolve(overrides=small)
    assert isinstance(after.method, upgraded) and after.identity() == cfg.identity()
    text = attempt(after)
    assert "resumed from" in text and "(epoch 1/1 done)" in text and "epoch 1/1 loss" not in text, text
    assert not tracking.recorded_failure(client, run_id)

    # Another configuration on the same checkpoints: one recorded line, no traceback, no retry.
    other = resolve(overrides=[*small, "method.memory_size=20"])
    attempt(other)
    line = tracking.recorded_failure(client, run_id)
    assert line.startswith(f"CheckpointError: checkpoint {tmp_path / 'run' / 'checkpoint_epoch00000'}: "
                           "written by another configuration"), line

    # Every checkpoint damaged (a new run on the same folder): one line too, not a retried error.
    run_id = client.create_run(experiment).info.run_id
    state = tmp_path / "run" / "checkpoint_epoch00000" / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    attempt(cfg)
    line = tracking.recorded_failure(client, run_id)
    assert line.startswith(f"CheckpointError: no usable checkpoint in {tmp_path / 'run'}: ") and "truncated" in line, line
