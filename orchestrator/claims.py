"""The papers' claims as data, and the rules that decide them from a sweep's seeds.

A claim file (``claims/*.yaml``) names the paper, the table or figure and its numbers, the
passage it encodes (``quote``: the paper's sentence, table cells or figure panel, verbatim), the
search space whose sweep tests it, the metric, and the statement as a comparison of the sweep's
configurations (by the labels ``avlab report`` shows) that a program can decide. ``kind`` is
``paper`` (what the quoted passage says, no more) or ``sanity_check`` (avlab's own check that a
method learns what it is built to learn, which no paper states; never attributed to one):

- ``greater``: ``a`` > ``b``;
- ``ordering``: ``rows`` from best to worst, every adjacent pair decided as ``greater``;
- ``argmax``: ``best`` above every row of ``among``;
- ``plateau``: beyond ``after``, no row of ``rows`` gains ``delta`` or more over it;
- ``peak``: ``at`` above both ends of ``rows`` (rows in the order of the varied value);
- ``above``: ``row``'s mean above ``value`` (e.g. chance).

The configurations of a claim share their seeds (and, the data following the run seed, each
seed's data), so every comparison of two configurations is paired by seed: the paired t-test on
the per-seed differences over the seeds both finished, two-sided at ALPHA = 0.05 (one common
seed is always inconclusive). A rule that needs every one of its k comparisons (``ordering``,
``argmax``, ``peak``, ``greater``) **holds** when each is significant in the claimed direction
(an intersection-union test, each at ALPHA); it is **contradicted** when one comparison is
significant the other way after Holm's correction over its k comparisons; otherwise it is
**inconclusive**. A plateau holds when every gain's 95 % interval lies below ``delta`` and is
contradicted when one gain is above it (Holm over the gains); ``above`` is the one-sample t-test
against ``value``. Each verdict carries its effect (the deciding difference: the weakest pair of
a holding or undecided claim, the strongest reversal of a contradicted one; for ``plateau`` the
largest gain, for ``above`` the margin over ``value``) with its 95 % interval, the claim's p (the
largest p of an intersection-union test, the Holm-adjusted p of a reversal) and the minimum
detectable effect of its comparisons: the difference a paired test over these seeds would
detect with 80 % power at the observed spread, i.e. how large an effect an "inconclusive" can
hide. ``family_wise`` corrects the claims' p values across a table (Holm), beside each claim's
own verdict.
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
# The keys of a claim file and what each holds (the docs' reference is generated from them).
KEYS = {
    "claim": "the statement, in one sentence",
    "paper": "the paper it comes from",
    "where": "the table, figure or section of the paper",
    "quote": "the paper's passage the claim encodes, verbatim (required for kind: paper)",
    "kind": "paper (what the quoted passage says, no more) or sanity_check (avlab's own check; default paper)",
    "search_space": "the search space's file name (beside the claim or in search_spaces/) whose sweep tests it",
    "metric": "the metric the rule compares, a name the sweep's runs log",
    "rule": "the statement as a comparison of the sweep's configurations: {type, and the type's fields}",
    "paper_values": "configuration label -> the paper's number, shown beside avlab's",
}
KINDS = ("paper", "sanity_check")


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
    quote: str = ""  # the paper's passage the claim encodes, verbatim
    kind: str = "paper"  # paper | sanity_check (avlab's own, not the paper's)

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
        if key not in KEYS:
            raise ConfigError(f"{where}: {key}: unknown claim key; known keys: {', '.join(KEYS)}")
    statement, paper, place = _text(raw, "claim", where), _text(raw, "paper", where), _text(raw, "where", where)
    kind = raw.get("kind", "paper")
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    # A paper's claim quotes the passage it encodes; a sanity check may quote what the paper does say.
    quote = _text(raw, "quote", where) if kind == "paper" or "quote" in raw else ""
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
        if kind == "paper":
            for item in items:
                if space.role(item):
                    raise ConfigError(f"{where}: rule.{key}: {item!r} is a {space.role(item)} row of "
                                      f"{space_path.name}, not the paper's algorithm; a claim attributed to the paper "
                                      f"compares its algorithm (or make the claim kind: sanity_check)")
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
    if kind == "sanity_check" and paper_values:
        raise ConfigError(f"{where}: paper_values: a sanity check is avlab's own; it quotes no paper's numbers")
    return Claim(id=p.stem, path=p, statement=statement, paper=paper, where=place, search_space=space_path,
                 metric=metric, rule=rule["type"], rows=rows, numbers=numbers,
                 paper_values={k: float(v) for k, v in paper_values.items()}, quote=quote, kind=kind)


def all_claims() -> list[Path]:
    return sorted(CLAIMS_DIR.glob("*.yaml"))


# --- deciding ----------------------------------------------------------------------------------

ALPHA = 0.05  # every test's level, two-sided
POWER = 0.8  # the power the minimum detectable effect is quoted at
_SAME = 1e-9  # per-seed differences closer than this are equal (float rounding of the metrics)


@dataclass(frozen=True)
class Comparison:
    """``a`` - ``b`` over the seeds both finished, paired by seed: the mean difference, the
    half-width of its 95 % interval, the two-sided p of the paired t-test, the seeds, and the
    minimum detectable effect (two-sided at ALPHA, POWER, at the differences' observed spread)."""

    a: str
    b: str
    diff: float
    ci: float
    p: float
    n: int
    mde: float


def t_quantile(q: float, df: float) -> float:
    """Student's t quantile: ``scipy.stats.t.ppf(q, df)``, bit for bit, from ``scipy.special``
    (what ``scipy.stats`` calls; importing ``scipy.stats`` costs a report a second more)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, q))


def t_cdf(x: float, df: float) -> float:
    """Student's t distribution function: ``scipy.stats.t.cdf(x, df)``; ``t_cdf(-x, df)`` is its sf."""
    from scipy.special import stdtr

    return float(stdtr(df, x))


def paired(a: dict[int, float], b: dict[int, float], alpha: float = ALPHA) -> tuple[float, float, float, int, float]:
    """(mean difference, 1 - alpha half-width, two-sided p, seeds, MDE at ``alpha``) of the per-seed
    differences a[s] - b[s] over the seeds in both (the paired t-test; one seed: inf, nan, inf; differences
    all equal: the exact sign-flip p)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if not d:
        return math.nan, math.inf, math.nan, 0, math.inf
    mean = statistics.fmean(d)
    if len(d) < 2:
        return mean, math.inf, math.nan, len(d), math.inf
    se = statistics.stdev(d) / math.sqrt(len(d))
    df = len(d) - 1
    q, q_power = t_quantile(1 - alpha / 2, df), t_quantile(POWER, df)
    if max(d) - min(d) <= _SAME * max(1.0, abs(mean)):
        # every seed's difference the same, up to rounding (a probe's accuracy is a multiple of
        # 1/n_test): no spread for t to read (it would give p ~ 0 from rounding alone), so the exact
        # sign-flip test decides, which on n seeds of one sign gives p = 2 / 2^n (two seeds: 0.5,
        # never a decision; five: 0.0625; six: 0.031); the MDE is 0 where n seeds can decide, else inf
        sign_flip = 2.0 ** (1 - len(d))
        return mean, 0.0, (sign_flip if abs(mean) > _SAME else 1.0), len(d), (0.0 if sign_flip < alpha else math.inf)
    return mean, q * se, 2 * t_cdf(-abs(mean / se), df), len(d), (q + q_power) * se


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p values (nan counts as 1): reject where the adjusted p < alpha."""
    order = sorted(range(len(ps)), key=lambda i: 1.0 if math.isnan(ps[i]) else ps[i])
    adjusted, running = [1.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        p = 1.0 if math.isnan(ps[i]) else ps[i]
        running = max(running, min(1.0, (len(ps) - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Verdict:
    verdict: str  # holds | contradicted | inconclusive
    effect: float  # the deciding difference (see the module docstring)
    detail: str  # one line: the comparisons behind the verdict
    ci: float = math.inf  # half-width of the effect's 95 % interval
    mde: float = math.inf  # the largest of the comparisons' minimum detectable effects
    p: float = math.nan  # the claim's p for its verdict (what the table's correction reads)
    seeds: int = 0  # seeds the comparisons were paired over (the fewest of any comparison)


def _welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean a - mean b, half-width of its 95 % Welch interval, two-sided p); inf / nan with
    fewer than two seeds on a side. For configurations that do not share seeds (the report's
    best configuration); a claim's configurations share them and are compared paired."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, math.inf, math.nan
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if max(a) - min(a) <= _SAME and max(b) - min(b) <= _SAME:
        # Every seed equal on each side (probe accuracies are multiples of 1/n_test): Welch's
        # standard error is 0 or float rounding, which would read as certainty on any number of
        # seeds. The exact permutation test instead: all of one side above all of the other is the
        # most extreme of the C(n_a + n_b, n_a) splits, p = 2 / C (2 + 2 seeds: 1/3; 4 + 4: 0.029).
        if abs(diff) <= _SAME:
            return diff, math.nan, 1.0
        return diff, math.nan, min(1.0, 2.0 / math.comb(len(a) + len(b), len(a)))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va and vb else len(a) + len(b) - 2
    t = diff / se
    return diff, t_quantile(0.975, df) * se, 2 * t_cdf(-abs(t), df)


def compare(a: list[float], b: list[float]) -> int:
    """+1 when a is significantly above b (Welch, 95 %), -1 when below, 0 when neither."""
    diff, _, p = _welch(a, b)
    if not p < ALPHA:
        return 0
    return 1 if diff > 0 else -1


def _pairs(values: dict[str, dict[int, float]], pairs: list[tuple[str, str]], alpha: float = ALPHA) -> Verdict:
    """Every (a, b) claimed a > b, each paired over the seeds both finished. Holds when every one
    is significant in the claimed direction (an intersection-union test: each at ALPHA); is
    contradicted when one is significant the other way after Holm's correction over the claim's
    pairs (any one of k reversals would otherwise fire k times as often)."""
    cs = [Comparison(a, b, *paired(values[a], values[b], alpha)) for a, b in pairs]
    adjusted = holm([c.p for c in cs])
    reversed_ = [(c, q) for c, q in zip(cs, adjusted) if c.diff < 0 and q < alpha]
    if reversed_:
        c, q = min(reversed_, key=lambda item: item[1])
        verdict, p, deciding = "contradicted", q, c
    else:
        weakest = max(cs, key=lambda c: (1.0 if math.isnan(c.p) else c.p, -c.diff))
        holds = all(c.diff > 0 and c.p < alpha for c in cs)
        verdict, p, deciding = ("holds" if holds else "inconclusive"), weakest.p, weakest
    def sign(c: Comparison, q: float) -> str:  # what each pair says under the rule above
        return "<" if c.diff < 0 and q < alpha else ">" if c.diff > 0 and c.p < alpha else "~"
    detail = "; ".join(f"{c.a} {sign(c, q)} {c.b} ({c.diff:+.3f} ± {c.ci:.3f}, p {c.p:.3g}, Holm {q:.3g}, "
                       f"n {c.n})" for c, q in zip(cs, adjusted))
    return Verdict(verdict, deciding.diff, detail, deciding.ci, max(c.mde for c in cs), p, min(c.n for c in cs))


def decide(claim: Claim, values: dict[str, dict[int, float]], alpha: float = ALPHA) -> Verdict:
    """The claim's verdict from each configuration's per-seed values of its metric (label ->
    seed -> value), every test at ``alpha`` (a sequential look's share of ALPHA: ``look_alpha``).
    A configuration without a finished seed makes the claim inconclusive."""
    missing = [label for label in claim.labels() if not values.get(label)]
    if missing:
        return Verdict("inconclusive", math.nan, f"no finished seed for {', '.join(missing)}")
    r = claim.rows
    if claim.rule == "greater":
        return _pairs(values, [(r["a"], r["b"])], alpha)
    if claim.rule == "ordering":
        return _pairs(values, list(zip(r["rows"], r["rows"][1:])), alpha)
    if claim.rule == "argmax":
        return _pairs(values, [(r["best"], other) for other in r["among"] if other != r["best"]], alpha)
    if claim.rule == "peak":
        return _pairs(values, [(r["at"], r["rows"][0]), (r["at"], r["rows"][-1])], alpha)
    if claim.rule == "plateau":
        return _plateau(claim, values, alpha)
    return _above(claim, values, alpha)


def _plateau(claim: Claim, values: dict[str, dict[int, float]], alpha: float) -> Verdict:
    """Beyond ``after`` no row gains ``delta``: holds when every paired gain's 1 - alpha interval
    lies below delta (each at alpha: intersection-union); contradicted when one gain is above
    delta with Holm's correction over the rows."""
    delta, after = claim.numbers["delta"], claim.rows["after"]
    rows = claim.rows["rows"]
    later = [row for row in (rows[rows.index(after) + 1:] if after in rows else rows) if row != after]
    if not later:
        return Verdict("inconclusive", math.nan, f"no configuration after {after}")
    gains = [Comparison(row, after, *paired(values[row], values[after], alpha)) for row in later]
    def p_against(c: Comparison, above: bool) -> float:  # two-sided convention, as the pair rules
        if c.n < 2 or not math.isfinite(c.ci):
            return math.nan
        if c.ci == 0:
            return 0.0 if (c.diff > delta if above else c.diff < delta) else 1.0
        se = c.ci / t_quantile(1 - alpha / 2, c.n - 1)
        t = (c.diff - delta) / se
        return min(1.0, 2 * (t_cdf(-t, c.n - 1) if above else t_cdf(t, c.n - 1)))

    over = holm([p_against(c, above=True) for c in gains])
    under = [p_against(c, above=False) for c in gains]
    detail = "; ".join(f"{c.a} - {after} = {c.diff:+.3f} ± {c.ci:.3f} (n {c.n})" for c in gains) + f" (delta {delta:g})"
    largest = max(gains, key=lambda c: c.diff)
    mde, n = max(c.mde for c in gains), min(c.n for c in gains)
    if min(over) < alpha:
        return Verdict("contradicted", largest.diff, detail, largest.ci, mde, min(over), n)
    holds = all(not math.isnan(p) and p < alpha for p in under)
    p = max(1.0 if math.isnan(p) else p for p in under)
    return Verdict("holds" if holds else "inconclusive", largest.diff, detail, largest.ci, mde, p, n)


def _above(claim: Claim, values: dict[str, dict[int, float]], alpha: float) -> Verdict:
    """``row``'s mean above ``value``: the one-sample t-test, two-sided at alpha."""
    row, value = claim.rows["row"], claim.numbers["value"]
    seeds = list(values[row].values())
    mean = statistics.fmean(seeds)
    if len(seeds) < 2:
        return Verdict("inconclusive", mean - value, f"{row} = {mean:.3f} on one seed (value {value:g})", seeds=1)
    diff, ci, p, n, mde = paired(values[row], {s: value for s in values[row]}, alpha)
    verdict = "inconclusive" if not p < alpha else "holds" if diff > 0 else "contradicted"
    return Verdict(verdict, diff, f"{row} = {mean:.3f} ± {ci:.3f} against {value:g} (p {p:.3g}, n {n})",
                   ci, mde, p, n)


def family_wise(verdicts: list[Verdict], alpha: float = ALPHA) -> list[str]:
    """Each claim's verdict with Holm's correction across the table: a holding or contradicted
    claim whose p does not survive it becomes inconclusive."""
    adjusted = holm([v.p if v.verdict != "inconclusive" else 1.0 for v in verdicts])
    return [v.verdict if v.verdict == "inconclusive" or q < alpha else "inconclusive"
            for v, q in zip(verdicts, adjusted)]


def looks(start: int, most: int) -> list[int]:
    """The seed counts at which ``--until-decided`` looks: ``start``, then ``start`` more each
    round, up to ``most`` (the last look at ``most`` itself)."""
    if not 2 <= start <= most:
        raise ConfigError(f"--max-seeds: must be at least the starting seeds (--seeds {start}, at least 2), got {most}")
    counts = list(range(start, most + 1, start))
    return counts if counts[-1] == most else [*counts, most]


def look_alpha(start: int, most: int) -> float:
    """Each look's level under ``--until-decided``: ALPHA split evenly over the planned looks
    (Bonferroni over looks), so that the chance of a false holds or contradicted over all of a
    claim's looks stays at most ALPHA, however many it takes."""
    return ALPHA / len(looks(start, most))
