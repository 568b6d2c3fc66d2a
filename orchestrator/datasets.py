"""Real datasets on disk, for ``avlab data``: a manifest from a dataset's folder layout, its
files checked, its feature cache built. Bad input raises ConfigError naming the field or file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError


@contextlib.contextmanager
def _one_line() -> Iterator[None]:
    """A dataset error (a file that does not decode, a broken manifest) as ConfigError: one line."""
    from methods.data.decode import DataError
    from methods.data.manifest import ManifestError

    try:
        yield
    except (DataError, ManifestError) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def data_config(manifest: str, overrides: list[str], *, preset: str | None, skip_bad: bool = False,
                workers: int | None = None):
    """The data section (feature settings, cache knobs) for ``manifest`` from the preset and the
    overrides, validated like a run's."""
    from orchestrator.config import resolve

    overrides = [*overrides, f"data.manifest={os.path.abspath(manifest)}"]
    if skip_bad:
        overrides.append("data.skip_bad=true")
    if workers is not None:
        overrides.append(f"data.cache_workers={workers}")
    with _one_line():  # only the data section is used: no training, so no batch-size check against the pools
        return resolve({}, preset=preset, overrides=[*overrides, "train.epochs=0"]).data


def _absolute_paths(row: dict, folder: Path) -> dict:
    """A manifest row with its file paths made absolute (they are stored relative to ``folder``)."""
    out = dict(row)
    for key in ("image", "sound"):
        if out.get(key) and not os.path.isabs(out[key]):
            out[key] = str((folder / out[key]).resolve())
    return out


def index(layout: str, path: str, out: Path, *, seed: int, options: list[str], force: bool, append: bool
          ) -> tuple[dict[str, int], int]:
    """Write the manifest of the dataset at ``path`` (its ``layout``) to ``out``; return its rows
    per split and its number of classes. ``options`` are the layout's ``KEY=VALUE`` options."""
    from methods.data.layouts import index_layout
    from methods.data.manifest import read_manifest, write_manifest
    from orchestrator.config import parse_override

    if out.is_dir():
        raise ConfigError(f"--out: {out} is a folder; give the path of the manifest CSV to write")
    if out.exists() and not (force or append):
        raise ConfigError(f"--out: {out} exists; pass --append to add rows to it or --force to replace it")
    given = dict(parse_override(text) for text in options)
    with _one_line():
        try:
            rows = index_layout(layout, path, seed=seed, **given)
        except TypeError as exc:  # an option the layout does not have
            raise ConfigError(f"--option: {exc}") from None
        if append and out.exists():
            old = read_manifest(out)  # validated: a broken manifest is not extended
            rows = [*(_absolute_paths(row, out.parent) for row in old.rows), *rows]
        write_manifest(rows, out)
        manifest = read_manifest(out)  # what was written must read back valid
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["split"]] = counts.get(row["split"], 0) + 1
    return counts, len(manifest.classes)


def check(data_cfg: Any, *, skip_bad: bool) -> str:
    """Decode every item of ``data_cfg``'s manifest; the summary line (ConfigError for the first
    unusable item unless ``skip_bad``)."""
    from methods.data.check import check_manifest
    from methods.data.decode import FeatureSettings
    from methods.data.manifest import read_manifest

    with _one_line():
        manifest = read_manifest(data_cfg.manifest)
        workers = data_cfg.cache_workers or os.cpu_count() or 1
        report = check_manifest(manifest, FeatureSettings.from_config(data_cfg), skip_bad=skip_bad, workers=workers)
        if not skip_bad:
            report.raise_if_bad()
    return report.summary()


def cache(data_cfg: Any):
    """Build ``data_cfg``'s memory-mapped feature cache (once; other callers wait on its lock) and
    return it."""
    from methods.data.decode import FeatureSettings
    from methods.data.manifest import read_manifest
    from methods.data.real import ManifestAV

    with _one_line():
        read_manifest(data_cfg.manifest)
        FeatureSettings.from_config(data_cfg)
        return ManifestAV(data_cfg).cache
