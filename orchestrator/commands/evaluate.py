"""``avlab evaluate RUN``: the downstream suite on a finished run's encoders, logged as a nested run."""

from __future__ import annotations

import argparse
import sys

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = "overrides", True, False


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("evaluate", parents=[common],
                       help="the downstream suite on a finished run's encoders (another dataset or protocol)")
    p.add_argument("name", metavar="RUN", help="a run id or run name (a sweep's trial too)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="data.* and eval.* settings")
    p.add_argument("--data", metavar="MANIFEST", help="a dataset's manifest (its train and test splits)")
    p.add_argument("--encoders-only", action="store_true",
                   help="the run's exported encoders instead of its final checkpoint: their f features only, "
                        "logged as <run>/eval-<dataset>-encoders")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from methods.metric_names import HEADLINE_METRICS, OPTIONAL_HEADLINE_METRICS
    from orchestrator import tracking
    from orchestrator.evaluate_run import evaluate

    home, client = tracking.open_home_store(args.home, args.tracking_uri)
    uri = tracking.resolve_tracking_uri(home, args.tracking_uri)
    child, metrics = evaluate(client, uri, home, args.name, data=args.data, overrides=args.overrides,
                              encoders_only=args.encoders_only)
    keys = [k for k in (*HEADLINE_METRICS, *OPTIONAL_HEADLINE_METRICS) if k in metrics] or sorted(
        k for k in metrics if k.endswith(("_linear_acc", "_knn_acc")))
    print(f"[avlab] evaluated {args.name}: {', '.join(f'{k}={metrics[k]:.3f}' for k in keys)}")
    print(f"[avlab] logged to MLflow run {child} (nested under {args.name})", file=sys.stderr)
    return 0
