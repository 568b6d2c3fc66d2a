"""The `avlab run` contract: bad input exits 2 with one line naming the field, before Ray or
MLflow start; a real run on two DDP workers under a local Ray lands in exactly one MLflow run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parent.parent


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
        # More than a local Ray on this machine has: the workers would wait for them forever.
        (["run", "resources.workers=64"], "resources.workers"),
        (["run", "resources.cpus_per_worker=4096"], "resources.cpus_per_worker"),
        pytest.param(["run", "resources.gpu=true"], "resources.gpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
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
def test_run_tiny_two_workers_end_to_end(tmp_path):
    from mlflow.tracking import MlflowClient

    home = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(Path(sys.executable).parent / "avlab"), "run", "--preset", "tiny", "--workers", "2", "--home", str(home),
        "train.epochs=2", "train.batch_size=64", "data.paired_size=256", "data.unpaired_sound_size=128",
        "data.unpaired_image_size=128", "data.train_size=200", "data.test_size=100",
        "data.transfer_train_size=100", "data.transfer_test_size=100", "method.memory_size=50",
        "eval.every_epochs=1",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[avlab] epoch 2/2" in out.stdout + out.stderr
    assert "Ray dashboard" not in out.stdout  # not started unless asked (--ray-dashboard)

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("avlab")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["method.memory_size"] == "50" and run.data.params["resources.workers"] == "2"
    assert run.data.tags["avlab.method"] == "bma" and run.data.tags["avlab.preset"] == "tiny"
    for term in ("loss", "loss_pair", "loss_unpair_sound", "loss_unpair_image"):
        history = client.get_metric_history(run.info.run_id, term)
        assert [m.step for m in history] == [0, 1], term
    # the quick kNN probe after epoch 0 (eval.every_epochs=1), then the final evaluation
    assert [m.step for m in client.get_metric_history(run.info.run_id, "image_h_knn_acc")] == [0, 1]
    metrics = run.data.metrics
    for key in ("image_h_linear_acc", "image_h_linear_f1", "image_h_knn_acc", "sound_h_linear_acc",
                "sound_h_knn_acc", "image_z_linear_acc", "retrieval_s2i_rank1", "retrieval_s2i_rank5",
                "transfer_sound_h_linear_acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["retrieval_s2i_rank5"] >= metrics["retrieval_s2i_rank1"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "config.yaml" in artifacts and "plots/confusion_image_h_linear.png" in plots
    # Ray Train kept per-epoch checkpoints under the run's fixed name.
    ckpts = list((home / "ray").glob("bma-tiny-*/checkpoint_epoch*"))
    assert ckpts, list((home / "ray").rglob("*"))[:20]


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
