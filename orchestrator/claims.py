"""The papers' claims as data, and the rules that decide them from a sweep's seeds.

A claim file (``claims/*.yaml``) names the paper, the table or figure and its numbers, the search
space whose sweep tests it, the metric, and the statement as a comparison of the sweep's
configurations (by the labels ``avlab report`` shows) that a program can decide:

- ``greater``: ``a`` > ``b``;
- ``ordering``: ``rows`` from best to worst, every adjacent pair decided as ``greater``;
- ``argmax``: ``best`` above every row of ``among``;
- ``plateau``: beyond ``after``, no row of ``rows`` gains ``delta`` or more over it;
- ``peak``: ``at`` above both ends of ``rows`` (rows in the order of the varied value);
- ``above``: ``row``'s mean above ``value`` (e.g. chance).

Each comparison of two configurations is Welch's t-test over their seeds at 95 % (two-sided):
significant and in the claimed direction **holds**, significant the other way **contradicted**,
neither **inconclusive**; one seed on either side is always inconclusive. A plateau holds when
the upper end of every gain's 95 % interval (Welch) is below ``delta`` and is contradicted when
the lower end of one is above it; ``above`` uses the one-sample t interval. The effect size is
the difference of means (for ``plateau`` the largest gain, for ``above`` the margin over
``value``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError
from orchestrator.typed import as_float, read_yaml_mapping

ROOT = Path(__file__).resolve().parents[1]
CLAIMS_DIR = ROOT / "claims"
SPACES_DIR = ROOT / "search_spaces"
VERDICTS = ("holds", "contradicted", "inconclusive")
# Rule type -> its fields (besides ``type``): rows of the sweep, then numbers.
RULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "greater": (("a", "b"), ()),
    "ordering": (("rows",), ()),
    "argmax": (("best", "among"), ()),
    "plateau": (("after", "rows"), ("delta",)),
    "peak": (("at", "rows"), ()),
    "above": (("row",), ("value",)),
}
_KEYS = ("claim", "paper", "where", "search_space", "metric", "rule", "paper_values")


@dataclass(frozen=True)
class Claim:
    """One claim file, validated (``load_claim``)."""

    id: str
    path: Path
    statement: str
    paper: str
    where: str
    search_space: Path
    metric: str
    rule: str
    rows: dict[str, Any]  # the rule's row fields: a label or a list of labels
    numbers: dict[str, float]  # the rule's numbers (delta, value)
    paper_values: dict[str, float] = field(default_factory=dict)  # configuration label -> the paper's number

    def labels(self) -> list[str]:
        """Every configuration the rule reads, in the order the rule names them."""
        out: list[str] = []
        for value in self.rows.values():
            out += [value] if isinstance(value, str) else list(value)
        return list(dict.fromkeys(out))


def _text(raw: dict[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key}: expected a non-empty string, got {value!r}")
    return value.strip()


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(as_float(value)):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _space_path(name: str, claim: Path, where: str) -> Path:
    """The claim's search space: a .yaml file named by itself (no folder), beside the claim or in
    the project's ``search_spaces/``, where it must also lie once links are followed. A claim
    file is shared data; it picks among the ablations, it does not point at files elsewhere."""
    if Path(name).name != name or name in (".", "..") or not name.endswith(".yaml"):
        raise ConfigError(f"{where}: search_space: {name!r} is not a search space's file name; give the name of a "
                          f".yaml file beside the claim or in {SPACES_DIR} (no folders)")
    for folder in (claim.parent, SPACES_DIR):
        candidate = folder / name
        if candidate.is_file():
            if not candidate.resolve().is_relative_to(folder.resolve()):
                raise ConfigError(f"{where}: search_space: {candidate} links outside {folder}; "
                                  "a claim's search space lies beside it or in the project's search spaces")
            return candidate
    raise ConfigError(f"{where}: search_space: {name} not found beside the claim or in {SPACES_DIR}")


def _check_distinct(rule: str, rows: dict[str, Any], where: str) -> None:
    """Refuse a rule that compares a configuration with itself: it could only come out
    inconclusive, after its sweep had trained every seed of it."""
    if rule == "greater" and rows["a"] == rows["b"]:
        raise ConfigError(f"{where}: rule.b: {rows['b']!r} is rule.a too; a configuration is not compared with itself")
    if rule == "argmax" and not set(rows["among"]) - {rows["best"]}:
        raise ConfigError(f"{where}: rule.among: names only rule.best ({rows['best']!r}); list the configurations it beats")
    if rule == "peak" and rows["at"] in (rows["rows"][0], rows["rows"][-1]):
        raise ConfigError(f"{where}: rule.at: {rows['at']!r} is an end of rule.rows; a peak lies between both ends")
    if rule == "plateau" and rows["after"] in rows["rows"] and rows["after"] == rows["rows"][-1]:
        raise ConfigError(f"{where}: rule.after: {rows['after']!r} is the last of rule.rows; a plateau needs a "
                          "configuration after it")


def load_claim(path: str | Path) -> Claim:
    """Read and check a claim file: ConfigError naming the file and field, before anything runs.
    The search space is a .yaml file name, looked up beside the claim, then in ``search_spaces/``;
    the rule's rows must be distinct configurations of it (``avlab report``'s labels)."""
    from orchestrator.search_space import load_search_space
    from orchestrator.search_space import point_label

    p = Path(path)
    raw = read_yaml_mapping(p, "claim")
    where = p.name
    for key in raw:
        if key not in _KEYS:
            raise ConfigError(f"{where}: {key}: unknown claim key; known keys: {', '.join(_KEYS)}")
    statement, paper, place = _text(raw, "claim", where), _text(raw, "paper", where), _text(raw, "where", where)
    space_path = _space_path(_text(raw, "search_space", where), p, where)
    space = load_search_space(space_path)
    metric = _text(raw, "metric", where)
    from orchestrator.metrics import run_metrics

    logged = frozenset().union(*(run_metrics(space.config_for(params, space.seeds[0])) for params in space.grid_points()))
    if metric not in logged:
        raise ConfigError(f"{where}: metric: {metric!r} is not logged by {space_path.name}'s runs")
    rule = raw.get("rule")
    if not isinstance(rule, dict) or rule.get("type") not in RULES:
        raise ConfigError(f"{where}: rule.type: expected one of {', '.join(RULES)}, got "
                          f"{rule.get('type') if isinstance(rule, dict) else rule!r}")
    row_keys, number_keys = RULES[rule["type"]]
    for key in rule:
        if key not in ("type", *row_keys, *number_keys):
            raise ConfigError(f"{where}: rule.{key}: not a field of a {rule['type']} rule "
                              f"({', '.join((*row_keys, *number_keys))})")
    labels = {point_label(params, tuple(space.grid)) for params in space.grid_points()}
    rows: dict[str, Any] = {}
    for key in row_keys:
        value = rule.get(key)
        many = key in ("rows", "among")
        items = value if many and isinstance(value, list) else [value]
        if many and (not isinstance(value, list) or len(value) < 2):
            raise ConfigError(f"{where}: rule.{key}: expected a list of at least two configurations, got {value!r}")
        for item in items:
            if item not in labels:
                raise ConfigError(f"{where}: rule.{key}: {item!r} is not a configuration of {space_path.name}; "
                                  f"its configurations: {', '.join(sorted(labels))}")
        if many and len(set(items)) < len(items):
            twice = next(item for item in items if items.count(item) > 1)
            raise ConfigError(f"{where}: rule.{key}: {twice!r} is listed twice; name each configuration once")
        rows[key] = list(value) if many else value
    _check_distinct(rule["type"], rows, where)
    numbers = {key: _number(rule.get(key), f"{where}: rule.{key}") for key in number_keys}
    if rule["type"] == "plateau" and numbers["delta"] <= 0:
        raise ConfigError(f"{where}: rule.delta: must be positive, got {numbers['delta']}")
    paper_values = raw.get("paper_values") or {}
    if not isinstance(paper_values, dict):
        raise ConfigError(f"{where}: paper_values: expected a mapping of configuration -> number")
    for label, value in paper_values.items():
        if label not in labels:
            raise ConfigError(f"{where}: paper_values: {label!r} is not a configuration of {space_path.name}")
        _number(value, f"{where}: paper_values.{label}")
    return Claim(id=p.stem, path=p, statement=statement, paper=paper, where=place, search_space=space_path,
                 metric=metric, rule=rule["type"], rows=rows, numbers=numbers,
                 paper_values={k: float(v) for k, v in paper_values.items()})


def all_claims() -> list[Path]:
    return sorted(CLAIMS_DIR.glob("*.yaml"))


# --- deciding ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    verdict: str  # holds | contradicted | inconclusive
    effect: float  # difference of means (see the module docstring)
    detail: str  # one line: the comparisons behind the verdict


def _welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean a - mean b, half-width of its 95 % Welch interval, two-sided p); inf / nan with
    fewer than two seeds on a side."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, math.inf, math.nan
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # every seed equal on both sides: the sign is certain
        return diff, 0.0, 0.0 if diff else 1.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va and vb else len(a) + len(b) - 2
    t = diff / se
    from scipy import stats  # a second to import: only when a claim is decided

    return diff, float(stats.t.ppf(0.975, df) * se), float(2 * stats.t.sf(abs(t), df))


def compare(a: list[float], b: list[float]) -> int:
    """+1 when a is significantly above b (Welch, 95 %), -1 when below, 0 when neither."""
    diff, _, p = _welch(a, b)
    if not p < 0.05:
        return 0
    return 1 if diff > 0 else -1


def _pairs(values: dict[str, list[float]], pairs: list[tuple[str, str]]) -> Verdict:
    """Every (a, b) claimed a > b: holds when all are significant, contradicted when one is
    significant the other way."""
    signs = [compare(values[a], values[b]) for a, b in pairs]
    diffs = [statistics.fmean(values[a]) - statistics.fmean(values[b]) for a, b in pairs]
    verdict = "contradicted" if -1 in signs else "holds" if all(s == 1 for s in signs) else "inconclusive"
    words = {1: ">", -1: "<", 0: "~"}
    detail = "; ".join(f"{a} {words[s]} {b} ({d:+.3f})" for (a, b), s, d in zip(pairs, signs, diffs))
    return Verdict(verdict, min(diffs), detail)


def decide(claim: Claim, values: dict[str, list[float]]) -> Verdict:
    """The claim's verdict from each configuration's per-seed values of its metric. A
    configuration without a finished seed makes the claim inconclusive."""
    missing = [label for label in claim.labels() if not values.get(label)]
    if missing:
        return Verdict("inconclusive", math.nan, f"no finished seed for {', '.join(missing)}")
    r = claim.rows
    if claim.rule == "greater":
        return _pairs(values, [(r["a"], r["b"])])
    if claim.rule == "ordering":
        return _pairs(values, list(zip(r["rows"], r["rows"][1:])))
    if claim.rule == "argmax":
        return _pairs(values, [(r["best"], other) for other in r["among"] if other != r["best"]])
    if claim.rule == "peak":
        return _pairs(values, [(r["at"], r["rows"][0]), (r["at"], r["rows"][-1])])
    if claim.rule == "plateau":
        delta, after = claim.numbers["delta"], r["after"]
        later = r["rows"][r["rows"].index(after) + 1:] if after in r["rows"] else r["rows"]
        gains = [(row, *_welch(values[row], values[after])[:2]) for row in later if row != after]
        if not gains:
            return Verdict("inconclusive", math.nan, f"no configuration after {after}")
        verdict = ("contradicted" if any(g - ci > delta for _, g, ci in gains)
                   else "holds" if all(g + ci < delta for _, g, ci in gains) else "inconclusive")
        detail = "; ".join(f"{row} - {after} = {g:+.3f} ± {ci:.3f}" for row, g, ci in gains)
        return Verdict(verdict, max(g for _, g, _ in gains), f"{detail} (delta {delta:g})")
    # above
    seeds, value = values[r["row"]], claim.numbers["value"]
    mean = statistics.fmean(seeds)
    if len(seeds) < 2:
        return Verdict("inconclusive", mean - value, f"{r['row']} = {mean:.3f} on one seed (value {value:g})")
    sem = statistics.stdev(seeds) / math.sqrt(len(seeds))
    from scipy import stats

    ci = float(stats.t.ppf(0.975, len(seeds) - 1) * sem)
    verdict = "holds" if mean - ci > value else "contradicted" if mean + ci < value else "inconclusive"
    return Verdict(verdict, mean - value, f"{r['row']} = {mean:.3f} ± {ci:.3f} against {value:g}")
