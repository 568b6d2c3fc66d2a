"""The memory estimate that refuses runs which cannot fit, before anything starts."""

import dataclasses
import json
import resource
from dataclasses import asdict

import pytest

from orchestrator.config import resolve
from orchestrator.errors import ConfigError
from orchestrator import footprint
from orchestrator.footprint import GIB, cached_estimate, check_fits, estimate


def test_the_estimate_counts_what_the_config_asks_for():
    base = estimate(resolve(preset="tiny", overrides=["method.memory_size=100"]))
    more = estimate(resolve(preset="tiny", overrides=["method.memory_size=1100"]))
    # Two sub-memories of 1000 more slots of 128 floats, each with a gradient and Adam's two moments.
    assert more.total - base.total == 2 * 1000 * 128 * 4 * 4
    assert more.by_field["method.memory_size"] - base.by_field["method.memory_size"] == 2 * 1000 * 128 * 4 * 4
    sgd = estimate(resolve(preset="tiny", overrides=["method.memory_size=100", "optim.name=sgd"]))
    assert base.parameters - sgd.parameters == base.parameters // 4  # one optimiser buffer, not two
    double = estimate(resolve(preset="tiny", overrides=["method.memory_size=100", "train.batch_size=256"]))
    assert double.activations == 2 * base.activations
    bf16 = estimate(resolve(preset="tiny", overrides=["method.memory_size=100", "train.precision=bf16"]))
    assert bf16.activations == base.activations // 2


def test_a_terabyte_config_is_estimated_without_allocating_it():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fp = estimate(resolve(preset="tiny", overrides=["method.memory_size=1000000000"]))
    assert fp.total > 3000 * GIB and fp.dominant_field == "method.memory_size"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB: under 512 MiB


@pytest.mark.parametrize("overrides, field", [
    (["method.memory_size=1000000000"], "method.memory_size"),
    (["train.batch_size=10000000", "data.paired_size=10000000", "data.unpaired_sound_size=0",
      "data.unpaired_image_size=0"], "train.batch_size"),
    (["method.image_encoder.base_width=100000", "method.sound_encoder.base_width=100000"],
     "method.image_encoder.base_width"),
    (["method.name=avid", "data.paired_size=10000000"], "data.paired_size"),  # AVID's banks: 10 GB
])
def test_what_cannot_fit_is_refused_naming_the_field(overrides, field):
    cfg = resolve(preset="tiny", overrides=overrides)
    with pytest.raises(ConfigError, match=rf"^{field}: the run needs at least [\d.]+ GiB per worker .* has 8\.0 GiB"):
        check_fits(cfg, per_worker_bytes=8 * GIB, where="this machine")
    check_fits(resolve(preset="tiny"), per_worker_bytes=8 * GIB, where="this machine")  # the default fits


def test_an_estimate_is_kept_in_the_user_cache_by_its_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "avlab" / "footprint"
    cfg = resolve(preset="tiny", overrides=["method.memory_size=100"])
    first = cached_estimate(cfg)
    assert first == estimate(cfg) and len(list(folder.glob("*.json"))) == 1
    # The same inputs read the file: a value written there comes back.
    (path,) = folder.glob("*.json")
    path.write_text(json.dumps({**asdict(first), "buffers": first.buffers + 1}))
    assert cached_estimate(resolve(preset="tiny", overrides=["method.memory_size=100", "seed=3",
                                                             "train.epochs=7"])).buffers == first.buffers + 1
    # Any field the estimate reads is a new entry.
    for override in ("method.memory_size=200", "train.batch_size=64", "optim.name=sgd", "data.image_size=48",
                     "train.precision=bf16"):
        other = resolve(preset="tiny", overrides=["method.memory_size=100", override])
        assert cached_estimate(other) == estimate(other)
    assert len(list(folder.glob("*.json"))) == 6
    # A damaged entry is estimated afresh and rewritten.
    path.write_text('{"parameters": "a lot"')
    assert cached_estimate(cfg) == first and json.loads(path.read_text()) == asdict(first)


def test_a_run_on_a_manifest_is_estimated_afresh(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = resolve(preset="tiny", overrides=["method.memory_size=100"])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=str(tmp_path / "manifest.csv")))
    assert footprint._cache_path(cfg) is None
