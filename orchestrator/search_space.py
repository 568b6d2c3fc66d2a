"""Search spaces: an ablation as data (dotted config paths and their values or distributions).

A search-space YAML names its base run (preset + run-file sections + overrides), a ``grid`` of
dotted paths with value lists and/or a ``search`` of dotted paths with distributions (for
Optuna), the seeds, the metric and mode, an optional scheduler, the resources per trial and the
concurrency. ``load_search_space`` checks every path and every value against the typed config
(by resolving the base with it), so a bad file fails with a ``ConfigError`` naming the problem
before anything starts. A grid value ``"N%"`` is N % of the base's value at the preset the space
runs at (``--preset`` included): a data volume that scales with the preset.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from methods.metric_names import DEFAULT_METRIC, HEADLINE_METRICS, VALIDATION_PREFIX
from orchestrator.config import SEED_LIMIT, ConfigError, ExperimentConfig, parse_override, resolve
from orchestrator.typed import as_float, first_line, read_yaml_mapping
from orchestrator.metrics import run_metrics

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
MODES = ("max", "min")
SCHEDULERS = ("asha",)
# What a variant is when it is not the paper's (or its authors' released) algorithm on the
# paper's kind of data: avlab's change to an algorithm, data engineered so that a task has
# something to learn, an evaluation added after the results were seen. A claim attributed to a
# paper never compares such a row; reports print the role beside the row.
ROLES = ("modified", "engineered positive control", "post-hoc diagnostic")
# The keys of a search-space file and what each holds (the docs' reference is generated from them).
KEYS = {
    "description": "one line on what the ablation asks (shown in reports)",
    "base": "the run every trial starts from: `preset` (default tiny), `config` (run-file sections), `overrides` "
            "(a list of key.path=value)",
    "variants": "label -> settings (dotted paths and values): configurations that differ in several fields at once; "
                "crossed with the grid",
    "roles": "variant label -> its role when it is not the paper's algorithm: " + ", ".join(ROLES),
    "grid": "dotted path -> list of values; every combination is a configuration (a value \"N%\" is N % of the "
            "base's value at the preset the space runs at)",
    "search": "dotted path -> a distribution for Optuna: {type: uniform|loguniform|int, low, high} or "
              "{type: choice, values: [...]}",
    "num_samples": "with a search: how many configurations Optuna proposes (default 1)",
    "seeds": "a count (seeds 0..N-1) or a list of seeds; every configuration runs each (default 1)",
    "metric": "the metric the sweep compares (and a search or scheduler optimises), a name a run logs",
    "mode": "max or min",
    "metrics": "several objectives for a multi-objective search: a list of {metric, mode}",
    "scheduler": "{type: asha, ...}: stops weak trials early, on the validation split",
    "resources": "per trial: workers (DDP), cpus_per_worker, gpu (true, false or a share of one GPU), placement "
                 "(pack, strict_pack, spread, strict_spread)",
    "max_concurrent": "how many trials run at once (default 1)",
    "plot": "x: the varied path the report plots the metric against; log_x: a log axis",
}


@dataclass(frozen=True)
class Distribution:
    """One Optuna dimension: uniform / loguniform floats, int in [low, high], or a choice."""

    type: str
    low: float = 0.0
    high: float = 0.0
    values: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Trial:
    """One trial of a grid: its Tune value (``key``, see ``trial_key``), its configuration's
    label and index in ``grid_points()``, the settings the grid varies, its seed and its config."""

    key: str
    label: str
    point: int
    params: dict[str, Any]
    seed: int
    config: ExperimentConfig


@dataclass(frozen=True)
class SearchSpace:
    name: str
    path: Path
    description: str
    base_run: dict[str, Any]
    preset: str
    base_overrides: tuple[str, ...]
    grid: dict[str, tuple[Any, ...]]
    search: dict[str, Distribution]
    variants: dict[str, dict[str, Any]]
    num_samples: int
    seeds: tuple[int, ...]
    metric: str
    mode: str
    scheduler: dict[str, Any] | None
    resources: dict[str, int]
    max_concurrent: int
    plot: dict[str, Any] = field(default_factory=dict)
    # Several (metric, mode) pairs for a multi-objective search; empty: the one ``metric``.
    objectives: tuple[tuple[str, str], ...] = ()
    # The prefix of the split a search or scheduler chooses on: "val_" (the validation split) for
    # a space that selects; "" for a grid, which chooses nothing, and for a job file written before
    # choices moved to the validation split (such a sweep resumes as it started).
    choose_on: str = ""
    # Variant label -> its role (one of ROLES); a variant not listed is the paper's algorithm.
    roles: dict[str, str] = field(default_factory=dict)

    def role(self, label: str) -> str:
        """The role of the configuration ``label`` (``point_label``): its variant's, or ""."""
        return self.roles.get(label.split(",", 1)[0], "")

    @property
    def uses_optuna(self) -> bool:
        return bool(self.search)

    @property
    def selects(self) -> bool:
        """Whether the sweep makes choices while it runs: a model-based search, or a scheduler."""
        return self.uses_optuna or self.scheduler is not None

    def chosen(self, metric: str) -> str:
        """The name a choice reads for ``metric``: where the space selects, a probe's score on the
        validation split (its ``val_`` twin); a cost or a training metric (``train_time_s``,
        ``loss``) is the same on every split and is read as it is."""
        if not self.choose_on or metric.startswith(self.choose_on):
            return metric
        from methods.evaluate.suite import quick_probe_config
        from methods.metric_names import metric_names
        from methods.registry import METHODS

        first = self.first_config()
        cfg = first.eval
        probes = {*metric_names(cfg), *metric_names(quick_probe_config(cfg)),
                  *METHODS[first.method_name].method_cls.held_out_metrics(first.method)}
        return f"{self.choose_on}{metric}" if metric in probes else metric

    @property
    def all_objectives(self) -> tuple[tuple[str, str], ...]:
        """The (metric, mode) pairs the search optimises; the first is ``metric`` / ``mode``."""
        return self.objectives or ((self.metric, self.mode),)

    def grid_points(self) -> list[dict[str, Any]]:
        """Every variant crossed with every combination of the grid values, in file order.

        A point maps dotted paths to values; a variant adds its label under ``variant``."""
        keys = list(self.grid)
        combos = [dict(zip(keys, c)) for c in itertools.product(*(self.grid[k] for k in keys))]
        if not self.variants:
            return combos
        return [
            {"variant": label, **settings, **combo}
            for label, settings in self.variants.items()
            for combo in combos
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form that ``from_dict`` turns back into an equal search space."""
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        if not out["roles"]:  # as written before roles existed: the same space, the same claims sweep
            del out["roles"]
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SearchSpace:
        """The search space ``to_dict`` wrote (in a job file); ConfigError naming ``space`` when
        ``raw`` is not one (a damaged or hand-edited job file)."""
        try:
            raw = dict(raw)
            raw["path"] = Path(raw["path"])
            raw["base_overrides"] = tuple(raw["base_overrides"])
            raw["seeds"] = tuple(raw["seeds"])
            raw["objectives"] = tuple(tuple(o) for o in raw.get("objectives", ()))  # absent in older job files
            raw["grid"] = {k: tuple(v) for k, v in raw["grid"].items()}
            raw["search"] = {
                k: Distribution(d["type"], d["low"], d["high"], tuple(d["values"])) for k, d in raw["search"].items()
            }
            return cls(**raw)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            what = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) else first_line(exc)
            raise ConfigError(f"space: not a search space as avlab writes it ({what})") from None

    def num_configurations(self) -> int:
        return len(self.grid_points()) * (self.num_samples if self.uses_optuna else 1)

    def num_trials(self) -> int:
        """Configurations x seeds: each (configuration, seed) is one trial and one MLflow child run."""
        return self.num_configurations() * len(self.seeds)

    def first_config(self) -> ExperimentConfig:
        """The config of the first trial (a search space without a grid has one empty point)."""
        return self.config_for(self.grid_points()[0], self.seeds[0])

    def with_overrides(self, preset: str | None, overrides: list[str] | tuple[str, ...]) -> SearchSpace:
        """This space with the command line's ``--preset`` and ``key.path=value`` overrides applied
        to every trial, each trial's config checked again.

        A trial's grid, search and variant values, its seed and the space's resources come after
        the overrides, so an override of one of them would be dropped without a word: refused."""
        if not preset and not overrides:
            return self
        varied = {*self.grid, *self.search, *(k for v in self.variants.values() for k in v)}
        for text in overrides:
            key, _ = parse_override(text)
            if key in varied:
                raise ConfigError(f"{key}: set on the command line and varied by {self.path.name}; "
                                  "drop the override, or change the grid, search or variants")
            if key == "seed":
                raise ConfigError(f"seed: set on the command line, but each trial's seed comes from "
                                  f"{self.path.name}'s seeds; use --seeds or edit seeds there")
            if key.startswith("resources.") and key.removeprefix("resources.") in self.resources:
                raise ConfigError(f"{key}: set on the command line and in {self.path.name}'s resources; "
                                  "drop one of them")
        space = dataclasses.replace(self, preset=preset or self.preset,
                                    base_overrides=(*self.base_overrides, *overrides))
        for point in space.grid_points():
            space.config_for(point, space.seeds[0])
        return space

    def trials(self) -> list[Trial]:
        """The grid's trials in the order they start (``grid_trials``), each with its Tune value,
        its configuration's label and its resolved config."""
        points = self.grid_points()
        return [Trial(key=trial_key(self, point, seed), label=point_label(points[point], tuple(self.grid)),
                      point=point, params=dict(points[point]), seed=seed, config=self.config_for(points[point], seed))
                for point, seed in grid_trials(self)]

    def config_for(self, params: Mapping[str, Any], seed: int) -> ExperimentConfig:
        """The resolved config of one trial (a grid value ``"N%"`` is N % of the base's value at
        this space's preset). Resolved once per space: configs are immutable, and a space with
        other overrides (``with_overrides``) is another space."""
        key = (repr(sorted(params.items())), seed)
        resolved = self.__dict__.setdefault("_resolved", {})  # not a field: to_dict, == and repr ignore it
        if key not in resolved:
            resolved[key] = self._resolve_trial(params, seed)
        return resolved[key]

    def _resolve_trial(self, params: Mapping[str, Any], seed: int) -> ExperimentConfig:
        settings = {k: v for k, v in params.items() if k != "variant"}
        if any(_percent(v) is not None for v in settings.values()):
            settings = _absolute(self.path, settings, self.base_run, self.preset, self.base_overrides)
        overrides = [*self.base_overrides, *(_override(k, v) for k, v in settings.items()), f"seed={seed}"]
        overrides += [f"resources.{k}={v}" for k, v in self.resources.items()]
        return resolve(self.base_run, preset=self.preset, overrides=overrides)


def _override(path: str, value: Any) -> str:
    return f"{path}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def load_search_space(path: str | Path, *, seeds: int | None = None) -> SearchSpace:
    p = Path(path)
    raw = read_yaml_mapping(p, "search space")
    for key in raw:
        if key not in KEYS:
            raise ConfigError(f"{p.name}: {key}: unknown search-space key; known keys: {', '.join(KEYS)}")

    base = raw.get("base") or {}
    if not isinstance(base, Mapping):
        raise ConfigError(f"{p.name}: base: expected a mapping with preset, config, overrides")
    for key in base:
        if key not in ("preset", "config", "overrides"):
            raise ConfigError(f"{p.name}: base.{key}: unknown key; use preset, config, overrides")
    preset = base.get("preset", "tiny")
    base_run = dict(base.get("config") or {})
    base_overrides = tuple(str(o) for o in base.get("overrides") or ())
    selects = bool(raw.get("search")) or raw.get("scheduler") is not None
    if selects:
        # A search or a scheduler chooses: on the validation split, so its trials score it too.
        if _resolve(p, base_run, preset, base_overrides, "base").eval.val_metrics is False and (
                (base_run.get("eval") or {}).get("val_metrics") is False
                or any(o.replace(" ", "").startswith("eval.val_metrics=") for o in base_overrides)):
            raise ConfigError(f"{p.name}: base: eval.val_metrics: a search or a scheduler chooses on the validation "
                              "split, so its trials must score it; drop eval.val_metrics=false")
        base_overrides = (*base_overrides, "eval.val_metrics=true")
    base_cfg = _resolve(p, base_run, preset, base_overrides, "base")

    variants, variant_cfgs = _load_variants(p, raw.get("variants") or {}, base_run, preset, base_overrides)
    roles = _load_roles(p, raw.get("roles") or {}, variants)
    grid = _load_grid(p, raw.get("grid") or {}, base_run, preset, base_overrides)
    search = _load_search(p, raw.get("search") or {}, base_run, preset, base_overrides)
    if "grid" in raw and not grid:
        raise ConfigError(f"{p.name}: grid: is empty; list at least one dotted path with values")
    if not grid and not search and not variants:
        raise ConfigError(f"{p.name}: grid/search: the space varies nothing; give a grid or a search")
    overlap = set(grid) & set(search)
    if overlap:
        raise ConfigError(f"{p.name}: {sorted(overlap)[0]}: in both grid and search")

    num_samples = _positive_int(p, raw.get("num_samples", 1), "num_samples")
    seed_spec = raw.get("seeds", 1) if seeds is None else seeds
    if isinstance(seed_spec, list):
        if not seed_spec or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < SEED_LIMIT
                                    for s in seed_spec):
            raise ConfigError(f"{p.name}: seeds: expected a count or a non-empty list of seeds >= 0 and < 2**32")
        _reject_repeats(p, seed_spec, "seeds")
        seed_list = tuple(seed_spec)
    else:
        seed_list = tuple(range(_positive_int(p, seed_spec, "seeds")))

    logged = frozenset().union(*(run_metrics(cfg) for cfg in (base_cfg, *variant_cfgs)))
    objectives = _load_objectives(p, raw, logged)
    metric, mode = objectives[0]

    scheduler = raw.get("scheduler")
    if scheduler is not None:
        if not isinstance(scheduler, Mapping) or scheduler.get("type") not in SCHEDULERS:
            raise ConfigError(f"{p.name}: scheduler.type: must be one of {SCHEDULERS} (or no scheduler)")
        scheduler = dict(scheduler)
    if len(objectives) > 1:
        if scheduler is not None:
            raise ConfigError(f"{p.name}: scheduler: ASHA stops trials on one metric; a space with several "
                              "metrics cannot use it (drop the scheduler or give one metric)")
        if not search:
            raise ConfigError(f"{p.name}: metrics: several objectives need a search (Optuna); a grid runs every "
                              "configuration anyway: give one metric, and the report shows what each one cost")

    resources = raw.get("resources") or {}
    if not isinstance(resources, Mapping):
        raise ConfigError(f"{p.name}: resources: expected a mapping (workers, cpus_per_worker, gpu, placement)")
    for key, value in resources.items():
        if key not in ("workers", "cpus_per_worker", "gpu", "placement"):
            raise ConfigError(f"{p.name}: resources.{key}: unknown key; use workers, cpus_per_worker, gpu, placement")
    _resolve(p, base_run, preset, (*base_overrides, *(f"resources.{k}={v}" for k, v in resources.items())), "resources")
    max_concurrent = _positive_int(p, raw.get("max_concurrent", 1), "max_concurrent")

    plot = _load_plot(p, raw.get("plot") or {}, [*grid, *search])
    return SearchSpace(
        name=p.stem, path=p.resolve(), description=str(raw.get("description", "")),
        base_run=base_run, preset=preset, base_overrides=base_overrides, grid=grid, search=search,
        variants=variants,
        num_samples=num_samples, seeds=seed_list, metric=metric, mode=mode, scheduler=scheduler,
        resources=dict(resources), max_concurrent=max_concurrent, plot=dict(plot),
        objectives=objectives if len(objectives) > 1 else (), choose_on=VALIDATION_PREFIX if selects else "",
        roles=roles,
    )


def _load_roles(p: Path, roles: Any, variants: Mapping[str, Any]) -> dict[str, str]:
    if not isinstance(roles, Mapping):
        raise ConfigError(f"{p.name}: roles: expected a mapping of variant labels to a role ({', '.join(ROLES)})")
    for label, role in roles.items():
        if label not in variants:
            raise ConfigError(f"{p.name}: roles.{label}: not a variant of this space; its variants: "
                              f"{', '.join(variants) or 'none'}")
        if role not in ROLES:
            raise ConfigError(f"{p.name}: roles.{label}: expected one of {', '.join(map(repr, ROLES))}, got {role!r}")
    return {str(k): str(v) for k, v in roles.items()}


def _load_objectives(p: Path, raw: Mapping[str, Any], logged: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """``metric`` + ``mode``, or ``metrics``: two or more metric names, each with max or min."""
    def known(metric: Any, where: str) -> str:
        if not isinstance(metric, str) or metric not in logged:
            examples = ", ".join(m for m in (*HEADLINE_METRICS, "loss") if m in logged)
            raise ConfigError(f"{p.name}: {where}: unknown metric {metric!r}: the runs of this space do not log it; "
                              f"e.g. {examples}; `avlab metrics` lists what a configuration logs")
        return metric

    if "metrics" not in raw:
        mode = raw.get("mode", "max")
        metric = known(raw.get("metric", DEFAULT_METRIC), "metric")
        if mode not in MODES:
            raise ConfigError(f"{p.name}: mode: must be max or min, got {mode!r}")
        return ((metric, mode),)
    spec = raw["metrics"]
    if "metric" in raw or "mode" in raw:
        raise ConfigError(f"{p.name}: metrics: give either metric and mode, or metrics, not both")
    if not isinstance(spec, Mapping) or len(spec) < 2:
        raise ConfigError(f"{p.name}: metrics: expected two or more metric names, each with max or min "
                          "(e.g. {image_h_linear_acc: max, train_time_s: min})")
    out = []
    for metric, mode in spec.items():
        known(metric, f"metrics.{metric}")
        if mode not in MODES:
            raise ConfigError(f"{p.name}: metrics.{metric}: must be max or min, got {mode!r}")
        out.append((metric, mode))
    return tuple(out)


def _resolve(p: Path, run: dict, preset: Any, overrides: tuple[str, ...], where: str) -> ExperimentConfig:
    try:
        return resolve(run, preset=preset, overrides=list(overrides))
    except ConfigError as exc:
        raise ConfigError(f"{p.name}: {where}: {exc}") from None


def _load_variants(
    p: Path, variants: Any, run: dict, preset: Any, base: tuple[str, ...]
) -> tuple[dict[str, dict[str, Any]], list[ExperimentConfig]]:
    """The variants' settings by label, and their resolved configurations."""
    if not isinstance(variants, Mapping):
        raise ConfigError(f"{p.name}: variants: expected a mapping of labels to {{dotted path: value}}")
    out: dict[str, dict[str, Any]] = {}
    cfgs: list[ExperimentConfig] = []
    for label, settings in variants.items():
        if not isinstance(settings, Mapping) or not settings:
            raise ConfigError(f"{p.name}: variants.{label}: expected a non-empty mapping of dotted paths to values")
        values = dict(settings)
        if any(_percent(v) is not None for v in values.values()):  # "N%" of the base's value, as in a grid
            values = _absolute(p, values, run, preset, base)
        cfgs.append(_resolve(p, run, preset, (*base, *(_override(k, v) for k, v in values.items())), f"variants.{label}"))
        out[str(label)] = dict(settings)
    return out, cfgs


def _load_grid(p: Path, grid: Any, run: dict, preset: Any, base: tuple[str, ...]) -> dict[str, tuple[Any, ...]]:
    if not isinstance(grid, Mapping):
        raise ConfigError(f"{p.name}: grid: expected a mapping of dotted config paths to value lists")
    out: dict[str, tuple[Any, ...]] = {}
    for path, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{p.name}: grid.{path}: expected a non-empty list of values")
        _reject_repeats(p, values, f"grid.{path}")
        for value in values:
            absolute = _absolute(p, {path: value}, run, preset, base)[path]
            _resolve(p, run, preset, (*base, _override(path, absolute)), f"grid.{path}")
        out[str(path)] = tuple(values)
    return out


def _load_search(p: Path, search: Any, run: dict, preset: Any, base: tuple[str, ...]) -> dict[str, Distribution]:
    if not isinstance(search, Mapping):
        raise ConfigError(f"{p.name}: search: expected a mapping of dotted config paths to distributions")
    out: dict[str, Distribution] = {}
    for path, spec in search.items():
        where = f"search.{path}"
        if not isinstance(spec, Mapping) or spec.get("type") not in DISTRIBUTIONS:
            raise ConfigError(f"{p.name}: {where}.type: must be one of {', '.join(DISTRIBUTIONS)}")
        kind = spec["type"]
        if kind == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{p.name}: {where}.values: expected a non-empty list")
            _reject_repeats(p, values, f"{where}.values")
            probes = values
            dist = Distribution(kind, values=tuple(values))
        else:
            low, high = spec.get("low"), spec.get("high")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
                raise ConfigError(f"{p.name}: {where}: low and high must be numbers")
            if not all(math.isfinite(as_float(v)) for v in (low, high)):
                raise ConfigError(f"{p.name}: {where}: low and high must be finite, got {low!r} and {high!r}")
            if low > high:
                raise ConfigError(f"{p.name}: {where}: low {low} is greater than high {high}")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{p.name}: {where}: loguniform needs low > 0, got {low}")
            if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
                raise ConfigError(f"{p.name}: {where}: int bounds must be integers")
            probes = [int(low), int(high)] if kind == "int" else [float(low), float(high)]
            dist = Distribution(kind, low=low, high=high)
        for value in probes:
            _resolve(p, run, preset, (*base, _override(str(path), value)), where)
        out[str(path)] = dist
    return out


def _percent(value: Any) -> float | None:
    """``"20%"`` -> 20.0; None for anything that is not a string ending in ``%``."""
    if not isinstance(value, str) or not value.endswith("%"):
        return None
    try:
        return float(value[:-1])
    except ValueError:
        return math.nan


def _absolute(p: Path, settings: Mapping[str, Any], run: dict, preset: Any, base: tuple[str, ...]) -> dict[str, Any]:
    """``settings`` with each ``"N%"`` value replaced by N % of the base configuration's value of
    that path at ``preset`` (rounded for an integer field), so a grid can name a share of the
    preset's data (Table 5's 20 % and 100 % of the paired pairs) at any preset."""
    out = dict(settings)
    reference = None
    for path, value in settings.items():
        share = _percent(value)
        if share is None:
            continue
        if not (math.isfinite(share) and share >= 0):
            raise ConfigError(f"{p.name}: grid.{path}: {value!r}: a share must be a number >= 0 followed by %")
        if reference is None:
            reference = _resolve(p, run, preset, base, "base").flat()
        if path not in reference:
            raise ConfigError(f"{p.name}: grid.{path}: not a config path (a share {value!r} needs one)")
        of = reference[path]
        if isinstance(of, bool) or not isinstance(of, (int, float)):
            raise ConfigError(f"{p.name}: grid.{path}: {value!r}: a share needs a numeric field, "
                              f"and {path} is {of!r} in the base")
        out[path] = round(of * share / 100) if isinstance(of, int) else of * share / 100
    return out


def _reject_repeats(p: Path, values: list[Any], where: str) -> None:
    """A value listed twice would run the same trials twice (and average them as two seeds)."""
    for i, value in enumerate(values):
        if value in values[:i]:
            raise ConfigError(f"{p.name}: {where}: {value!r} is listed twice")


def _load_plot(p: Path, plot: Any, varied: list[str]) -> dict[str, Any]:
    """``x``: the grid or search path that the report plots the metric against; ``log_x``: a log
    scale for it."""
    if not isinstance(plot, Mapping):
        raise ConfigError(f"{p.name}: plot: expected a mapping (x, log_x)")
    for key in plot:
        if key not in ("x", "log_x"):
            raise ConfigError(f"{p.name}: plot.{key}: unknown key; use x, log_x")
    if "x" in plot and plot["x"] not in varied:
        hint = f"; use one of {', '.join(varied)}" if varied else "; this space has no grid or search path"
        raise ConfigError(f"{p.name}: plot.x: {plot['x']!r} is not a grid or search path of this space{hint}")
    if not isinstance(plot.get("log_x", False), bool):
        raise ConfigError(f"{p.name}: plot.log_x: expected true or false, got {plot['log_x']!r}")
    return dict(plot)


def _positive_int(p: Path, value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{p.name}: {name}: must be an integer >= 1, got {value!r}")
    return value


def point_label(params: dict[str, Any], grid: tuple[str, ...] = ()) -> str:
    """Stable, readable label of one configuration, e.g. ``method.memory_size=500``; a variant
    is named by its label (its settings are in the run's params), then the grid values."""
    if not params:
        return "base"
    if "variant" in params:
        return ",".join([str(params["variant"]), *(f"{k}={params[k]}" for k in grid if k in params)])
    return ",".join(f"{k}={v}" for k, v in params.items())


def trial_params(space: SearchSpace, config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The varied settings and the seed of the trial whose Tune config is ``config``."""
    if space.uses_optuna:
        config = config.get("retry", config)  # a retried proposal: its values (retry.retry_tuner)
        return {path: config[path] for path in space.search}, config["seed"]
    trial = config.get("trial")
    if isinstance(trial, str):  # "<configuration> seed=<seed>": whatever order the space lists them in
        label, seed = trial.rsplit(" seed=", 1)
        points = {point_label(params, tuple(space.grid)): params for params in space.grid_points()}
        return dict(points[label]), int(seed)
    if trial is not None:  # a sweep started before trials were named: an index into its grid's order
        point, seed = grid_trials(space)[trial]
    else:  # a sweep started before grid trials were ordered: one Tune dimension each
        point, seed = config["point"], config["seed"]
    return dict(space.grid_points()[point]), seed


def trial_key(space: SearchSpace, point: int, seed: int) -> str:
    """A grid trial's Tune value: its configuration's label and seed. A restored sweep finds each
    trial's configuration by it, even if the space comes back with its variants or grid keys in
    another order (an index would then name another configuration)."""
    return f"{point_label(space.grid_points()[point], tuple(space.grid))} seed={seed}"



def grid_trials(space: SearchSpace) -> list[tuple[int, int]]:
    """The grid's trials as (configuration index, seed), in the order they start: every seed of a
    configuration in a row, the longest configurations first. Trials of a grid differ in length
    (a random-init variant only evaluates); started longest first, the short ones fill the slots
    at the end instead of one long trial running alone while the other slots idle."""
    return [(point, seed) for point in longest_first(space) for seed in space.seeds]


def longest_first(space: SearchSpace) -> list[int]:
    """Indices of the grid's configurations by decreasing training work (epochs x steps per
    epoch x batch; ties keep the search space's order)."""
    def work(index: int) -> int:
        cfg = space.config_for(space.grid_points()[index], space.seeds[0])
        from methods.registry import METHODS

        pool = cfg.data.pool_size(METHODS[cfg.method_name].method_cls.pretraining_pool(cfg.method))
        steps = max(pool // cfg.train.batch_size, 1)
        if cfg.train.max_steps_per_epoch:
            steps = min(steps, cfg.train.max_steps_per_epoch)
        return cfg.train.epochs * steps * cfg.train.batch_size

    return sorted(range(len(space.grid_points())), key=lambda i: -work(i))

