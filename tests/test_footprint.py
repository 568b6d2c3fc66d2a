"""The memory estimate that refuses runs which cannot fit, before anything starts."""

import resource

import pytest

from orchestrator.config import resolve
from orchestrator.errors import ConfigError
from orchestrator.footprint import GIB, check_fits, estimate


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
