"""``avlab ui``: the MLflow UI and tracking server on the project's store, on 127.0.0.1 unless
``--host`` says otherwise (then behind MLflow's login)."""

from __future__ import annotations

import argparse
import os
import sys

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = None, False, False


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    ui = sub.add_parser("ui", parents=[common],
                        help="browse runs, sweeps, metrics and plots in the MLflow UI, or serve a cluster's "
                             "tracking (Ctrl-C stops it)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: 127.0.0.1, this machine only; any other runs with MLflow's "
                         "login, its admin from MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD)")
    ui.add_argument("--port", type=int, default=5000, help="port to listen on (default: 5000)")
    ui.add_argument("--workers", type=int, default=1,
                    help="server processes (default: 1, for browsing; a cluster's tracking server: 4 or more)")
    ui.add_argument("--login", action=argparse.BooleanOptionalAction, default=None,
                    help="MLflow's basic-auth login (default: on when --host is not a loopback address); "
                         "--no-login serves beyond this machine without one, on a network you trust")
    ui.set_defaults(func=main)


MAX_WORKERS = 64


def main(args: argparse.Namespace) -> int:
    from orchestrator.errors import ConfigError
    from orchestrator.tracking import resolve_home
    from orchestrator.ui import backend_store_uri, check_login, check_port_free, is_loopback, serve

    if not 1 <= args.workers <= MAX_WORKERS:
        raise ConfigError(f"--workers: must be between 1 and {MAX_WORKERS}, got {args.workers}")
    home = resolve_home(args.home)
    store_uri = backend_store_uri(home, args.tracking_uri)
    addresses = check_port_free(args.host, args.port)  # a busy port or a host that cannot be bound: exit 2
    local = is_loopback(addresses)
    login = not local if args.login is None else args.login
    if login:
        check_login("" if local else args.host, os.environ)
    elif not local:
        print(f"[avlab] warning: --host {args.host} is not a loopback address and --no-login is given: anyone "
              f"who can reach this machine on port {args.port} can read and change the runs",
              file=sys.stderr, flush=True)
    return serve(store_uri, home, args.host, args.port, workers=args.workers, login=login)
