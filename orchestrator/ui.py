"""`avlab ui`: the MLflow UI on the project's store (to be written)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `ui` subcommand to the avlab parser."""
