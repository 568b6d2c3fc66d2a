"""``avlab data index | check | cache``: a manifest from a dataset's folder layout, its files
checked, its feature cache built. Bad input exits 2 in one line naming the field or file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from orchestrator.errors import ConfigError


def _data_config(args: argparse.Namespace):
    """The data section (feature settings, cache knobs) for ``args.manifest`` from the preset and
    the overrides, validated like a run's."""
    overrides = [*args.overrides, f"data.manifest={os.path.abspath(args.manifest)}"]
    if getattr(args, "skip_bad", False):
        overrides.append("data.skip_bad=true")
    if getattr(args, "workers", None) is not None:
        overrides.append(f"data.cache_workers={args.workers}")
    from orchestrator.config import resolve

    # Only the data section is used: no training, so no batch-size check against the pools.
    return resolve({}, preset=args.preset, overrides=[*overrides, "train.epochs=0"]).data


def _absolute_paths(row: dict, folder: Path) -> dict:
    """A manifest row with its file paths made absolute (they are stored relative to ``folder``)."""
    out = dict(row)
    for key in ("image", "sound"):
        if out.get(key) and not os.path.isabs(out[key]):
            out[key] = str((folder / out[key]).resolve())
    return out


def cmd_data(args: argparse.Namespace) -> int:
    from methods.data.decode import DataError, FeatureSettings
    from methods.data.manifest import ManifestError
    from orchestrator.config import parse_override

    try:
        if args.data_command == "index":
            from methods.data.layouts import index_layout
            from methods.data.manifest import read_manifest, write_manifest

            out = Path(args.out)
            if out.is_dir():
                raise ConfigError(f"--out: {out} is a folder; give the path of the manifest CSV to write")
            if out.exists() and not (args.force or args.append):
                raise ConfigError(f"--out: {out} exists; pass --append to add rows to it or --force to replace it")
            options = dict(parse_override(text) for text in args.option)
            try:
                rows = index_layout(args.layout, args.path, seed=args.seed, **options)
            except TypeError as exc:  # an option the layout does not have
                raise ConfigError(f"--option: {exc}") from None
            if args.append and out.exists():
                old = read_manifest(out)  # validated: a broken manifest is not extended
                rows = [*(_absolute_paths(row, out.parent) for row in old.rows), *rows]
            write_manifest(rows, out)
            manifest = read_manifest(out)  # what was written must read back valid
            counts: dict[str, int] = {}
            for row in rows:
                counts[row["split"]] = counts.get(row["split"], 0) + 1
            print(f"[avlab] {out}: {len(rows)} rows ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}), "
                  f"{len(manifest.classes)} classes")
            return 0
        from methods.data.check import check_manifest
        from methods.data.manifest import read_manifest

        data_cfg = _data_config(args)
        manifest = read_manifest(data_cfg.manifest)
        settings = FeatureSettings.from_config(data_cfg)
        workers = data_cfg.cache_workers or os.cpu_count() or 1
        if args.data_command == "check":
            report = check_manifest(manifest, settings, skip_bad=args.skip_bad, workers=workers)
            if not args.skip_bad:
                report.raise_if_bad()
            print(f"[avlab] {report.summary()}")
            return 0
        from methods.data.real import ManifestAV

        data = ManifestAV(data_cfg)
        cache = data.cache  # builds it (once; other callers wait on its lock)
        print(f"[avlab] feature cache {cache.root}: {len(cache)} items"
              + (f", {len(cache.skipped)} skipped" if cache.skipped else ""))
        return 0
    except (DataError, ManifestError) as exc:  # main() prints it in one line and exits 2
        raise ConfigError(str(exc).splitlines()[0]) from None


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `data` subcommand and its `index`, `check` and `cache` commands to the avlab parser."""
    data = sub.add_parser("data", parents=[common], help="real datasets: index a layout, check it, cache its features")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    index = data_sub.add_parser("index", help="write a manifest CSV for a dataset on disk")
    index.add_argument("layout", choices=("esc50", "dcase2018", "kinetics", "acivw", "folder"))
    index.add_argument("path", help="the dataset's root folder (or a CSV of files for `folder`)")
    index.add_argument("--out", required=True, metavar="MANIFEST", help="the manifest CSV to write")
    index.add_argument("--seed", type=int, default=0, help="seed of split assignments that are random")
    index.add_argument("--force", action="store_true", help="replace an existing --out")
    index.add_argument("--append", action="store_true", help="add the rows to an existing --out (ids stay unique)")
    index.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a layout option, e.g. test_fold=1 (esc50), labelled=true split=train (folder), "
                            "as_unpaired=false (kinetics), split_fractions=[0.7,0.2,0.1] (acivw)")
    index.set_defaults(func=cmd_data, overrides=[])
    for name, text in (("check", "decode every item and list the unusable ones"),
                       ("cache", "decode everything once into the memory-mapped feature cache")):
        p = data_sub.add_parser(name, help=text)
        p.add_argument("manifest", metavar="MANIFEST")
        p.add_argument("overrides", nargs="*", metavar="key.path=value",
                       help="feature settings, e.g. data.image_size=64 data.sample_rate=16000")
        p.add_argument("--preset", help="tiny, small or paper: the feature settings to use")
        p.add_argument("--skip-bad", action="store_true", help="skip unusable items (listed once) instead of failing")
        p.add_argument("--workers", type=int, help="decoding processes (default: one per CPU core)")
        p.set_defaults(func=cmd_data, overrides=[])
