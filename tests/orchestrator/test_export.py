"""Exported encoders (safetensors + JSON): every method's encoders come back bit for bit, a bad
folder is named in one line, and `avlab export` refuses what it cannot do before writing. The
end-to-end path (a sweep's runs log them, `--best` registers and reloads them) is in
test_sweep.py, on the sweep that file already runs."""

from __future__ import annotations

import json

import pytest
import torch

from methods.export import META_FILE, META_MAX_BYTES, WEIGHTS_FILE, EncoderFeatures, ExportError, load_encoders, save_encoders
from methods.registry import METHODS, build_method
from orchestrator.cli import main
from orchestrator.config import resolve
from orchestrator.export import input_shapes


def _trained_looking(method: torch.nn.Module) -> torch.nn.Module:
    """Weights and BatchNorm statistics moved away from their initial values."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for module in method.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.9, 1.1)
            module.num_batches_tracked.fill_(7)
    return method.eval()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_methods_encoders_come_back_bit_for_bit(tmp_path, name):
    from methods.data import build_dataset

    cfg = resolve({"method": {"name": name}}, preset="tiny", overrides=["data.train_size=20",
                                                                        "data.test_size=20"])
    data = build_dataset(cfg.data)
    method = _trained_looking(build_method(cfg.method_name, cfg.method, data.info()))
    shapes = input_shapes(data)
    save_encoders(method, tmp_path, config=cfg.to_dict(), input_shapes=shapes, run_id="r1")
    loaded = load_encoders(tmp_path)
    images = torch.rand(3, *shapes["image"])
    sounds = torch.randn(3, *shapes["sound"])
    assert torch.equal(loaded.image(images), method.E_v(images))
    assert torch.equal(loaded.sound(sounds), method.E_s(sounds))
    assert not loaded.image.training and loaded.meta["method"] == name and loaded.meta["run_id"] == "r1"
    assert loaded.meta["encoders"]["image"]["input_shape"] == shapes["image"]
    assert loaded.meta["config"] == json.loads(json.dumps(cfg.to_dict(), default=str))
    # What `avlab evaluate --encoders-only` probes: the method's own f features, from the encoders alone.
    own, exported = method.embed(images=images, sounds=sounds), EncoderFeatures(loaded).embed(images=images, sounds=sounds)
    assert set(exported) == {"f_v", "f_s"}
    for key in exported:
        torch.testing.assert_close(exported[key], own[key], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = resolve(None, preset="tiny")
    from methods.data.pools import DataInfo

    method = build_method(cfg.method_name, cfg.method, DataInfo())
    folder = tmp_path_factory.mktemp("exported")
    save_encoders(method, folder, config=cfg.to_dict(), input_shapes={"image": [3, 32, 32], "sound": [1, 40, 64]})
    return folder


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / META_FILE).unlink(), "encoders.json: not found"),
        (lambda f: (f / META_FILE).write_text("{nope"), "encoders.json: not valid JSON"),
        (lambda f: (f / META_FILE).write_text('{"format": 9}'), "encoders.json: format: expected 1, got 9"),
        (lambda f: (f / WEIGHTS_FILE).write_bytes(b"\x00" * 64), "encoders.safetensors: not a safetensors file"),
        (lambda f: _edit_meta(f, lambda m: m["encoders"]["image"]["config"].update(arch="resnet99")),
         "encoders.json: encoders.image: arch: unknown encoder 'resnet99'"),
        (lambda f: _edit_meta(f, lambda m: m["encoders"]["sound"]["config"].update(base_width=32)),
         "encoders.safetensors: does not match encoders.json: sound."),
        # Declarations the weights do not hold are refused before anything is built or allocated:
        # 16 -> 1024 would build a 10 GiB encoder, 1e6 one of terabytes.
        (lambda f: _edit_meta(f, lambda m: m["encoders"]["image"]["config"].update(base_width=1024)),
         "encoders.safetensors: does not match encoders.json: image.stem.0.weight has shape (16, 3, 7, 7), "
         "the encoder (1024, 3, 7, 7)"),
        (lambda f: _edit_meta(f, lambda m: m["encoders"]["image"]["config"].update(base_width=10**12)),
         "encoders.json: encoders.image: cannot be built: "),
        (lambda f: _edit_meta(f, lambda m: m["encoders"]["image"]["config"].update(base_width=1e6)),
         "encoders.json: encoders.image.config.base_width: expected int, got 1000000.0"),
        (lambda f: _edit_meta(f, lambda m: m["encoders"]["sound"].update(in_channels="2")),
         "encoders.json: encoders.sound.in_channels: must be a positive integer, got '2'"),
        (lambda f: (f / META_FILE).write_text('{"format": 1, "encoders": ' + "[" * 200_000 + "]" * 200_000 + "}"),
         "encoders.json: not valid JSON: nested too deeply"),
        (lambda f: (f / META_FILE).write_text('{"format": 1, "pad": "' + "x" * META_MAX_BYTES + '"}'),
         f"encoders.json: {META_MAX_BYTES + 24} bytes; an encoders.json holds two encoders"),
    ],
)
def test_a_damaged_export_is_named_in_one_line(tmp_path, exported, damage, message):
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in exported.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    damage(folder)
    with pytest.raises(ExportError) as info:
        load_encoders(folder)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def _edit_meta(folder, change) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    change(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def test_export_of_an_unknown_name_exits_2_and_writes_nothing(tmp_path, capsys):
    from orchestrator import tracking

    home = tmp_path / "home"
    tracking.prepare_store(f"sqlite:///{home / 'mlflow.db'}")
    assert main(["export", "nothing", "--out", str(tmp_path / "out"), "--home", str(home)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "avlab: error: export: no run or sweep named 'nothing' in this store", err
    assert not (tmp_path / "out").exists()


def test_a_concat_multissl_run_skips_the_export_with_one_line_and_every_other_method_exports(capsys):
    """Multi-SSL's ``concat`` has one encoder pair per task and no ``E_v`` / ``E_s``: the end of its
    training used to fail on the export (AttributeError) and lose the trial."""
    from methods.data import build_dataset
    from methods.export import exportable
    from orchestrator.export import log_encoders

    for name in sorted(METHODS):
        cfg = resolve({"method": {"name": name}}, preset="tiny", overrides=["data.train_size=20", "data.test_size=20"])
        assert exportable(build_method(cfg.method_name, cfg.method, build_dataset(cfg.data).info())), name
    cfg = resolve({"method": {"name": "multissl", "combination": "concat"}}, preset="tiny",
                  overrides=["data.train_size=20", "data.test_size=20"])
    data = build_dataset(cfg.data)
    method = build_method(cfg.method_name, cfg.method, data.info())
    assert not exportable(method)
    # Returns before it touches the tracking store: no client is needed.
    assert log_encoders(None, "run", cfg, method, data) == 0.0
    assert "encoders not exported" in capsys.readouterr().out


def test_a_concat_multissl_run_goes_through_the_real_loop_to_its_evaluation(tmp_path, capsys):
    """The whole training loop of a ``concat`` run, in this process (the one-worker loop a trial
    runs, without Ray): its three stages, its checkpoints, the end of training that skips the
    export, and the evaluation of its joined features, into a real MLflow run that ends without
    a recorded failure (the export bug failed exactly here, after the last epoch)."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking
    from orchestrator.config import dump_yaml
    from orchestrator.train import train_in_trial
    from orchestrator.worker_spec import WorkerSpec

    cfg = resolve({"method": {"name": "multissl", "combination": "concat"}}, preset="tiny", overrides=[
        "train.epochs=3", "train.batch_size=32", "data.paired_size=64", "data.unpaired_sound_size=0",
        "data.unpaired_image_size=0", "data.train_size=40", "data.test_size=20", "data.transfer_train_size=0",
        "data.transfer_test_size=0", "tracking.log_model=false"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    run_id = tracking.create_run(tracking_uri=uri, home=tmp_path, experiment="concat", run_name="concat",
                                 params=cfg.flat(), tags={}, config_yaml=dump_yaml(cfg))
    train_in_trial(WorkerSpec(cfg.to_dict(), run_id, uri, launch_time_s=0.0, import_time_s=0.0),
                   str(tmp_path / "run"), tune=False)
    run = MlflowClient(uri).get_run(run_id)
    assert "avlab.failed" not in run.data.tags, run.data.tags.get("avlab.failed")
    assert {"eval_time_s", "sound_h_linear_acc", "image_h_linear_acc"} <= set(run.data.metrics)
    assert run.data.metrics["epoch"] == 2 and run.data.metrics["export_time_s"] == 0.0
    assert "encoders not exported" in capsys.readouterr().out


def test_a_sweep_trial_leaves_its_mlflow_models_to_later_and_they_come_from_its_safetensors(tmp_path):
    """The one-worker loop of a sweep's trial logs ``encoders/`` and no MLflow model (tracing them
    costs 1.5-2.5 s a trial); ``log_models`` makes them afterwards from ``encoders/`` alone, and the
    pt2 model gives the features of the safetensors encoder. A run whose config says
    ``tracking.log_model: false`` gets none."""
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from methods.export import load_encoders
    from orchestrator import tracking
    from orchestrator.config import dump_yaml
    from orchestrator.export import ARTIFACT_DIR, download, has_models, log_models
    from orchestrator.train import train_in_trial
    from orchestrator.worker_spec import WorkerSpec

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    client = MlflowClient(uri)
    runs = {}
    for log_model in (True, False):
        cfg = resolve(preset="tiny", overrides=[
            "train.epochs=1", "train.batch_size=32", "data.paired_size=64", "data.unpaired_sound_size=0",
            "data.unpaired_image_size=0", "data.train_size=40", "data.test_size=20", "data.val_size=20",
            "data.transfer_train_size=0", "data.transfer_test_size=0", f"tracking.log_model={str(log_model).lower()}"])
        run_id = tracking.create_run(tracking_uri=uri, home=tmp_path, experiment="trials", run_name=f"m{log_model}",
                                     params=cfg.flat(), tags={}, config_yaml=dump_yaml(cfg))
        train_in_trial(WorkerSpec(cfg.to_dict(), run_id, uri, launch_time_s=0.0, import_time_s=0.0, sweep_trial=True),
                       str(tmp_path / f"run{log_model}"), tune=False)
        assert not has_models(client, run_id) and "encoders" in {a.path for a in client.list_artifacts(run_id)}
        runs[log_model] = client.get_run(run_id)
    assert not log_models(client, runs[False]) and not has_models(client, runs[False].info.run_id)
    run_id = runs[True].info.run_id
    assert log_models(client, runs[True]) and has_models(client, run_id)
    encoders = load_encoders(download(client, run_id, ARTIFACT_DIR, str(tmp_path / "dl")))
    images = torch.rand(3, *encoders.meta["encoders"]["image"]["input_shape"])
    with torch.no_grad():
        own = encoders.image(images).numpy()
    model = mlflow.pyfunc.load_model(str(download(client, run_id, "image_encoder", str(tmp_path / "model"))))
    torch.testing.assert_close(torch.as_tensor(model.predict(images.numpy())), torch.as_tensor(own), rtol=1e-4, atol=1e-5)
