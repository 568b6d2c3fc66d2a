"""Real datasets through the command line: `avlab data index / check / cache` on generated
trees, bad manifests rejected before anything starts, and a BMA run on a generated ESC-50-style
+ paired-folder manifest end to end under a local Ray."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from orchestrator.cli import main

SR = 8000


def _tone(path: Path, freq: float, seconds: float = 2.5, rate: int = SR) -> None:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(int(freq))
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), rate)


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(sum(colour))
    arr = np.clip(np.array(colour)[None, None, :] + rng.integers(-20, 20, (40, 48, 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def make_trees(root: Path, pairs: int = 64) -> tuple[Path, Path]:
    """A folder of image + sound pairs (same stem; two kinds) plus sounds alone, and an ESC-50
    tree with two classes over five folds."""
    folder = root / "clips"
    for i in range(pairs):
        kind = i % 2
        _tone(folder / "pairs" / f"c{i:03d}.wav", 300 + 500 * kind + 3 * i)
        _image(folder / "pairs" / f"c{i:03d}.png", (200, 40, 40) if kind else (40, 40, 200))
    for i in range(16):
        _tone(folder / "sounds" / f"s{i:03d}.wav", 400 + 20 * i)
    esc = root / "ESC-50"
    rows = []
    for fold in range(1, 6):
        for target, category in ((0, "dog"), (1, "rain")):
            for take in range(4):
                name = f"{fold}-{target}{take}-A-{target}.wav"
                _tone(esc / "audio" / name, 350 + 700 * target + 5 * take + fold)
                rows.append([name, fold, target, category, "False", f"{target}{take}", "A"])
    (esc / "meta").mkdir(parents=True)
    with open(esc / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        w.writerows(rows)
    return folder, esc


def test_data_index_check_cache_from_the_command_line(tmp_path, capsys):
    folder, esc = make_trees(tmp_path / "raw", pairs=8)
    manifest = tmp_path / "m.csv"
    assert main(["data", "index", "folder", str(folder), "--out", str(manifest)]) == 0
    assert main(["data", "index", "esc50", str(esc), "--out", str(manifest)]) == 2  # exists: no silent overwrite
    assert "--append" in capsys.readouterr().err
    assert main(["data", "index", "esc50", str(esc), "--out", str(manifest), "--append"]) == 0
    rows = list(csv.DictReader(open(manifest)))
    assert len(rows) == 8 + 16 + 40
    assert {r["split"] for r in rows} == {"pretrain", "train", "test"}
    assert sum(1 for r in rows if r["image"] and r["sound"]) == 8  # the stems paired up
    assert sum(1 for r in rows if r["split"] == "test") == 8  # ESC-50 fold 5

    # Layout options: a labelled folder as an extra evaluation split; an unknown option is refused.
    labelled = tmp_path / "m2.csv"
    assert main(["data", "index", "folder", str(folder), "--out", str(labelled),
                 "--option", "labelled=true", "--option", "split=train"]) == 0
    assert {r["label"] for r in csv.DictReader(open(labelled))} == {"pairs", "sounds"}
    assert main(["data", "index", "esc50", str(esc), "--out", str(labelled), "--force", "--option", "folds=3"]) == 2
    assert "--option" in capsys.readouterr().err

    assert main(["data", "check", str(manifest), "--workers", "1"]) == 0
    assert "64" in capsys.readouterr().out
    assert main(["data", "cache", str(manifest), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "feature cache" in out and ".avlab-cache" in out
    caches = [p for p in (tmp_path / ".avlab-cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(caches) == 1
    # A different feature setting is a different cache; the first one stays.
    assert main(["data", "cache", str(manifest), "--workers", "1", "data.n_mels=32"]) == 0
    caches2 = [p for p in (tmp_path / ".avlab-cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(caches2) == 2 and caches[0] in caches2

    capsys.readouterr()  # drop the progress bars
    # A broken file: check names it and exits 2; --skip-bad lists it and succeeds.
    (esc / "audio" / rows[-1]["sound"].split("/")[-1]).write_bytes(b"not a wav at all")
    assert main(["data", "check", str(manifest), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 of 64" in err and rows[-1]["sound"].split("/")[-1] in err
    assert main(["data", "check", str(manifest), "--workers", "1", "--skip-bad"]) == 0


def test_bad_manifest_exits_2_before_anything_starts(tmp_path, capsys):
    import ray

    bad = tmp_path / "bad.csv"
    bad.write_text("id,split,image\nx,pretrain,a.png\n")
    home = tmp_path / "home"
    assert main(["--home", str(home), "run", f"data.manifest={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("avlab: error: data.manifest:") and "bad.csv" in err
    assert main(["--home", str(home), "run", f"data.manifest={tmp_path / 'missing.csv'}"]) == 2
    assert "missing.csv" in capsys.readouterr().err
    # 16 unpaired sounds cannot fill a batch of 32: refused up front (it would never yield one).
    folder, esc = make_trees(tmp_path / "raw", pairs=32)
    manifest = tmp_path / "m.csv"
    assert main(["data", "index", "folder", str(folder), "--out", str(manifest)]) == 0
    capsys.readouterr()
    # Pairs alone: the run's own evaluation would have nothing to fit on, named before training.
    assert main(["--home", str(home), "run", f"data.manifest={manifest}", "train.batch_size=16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("avlab: error: data.manifest:") and "train split" in err
    assert main(["data", "index", "esc50", str(esc), "--out", str(manifest), "--append"]) == 0
    capsys.readouterr()
    assert main(["--home", str(home), "run", f"data.manifest={manifest}", "train.batch_size=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("avlab: error: data.unpaired_sound_count:") and "16 items" in err
    # An unusable file stops a local run with exit 2 too, before Ray and MLflow: the cache is
    # built (and fails) first.
    broken = next((tmp_path / "raw" / "clips" / "pairs").glob("*.wav"))
    broken.write_bytes(b"RIFF not really")
    assert main(["--home", str(home), "run", f"data.manifest={manifest}", "train.batch_size=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("avlab: error: data.manifest:") and broken.name in err and "--skip-bad" in err
    assert not home.exists() or not any(home.iterdir())
    assert not ray.is_initialized()


@pytest.mark.slow
def test_bma_run_on_a_real_data_manifest_end_to_end(tmp_path):
    from mlflow.tracking import MlflowClient

    folder, esc = make_trees(tmp_path / "raw", pairs=64)
    manifest = tmp_path / "m.csv"
    assert main(["data", "index", "folder", str(folder), "--out", str(manifest)]) == 0
    assert main(["data", "index", "esc50", str(esc), "--out", str(manifest), "--append"]) == 0
    # A labelled image set beside ESC-50's sounds, in the same five folds: the evaluation splits mix
    # image-only and sound-only rows.
    with open(manifest, "a", newline="") as f:
        w = csv.writer(f)
        for fold in range(1, 6):
            for label, colour in (("dog", (200, 60, 40)), ("rain", (40, 60, 200))):
                for take in range(2):
                    path = tmp_path / "raw" / "images" / f"{label}-{fold}-{take}.png"
                    _image(path, tuple(c + 7 * take + fold for c in colour))
                    w.writerow([f"img/{label}-{fold}-{take}", "test" if fold == 5 else "train", "", "images", label,
                                str(path), "", "", "", "", fold])
    home = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(Path(sys.executable).parent / "avlab"), "run", "--preset", "tiny", "--home", str(home),
        f"data.manifest={manifest}", "data.cache_workers=1", "train.epochs=2", "train.batch_size=16",
        "method.memory_size=16", "tracking.run_name=real", "eval.protocol=folds", "eval.knn_k_grid=[1,3]",
        "data.paired_fraction=0.5", "data.unpaired_sound_per_pair=0.25",  # act on a manifest as on the embedded data
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "[avlab] epoch 2/2" in log
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    # The five-fold protocol, each modality on the rows that carry it, no retrieval (no pairs):
    # every fold held out once, the plain name is the mean, the probes' C chosen on validation.
    for modality in ("image", "sound"):
        folds = [metrics[f"{modality}_h_linear_acc_fold{k}"] for k in range(1, 6)]
        assert all(0.0 <= v <= 1.0 for v in folds)
        assert metrics[f"{modality}_h_linear_acc"] == pytest.approx(sum(folds) / 5)
        assert metrics[f"{modality}_h_knn_k_fold3"] in (1, 3) and f"{modality}_h_linear_C_fold5" in metrics
    assert "retrieval_s2i_rank1" not in metrics
    assert runs[0].data.params["data.manifest"] == str(manifest)
    # Half the 64 pairs, unpaired sounds a quarter of all the pairs: the pools as read are tagged.
    tags = runs[0].data.tags
    assert (tags["avlab.pool.paired"], tags["avlab.pool.unpaired_sound"], tags["avlab.pool.unpaired_image"]) == (
        "32", "16", "0")
    # The cache was built once, next to the manifest, and reused by the evaluation.
    assert len([p for p in (tmp_path / ".avlab-cache").iterdir() if p.is_dir() and not p.name.startswith(".")]) == 1


def test_supervised_on_a_manifest_needs_its_labelled_split(tmp_path, capsys):
    """A manifest labels only its train and test splits: supervised pretraining on its unlabelled
    pairs is refused at the edge (it used to fail on a missing key in every retried attempt)."""
    from orchestrator.config import resolve

    folder, esc = make_trees(tmp_path / "raw", pairs=32)
    manifest = tmp_path / "m.csv"
    assert main(["data", "index", "folder", str(folder), "--out", str(manifest)]) == 0
    assert main(["data", "index", "esc50", str(esc), "--out", str(manifest), "--append"]) == 0
    capsys.readouterr()
    home = tmp_path / "home"
    assert main(["--home", str(home), "run", f"data.manifest={manifest}", "method.name=supervised",
                 "method.pool=paired", "train.batch_size=16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("avlab: error: method.pool:") and "method.pool=train" in err
    assert not home.exists() or not any(home.iterdir())
    # Left unset, the pool is the one a manifest labels, written into the config (and its identity).
    cfg = resolve(preset="tiny", overrides=[f"data.manifest={manifest}", "method.name=supervised",
                                            "train.batch_size=16"])
    assert cfg.method.pool == "train" and cfg.to_dict()["method"]["pool"] == "train"
    on_procedural = resolve(preset="tiny", overrides=["method.name=supervised"])
    assert on_procedural.method.pool == "paired"


def test_a_worker_takes_the_validated_config_without_reading_the_manifest_again(tmp_path, capsys):
    """The driver validates a config once (reading the manifest); the copy a worker receives is
    rebuilt field by field without reading it again: the worker builds its dataset once."""
    from orchestrator.config import ExperimentConfig, resolve
    from orchestrator.errors import ConfigError

    folder, esc = make_trees(tmp_path / "raw", pairs=32)
    manifest = tmp_path / "m.csv"
    assert main(["data", "index", "folder", str(folder), "--out", str(manifest)]) == 0
    assert main(["data", "index", "esc50", str(esc), "--out", str(manifest), "--append"]) == 0
    cfg = resolve(preset="tiny", overrides=[f"data.manifest={manifest}", "train.batch_size=16"])
    manifest.unlink()
    assert ExperimentConfig.from_dict(cfg.to_dict(), checked=True) == cfg
    with pytest.raises(ConfigError, match=r"^data\.manifest: .*m\.csv"):
        ExperimentConfig.from_dict(cfg.to_dict())
