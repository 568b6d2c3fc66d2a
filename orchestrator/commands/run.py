"""``avlab run``: pretrain one configuration, then evaluate it downstream."""

from __future__ import annotations

import argparse

from orchestrator.commands.options import add_job_flags

# How ``cli`` treats it: trailing ``key=value`` words join ``items``; it writes into the home and
# drives a job (SIGTERM as Ctrl-C, every process it started ended with it).
EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = "items", True, True


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    run = sub.add_parser("run", parents=[common], help="pretrain one configuration, then evaluate it downstream")
    run.add_argument("items", nargs="*", metavar="[RUN.yaml] [key.path=value ...]",
                     help="an optional YAML run file, then config overrides")
    run.add_argument("--preset", help="tiny (2 CPU cores, minutes; for tests), small (2 CPU cores, minutes; the "
                                      "methods learn) or paper (the papers' sizes)")
    run.add_argument("--workers", type=int, help="DDP training workers (resources.workers)")
    run.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL (resources.gpu)")
    add_job_flags(run)
    run.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from orchestrator.config import resolve_run_config
    from orchestrator.service import start_run

    cfg = resolve_run_config(args.items, preset=args.preset, workers=args.workers, gpu=args.gpu)  # ConfigError -> exit 2
    return start_run(cfg, home_arg=args.home, tracking_uri=args.tracking_uri, address=args.address,
                     ray_dashboard=args.ray_dashboard)
