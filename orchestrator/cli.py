"""The ``avlab`` command line.

Exit codes: 0 success; 2 bad input (config, run file, override), reported in one line that names
the field, before Ray starts or an MLflow run is created; 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from orchestrator.config import ConfigError, ExperimentConfig, dump_yaml, load_run_file, resolve

EXIT_BAD_INPUT = 2


def _split_run_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """First item without '=' is the run file; the rest are key.path=value overrides."""
    run_file, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif run_file is None:
            run_file = item
        else:
            raise ConfigError(f"arguments: unexpected {item!r}; overrides are key.path=value")
    return run_file, overrides


def resolve_run_config(args: argparse.Namespace) -> ExperimentConfig:
    run_file, overrides = _split_run_args(args.items)
    run = load_run_file(run_file) if run_file else {}
    if args.workers is not None:
        overrides.append(f"resources.workers={args.workers}")
    if args.gpu:
        overrides.append("resources.gpu=true")
    return resolve(run, preset=args.preset, overrides=overrides)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = resolve_run_config(args)  # ConfigError -> exit 2, nothing started yet

    from orchestrator import tracking
    from orchestrator.launch import launch_run

    home = tracking.resolve_home(args.home)
    home.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_tracking_uri(home, args.tracking_uri)
    name = cfg.tracking.run_name or f"{cfg.method_name}-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[avlab] run {name}: method={cfg.method_name} preset={cfg.preset} "
          f"workers={cfg.resources.workers} gpu={cfg.resources.gpu}", flush=True)
    run_id = tracking.create_run(
        tracking_uri=uri,
        home=home,
        experiment=cfg.tracking.experiment,
        run_name=name,
        params=cfg.flat(),
        tags={
            "method": cfg.method_name,
            "preset": cfg.preset,
            "run_identity": cfg.identity(),
            "run_name": name,
            "kind": "run",
        },
        config_yaml=dump_yaml(cfg),
    )
    ok = False
    try:
        metrics = launch_run(cfg, name=name, run_id=run_id, tracking_uri=uri, home=home, address=args.address)
        ok = True
    finally:
        tracking.end_run(uri, run_id, ok=ok)
    print(f"[avlab] finished {name} (MLflow run {run_id})")
    for key in ("image_h_linear_acc", "image_h_knn_acc", "sound_h_linear_acc", "sound_h_knn_acc",
                "retrieval_s2i_rank1", "retrieval_s2i_rank5"):
        if key in metrics:
            print(f"  {key:<22} {metrics[key]:.4f}")
    print(f"[avlab] see it in MLflow: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS,
                        help="where runs, checkpoints and mlflow.db live (default: $AVLAB_HOME or ./avlab-runs)")
    common.add_argument("--tracking-uri", default=argparse.SUPPRESS,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite in --home)")
    parser = argparse.ArgumentParser(prog="avlab", description=__doc__.splitlines()[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="pretrain one configuration, then evaluate it downstream")
    run.add_argument("items", nargs="*", metavar="[RUN.yaml] [key.path=value ...]",
                     help="an optional YAML run file, then config overrides")
    run.add_argument("--preset", help="tiny (2 CPU cores, minutes) or paper (the papers' sizes)")
    run.add_argument("--workers", type=int, help="DDP training workers (resources.workers)")
    run.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL (resources.gpu)")
    run.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("home", "tracking_uri"):  # accepted before or after the subcommand
        if not hasattr(args, name):
            setattr(args, name, None)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"avlab: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("avlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
