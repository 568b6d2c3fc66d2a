"""`avlab submit` / `avlab logs`: sweeps as Ray jobs on a running cluster (to be written)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `submit` and `logs` subcommands to the avlab parser."""
