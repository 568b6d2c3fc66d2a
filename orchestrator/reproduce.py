"""``avlab reproduce``: run the claims' sweeps (or reuse them), decide each claim, report verdicts.

Claims that test the same search space at the same preset, seeds, overrides and data share one
sweep, named ``reproduce-<space>-<preset>-s<seeds>-<hash>`` (the hash covers the resolved search
space, every trial's resolved configuration and the results version: ``sweep_digest``), so a
second ``avlab reproduce`` finds it: a finished sweep is reused without training, an unfinished
one is resumed like ``avlab resume`` would. After a change to a preset or to the numerics the
hash is another: a new sweep, whose unchanged trials take their results from the old one. A new claims sweep runs with
``--reuse-trials`` (unless it has a scheduler): a trial identical to a finished trial of another
claims sweep (the BMA default of Fig. 5, Fig. 6 and Table 1, for one) takes its results instead
of training again. The verdicts go to
``<home>/reports/claims/<name>/`` (``verdicts.md``, ``verdicts.json``, one figure per claim) and to
an MLflow run of the ``avlab-claims`` experiment; each sweep's parent run is tagged with the
verdicts it decided (``avlab report`` shows them).

``verdicts.json`` (format 1)::

    {"format": 1, "name": str, "preset": str, "seeds": int | null, "data": str | null,
     "overrides": [str], "mlflow_run_id": str,
     "pending": [str],  # claim ids not decided: --finished-only and their sweeps unfinished
     "claims": [{"id": str, "claim": str, "paper": str, "where": str, "metric": str,
                 "quote": str, "kind": "paper" | "sanity_check",
                 "rule": {"type": str, ...its fields}, "sweep": str, "budget": str,
                 "verdict": "holds" | "contradicted" | "inconclusive", "effect": float | null,
                 "effect_ci95": float | null,  # half-width of the effect's 95 % interval
                 "mde": float | null,  # minimum detectable effect (80 % power) at the observed spread
                 "p": float | null,  # the claim's p for its verdict (orchestrator.claims)
                 "paired_seeds": int,  # seeds its comparisons were paired over
                 "family_verdict": str,  # the verdict with Holm's correction across this table
                 "detail": str,
                 "rows": [{"configuration": str, "mean": float | null, "ci95": float | null,
                           "values": [float], "seeds": [int], "paper": float | null,
                           "role": str}],  # "" for the paper's algorithm, else one of ROLES
                 "code": {str: int},  # finished trials of the sweep per code version
                                      # (tag avlab.source_hash; "unrecorded" before it)
                 "environments": str | null,  # a line when its trials ran in more than one
                                              # environment (tag avlab.env.id), else null
                 "elsewhere": str | null}]}  # a line when some were computed in an environment
                                             # other than this one (--reuse-across-environments)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.claims import ALPHA, Claim, Verdict, all_claims, decide, family_wise, load_claim, look_alpha, looks
from orchestrator.errors import ConfigError

CLAIMS_EXPERIMENT = "avlab-claims"
FORMAT = 1


@dataclass(frozen=True)
class Request:
    """What to decide: the claim files (``every`` for all of ``claims/``), the overrides for every
    trial, and how to run their sweeps (as ``avlab sweep`` and ``avlab resume`` take them);
    ``finished_only`` runs nothing and decides what has finished."""

    claims: tuple[str, ...] = ()
    every: bool = False
    overrides: tuple[str, ...] = ()
    preset: str | None = None
    seeds: int | None = None
    data: str | None = None
    finished_only: bool = False
    retry_failed: bool = False
    reuse_any_environment: bool = False  # decide from work computed in another environment too
    max_seeds: int | None = None  # --until-decided: add seeds in rounds up to this many
    alpha: float = ALPHA  # each test's level (a sequential look's share under --until-decided)
    address: str | None = None
    home: str | None = None
    tracking_uri: str | None = None
    ray_dashboard: bool = False


@dataclass(frozen=True)
class Verdicts:
    """What ``reproduce`` decided: the verdicts as Markdown, their counts, and where the report is."""

    markdown: str
    counts: dict[str, int]
    report: Path
    claims: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # verdicts.json's entries


def _plans(args: Request) -> tuple[list[Claim], dict[str, tuple[Any, list[Claim]]], list[str]]:
    """The claims, and the sweep each needs (by name): everything checked before anything runs."""
    from orchestrator.search_space import load_search_space

    if args.every == bool(args.claims):
        raise ConfigError("CLAIM: name claim files, or give --all for every file in claims/")
    claims = [load_claim(p) for p in (all_claims() if args.every else args.claims)]
    overrides = [*args.overrides, *([f"data.manifest={Path(args.data).resolve()}"] if args.data else [])]
    plans: dict[str, tuple[Any, list[Claim]]] = {}
    for claim in claims:
        space = load_search_space(claim.search_space, seeds=args.seeds).with_overrides(args.preset, overrides)
        name = f"reproduce-{claim.search_space.stem}-{space.preset}-s{len(space.seeds)}-{sweep_digest(space)}"
        plans.setdefault(name, (space, []))[1].append(claim)
    return claims, plans, overrides


def sweep_digest(space: Any) -> str:
    """What names a claims sweep: the resolved search space (``sweep_content``), the identity of
    each of its trials' *resolved* configuration and the results version of this code
    (``tracking.RESULTS_VERSION``). A change to a preset's contents, a method's defaults or the
    numerics is another sweep, whose trials take the results of the unchanged ones of the old
    sweep (``--reuse-trials``) and train the rest; the preset's name alone decides nothing."""
    from orchestrator.tracking import RESULTS_VERSION

    content = {"space": sweep_content(space), "trials": [t.config.identity() for t in space.trials()],
               "results_version": RESULTS_VERSION}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:8]


def sweep_content(space: Any) -> dict[str, Any]:
    """What a claims sweep runs: the resolved search space, with the file's name but not where it
    lives, so another checkout (or a cluster's copy) of the same claims finds the same sweep."""
    return {**space.to_dict(), "path": space.path.name}


def _same_sweeps(home: Path, name: str) -> list[str]:
    """``[name]`` when the home holds that claims sweep, else ``[]``. Its name says what it runs
    (``sweep_digest``): a sweep of another name is never taken whole, however alike its search
    space reads, since a preset of the same name may have resolved to other trials."""
    from orchestrator import jobs

    return [name] if jobs.exists(home, name) else []


def _finished(client, same: list[str]) -> str | None:
    """The first of the sweeps ``same`` that has finished, if any."""
    from orchestrator.runs import find_sweep_run

    for existing in same:
        run = find_sweep_run(client, existing)
        if run is not None and run.info.status == "FINISHED":
            return existing
    return None


def _progress(client, same: list[str], space: Any, claim_ids: list[str]) -> tuple[str, list[Any], list[float]]:
    """How far the sweep of ``claim_ids`` got (its finished trials of all, or not started), its
    finished trial runs, and the seconds they took (``trial_seconds``)."""
    from orchestrator.runs import children as _children
    from orchestrator.runs import find_sweep_run

    waiting = f"for {', '.join(claim_ids)}"
    run = find_sweep_run(client, same[0]) if same else None
    if run is None:
        return f"{space.path.name}: not started ({space.num_trials()} trials) {waiting}", [], []
    finished = [r for r in _children(client, run.info.run_id) if r.info.status == "FINISHED"]
    line = f"{same[0]}: {len(finished)} of {space.num_trials()} trials finished {waiting}"
    return line, finished, trial_seconds(finished)


def trials_to_train(client, sweeps: list[tuple[Any, list[Any]]]) -> list[tuple[int, int]]:
    """Per undecided sweep (its space, its finished trial runs): (trials left, trials of them that
    will train). A trial left takes its results without training (``--reuse-trials``) when a
    finished trial in the store, or a trial left in an earlier sweep of this list, has its resolved
    config and seed; a search by Optuna proposes its trials as it goes, so all of them train."""
    from orchestrator import tracking
    from orchestrator.runs import SWEEP_EXPERIMENT, search_all

    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    runs = search_all(client, [exp.experiment_id], "tags.`avlab.kind` = 'trial' and attributes.status = 'FINISHED'"
                      ) if exp is not None else []
    done = {r.data.tags.get("avlab.run_identity") for r in runs if tracking.is_whole_result(r)}
    counts = []
    for space, finished in sweeps:
        left = space.num_trials() - len(finished)
        if space.uses_optuna or space.scheduler is not None:
            counts.append((left, left))
            continue
        own = {r.data.tags.get("avlab.run_identity") for r in finished}
        ids = [trial.config.identity() for trial in space.trials()]
        ids = [i for i in ids if i not in own]
        counts.append((len(ids), sum(1 for i in dict.fromkeys(ids) if i not in done)))
        done.update(ids)
    return counts


def trial_seconds(runs: list) -> list[float]:
    """Wall seconds from start to end of each finished trial run that trained (a reused trial,
    tagged ``avlab.reused_from``, took its results in a moment and says nothing of the cost; a
    retried one, tagged ``avlab.retries``, spans the time between its failure and its retry)."""
    return [(r.info.end_time - r.info.start_time) / 1000 for r in runs
            if r.info.end_time and r.info.start_time
            and not r.data.tags.get("avlab.reused_from") and not r.data.tags.get("avlab.retries")]


def time_left(sweeps: list[tuple[int, int, int, list[float]]], pooled: list[float]) -> str:
    """One line that estimates the wall time the undecided sweeps still need: per sweep (trials
    left, trials of them that train, trials at once, its finished trials' seconds), rounds of
    trials at once times the median finished trial of that sweep, or of ``pooled`` (every finished
    trial of these claims' sweeps, each sweep's own among them) when it has none yet."""
    import statistics

    left, train = sum(s[0] for s in sweeps), sum(s[1] for s in sweeps)
    reused = f", {left - train} of them repeat a finished or an earlier trial (reused, not trained)" if left > train else ""
    head = f"{left} trial{'s' * (left != 1)} left{reused}"
    if not pooled:
        return f"{head}; none of these claims' trials has finished yet to time the {train} to train"
    seconds = sum(math.ceil(n / max(1, at_once)) * statistics.median(own or pooled) for _, n, at_once, own in sweeps)
    when = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
    return (f"{head}: {train} to train, about {when} of wall time (each sweep's trials at once, times the median "
            f"of its finished trials, else of all {len(pooled)} finished: {statistics.median(pooled) / 60:.1f} min)")


def _run_or_reuse(args: Request, name: str, space: Any, overrides: list[str], client, home: Path) -> str:
    """Run the sweep ``name``, or reuse / continue one of the same content; the sweep's name."""
    from orchestrator import service

    same = _same_sweeps(home, name)
    existing = _finished(client, same)
    if existing is not None:
        print(f"[avlab] reproduce: reusing finished sweep {existing}", flush=True)
        return existing
    common = {"home_arg": args.home, "tracking_uri": args.tracking_uri, "address": args.address,
              "ray_dashboard": args.ray_dashboard}
    if same:
        print(f"[avlab] reproduce: continuing sweep {same[0]}", flush=True)
        service.resume(same[0], retry_failed=args.retry_failed, **common)
        return same[0]
    print(f"[avlab] reproduce: sweep {name} ({space.path.name})", flush=True)
    service.start_sweep(space.path, seeds=args.seeds, preset=args.preset, overrides=overrides, name=name,
                        reuse_trials=space.scheduler is None,
                        reuse_any_environment=args.reuse_any_environment and space.scheduler is None, **common)
    return name


def seed_values(client, name: str, metric: str) -> dict[str, dict[int, float]]:
    """Per configuration label, the metric of each finished trial of sweep ``name`` by its seed
    (what pairs the configurations' comparisons)."""
    from orchestrator.report import _sweep
    from orchestrator.runs import children as _children

    out: dict[str, dict[int, float]] = {}
    for run in _children(client, _sweep(client, name).info.run_id, params=("seed",)):
        if run.info.status == "FINISHED" and metric in run.data.metrics:
            seed = int(run.data.tags.get("avlab.seed", run.data.params.get("seed", "0")))
            out.setdefault(run.data.tags.get("avlab.config_label", "base"), {})[seed] = run.data.metrics[metric]
    return out


def sweep_provenance(client, name: str) -> tuple[dict[str, int], str | None, str | None]:
    """The finished trials of sweep ``name`` per code version (``report.code_versions``), one line
    when they ran in more than one environment (``environment.summary``), and one when some were
    computed in an environment other than this one (``environment.elsewhere``)."""
    from orchestrator import environment
    from orchestrator.report import _sweep, code_versions
    from orchestrator.runs import children as _children

    finished = [r for r in _children(client, _sweep(client, name).info.run_id, params=()) if r.info.status == "FINISHED"]
    here = environment.describe()["id"]
    return code_versions(finished), environment.summary(finished), environment.elsewhere(finished, here)


def _check_environments(client, home: Path, plans: dict[str, Any], args: Request) -> None:
    """Without ``--reuse-across-environments``, a finished claims sweep computed (in part) in another
    environment is refused, before anything runs: its verdict would be another machine's."""
    if args.reuse_any_environment:
        return
    from orchestrator import environment

    here = environment.describe()["id"]
    for name in plans:
        existing = _finished(client, _same_sweeps(home, name))
        if existing is None:
            continue
        _, _, elsewhere = sweep_provenance(client, existing)
        if elsewhere is not None:
            raise ConfigError(f"--home: finished sweep {existing}: {elsewhere.split(':')[0]}; decide from it with "
                              f"--reuse-across-environments (the verdicts say so), or use another --home to "
                              f"compute it here ({here})")


def budget_line(space: Any) -> str:
    """The preset, epochs, paired pairs and seeds of a sweep; epochs or pairs that the grid varies
    (Table 5's paired volume) are listed, not the first trial's alone."""
    cfgs = [space.config_for(point, space.seeds[0]) for point in space.grid_points()]

    def values(get) -> str:
        return " or ".join(str(v) for v in sorted({get(c) for c in cfgs}))

    seeds = len(space.seeds)
    return (f"{space.preset}: {values(lambda c: c.train.epochs)} epochs, "
            f"{values(lambda c: c.data.pool_size('paired'))} pairs, {seeds} seed{'s' * (seeds > 1)}")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _claim_entry(claim: Claim, sweep: str, space: Any, values: dict[str, dict[int, float]],
                 alpha: float = ALPHA) -> dict[str, Any]:
    from orchestrator.report import mean_ci95

    verdict = decide(claim, values, alpha)
    rows = []
    for label in claim.labels():
        by_seed = values.get(label, {})
        seeds = [by_seed[s] for s in sorted(by_seed)]
        mean, ci = mean_ci95(seeds) if seeds else (None, None)
        rows.append({"configuration": label, "mean": mean, "ci95": ci, "values": seeds, "seeds": sorted(by_seed),
                     "paper": claim.paper_values.get(label), "role": space.role(label)})
    budget = budget_line(space)
    return {"id": claim.id, "claim": claim.statement, "paper": claim.paper, "where": claim.where,
            "quote": claim.quote, "kind": claim.kind,
            "metric": claim.metric, "rule": {"type": claim.rule, **claim.rows, **claim.numbers}, "sweep": sweep,
            "budget": budget, "verdict": verdict.verdict,
            "effect": _finite(verdict.effect), "effect_ci95": _finite(verdict.ci), "mde": _finite(verdict.mde),
            "p": _finite(verdict.p), "paired_seeds": verdict.seeds, "family_verdict": verdict.verdict,
            "detail": verdict.detail, "rows": rows}


def _row_name(row: dict[str, Any]) -> str:
    """A row's configuration, with its role where it is not the paper's algorithm."""
    return row["configuration"] + (f" [{row['role']}]" if row.get("role") else "")


def to_markdown(doc: dict[str, Any]) -> str:
    from orchestrator.report import code_line

    lines = [f"### Claims at the {doc['preset']} preset ({doc['name']})", "",
             "| claim | paper's numbers | avlab mean ± 95 % CI | verdict | across the table | effect ± 95 % CI | "
             "MDE | seeds | budget |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in doc["claims"]:
        paper = "; ".join(f"{r['configuration']} {r['paper']:.3f}" for r in c["rows"] if r["paper"] is not None)
        ours = "; ".join(f"{_row_name(r)} {r['mean']:.3f} ± {r['ci95']:.3f}" if r["mean"] is not None
                         else f"{_row_name(r)} –" for r in c["rows"])
        seeds = c.get("paired_seeds", 0)
        effect = "–" if c["effect"] is None else f"{c['effect']:+.3f}" + (
            f" ± {c['effect_ci95']:.3f}" if c.get("effect_ci95") is not None else "")
        mde = "–" if c.get("mde") is None else f"{c['mde']:.3f}"
        where = c["where"] if c.get("kind", "paper") == "paper" else "avlab's sanity check, not the paper's"
        lines.append(f"| {c['id']}: {c['claim']} ({where}) | {paper or '–'} | {ours} | **{c['verdict']}** | "
                     f"{c.get('family_verdict', '–')} | {effect} | {mde} | {seeds} | {c['budget']} |")
    lines += ["", "Comparisons are paired by seed (paired t-test, two-sided, 5 %); a claim that needs every "
              "comparison holds when each is significant its way, and is contradicted by a reversal significant "
              "after Holm's correction over its comparisons; \"across the table\" applies Holm over the claims. "
              "MDE: the difference these seeds would detect with 80 % power at the observed spread."]
    versions = {code for c in doc["claims"] for code in c.get("code", {})}
    if len(versions) == 1:
        lines += ["", code_line({versions.pop(): 1})]
    elif versions:
        lines += ["", "Code versions of the trials (tag `avlab.source_hash`, trials per version): " + "; ".join(
            f"{c['id']}: " + ", ".join(f"{code} ({n})" for code, n in c["code"].items()) for c in doc["claims"]) + "."]
    mixed = [c for c in doc["claims"] if c.get("environments")]
    if mixed:
        lines += ["", "Rows computed in more than one environment (their last digits may differ for that alone):",
                  *(f"- {c['id']}: {c['environments']}" for c in mixed)]
    if doc.get("sequential"):
        seq = doc["sequential"]
        lines += ["", f"Seeds added until decided: looks at {', '.join(map(str, seq['looks']))} seeds, each test at "
                      f"p < {seq['alpha_per_look']:.4g} (5 % split over the {len(seq['looks'])} planned looks, "
                      "Bonferroni), so a claim ends holds or contradicted falsely with at most 5 % chance."
                  + (f" Still inconclusive at the budget: {', '.join(seq['undecided_at_budget'])}."
                     if seq["undecided_at_budget"] else "")]
    foreign = [c for c in doc["claims"] if c.get("elsewhere")]
    if foreign:
        lines += ["", "Decided from trials computed in another environment (--reuse-across-environments):",
                  *(f"- {c['id']}: {c['elsewhere']}" for c in foreign)]
    if doc.get("pending"):
        lines += ["", f"Not decided (their sweeps have not finished): {', '.join(doc['pending'])}."]
    return "\n".join(lines) + "\n"


def figure(entry: dict[str, Any]):
    """avlab's mean ± 95 % CI per configuration, with the paper's number beside it where known."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = entry["rows"]
    fig = Figure(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(len(rows)))
    means = [r["mean"] if r["mean"] is not None else math.nan for r in rows]
    cis = [r["ci95"] if r["ci95"] is not None else 0.0 for r in rows]
    ax.bar([x - 0.2 for x in xs], means, width=0.4, yerr=cis, capsize=3, label="avlab (mean ± 95 % CI)")
    if any(r["paper"] is not None for r in rows):
        ax.bar([x + 0.2 for x in xs], [r["paper"] if r["paper"] is not None else math.nan for r in rows],
               width=0.4, color="lightgray", edgecolor="black", label="paper")
    ax.set_xticks(xs, labels=[_row_name(r).replace(",", "\n") for r in rows], rotation=20, ha="right",
                  fontsize=7)
    ax.set_ylabel(entry["metric"])
    ax.set_title(f"{entry['id']}: {entry['verdict']}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def reproduce(args: Request) -> Verdicts | None:
    """Run (or reuse) the claims' sweeps, then decide every claim whose sweep has finished; None
    when none has (what is left is said on stdout as it goes)."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    claims, plans, overrides = _plans(args)  # ConfigError -> exit 2, nothing started yet
    home = tracking.resolve_home(args.home)
    uri = tracking.resolve_tracking_uri(home, args.tracking_uri)
    if args.finished_only and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        print(f"[avlab] reproduce: no avlab store at {home}, so no claim's sweep has finished; nothing to decide")
        return None
    home.mkdir(parents=True, exist_ok=True)
    tracking.prepare_store(uri)
    client = MlflowClient(uri)
    _check_environments(client, home, plans, args)  # ConfigError -> exit 2, nothing run
    print(f"[avlab] reproduce: {len(claims)} claims over {len(plans)} sweeps", flush=True)
    ran: dict[str, str] = {}
    pending: list[str] = []  # with --finished-only: the claims whose sweeps have not finished
    progress: list[tuple[Any, tuple[str, list[Any], list[float]]]] = []  # and how far each of their sweeps got
    for name, (space, group) in plans.items():
        if not args.finished_only:
            ran[name] = _run_or_reuse(args, name, space, overrides, client, home)
        elif (existing := _finished(client, same := _same_sweeps(home, name))) is not None:
            ran[name] = existing
        else:
            pending += [c.id for c in group]
            progress.append((space, _progress(client, same, space, [c.id for c in group])))
    order = {c.id: i for i, c in enumerate(claims)}
    pending.sort(key=order.__getitem__)
    if pending:
        print(f"[avlab] reproduce: not decided, their sweeps have not finished: {', '.join(pending)}", flush=True)
        for _, (line, _, _) in progress:
            print(f"[avlab] reproduce:   {line}", flush=True)
        counts = trials_to_train(client, [(space, finished) for space, (_, finished, _) in progress])
        from orchestrator.runs import children as _children
        from orchestrator.runs import find_sweep_run

        pooled = [s for _, (_, _, own) in progress for s in own]
        for name in ran.values():
            trials = _children(client, find_sweep_run(client, name).info.run_id)
            pooled += trial_seconds([r for r in trials if r.info.status == "FINISHED"])
        estimate = time_left([(left, train, space.max_concurrent, own)
                              for (space, (_, _, own)), (left, train) in zip(progress, counts)], pooled)
        print(f"[avlab] reproduce:   {estimate}", flush=True)
    if not ran:
        print("[avlab] reproduce: no claim's sweep has finished yet; nothing to decide", flush=True)
        return None
    preset = next(iter(plans.values()))[0].preset
    plans = {ran[name]: plan for name, plan in plans.items() if name in ran}
    entries = []
    for name, (space, group) in plans.items():
        values_by_metric: dict[str, dict[str, dict[int, float]]] = {}
        code, environments, elsewhere = sweep_provenance(client, name)
        for claim in group:
            if claim.metric not in values_by_metric:
                values_by_metric[claim.metric] = seed_values(client, name, claim.metric)
            entries.append({**_claim_entry(claim, name, space, values_by_metric[claim.metric], args.alpha), "code": code,
                            "environments": environments, "elsewhere": elsewhere})
    entries.sort(key=lambda e: order[e["id"]])
    return _publish(client, home, uri, args, claims, entries, pending, overrides, preset, [*plans])

def until_decided(args: Request) -> Verdicts | None:
    """``--until-decided``: decide the claims at ``args.seeds`` seeds (3 when not given), then run
    the sweeps of the claims still inconclusive again with as many seeds more, round after round,
    up to ``args.max_seeds``. Every look tests at ALPHA over the number of planned looks
    (``claims.look_alpha``: Bonferroni over looks), so the chance that a claim ends holds or
    contradicted falsely stays at most ALPHA however many looks it takes. Each round is a plain
    ``reproduce`` with its own report (a round's sweep takes the trials of the seeds before it
    from the last round's, ``--reuse-trials``; stopped, the command run again continues where it
    was); the last report holds every claim as its last look decided it."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    if args.finished_only:
        raise ConfigError("--until-decided: runs the sweeps it needs; not with --finished-only")
    if args.max_seeds is None:
        raise ConfigError("--until-decided: give --max-seeds K, the most seeds any claim may take")
    start = args.seeds or 3
    counts, alpha = looks(start, args.max_seeds), look_alpha(start, args.max_seeds)
    claims, plans, overrides = _plans(dataclasses.replace(args, seeds=start))  # ConfigError -> exit 2 before anything
    preset = next(iter(plans.values()))[0].preset
    paths = {c.id: c.path for c in claims}
    final: dict[str, dict[str, Any]] = {}
    pending = [c.id for c in claims]
    print(f"[avlab] reproduce: until decided: looks at {', '.join(map(str, counts))} seeds, each at p < {alpha:.4g} "
          f"(5 % over {len(counts)} looks)", flush=True)
    for n in counts:
        print(f"[avlab] reproduce: {n} seeds for {len(pending)} claim(s): {', '.join(pending)}", flush=True)
        round_args = dataclasses.replace(args, claims=tuple(str(paths[i]) for i in pending), every=False, seeds=n,
                                         alpha=alpha, max_seeds=None)
        verdicts = reproduce(round_args)
        for entry in verdicts.claims if verdicts else []:
            final[entry["id"]] = entry
        pending = [i for i in pending if final.get(i, {}).get("verdict", "inconclusive") == "inconclusive"]
        if not pending:
            break
    home = tracking.resolve_home(args.home)
    uri = tracking.resolve_tracking_uri(home, args.tracking_uri)
    entries = [final[c.id] for c in claims if c.id in final]
    sequential = {"looks": counts, "alpha_per_look": alpha, "undecided_at_budget": pending}
    if not entries:
        return None
    return _publish(MlflowClient(uri), home, uri, dataclasses.replace(args, alpha=alpha), claims, entries, [],
                    overrides, preset, list(dict.fromkeys(e["sweep"] for e in entries)), sequential)


def _publish(client, home: Path, uri: str, args: Request, claims: list[Claim], entries: list[dict[str, Any]],
             pending: list[str], overrides: list[str], preset: str, sweeps: list[str],
             sequential: dict[str, Any] | None = None) -> Verdicts:
    """Correct the table's verdicts across its claims (Holm), write the verdicts (JSON, Markdown,
    a figure each) to ``<home>/reports/claims/<name>/`` and an ``avlab-claims`` MLflow run, and
    tag each of ``sweeps`` with what it decided."""
    from orchestrator import tracking

    # Holm across the table: each claim's verdict as the whole table's family of tests allows.
    table = [Verdict(e["verdict"], math.nan, "", p=math.nan if e["p"] is None else e["p"]) for e in entries]
    for entry, family in zip(entries, family_wise(table, args.alpha)):
        entry["family_verdict"] = family
    run_name = stamp = f"reproduce-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(2, 1000):  # two commands in one second never share a report folder
        if not (home / "reports" / "claims" / run_name).exists():
            break
        run_name = f"{stamp}-{n}"
    tracking.get_or_create_experiment(client, CLAIMS_EXPERIMENT, home)
    run_id = tracking.create_run(
        tracking_uri=uri, home=home, experiment=CLAIMS_EXPERIMENT, run_name=run_name,
        params={"preset": preset, "seeds": args.seeds or "", "data": args.data or "", "claims": len(entries),
                "overrides": " ".join(overrides), "pending": len(pending)},
        tags={"kind": "claims", **{f"verdict.{e['id']}": e["verdict"] for e in entries}},
        config_yaml="\n---\n".join(c.path.read_text() for c in claims),
    )
    doc = {"format": FORMAT, "name": run_name, "preset": preset, "seeds": args.seeds, "data": args.data,
           "overrides": overrides, "mlflow_run_id": run_id, "claims": entries, "pending": pending,
           "sequential": sequential}
    out = home / "reports" / "claims" / run_name
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "verdicts.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    markdown = to_markdown(doc)
    (out / "verdicts.md").write_text(markdown)
    for entry in entries:
        fig = figure(entry)
        fig.savefig(out / "figures" / f"{entry['id']}.png", dpi=110)
        client.log_figure(run_id, fig, f"figures/{entry['id']}.png")
    client.log_artifact(run_id, str(out / "verdicts.json"))
    client.log_artifact(run_id, str(out / "verdicts.md"))
    counts = {v: sum(e["verdict"] == v for e in entries) for v in ("holds", "contradicted", "inconclusive")}
    tracking.log_metrics(client, run_id, {f"claims_{k}": float(n) for k, n in counts.items()}, step=0)
    tracking.end_run(uri, run_id, ok=True)
    from orchestrator.runs import find_sweep_run

    for name in sweeps:  # `avlab report NAME` links back to these verdicts
        decided = "; ".join(f"{e['id']}: {e['verdict']}" for e in entries if e["sweep"] == name)
        tracking.set_tags(client, find_sweep_run(client, name).info.run_id,
                          {"verdicts": decided, "verdict_run": run_id, "verdict_report": str(out / "verdicts.md")})
    return Verdicts(markdown, counts, out / "verdicts.md", entries)
