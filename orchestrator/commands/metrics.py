"""``avlab metrics [RUN.yaml] [key.path=value ...]``: every metric a run of that configuration logs."""

from __future__ import annotations

import argparse

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = "items", False, False


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    cmd = sub.add_parser("metrics", parents=[common],
                         help="every metric a run of this configuration logs (any may be a sweep's metric)")
    cmd.add_argument("items", nargs="*", metavar="[RUN.yaml] [key.path=value ...]",
                     help="an optional YAML run file, then config overrides")
    cmd.add_argument("--preset", help="tiny, small or paper")
    cmd.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from orchestrator.config import resolve_run_config
    from orchestrator.metrics import COST_METRICS, TIMING_METRICS, downstream_metrics, epoch_metrics

    cfg = resolve_run_config(args.items, preset=args.preset)  # ConfigError -> exit 2
    downstream = downstream_metrics(cfg)
    groups = (
        (f"training, every epoch ({cfg.method_name})", epoch_metrics(cfg)),
        ("downstream evaluation", [m for m in downstream if not m.startswith("transfer_")]),
        ("transfer evaluation (with transfer splits)", [m for m in downstream if m.startswith("transfer_")]),
        ("cost and timings", (*COST_METRICS, *TIMING_METRICS)),
    )
    for title, names in groups:
        print(f"# {title}")
        print("\n".join(names))
    return 0
