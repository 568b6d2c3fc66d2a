"""Typed config: presets, run files, overrides, and errors that name the field."""

import pytest

from orchestrator.config import PRESETS, ConfigError, ExperimentConfig, resolve


def test_presets_resolve_and_round_trip():
    for name in PRESETS:
        cfg = resolve(preset=name)
        assert cfg.preset == name
        assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    paper = resolve(preset="paper")
    assert paper.method.image_encoder.base_width == 64 and paper.data.image_size == 224
    assert (paper.data.n_mels, paper.data.n_frames) == (150, 200)
    assert paper.optim.lr == 2e-4 and paper.train.batch_size == 256 and paper.method.memory_size == 1000


def test_precedence_preset_run_file_overrides():
    cfg = resolve({"method": {"memory_size": 50}, "train": {"epochs": 3}}, overrides=["train.epochs=5", "optim.lr=1e-3"])
    assert cfg.method.memory_size == 50 and cfg.train.epochs == 5 and cfg.optim.lr == 1e-3
    assert cfg.method.image_encoder.base_width == 16  # from the tiny preset


def test_identity_depends_on_config_and_seed():
    a, b = resolve(), resolve(overrides=["seed=1"])
    assert a.identity() == resolve().identity() and a.identity() != b.identity()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.memmory_size=10"], r"^method\.memmory_size: unknown config key; did you mean method\.memory_size\?"),
        (["trian.epochs=1"], r"^trian: unknown config key"),
        (["train.epochs=three"], r"^train\.epochs: expected an integer"),
        (["method.memory_size=0"], r"^method\.memory_size: must be a positive"),
        (["method.memory_temperature=0"], r"^method\.memory_temperature: must be positive"),
        (["method.loss_temperature=-0.1"], r"^method\.loss_temperature: must be positive"),
        (["method.name=nope"], r"^method\.name: unknown method 'nope'"),
        (["data.image_size=true"], r"^data\.image_size: expected an integer"),
        (["resources.workers=3"], r"^train\.batch_size: 128 is not divisible by resources\.workers=3"),
        (["notakeyvalue"], r"^override: "),
        (["resources.gpu=2"], r"^resources\.gpu: must be true, false or a share of one GPU in \(0, 1\], got 2"),
        (["resources.gpu=0"], r"^resources\.gpu: must be true, false or a share"),
        (["resources.gpu=nan"], r"^resources\.gpu: expected a finite number"),
        (["resources.gpu=0.25", "resources.workers=2"],
         r"^resources\.gpu: a share of a GPU \(0\.25\) is for single-worker trials; with workers=2"),
        (["tracking.system_metrics_interval_s=0.1"], r"^tracking\.system_metrics_interval_s: must be in \[1, 3600\]"),
        (["tracking.system_metrics_interval_s=inf"], r"^tracking\.system_metrics_interval_s: "),
        (["tracking.system_metrics=maybe"], r"^tracking\.system_metrics: expected true or false"),
        (["tracking.log_model=2"], r"^tracking\.log_model: expected true or false"),
        (["eval.protocol=kfold"], r"^eval\.protocol: must be one of fixed, validation, folds"),
        (["eval.protocol=folds"], r"^eval\.protocol: folds needs a manifest whose train and test rows carry"),
        (["eval.folds=1"], r"^eval\.folds: expected an integer in 2\.\.20"),
        (["eval.knn_k_grid=[1, 1]"], r"^eval\.knn_k_grid: expected distinct positive integers"),
        (["eval.linear_C_grid=[0.1, .inf]"], r"^eval\.linear_C_grid\[1\]: expected a finite number"),
        (["eval.validation_fraction=0.9"], r"^eval\.validation_fraction: expected a number in \[0\.05, 0\.5\]"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve(overrides=overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match=r"^preset: unknown preset 'huge'"):
        resolve(preset="huge")


def test_switching_method_drops_the_other_methods_preset_keys():
    cfg = resolve(overrides=["method.name=supervised"])
    assert cfg.method_name == "supervised" and cfg.method.image_encoder.base_width == 16
    cfg = resolve({"method": {"name": "supervised"}}, preset="paper")
    assert cfg.method.image_encoder.base_width == 64


def test_every_method_owns_its_presets_and_the_registry_refuses_one_without_them():
    """Each method module gives its tiny / small / paper values (methods/<name>.py PRESETS): a
    method without them would train the paper's encoders under --preset tiny."""
    from methods.bma import BMAConfig, BMAMemory
    from methods.registry import METHODS, PRESET_NAMES, _entry

    assert tuple(PRESETS) == PRESET_NAMES
    for name, entry in METHODS.items():
        assert set(entry.presets) == set(PRESET_NAMES), name
        width = {p: resolve(preset=p, overrides=[f"method.name={name}"]).method.image_encoder.base_width for p in PRESET_NAMES}
        assert width == {"tiny": 16, "small": 16, "paper": 64}, name
    with pytest.raises(TypeError, match=r"^bma: PRESETS must give exactly the presets \['tiny', 'small', 'paper'\]"):
        _entry(BMAConfig, BMAMemory, {"tiny": {}, "paper": {}})
    with pytest.raises(TypeError, match=r"PRESETS\['tiny'\]: sections must be among"):
        _entry(BMAConfig, BMAMemory, {"tiny": {"methd": {}}, "small": {}, "paper": {}})


def test_the_small_preset_tunes_bma_only_and_overrides_still_win():
    """BMA-Memory's small-preset settings (τ_l 0.2, no paired augmentation, unpaired sounds only)
    stay with BMA: the other methods keep the preset's light augmentation and both unpaired pools,
    and the command line still decides."""
    bma = resolve(preset="small", overrides=["method.name=bma"])
    assert bma.method.loss_temperature == 0.2 and bma.train.paired_augment == "none"
    assert (bma.data.unpaired_sound_size, bma.data.unpaired_image_size) == (4096, 0)
    for other in ("avid", "l3", "supervised"):
        other_cfg = resolve(preset="small", overrides=[f"method.name={other}"])
        assert other_cfg.train.paired_augment == "light" and other_cfg.data.unpaired_image_size == 4096
    assert resolve(preset="small", overrides=["data.unpaired_image_size=2048"]).data.unpaired_image_size == 2048
    mine = resolve(preset="small", overrides=["method.name=bma", "train.paired_augment=light",
                                             "method.loss_temperature=0.1"])
    assert mine.method.loss_temperature == 0.1 and mine.train.paired_augment == "light"
    assert resolve(preset="tiny").method.loss_temperature == 0.1  # the paper's value elsewhere


def test_the_small_preset_gives_the_resnet_methods_the_small_image_stem_and_one_encoder_each():
    """The ResNet methods compared at the small preset (and their supervised baseline) share one
    image encoder, the small-stem ResNet-18, so that gaps are measured at the same encoders; the
    sound encoder, L3's VGG and the binaural panoramas keep the ImageNet stem; tiny and paper keep
    the papers' stem; a run file or the command line still decides."""
    encoders = {name: resolve(preset="small", overrides=[f"method.name={name}"]).method
                for name in ("bma", "avid", "supervised")}
    for name, m in encoders.items():
        assert (m.image_encoder.stem, m.sound_encoder.stem) == ("small", "imagenet"), name
        assert m.image_encoder == encoders["bma"].image_encoder and m.sound_encoder == encoders["bma"].sound_encoder
    assert resolve(preset="small", overrides=["method.name=multissl"]).method.image_encoder.stem == "imagenet"
    for preset in ("tiny", "paper"):
        assert resolve(preset=preset).method.image_encoder.stem == "imagenet"
    mine = resolve(preset="small", overrides=["method.image_encoder.stem=imagenet"])
    assert mine.method.image_encoder.stem == "imagenet" and mine.method.image_encoder.base_width == 16


def test_a_gpu_share_is_per_worker_and_true_is_one_whole_gpu():
    assert resolve(overrides=["resources.gpu=0.25"]).resources.gpu_share == 0.25
    assert resolve(overrides=["resources.gpu=true", "resources.workers=2"]).resources.gpu_share == 1.0
    assert resolve().resources.gpu_share == 0.0 and resolve().resources.gpu is False
    # A whole config round-trips with its share (a sweep's trial rebuilds it from the dict).
    cfg = resolve(overrides=["resources.gpu=0.5"])
    assert ExperimentConfig.from_dict(cfg.to_dict()).resources.gpu == 0.5


def test_an_option_added_at_its_neutral_value_keeps_every_identity():
    """Checkpoints, trial runs and reusable results are found by ``identity()``: an option that an
    upgrade adds with ``neutral_field`` leaves it unchanged at the value that behaves as before,
    and changes it at any other value (a plain new field would change every identity)."""
    import dataclasses

    from methods.bma import BMAConfig
    from methods.base import neutral_field

    old = resolve(overrides=["method.memory_size=50"])
    values = {f.name: getattr(old.method, f.name) for f in dataclasses.fields(old.method)}

    def upgraded(spec, **value):
        cls = dataclasses.make_dataclass("BMAConfig", [("new_option", bool, spec)], bases=(BMAConfig,), frozen=True)
        return dataclasses.replace(old, method=cls(**values, **value))

    assert upgraded(neutral_field(False)).identity() == old.identity()
    assert upgraded(neutral_field(False), new_option=True).identity() != old.identity()
    # A new default that changes behaviour: neutral at the old behaviour, so the identity moves.
    assert upgraded(neutral_field(True, neutral=False)).identity() != old.identity()
    assert upgraded(dataclasses.field(default=False)).identity() != old.identity()
    # Everything else still sees the field: MLflow params, config.yaml, the workers' copy.
    assert upgraded(neutral_field(False)).to_dict()["method"]["new_option"] is False


def test_every_preset_draws_its_data_with_the_run_seed_and_a_fixed_data_seed_stays_fixed():
    """The data-seed policy (docs/spec.md §2): presets follow the run's seed, resolved into the config
    (so params and identity say which data a run saw); an explicit data.seed is kept for every seed."""
    for name in PRESETS:
        for seed in (0, 3):
            assert resolve(preset=name, overrides=[f"seed={seed}"]).data.seed == seed
    fixed = [resolve(overrides=["data.seed=7", f"seed={s}"]) for s in (0, 3)]
    assert [c.data.seed for c in fixed] == [7, 7]
    cfg = resolve(overrides=["seed=5"])
    assert ExperimentConfig.from_dict(cfg.to_dict()).data.seed == 5  # a worker's copy keeps the resolved seed


def test_a_dataset_refuses_an_unresolved_data_seed():
    from methods.data import DataConfig, build_dataset

    with pytest.raises(ValueError, match=r"^seed: -1 means the run's seed"):
        build_dataset(DataConfig(seed=-1))


@pytest.mark.parametrize("overrides", [["eval.val_metrics=true", "data.val_size=0"],
                                       ["eval.every_epochs=1", "train.epochs=3", "data.val_size=1"]])
def test_what_reads_the_validation_split_needs_one(overrides):
    with pytest.raises(ConfigError, match=r"^data.val_size: \d items; eval\.(val_metrics|every_epochs) scores the "
                                          r"validation split"):
        resolve(overrides=overrides)


def test_a_data_field_that_cannot_act_on_the_runs_data_is_refused(tmp_path):
    """The embedded datasets' pool sizes change nothing of a manifest's pools (its rows are the
    pools), and a manifest's counts nothing of the embedded datasets: set for the other kind of
    data, one line names the field, before anything reads the data. The share of the pairs and
    the unpaired multiples of them act on both; a multiple and a size of one pool conflict."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,split,pair_id,source,label,image,image_time,sound,sound_offset,sound_duration,fold\n")
    with pytest.raises(ConfigError, match=r"^data\.unpaired_sound_size: sizes the embedded dataset's pools; with a "
                                          r"manifest .* vary data\.paired_fraction or data\.unpaired_sound_per_pair"):
        resolve(overrides=[f"data.manifest={manifest}", "data.unpaired_sound_size=0"])
    with pytest.raises(ConfigError, match=r"^data\.unpaired_image_count: acts on a manifest's pools"):
        resolve(overrides=["data.unpaired_image_count=5"])
    with pytest.raises(ConfigError, match=r"^data\.unpaired_sound_per_pair: .* data\.unpaired_sound_size is set too"):
        resolve(overrides=["data.unpaired_sound_per_pair=2", "data.unpaired_sound_size=5"])
    with pytest.raises(ConfigError, match=r"^data\.unpaired_image_per_pair: must be a multiple of the pairs in 0\.\.1000"):
        resolve(overrides=["data.unpaired_image_per_pair=-0.5"])
    both = resolve(overrides=["data.paired_fraction=0.5", "data.unpaired_sound_per_pair=2"])  # act on the embedded
    assert (both.data.pool_size("paired"), both.data.pool_size("unpaired_sound")) == (4096, 16384)
    with pytest.raises(ConfigError, match=r"^data\.train_size: sizes the embedded"):
        resolve({"data": {"manifest": str(manifest), "train_size": 10}})
    assert resolve(overrides=["data.unpaired_sound_size=0"]).data.unpaired_sound_size == 0  # the embedded data's
