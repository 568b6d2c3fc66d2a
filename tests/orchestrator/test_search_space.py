"""Search spaces: every shipped file loads and expands to the expected number of trials; bad
files fail with a message naming the problem."""


import pytest
import torch

from orchestrator.config import ConfigError, resolve
from orchestrator.metrics import run_metrics
from orchestrator.search_space import load_search_space

from conftest import ROOT
EXPECTED = {  # file: (configurations, trials)
    "memory_size_fig6": (6, 12),
    "loss_weight_supp_table2": (5, 10),
    "unpaired_volume_fig5": (5, 10),
    "paired_volume_table5": (4, 8),
    "data_types_image_supp_table3": (3, 6),
    "data_types_sound_supp_table4": (3, 6),
    "temperatures": (12, 12),
    "avid_variants_table1": (3, 6),
    "cma_weight_fig3": (4, 8),
    "cma_positive_rule_fig4": (4, 8),
    "cma_criterion": (4, 12),
    "cma_references": (3, 9),
    "method_comparison": (7, 7),
    "multissl_combinations": (9, 9),
    "multissl_tasks_small": (7, 21),
    "demo_learning": (2, 8),
}


def _at(cfg, path):
    section, *rest = path.split(".")
    node = cfg.method if section == "method" else getattr(cfg, section)
    for part in rest:
        node = getattr(node, part)
    return node


def test_every_search_space_loads_and_expands():
    files = sorted((ROOT / "search_spaces").glob("*.yaml"))
    assert {f.stem for f in files} == set(EXPECTED)
    for f in files:
        space = load_search_space(f)
        assert (space.num_configurations(), space.num_trials()) == EXPECTED[f.stem], f.name
        for point in space.grid_points():
            cfg = space.config_for(point, space.seeds[-1])
            assert cfg.seed == space.seeds[-1]
            for path, value in point.items():
                if path == "variant":
                    continue
                if path == "method.name":
                    assert cfg.method_name == value
                    continue
                node = _at(cfg, path)
                if isinstance(value, str) and value.endswith("%"):  # a share of the base's value
                    value = round(_at(space.config_for({}, 0), path) * float(value[:-1]) / 100)
                assert (list(node) if isinstance(node, tuple) else node) == value, (f.name, path)


def test_seeds_override_and_variants_cross_the_grid(tmp_path):
    space = load_search_space(ROOT / "search_spaces" / "memory_size_fig6.yaml", seeds=3)
    assert space.seeds == (0, 1, 2) and space.num_trials() == 18
    types = load_search_space(ROOT / "search_spaces" / "data_types_image_supp_table3.yaml")
    points = types.grid_points()
    assert [p["variant"] for p in points] == ["unpair_images_only", "pair_only", "pair_plus_unpaired_sound"]
    assert types.config_for(points[0], 0).method.paired_loss is False


def test_a_share_of_the_presets_value_follows_the_preset(tmp_path):
    space = load_search_space(ROOT / "search_spaces" / "paired_volume_table5.yaml")
    shape = [(c.data.pool_size("paired"), c.train.epochs, c.data.pool_size("unpaired_sound"))
             for c in (space.config_for(p, 0) for p in space.grid_points())]
    # 20 % of the tiny preset's 8192 pairs at five times its 4 epochs: the same steps; one unpaired
    # pool, half as many sounds as the dataset's pairs, for both volumes.
    assert shape == [(1638, 20, 0), (1638, 20, 4096), (8192, 4, 0), (8192, 4, 4096)]
    small = space.with_overrides("small", [])
    assert [(c.data.pool_size("paired"), c.data.pool_size("unpaired_sound"))
            for c in (small.config_for(p, 0) for p in small.grid_points())] == [(3277, 0), (3277, 8192),
                                                                                 (16384, 0), (16384, 8192)]
    assert small.grid_points()[0]["train.epochs"] == "500%"  # the label names the share, at any preset
    sized = load_search_space(write(tmp_path, "base:\n  preset: tiny\ngrid:\n  data.paired_size: ['20%', '100%']\n"))
    assert [sized.config_for(p, 0).data.paired_size for p in sized.grid_points()] == [1638, 8192]


def test_a_paired_fraction_draws_the_pairs_a_paired_size_of_that_share_draws():
    from methods.data import build_dataset

    by_share = build_dataset(resolve({}, preset="tiny", overrides=["data.paired_fraction=0.2", "seed=3"]).data)
    by_size = build_dataset(resolve({}, preset="tiny", overrides=["data.paired_size=1638", "seed=3"]).data)
    a, b = by_share.pool("paired"), by_size.pool("paired")
    assert len(a) == len(b) == 1638
    for i in (0, 817, 1637):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["sound"], b[i]["sound"])
    many = resolve({}, preset="tiny", overrides=["data.unpaired_sound_per_pair=36", "data.paired_fraction=0.5"])
    assert many.data.pool_size("unpaired_sound") == 36 * 8192  # a multiple of all the pairs
    assert build_dataset(many.data).info().unpaired_sound_size == 36 * 8192


def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


SEARCH = "search:\n  method.loss_temperature: {type: loguniform, low: 0.02, high: 1.0}\n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("grid:\n  method.memmory_size: [10]\n", r"grid\.method\.memmory_size: method\.memmory_size: unknown config key"),
        ("grid: {}\n", r"grid: is empty"),
        ("grid:\n  method.memory_size: []\n", r"grid\.method\.memory_size: expected a non-empty list"),
        ("grid:\n  method.memory_size: [10, 0]\n", r"method\.memory_size: must be a positive"),
        ("search:\n  method.loss_temperature: {type: uniform, low: 0.5, high: 0.1}\n", r"low 0\.5 is greater than high 0\.1"),
        ("search:\n  method.loss_temperature: {type: normal, low: 0.1, high: 0.5}\n", r"\.type: must be one of"),
        ("search:\n  method.loss_temperature: {type: uniform, low: .nan, high: 0.5}\n", r"low and high must be finite"),
        ("search:\n  optim.lr: {type: loguniform, low: 1.0e-4, high: .inf}\n", r"optim\.lr: low and high must be finite"),
        ("grid:\n  method.memory_temperature: [0.1, .nan]\n", r"method\.memory_temperature: expected a finite number"),
        ("search:\n  method.loss_temperature: {type: choice, values: [0.1, .inf]}\n", r"expected a finite number"),
        ("grid:\n  method.memory_size: [10]\nmetric: image_accuracy\n", r"metric: unknown metric 'image_accuracy'"),
        # Names the runs of this space do not log: no spatial probe without binaural scenes, no
        # L_pair term without L_pair, no Rank-9 with retrieval_ks 5.
        ("grid:\n  method.memory_size: [10]\nmetric: sound_h_spatial_acc\n", r"metric: unknown metric 'sound_h_spatial_acc'"),
        ("base:\n  config: {method: {name: bma, paired_loss: false}}\ngrid:\n  method.memory_size: [10]\nmetric: loss_pair\n",
         r"metric: unknown metric 'loss_pair'"),
        ("grid:\n  method.memory_size: [10]\nmetric: retrieval_s2i_rank9\n", r"metric: unknown metric 'retrieval_s2i_rank9'"),
        ("grid:\n  method.memory_size: [10]\nmode: best\n", r"mode: must be max or min"),
        # Several objectives: an Optuna search without a scheduler, each metric logged, max or min.
        (f"{SEARCH}metrics: {{image_h_linear_acc: max}}\n", r"metrics: expected two or more metric names"),
        (f"{SEARCH}metric: loss\nmetrics: {{image_h_linear_acc: max, train_time_s: min}}\n",
         r"metrics: give either metric and mode, or metrics, not both"),
        (f"{SEARCH}metrics: {{image_h_linear_acc: max, train_time_s: fast}}\n", r"metrics\.train_time_s: must be max or min"),
        (f"{SEARCH}metrics: {{image_h_linear_acc: max, top1: max}}\n", r"metrics\.top1: unknown metric 'top1'"),
        ("grid:\n  method.memory_size: [10, 20]\nmetrics: {image_h_linear_acc: max, train_time_s: min}\n",
         r"metrics: several objectives need a search \(Optuna\)"),
        (f"{SEARCH}metrics: {{image_h_linear_acc: max, train_time_s: min}}\nscheduler: {{type: asha}}\n",
         r"scheduler: ASHA stops trials on one metric"),
        ("grid:\n  method.memory_size: [10]\nseeds: 0\n", r"seeds: must be an integer >= 1"),
        ("gird:\n  method.memory_size: [10]\n", r"gird: unknown search-space key"),
        ("base:\n  preset: huge\ngrid:\n  method.memory_size: [10]\n", r"base: preset: unknown preset 'huge'"),
        # A value or seed listed twice would run the same trials twice.
        ("grid:\n  method.memory_size: [10, 10]\n", r"grid\.method\.memory_size: 10 is listed twice"),
        ("search:\n  method.loss_temperature: {type: choice, values: [0.1, 0.1]}\n",
         r"search\.method\.loss_temperature\.values: 0\.1 is listed twice"),
        ("grid:\n  method.memory_size: [10]\nseeds: [0, 1, 0]\n", r"seeds: 0 is listed twice"),
        ("grid:\n  method.memory_size: [10]\nseeds: [4294967296]\n", r"seeds: .* seeds >= 0 and < 2\*\*32"),
        ("base:\n  config: {seed: -1}\ngrid:\n  method.memory_size: [10]\n", r"base: seed: must be an integer >= 0"),
        ("grid:\n  method.memory_size: [10]\n  method.memory_size: [20]\n",
         r"space\.yaml is not valid YAML \(duplicate key 'method\.memory_size' on line 3\)"),
        ("grid:\n  method.memory_size: [10]\nplot: {x: method.memmory_size}\n",
         r"plot\.x: 'method\.memmory_size' is not a grid or search path of this space; use one of method\.memory_size"),
        ("grid:\n  method.memory_size: [10]\nplot: {x: method.memory_size, logx: true}\n", r"plot\.logx: unknown key"),
        # A share of the preset's value: a number >= 0 and a numeric field that the config has.
        ("grid:\n  data.paired_size: ['-20%']\n", r"grid\.data\.paired_size: '-20%': a share must be a number >= 0"),
        ("grid:\n  data.paired_size: [half%]\n", r"grid\.data\.paired_size: 'half%': a share must be a number"),
        ("grid:\n  method.name: ['50%']\n", r"grid\.method\.name: '50%': a share needs a numeric field"),
        ("grid:\n  data.pairedsize: ['50%']\n", r"grid\.data\.pairedsize: not a config path"),
        ("grid:\n  data.paired_size: ['0%']\n", r"grid\.data\.paired_size: .*paired_size"),
    ],
)
def test_bad_search_spaces_name_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_search_space(write(tmp_path, text))


@pytest.mark.parametrize("method, metric", [
    ("multissl", "sound_h_spatial_acc"), ("multissl", "retrieval_s2i_clip_rank1"), ("multissl", "loss_gap"),
    ("l3", "l3_acc"), ("bma", "mem_slots_v"), ("bma", "transfer_image_h_linear_acc"), ("avid", "loss_cross"),
    ("supervised", "train_pairs_per_s"),
])
def test_every_metric_a_method_logs_can_be_the_objective(tmp_path, method, metric):
    space = load_search_space(write(tmp_path, f"base:\n  config: {{method: {{name: {method}}}}}\n"
                                              f"grid:\n  optim.lr: [0.001]\nmetric: {metric}\n"))
    assert space.metric == metric
    assert metric in run_metrics(space.first_config())


def test_a_variant_may_log_the_objective_that_the_base_does_not(tmp_path):
    text = "variants:\n  l3: {method.name: l3}\n  bma: {method.name: bma}\nmetric: l3_acc\n"
    assert load_search_space(write(tmp_path, text)).metric == "l3_acc"


def test_asha_may_stop_trials_on_any_metric_the_quick_probe_measures(tmp_path):
    from orchestrator.sweep import check_supported

    base = "base:\n  config: {method: {name: multissl}, eval: {every_epochs: 1}}\ngrid:\n  optim.lr: [0.001]\n"
    check_supported(load_search_space(write(tmp_path, base + "scheduler: {type: asha, metric: sound_h_spatial_acc}\n")))
    with pytest.raises(ConfigError, match=r"scheduler\.metric: must be one of val_image_h_knn_acc, .*val_sound_h_spatial_acc"):
        check_supported(load_search_space(write(tmp_path, base + "scheduler: {type: asha, metric: sound_h_linear_acc}\n")))


def test_not_utf8(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_bytes("description: café\ngrid:\n  method.memory_size: [10]\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"^search space: .*space\.yaml is not UTF-8 text"):
        load_search_space(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.memory_size=-5", r"^method\.memory_size: set on the command line and varied by memory_size_fig6\.yaml"),
        ("method.memory_size=50", r"^method\.memory_size: set on the command line"),
        ("seed=3", r"^seed: set on the command line"),
        ("resources.workers=2", r"^resources\.workers: set on the command line and in memory_size_fig6\.yaml's resources"),
        ("optim.lr=-1", r"^optim\.lr: must be positive"),
    ],
)
def test_command_line_overrides_are_checked_and_never_silently_dropped(override, message):
    """A trial's grid values, seed and resources come after the command line's overrides: an
    override of one of them would vanish, so it is refused; any other is checked in every trial."""
    space = load_search_space(ROOT / "search_spaces" / "memory_size_fig6.yaml")
    with pytest.raises(ConfigError, match=message):
        space.with_overrides(None, [override])
    assert space.with_overrides(None, ["optim.lr=0.01"]).first_config().optim.lr == 0.01


def test_missing_file():
    with pytest.raises(ConfigError, match=r"^search space: .*nope\.yaml not found"):
        load_search_space("nope.yaml")


def test_a_space_that_selects_chooses_on_the_validation_split_and_a_grid_chooses_nothing(tmp_path):
    """A search (or a scheduler) reads each objective's ``val_`` twin, and its trials score the
    validation split; a grid's trials do not; the test split only reports in both. A job file
    written before choices moved to the validation split resumes reading what it read."""
    from orchestrator.search_space import SearchSpace
    from orchestrator.sweep import build_searcher

    search = load_search_space(write(tmp_path, "search:\n  method.loss_temperature: {type: loguniform, low: 0.02, "
                                               "high: 1.0}\nmetric: sound_h_linear_acc\n"))
    assert search.selects and search.chosen("sound_h_linear_acc") == "val_sound_h_linear_acc"
    assert search.chosen("train_time_s") == "train_time_s"  # a cost has no validation twin
    assert search.first_config().eval.val_metrics
    assert build_searcher(search).metric == "val_sound_h_linear_acc"
    grid = load_search_space(write(tmp_path, "grid:\n  method.memory_size: [10, 20]\n"))
    assert not grid.selects and grid.chosen("image_h_linear_acc") == "image_h_linear_acc"
    assert not grid.first_config().eval.val_metrics
    with pytest.raises(ConfigError, match=r"^space\.yaml: base: eval\.val_metrics: a search or a scheduler chooses "
                                          r"on the validation split"):
        load_search_space(write(tmp_path, "base:\n  overrides: [eval.val_metrics=false]\nsearch:\n"
                                          "  method.loss_temperature: {type: loguniform, low: 0.02, high: 1.0}\n"))
    older = search.to_dict()
    del older["choose_on"]
    assert SearchSpace.from_dict(older).chosen("sound_h_linear_acc") == "sound_h_linear_acc"
    assert SearchSpace.from_dict(search.to_dict()) == search


def test_each_trial_draws_the_data_of_its_seed_so_configurations_of_one_seed_share_it(tmp_path):
    space = load_search_space(write(tmp_path, "grid:\n  method.memory_size: [10, 20]\nseeds: [0, 5]\n"))
    assert {(t.params["method.memory_size"], t.seed, t.config.data.seed) for t in space.trials()} == {
        (10, 0, 0), (20, 0, 0), (10, 5, 5), (20, 5, 5)}

