"""``avlab ui``: the MLflow UI on the project's store, on 127.0.0.1 unless ``--host`` says otherwise."""

from __future__ import annotations

import argparse
import sys

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = None, False, False


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    ui = sub.add_parser("ui", parents=[common],
                        help="browse runs, sweeps, metrics and plots in the MLflow UI (Ctrl-C stops it)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: 127.0.0.1, this machine only; the UI has no login)")
    ui.add_argument("--port", type=int, default=5000, help="port to listen on (default: 5000)")
    ui.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from orchestrator.tracking import resolve_home
    from orchestrator.ui import backend_store_uri, check_port_free, is_loopback, serve

    home = resolve_home(args.home)
    store_uri = backend_store_uri(home, args.tracking_uri)
    addresses = check_port_free(args.host, args.port)  # a busy port or a host that cannot be bound: exit 2
    if not is_loopback(addresses):
        print(f"[avlab] warning: --host {args.host} is not a loopback address: anyone who can reach this "
              f"machine on port {args.port} can read and change the runs (the MLflow UI has no login)",
              file=sys.stderr, flush=True)
    return serve(store_uri, home, args.host, args.port)
