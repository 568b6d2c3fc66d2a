"""``avlab report`` and ``avlab status``: an ablation as the paper would show it, from MLflow.

Child runs are grouped by configuration; each metric is reported as mean ± 95 % confidence
interval over seeds (Student t), as a Markdown table, a JSON document and a PNG plot (metric
against the varied value, log axis when asked, like Fig. 6 of the BMA-Memory paper).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.tracking import MlflowClient

from orchestrator import environment
from orchestrator.errors import ConfigError
from orchestrator.jobs import check_name
from orchestrator.metrics import COST_METRICS
from orchestrator.runs import children, find_sweep_run, search_all, shared_params, sweep_metric

if TYPE_CHECKING:  # imported where a plot is drawn: matplotlib (with scipy.stats) cost `avlab status` 1.4 s
    from matplotlib.figure import Figure


def _cell(metric: str, value: dict[str, float] | None, missing: str) -> str:
    """``mean ± ci``, or ``mean [low, high]`` when the interval was clipped to the metric's range."""
    if not value:
        return missing
    digits = 0 if metric in COST_METRICS else 3
    mean, ci = value["mean"], value["ci95"]
    low, high = value.get("low", mean - ci), value.get("high", mean + ci)
    if low > mean - ci or high < mean + ci:
        return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t confidence interval (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    sem = statistics.stdev(values) / math.sqrt(len(values))
    from orchestrator.claims import t_quantile

    return mean, t_quantile(0.975, len(values) - 1) * sem


def _sweep(client: MlflowClient, name: str):
    # Not a name avlab gives a sweep (a quote would also break MLflow's search filter): say so.
    check_name(name, "NAME")
    run = find_sweep_run(client, name)
    if run is None:
        raise ConfigError(f"sweep: no sweep named {name!r} in this store")
    return run


def build_report(client: MlflowClient, name: str) -> dict[str, Any]:
    """The sweep's headline metrics, then the binaural ones when its runs logged them, then what
    each configuration cost next to what it scored."""
    from methods.metric_names import HEADLINE_METRICS, OPTIONAL_HEADLINE_METRICS

    parent = _sweep(client, name)
    metric = sweep_metric(parent.data.params)
    mode = parent.data.params.get("mode", "max")
    objectives = objectives_of(parent.data.params)
    metrics = list(dict.fromkeys([metric, *(m for m, _ in objectives), *HEADLINE_METRICS]))
    groups: dict[str, list] = {}
    wanted = (*metrics, *OPTIONAL_HEADLINE_METRICS, *COST_METRICS)  # what a row can show
    for run in children(client, parent.info.run_id, params=("varied.",), metrics=tuple(dict.fromkeys(wanted))):
        if run.info.status == "FINISHED":
            groups.setdefault(run.data.tags.get("avlab.config_label", "base"), []).append(run)
    logged = {m for runs in groups.values() for r in runs for m in r.data.metrics}
    metrics += [m for m in OPTIONAL_HEADLINE_METRICS if m in logged and m not in metrics]
    metrics += [m for m in COST_METRICS if m in logged and m not in metrics]
    rows, seeds = [], {}
    for label, runs in groups.items():
        varied = {k.removeprefix("varied."): v for k, v in runs[0].data.params.items() if k.startswith("varied.")}
        row: dict[str, Any] = {"configuration": label, "varied": varied, "seeds": len(runs), "metrics": {}}
        for m in metrics:
            values = [r.data.metrics[m] for r in runs if m in r.data.metrics]
            if values:
                row["metrics"][m] = summary(m, values)
        seeds[label] = [r.data.metrics[metric] for r in runs if metric in r.data.metrics]
        rows.append(row)
    rows.sort(key=lambda r: _sort_key(r["varied"]))
    runs = [r for group in groups.values() for r in group]
    # The data, evaluation and encoder settings every finished trial shares (none: no trial finished).
    shared = shared_params(client, parent.info.run_id, _REFERENCE_PREFIXES) if runs else None
    return {
        "sweep": name,
        "parent_run_id": parent.info.run_id,
        "search_space": parent.data.params.get("search_space"),
        "metric": metric,
        "mode": mode,
        "rows": rows,
        **_best(seeds, mode),
        "objectives": [{"metric": m, "mode": d} for m, d in objectives],
        "pareto": pareto_front(rows, objectives) if len(objectives) > 1 else None,
        "chance": _chance(shared, metric),
        "random_init": _random_init(client, shared, metric),
        # Trials that took an identical finished trial's results (`avlab sweep --reuse-trials`).
        "reused": sum(1 for r in runs if r.data.tags.get("avlab.reused_from")),
        # Which code made the numbers: trials per `avlab.source_hash` ("unrecorded" before the tag).
        "code_versions": code_versions(runs),
        # One line when the trials ran in different environments (tag `avlab.env.id`), else None.
        "environments": environment.summary(runs),
        # Set by `avlab reproduce` on the sweeps it decided claims with.
        "verdicts": parent.data.tags.get("avlab.verdicts"),
        "verdict_report": parent.data.tags.get("avlab.verdict_report"),
    }


def code_versions(runs: list) -> dict[str, int]:
    """Trials per code version (tag ``avlab.source_hash``; "unrecorded" for runs made before it).
    A trial retried on other code (``--retry-failed``) counts as "<first> then <retry's>"."""
    counts: dict[str, int] = {}
    for run in runs:
        code = run.data.tags.get("avlab.source_hash", "unrecorded")
        retried = run.data.tags.get("avlab.retried_source_hash")
        if retried and retried != code:
            code = f"{code} then {retried}"
        counts[code] = counts.get(code, 0) + 1
    return dict(sorted(counts.items()))


def code_line(counts: dict[str, int]) -> str:
    """One sentence naming the code versions behind ``counts`` trials."""
    if list(counts) == ["unrecorded"]:
        return "No trial recorded its code version (made before the tag `avlab.source_hash`)."
    if len(counts) == 1:
        return f"Every trial ran on code {next(iter(counts))} (tag `avlab.source_hash`)."
    return ("The trials ran on several code versions (tag `avlab.source_hash`): "
            + ", ".join(f"{code} ({n})" for code, n in counts.items()) + ".")


def objectives_of(params: dict[str, str]) -> list[tuple[str, str]]:
    """The sweep's (metric, mode) pairs from its parent run's params (one for older sweeps)."""
    text = params.get("objectives")
    if text:
        return [tuple(item.rsplit(":", 1)) for item in text.split(",")]  # type: ignore[misc]
    return [(sweep_metric(params), params.get("mode", "max"))]


def pareto_front(rows: list[dict[str, Any]], objectives: list[tuple[str, str]]) -> list[str]:
    """The configurations that no other dominates on the objectives' means: another is at least
    as good on every objective and better on one. Rows without every objective are left out."""
    sign = {"max": 1.0, "min": -1.0}
    points = {r["configuration"]: [sign[d] * r["metrics"][m]["mean"] for m, d in objectives]
              for r in rows if all(m in r["metrics"] for m, _ in objectives)}

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [label for label, p in points.items() if not any(dominates(q, p) for q in points.values())]


def summary(metric: str, values: list[float]) -> dict[str, float]:
    """Mean, the half-width of its 95 % interval, the number of seeds, and the interval's ends
    clipped to the values the metric can take (two seeds' interval of an accuracy can reach
    below 0)."""
    from methods.metric_names import metric_range

    mean, ci = mean_ci95(values)
    lo, hi = metric_range(metric) or ((0.0, math.inf) if metric in COST_METRICS else (-math.inf, math.inf))
    return {"mean": mean, "ci95": ci, "n": len(values), "low": max(lo, mean - ci), "high": min(hi, mean + ci)}


def _best(seeds: dict[str, list[float]], mode: str) -> dict[str, Any]:
    """``best``: the configuration with the best mean when it is distinguishable, by Welch's
    t-test at 95 %, from every other configuration (the rule ``avlab reproduce`` uses for an
    argmax); otherwise None, and ``best_mean`` names the configuration with the best mean."""
    from orchestrator.claims import compare

    scored = {label: v for label, v in seeds.items() if v}
    if not scored:
        return {"best": None, "best_mean": None}
    pick = max if mode == "max" else min
    top = pick(scored, key=lambda label: statistics.fmean(scored[label]))
    sign = 1 if mode == "max" else -1
    clear = len(scored) > 1 and all(compare(scored[top], v) == sign for label, v in scored.items() if label != top)
    return {"best": top if clear else None, "best_mean": top}


def _chance(shared: dict[str, str] | None, metric: str) -> float | None:
    """Guessing's score on the metric, for the procedural data (a manifest's classes are not
    known to the report); ``shared``: the settings every finished trial shares (``shared_params``)."""
    from methods.metric_names import chance_level

    if shared is None or shared.get("data.manifest") not in (None, "", "None"):
        return None
    try:
        classes, sectors = int(shared["data.num_classes"]), int(shared["data.azimuth_sectors"])
    except (KeyError, ValueError):
        return None
    return chance_level(metric, num_classes=classes, sectors=sectors)


# What fixes a random-init encoder's downstream score: the data, the evaluation, the encoders.
_REFERENCE_PREFIXES = ("data.", "eval.", "method.image_encoder.", "method.sound_encoder.")


def _random_init(client: MlflowClient, shared: dict[str, str] | None, metric: str) -> dict[str, float] | None:
    """The metric of the store's finished untrained runs (``train.epochs=0``) whose data,
    evaluation and encoder settings are ``shared``, those every finished trial of the sweep
    shares; None when the store has none (or the sweep no finished trial)."""
    if shared is None:
        return None
    ids = [e.experiment_id for e in client.search_experiments()]
    found = search_all(client, ids, "params.`train.epochs` = '0' and attributes.status = 'FINISHED'")
    values = [r.data.metrics[metric] for r in found
              if metric in r.data.metrics and all(r.data.params.get(k) == v for k, v in shared.items())]
    return summary(metric, values) if values else None


def _number(value: str) -> float:
    """A varied value as a number; a share of the preset's value (``"20%"``) as its percentage."""
    return float(value.removesuffix("%"))


def _sort_key(varied: dict[str, str]) -> tuple:
    out = []
    for value in varied.values():
        try:
            out.append((0, _number(value), ""))
        except ValueError:
            out.append((1, 0.0, value))
    return tuple(out)


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """Which configuration is best, if any is distinguishable, and the references."""
    metric, lines = report["metric"], []
    if report.get("pareto") is not None:
        names = ", ".join(f"{o['metric']} ({o['mode']})" for o in report["objectives"])
        lines.append(f"Pareto front on {names}: {'; '.join(report['pareto']) or 'none'}")
    elif report["best"]:
        lines.append(f"best {metric}: {report['best']}, above every other configuration "
                     "(Welch's t-test, 95 %)")
    elif len(report["rows"]) > 1 and report.get("best_mean"):
        lines.append(f"no single best on {metric}: the highest mean, {report['best_mean']}, is not above "
                     "every other configuration (Welch's t-test, 95 %)")
    if report.get("chance") is not None:
        lines.append(f"chance: {report['chance']:.3f}")
    if report.get("random_init"):
        ref = report["random_init"]
        lines.append(f"random init (same data, evaluation and encoders; {ref['n']} runs): {_cell(metric, ref, '-')}")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    metrics = list(dict.fromkeys(m for r in report["rows"] for m in r["metrics"]))
    head = "| configuration | seeds | " + " | ".join(metrics) + " |"
    lines = [f"### {report['sweep']} ({report['search_space']}), mean ± 95 % CI over seeds", "",
             head, "| --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    for r in report["rows"]:
        cells = [_cell(m, r["metrics"].get(m), "–") for m in metrics]
        mark = (" **best**" if r["configuration"] == report["best"] else
                " **Pareto**" if r["configuration"] in (report.get("pareto") or ()) else "")
        lines.append(f"| {r['configuration']}{mark} | {r['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", *(line[0].upper() + line[1:] + "." for line in verdict_lines(report))]
    if report.get("reused"):
        lines += ["", f"{report['reused']} of {sum(r['seeds'] for r in report['rows'])} trials took the results of "
                      "identical finished trials of other sweeps without training (tag `avlab.reused_from`)."]
    if report.get("code_versions"):
        lines += ["", code_line(report["code_versions"])]
    if report.get("environments"):
        lines += ["", report["environments"]]
    if report.get("verdicts"):
        lines += ["", f"Claims decided on this sweep (`avlab reproduce`): {report['verdicts']}; "
                      f"verdicts: {report['verdict_report']}"]
    return "\n".join(lines) + "\n"


def to_table(report: dict[str, Any]) -> str:
    """Plain-text table for the terminal (same content as the Markdown one)."""
    metrics = list(dict.fromkeys(m for r in report["rows"] for m in r["metrics"]))
    header = ["configuration", "seeds", *metrics]
    body = []
    for r in report["rows"]:
        mark = " *" if r["configuration"] == report["best"] or r["configuration"] in (report.get("pareto") or ()) else ""
        cells = [r["configuration"] + mark, str(r["seeds"])]
        cells += [_cell(m, r["metrics"].get(m), "-") for m in metrics]
        body.append(cells)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    star = "on the Pareto front" if report.get("pareto") is not None else f"best {report['metric']}"
    title = f"{report['sweep']} ({report['search_space']}): mean ± 95 % CI over seeds, * = {star}"
    code = [code_line(report["code_versions"])] if report.get("code_versions") else []
    code += [report["environments"]] if report.get("environments") else []
    return "\n".join([title, fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body),
                      *verdict_lines(report), *code]) + "\n"


def plot_pareto(report: dict[str, Any]) -> Figure:
    """The first objective against the second, one point per configuration, the Pareto front
    drawn as a line through its points."""
    (y, y_mode), (x, x_mode) = [(o["metric"], o["mode"]) for o in report["objectives"][:2]]
    rows = [r for r in report["rows"] if x in r["metrics"] and y in r["metrics"]]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.scatter([r["metrics"][x]["mean"] for r in rows], [r["metrics"][y]["mean"] for r in rows],
               color="tab:grey", alpha=0.6, label="configurations")
    front = sorted((r for r in rows if r["configuration"] in report["pareto"]), key=lambda r: r["metrics"][x]["mean"])
    ax.plot([r["metrics"][x]["mean"] for r in front], [r["metrics"][y]["mean"] for r in front],
            "o-", color="tab:red", label="Pareto front")
    ax.set_xlabel(f"{x} ({x_mode})")
    ax.set_ylabel(f"{y} ({y_mode})")
    ax.set_title(f"{report['sweep']}: Pareto front", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot(report: dict[str, Any], *, x: str | None = None, log_x: bool = False) -> Figure:
    """The sweep metric against the varied value (error bars: 95 % CI clipped to the metric's
    range), or a bar per configuration; chance and the random-init reference as lines. With
    several objectives: the Pareto plot."""
    if report.get("pareto") is not None:
        return plot_pareto(report)
    metric = report["metric"]
    rows = [r for r in report["rows"] if metric in r["metrics"]]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    values = [r["metrics"][metric] for r in rows]
    means = [v["mean"] for v in values]
    errors = [[v["mean"] - v.get("low", v["mean"] - v["ci95"]) for v in values],
              [v.get("high", v["mean"] + v["ci95"]) - v["mean"] for v in values]]
    xs = None
    if x and rows and all(x in r["varied"] for r in rows):
        try:
            xs = [_number(r["varied"][x]) for r in rows]
        except ValueError:
            xs = None
    if xs is not None:
        ax.errorbar(xs, means, yerr=errors, marker="o", capsize=4, label="avlab")
        ax.set_xlabel(x)
        if log_x and all(v > 0 for v in xs):
            ax.set_xscale("log")
    else:
        ax.bar(range(len(rows)), means, yerr=errors, capsize=4, label="avlab")
        ax.set_xticks(range(len(rows)), [r["configuration"] for r in rows], rotation=30, ha="right", fontsize=7)
    if report.get("chance") is not None:
        ax.axhline(report["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    if report.get("random_init"):
        ref = report["random_init"]
        ax.axhline(ref["mean"], color="tab:red", linestyle=":", linewidth=1.5, label=f"random init ({ref['n']} runs)")
        ax.axhspan(ref["low"], ref["high"], color="tab:red", alpha=0.08)
    if report.get("chance") is not None or report.get("random_init"):
        ax.legend(fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(f"{report['sweep']}\n{metric}, mean ± 95 % CI over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_report(client: MlflowClient, name: str, out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.json and report.png to ``out_dir`` and log them to the parent run.

    The plot's x axis and scale come from the search space's ``plot`` entry (parent-run params)."""
    report = build_report(client, name)
    params = client.get_run(report["parent_run_id"]).data.params
    x, log_x = params.get("plot.x") or None, params.get("plot.log_x") == "True"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "json": out_dir / "report.json", "png": out_dir / "report.png"}
    paths["markdown"].write_text(to_markdown(report))
    paths["json"].write_text(json.dumps(report, indent=2, sort_keys=True))
    plot(report, x=x, log_x=log_x).savefig(paths["png"], dpi=120)
    for path in paths.values():
        client.log_artifact(report["parent_run_id"], str(path), "report")
    # The parent run's description: the first thing the MLflow UI shows of the sweep.
    client.set_tag(report["parent_run_id"], "mlflow.note.content", paths["markdown"].read_text())
    return paths


# The tags of a trial that ``status_lines`` shows.
STATUS_TAGS = ("avlab.config_label", "avlab.seed", "avlab.reused_from", "avlab.reused_from_sweep", "avlab.failed",
               "avlab.retried_failure")


def status_lines(client: MlflowClient, name: str) -> list[str]:
    parent = _sweep(client, name)
    metric = sweep_metric(parent.data.params)
    mode = parent.data.params.get("mode", "max")
    trials = children(client, parent.info.run_id, params=(), metrics=(metric,), tags=STATUS_TAGS)
    lines = [f"sweep {name}: {parent.info.status}, {len(trials)} of {parent.data.params.get('num_trials', '?')} trials started"]
    best = None
    for run in sorted(trials, key=lambda r: r.info.start_time or 0):
        value = run.data.metrics.get(metric)
        shown = f"{value:.4f}" if value is not None else "-"
        reused = f" (reused: {run.data.tags.get('avlab.reused_from_sweep', '?')})" if run.data.tags.get("avlab.reused_from") else ""
        if failure := run.data.tags.get("avlab.failed"):
            reused += f" failed: {failure}"
        elif retried := run.data.tags.get("avlab.retried_failure"):
            reused += f" (retried after: {retried})"
        lines.append(f"  {run.info.status:<9} {run.data.tags.get('avlab.config_label', '')} seed={run.data.tags.get('avlab.seed', '?')} {metric}={shown}{reused}")
        if value is not None and (best is None or (value > best[0] if mode == "max" else value < best[0])):
            best = (value, run.data.tags.get("avlab.config_label", ""))
    if best:
        lines.append(f"best so far: {best[1]} {metric}={best[0]:.4f}")
    failed = sum(1 for r in trials if r.data.tags.get("avlab.failed"))
    if failed and parent.info.status != "RUNNING":
        lines.append(f"{failed} failed; once the cause is fixed, `avlab resume {name} --retry-failed` trains "
                     f"{'them' if failed > 1 else 'it'} again")
    return lines
