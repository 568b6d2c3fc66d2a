"""The manifest: one CSV row per item of a real dataset, so paired, unpaired-sound and
unpaired-image pools and the evaluation splits are all expressed in one place.

Columns (``COLUMNS``; paths relative to the manifest's folder or absolute):
    id              unique item id
    split           pretrain | train | test | val | transfer_train | transfer_test (val: the
                    validation split that choices are made on; optional)
    pair_id         clip id; two pretrain rows with the same pair_id (one with an image, one
                    with a sound) form one pair; empty for standalone rows
    source          where the item comes from (esc50, dcase2018, kinetics, acivw, folder, ...)
    label           class name; empty when unknown (pretraining rows need none)
    image           image file, or a video file to take a frame from; empty for sound-only rows
    image_time      seconds into the video for the frame; empty = the middle (videos only)
    sound           audio file (or a video with an audio stream); empty for image-only rows
    sound_offset    seconds into the sound file where the clip starts (default 0)
    sound_duration  seconds of the file the clip may use; empty = to the end
    fold            optional integer (ESC-50 folds, DCASE fold files); empty if none

``layouts.index_layout`` turns a dataset as published into rows; ``write_manifest`` writes them;
``read_manifest`` validates a file into a ``Manifest``, whose ``pools()`` are the eight pools of
``pools.POOLS`` as Items; ``check.check_manifest`` decodes every Item once and lists the broken
files, so a run fails before training (or skips them) instead of in the middle of an epoch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from methods.data.pools import POOLS

COLUMNS: tuple[str, ...] = (
    "id", "split", "pair_id", "source", "label", "image", "image_time", "sound", "sound_offset",
    "sound_duration", "fold",
)
SPLITS: tuple[str, ...] = ("pretrain", "train", "test", "val", "transfer_train", "transfer_test")


@dataclass(frozen=True)
class Item:
    """One decodable item: an image, a sound, or both (a pair). Paths are absolute."""

    id: str
    image: str | None = None
    image_time: float | None = None
    sound: str | None = None
    sound_offset: float = 0.0
    sound_duration: float | None = None
    label: int = -1  # class id into Manifest.classes; -1 = unlabelled
    source: str = ""
    fold: int | None = None  # the row's fold (ESC-50, DCASE), for eval.protocol: folds


LABELLED_SPLITS: tuple[str, ...] = ("train", "test", "val", "transfer_train", "transfer_test")
PATH_COLUMNS: tuple[str, ...] = ("image", "sound")
# Each held-out split and the split its classifier is fitted on: a test label absent from the
# fitting split can never be predicted, so the manifest is rejected rather than the score skewed.
HELD_OUT: dict[str, str] = {"test": "train", "val": "train", "transfer_test": "transfer_train"}
FIRST = 5  # how many offending names an error message lists


class ManifestError(ValueError):
    """A manifest (or a dataset layout) that cannot be used. One line that names the file and,
    where relevant, the 1-based data row and the column."""


# ------------------------------------------------------------------------------------- writing


def write_manifest(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` as a manifest CSV with exactly ``COLUMNS`` in that order (absent keys and
    None become empty cells). Image and sound paths inside the manifest's folder are written
    relative to it, so a dataset folder can move with its manifest. Atomic: a reader sees the old
    file or the new one, never half of one."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    bases = [Path(os.path.abspath(folder)), folder.resolve()]  # as given, and with symlinks resolved
    table: list[list[str]] = []
    for n, row in enumerate(rows, start=1):
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ManifestError(f"{path}: row {n}: unknown columns {', '.join(unknown)} "
                                f"(a manifest has exactly: {', '.join(COLUMNS)})")
        table.append([_cell(row.get(column), column, bases) for column in COLUMNS])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(COLUMNS)
            writer.writerows(table)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a manifest is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _cell(value: Any, column: str, bases: list[Path]) -> str:
    if value is None:
        return ""
    if column in PATH_COLUMNS and str(value):
        p = Path(value)
        if p.is_absolute():
            p = Path(os.path.normpath(p))
            for base in bases:
                try:
                    return p.relative_to(base).as_posix()
                except ValueError:
                    continue
        return str(value)
    if isinstance(value, float):
        return repr(value)  # exact round trip
    return str(value)


# ------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Unit:
    """One decodable unit of the manifest: the pool it belongs to and its Item."""

    pool: str  # one of POOLS
    item: Item


@dataclass(frozen=True, eq=False)
class Manifest:
    """A validated manifest (build it with ``read_manifest``).

    ``rows`` are the CSV's data rows as dicts of stripped cells, in file order; ``classes`` the
    sorted label names of every labelled row (class id = index); ``content_hash`` the sha256 of
    the file's bytes, for cache keys.
    """

    path: Path
    content_hash: str
    classes: list[str]
    rows: list[dict[str, str]]
    _units: tuple[_Unit, ...] = field(repr=False)

    def items(self) -> list[Item]:
        """Every decodable unit once, in manifest order (a pair split over two rows is one Item,
        at the place of its first row): what a feature cache has to hold."""
        return [u.item for u in self._units]

    def pools(
        self,
        *,
        paired_fraction: float = 1.0,
        unpaired_sound_count: int = -1,
        unpaired_image_count: int = -1,
        unpaired_sound_per_pair: float = -1,
        unpaired_image_per_pair: float = -1,
        seed: int = 0,
    ) -> dict[str, list[Item]]:
        """The eight pools of ``pools.POOLS``, each in manifest order.

        paired           pretrain Items with an image and a sound: rows with both, and the two
                         halves of a pair_id merged into one Item whose id is the pair_id.
                         ``paired_fraction`` in (0, 1] keeps a random subset of
                         max(1, round(fraction × n)) Items (the papers' paired-data ablations).
        unpaired_sound   pretrain rows with only a sound and no pair_id; ``unpaired_sound_count``
                         >= 0 keeps that many at random, -1 keeps all.
        unpaired_image   likewise for images. ``unpaired_<kind>_per_pair`` >= 0 keeps that multiple
                         of the manifest's pairs (all of them, before ``paired_fraction``)
                         instead of a count.
        train, test, val, transfer_train, transfer_test
                         every row of the split, label = class id.

        Subsets are a pure function of ``seed`` (each pool its own random stream) and keep
        manifest order.
        """
        if not (isinstance(paired_fraction, (int, float)) and 0 < paired_fraction <= 1):
            raise ManifestError(f"{self.path}: paired_fraction must be in (0, 1], got {paired_fraction!r}")
        out = {name: [u.item for u in self._units if u.pool == name] for name in POOLS}
        n = len(out["paired"])
        counts = {"unpaired_sound": unpaired_sound_count, "unpaired_image": unpaired_image_count}
        for kind, per_pair in (("sound", unpaired_sound_per_pair), ("image", unpaired_image_per_pair)):
            if per_pair != -1:
                name = f"unpaired_{kind}"
                counts[name] = math.floor(per_pair * n + 0.5)
                if counts[name] > len(out[name]):
                    raise ManifestError(
                        f"{self.path}: data.{name}_per_pair={per_pair:g} asks for {counts[name]} {name} items "
                        f"({per_pair:g} x {n} pairs) but the manifest has {len(out[name])}")
        if n:
            out["paired"] = _subset(out["paired"], max(1, math.floor(paired_fraction * n + 0.5)), seed, stream=1)
        for stream, (name, count) in enumerate(counts.items(), start=2):
            if isinstance(count, bool) or not isinstance(count, int) or count < -1:
                raise ManifestError(f"{self.path}: {name}_count must be an integer >= 0, or -1 for all; "
                                    f"got {count!r}")
            if count == -1:
                continue
            if count > len(out[name]):
                raise ManifestError(f"{self.path}: {name}_count={count} but the manifest has {len(out[name])} "
                                    f"{name} items (ask for at most that many, or -1 for all)")
            out[name] = _subset(out[name], count, seed, stream=stream)
        return out


def _subset(items: list[Item], k: int, seed: int, *, stream: int) -> list[Item]:
    """``k`` of ``items`` at random (a pure function of seed and stream), in their given order."""
    keep = np.sort(np.random.default_rng([seed, stream]).choice(len(items), size=k, replace=False))
    return [items[int(i)] for i in keep]


@dataclass(frozen=True)
class _Row:
    n: int  # 1-based data row
    id: str
    split: str
    pair_id: str
    source: str
    label: str
    image: str | None
    image_time: float | None
    sound: str | None
    sound_offset: float
    sound_duration: float | None
    fold: int | None


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest; every problem is a one-line ManifestError naming the file,
    the row and the column. Checks: the header has exactly ``COLUMNS`` (any order); ids are
    non-empty and unique; splits are in ``SPLITS``; every row has an image or a sound; numbers
    parse (image_time, sound_offset >= 0, sound_duration > 0, fold an integer); rows of the
    labelled splits have a label; each pretrain pair_id has exactly one image half and one sound
    half (a row with both is a whole pair) and its halves agree on the label; every label of a
    held-out split (test, transfer_test) occurs in its fitting split (train, transfer_train).
    Only pretrain rows pair up: a pair_id in another split is kept in ``rows`` and nothing more.
    Files are not opened here: ``check_manifest`` decodes them."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc})") from None
    try:
        table = [cells for cells in csv.reader(io.StringIO(text, newline="")) if cells]
    except csv.Error as exc:
        raise ManifestError(f"{path}: not a CSV file ({exc})") from None
    if not table:
        raise ManifestError(f"{path}: empty file (a manifest starts with the header: {','.join(COLUMNS)})")
    header = [h.strip() for h in table[0]]
    doubled = sorted({h for h in header if header.count(h) > 1})
    if doubled:
        raise ManifestError(f"{path}: header repeats columns {', '.join(doubled)}")
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise ManifestError(f"{path}: unknown columns {', '.join(unknown)} (a manifest has exactly: "
                            f"{', '.join(COLUMNS)})")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ManifestError(f"{path}: header lacks columns {', '.join(missing)} (a manifest has exactly: "
                            f"{', '.join(COLUMNS)})")
    if len(table) == 1:
        raise ManifestError(f"{path}: no rows, only the header (`avlab data index` writes the rows)")
    folder = Path(os.path.abspath(path.parent))
    rows: list[dict[str, str]] = []
    parsed: list[_Row] = []
    first_row: dict[str, int] = {}
    for n, cells in enumerate(table[1:], start=1):
        if len(cells) != len(header):
            raise ManifestError(f"{path}: row {n}: {len(cells)} cells, the header has {len(header)}")
        raw = {c: cells[header.index(c)].strip() for c in COLUMNS}
        row = _parse_row(raw, n, path, folder)
        if row.id in first_row:
            raise ManifestError(f"{path}: row {n}, column id: duplicate id {row.id!r} "
                                f"(first at row {first_row[row.id]})")
        first_row[row.id] = n
        rows.append(raw)
        parsed.append(row)
    _check_pairs(parsed, path, first_row)
    _check_held_out_labels(parsed, path)
    classes = sorted({r.label for r in parsed if r.label})
    return Manifest(path=path, content_hash=hashlib.sha256(data).hexdigest(), classes=classes, rows=rows,
                    _units=tuple(_units(parsed, {name: i for i, name in enumerate(classes)})))


def _parse_row(raw: dict[str, str], n: int, path: Path, folder: Path) -> _Row:
    def fail(column: str, problem: str) -> ManifestError:
        return ManifestError(f"{path}: row {n}, column {column}: {problem}")

    def number(column: str, *, positive: bool = False) -> float | None:
        cell = raw[column]
        if not cell:
            return None
        try:
            value = float(cell)
        except ValueError:
            raise fail(column, f"{cell!r} is not a number") from None
        if not math.isfinite(value):
            raise fail(column, f"{cell!r} is not a finite number")
        if positive and value <= 0:
            raise fail(column, f"must be > 0 seconds, got {cell}")
        if value < 0:
            raise fail(column, f"must be >= 0 seconds, got {cell}")
        return value

    def file(column: str) -> str | None:
        cell = raw[column]
        return os.path.normpath(folder / cell) if cell else None  # an absolute cell replaces folder

    if not raw["id"]:
        raise fail("id", "empty id")
    if raw["split"] not in SPLITS:
        raise fail("split", f"{raw['split']!r} is not a split (one of: {', '.join(SPLITS)})")
    if not raw["image"] and not raw["sound"]:
        raise fail("image", "neither an image nor a sound (a row needs at least one)")
    if raw["split"] in LABELLED_SPLITS and not raw["label"]:
        raise fail("label", f"empty label in the {raw['split']} split (only pretrain rows may be unlabelled)")
    fold = None
    if raw["fold"]:
        try:
            fold = int(raw["fold"])
        except ValueError:
            raise fail("fold", f"{raw['fold']!r} is not an integer") from None
    return _Row(n=n, id=raw["id"], split=raw["split"], pair_id=raw["pair_id"], source=raw["source"],
                label=raw["label"], image=file("image"), image_time=number("image_time"), sound=file("sound"),
                sound_offset=number("sound_offset") or 0.0, sound_duration=number("sound_duration", positive=True),
                fold=fold)


def _check_pairs(rows: list[_Row], path: Path, first_row: dict[str, int]) -> None:
    groups: dict[str, list[_Row]] = {}
    for r in rows:
        if r.split == "pretrain" and r.pair_id:
            groups.setdefault(r.pair_id, []).append(r)
    broken = [pid for pid, g in groups.items() if not _whole_pair(g)]
    if broken:
        shown = ", ".join(broken[:FIRST]) + (", ..." if len(broken) > FIRST else "")
        raise ManifestError(f"{path}: {len(broken)} pair ids without both halves (one image row and one sound "
                            f"row, or one row with both): {shown}")
    for pid, g in groups.items():
        if len(g) == 2:
            if g[0].label != g[1].label:
                raise ManifestError(f"{path}: rows {g[0].n} and {g[1].n}, column label: the halves of pair "
                                    f"{pid!r} disagree ({g[0].label!r} vs {g[1].label!r})")
            if pid in first_row:  # the merged Item takes the pair id as its id
                raise ManifestError(f"{path}: row {first_row[pid]}, column id: {pid!r} is also the pair_id of "
                                    f"rows {g[0].n} and {g[1].n} (item ids and merged pair ids must differ)")


def _whole_pair(group: list[_Row]) -> bool:
    if len(group) == 1:
        return group[0].image is not None and group[0].sound is not None
    if len(group) == 2:
        kinds = sorted("image" if r.sound is None else "sound" if r.image is None else "both" for r in group)
        return kinds == ["image", "sound"]
    return False


def _check_held_out_labels(rows: list[_Row], path: Path) -> None:
    for held_out, fitted in HELD_OUT.items():
        seen = {r.label for r in rows if r.split == fitted}
        absent = sorted({r.label for r in rows if r.split == held_out} - seen)
        if absent:
            shown = ", ".join(absent[:FIRST]) + (", ..." if len(absent) > FIRST else "")
            raise ManifestError(f"{path}: labels absent from a split: {len(absent)} labels of {held_out} are not in "
                                f"{fitted}: {shown}")


def _units(rows: list[_Row], class_id: dict[str, int]) -> list[_Unit]:
    """Rows to decodable units, in manifest order; pair halves merge at their first row."""
    halves: dict[str, list[_Row]] = {}
    for r in rows:
        if r.split == "pretrain" and r.pair_id and (r.image is None or r.sound is None):
            halves.setdefault(r.pair_id, []).append(r)
    units: list[_Unit] = []
    for r in rows:
        label = class_id.get(r.label, -1)
        if r.split != "pretrain":
            units.append(_Unit(r.split, _item(r, r.id, r, r, label)))
        elif r.image is not None and r.sound is not None:
            units.append(_Unit("paired", _item(r, r.id, r, r, label)))
        elif r.pair_id:
            pair = halves[r.pair_id]
            if r is pair[0]:
                image_row, sound_row = (pair[0], pair[1]) if pair[0].image is not None else (pair[1], pair[0])
                units.append(_Unit("paired", _item(r, r.pair_id, image_row, sound_row, label)))
        else:
            units.append(_Unit("unpaired_sound" if r.image is None else "unpaired_image",
                               _item(r, r.id, r, r, label)))
    return units


def _item(row: _Row, id_: str, image_row: _Row, sound_row: _Row, label: int) -> Item:
    has_image, has_sound = image_row.image is not None, sound_row.sound is not None
    return Item(id=id_, image=image_row.image, image_time=image_row.image_time if has_image else None,
                sound=sound_row.sound, sound_offset=sound_row.sound_offset if has_sound else 0.0,
                sound_duration=sound_row.sound_duration if has_sound else None, label=label, source=row.source,
                fold=row.fold)
