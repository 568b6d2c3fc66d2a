"""``avlab data index | check | cache``: index a dataset's layout into a manifest, check its files,
build its feature cache."""

from __future__ import annotations

import argparse
from pathlib import Path

EXTRA_ARGS, WRITES_HOME, DRIVES_JOB = "overrides", False, False
LAYOUTS = ("esc50", "dcase2018", "kinetics", "acivw", "folder")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    data = sub.add_parser("data", parents=[common], help="real datasets: index a layout, check it, cache its features")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    index = data_sub.add_parser("index", help="write a manifest CSV for a dataset on disk")
    index.add_argument("layout", choices=LAYOUTS)
    index.add_argument("path", help="the dataset's root folder (or a CSV of files for `folder`)")
    index.add_argument("--out", required=True, metavar="MANIFEST", help="the manifest CSV to write")
    index.add_argument("--seed", type=int, default=0, help="seed of split assignments that are random")
    index.add_argument("--force", action="store_true", help="replace an existing --out")
    index.add_argument("--append", action="store_true", help="add the rows to an existing --out (ids stay unique)")
    index.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a layout option, e.g. test_fold=1 (esc50), labelled=true split=train (folder), "
                            "as_unpaired=false (kinetics), split_fractions=[0.7,0.2,0.1] (acivw)")
    index.set_defaults(func=main, overrides=[])
    for name, text in (("check", "decode every item and list the unusable ones"),
                       ("cache", "decode everything once into the memory-mapped feature cache")):
        p = data_sub.add_parser(name, help=text)
        p.add_argument("manifest", metavar="MANIFEST")
        p.add_argument("overrides", nargs="*", metavar="key.path=value",
                       help="feature settings, e.g. data.image_size=64 data.sample_rate=16000")
        p.add_argument("--preset", help="tiny, small or paper: the feature settings to use")
        p.add_argument("--skip-bad", action="store_true", help="skip unusable items (listed once) instead of failing")
        p.add_argument("--workers", type=int, help="decoding processes (default: one per CPU core)")
        p.set_defaults(func=main, overrides=[])


def main(args: argparse.Namespace) -> int:
    from orchestrator import datasets

    if args.data_command == "index":
        out = Path(args.out)
        counts, classes = datasets.index(args.layout, args.path, out, seed=args.seed, options=args.option,
                                         force=args.force, append=args.append)
        splits = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"[avlab] {out}: {sum(counts.values())} rows ({splits}), {classes} classes")
        return 0
    data_cfg = datasets.data_config(args.manifest, args.overrides, preset=args.preset, skip_bad=args.skip_bad,
                                    workers=args.workers)
    if args.data_command == "check":
        print(f"[avlab] {datasets.check(data_cfg, skip_bad=args.skip_bad)}")
        return 0
    cache = datasets.cache(data_cfg)
    print(f"[avlab] feature cache {cache.root}: {len(cache)} items"
          + (f", {len(cache.skipped)} skipped" if cache.skipped else ""))
    return 0
