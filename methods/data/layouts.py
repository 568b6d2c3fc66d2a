"""Indexing real datasets as they come from their authors into manifest rows
(``methods.data.manifest``), one function per layout, all reached through ``index_layout``.

    esc50      ESC-50: ``audio/*.wav`` + ``meta/esc50.csv``; sound-only labelled rows,
               folds 1-4 train, the test fold (5) test.
    dcase2018  DCASE 2018 task 1 (TUT Urban Acoustic Scenes): ``audio/*.wav`` + ``meta.csv`` +
               ``evaluation_setup/fold1_train.csv`` / ``fold1_evaluate.csv``; sound-only rows.
    kinetics   Kinetics-400: ``[train|val|test/]<class>/<video>``; by default each clip gives one
               unpaired sound and one unpaired image (the papers use Kinetics as unpaired data).
    acivw      ACIVW-style clips: ``<class>/<clip>/`` with frame images and one sound file;
               paired labelled rows split per class into pretrain / train / test.
    folder     any folder of images and sounds (same stem in the same folder = a pair), or a CSV
               with columns image, sound (and optionally label).

Rows carry absolute paths; ``write_manifest`` makes those inside the manifest's folder relative.
Files are not decoded here (except Kinetics durations): ``check.check_manifest`` finds broken ones.
A layout whose expected files are absent is a ManifestError naming the missing path.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from methods.data.decode import VIDEO_SUFFIXES
from methods.data.manifest import LABELLED_SPLITS, SPLITS, ManifestError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
SOUND_SUFFIXES: tuple[str, ...] = (".wav", ".flac", ".ogg")
LAYOUTS: tuple[str, ...] = ("esc50", "dcase2018", "kinetics", "acivw", "folder")

Row = dict[str, Any]


def index_layout(layout: str, root: str | Path, *, seed: int = 0, **options: Any) -> list[Row]:
    """Manifest rows for the dataset at ``root`` laid out as ``layout`` (one of ``LAYOUTS``);
    ``options`` go to that layout's function (``index_esc50`` etc.), whose signature lists them."""
    if layout not in INDEXERS:
        raise ManifestError(f"unknown layout {layout!r} (one of: {', '.join(LAYOUTS)})")
    return INDEXERS[layout](Path(root), seed=seed, **options)


# ------------------------------------------------------------------------------------- ESC-50


def index_esc50(
    root: Path, *, seed: int = 0, test_fold: int = 5, train_split: str = "train", test_split: str = "test"
) -> list[Row]:
    """ESC-50 (Piczak 2015): one labelled sound-only row per clip, label = category, fold = its
    fold; folds other than ``test_fold`` go to ``train_split``, ``test_fold`` to ``test_split``
    (``transfer_train`` / ``transfer_test`` to use ESC-50 as transfer data). ``seed`` is unused."""
    name = "ESC-50"
    meta, audio = root / "meta" / "esc50.csv", root / "audio"
    _require(meta, name)
    _require(audio, name, folder=True)
    _check_split_names(name, train_split, test_split)
    records = _read_csv(meta, name, need=("filename", "fold", "category"))
    rows, folds = [], set()
    for n, rec in enumerate(records, start=1):
        try:
            fold = int(rec["fold"])
        except ValueError:
            raise ManifestError(f"{name}: {meta} row {n}, column fold: {rec['fold']!r} is not an integer") from None
        if not rec["filename"] or not rec["category"]:
            raise ManifestError(f"{name}: {meta} row {n}: empty filename or category")
        folds.add(fold)
        split = test_split if fold == test_fold else train_split
        rows.append({"id": f"esc50/{Path(rec['filename']).stem}", "split": split, "source": "esc50",
                     "label": rec["category"], "sound": str(audio / rec["filename"]), "fold": fold})
    if test_fold not in folds:
        raise ManifestError(f"{name}: test_fold={test_fold} is not a fold of {meta} (folds: "
                            f"{', '.join(map(str, sorted(folds)))})")
    return rows


# ------------------------------------------------------------------------------------- DCASE 2018


def index_dcase2018(
    root: Path, *, seed: int = 0, fold: int = 1, train_split: str = "train", test_split: str = "test"
) -> list[Row]:
    """DCASE 2018 task 1 (Mesaros et al. 2018): one labelled sound-only row per file named in
    ``evaluation_setup/fold{fold}_train.csv`` (→ ``train_split``) and ``fold{fold}_evaluate.csv``
    (→ ``test_split``), label = scene_label, fold = ``fold``. The fold files' labels must agree
    with ``meta.csv`` (a fold file without labels takes them from meta.csv). Header lines are
    optional in every file. ``seed`` is unused."""
    name = "DCASE-2018"
    meta, audio = root / "meta.csv", root / "audio"
    fold_files = {train_split: root / "evaluation_setup" / f"fold{fold}_train.csv",
                  test_split: root / "evaluation_setup" / f"fold{fold}_evaluate.csv"}
    _require(audio, name, folder=True)
    _require(meta, name)
    for file in fold_files.values():
        _require(file, name)
    _check_split_names(name, train_split, test_split)
    scene = {cells[0]: cells[1] for cells in _read_tsv(meta, name) if len(cells) > 1}
    rows = []
    for split, file in fold_files.items():
        for n, cells in enumerate(_read_tsv(file, name), start=1):
            filename = cells[0]
            label = cells[1] if len(cells) > 1 and cells[1] else scene.get(filename, "")
            if not label:
                raise ManifestError(f"{name}: {file} line {n}: no scene label for {filename} (neither in the fold "
                                    f"file nor in meta.csv)")
            if filename in scene and scene[filename] != label:
                raise ManifestError(f"{name}: {file} line {n}: {filename} is {label!r} here but "
                                    f"{scene[filename]!r} in meta.csv")
            rows.append({"id": f"dcase2018/{Path(filename).stem}", "split": split, "source": "dcase2018",
                         "label": label, "sound": str(root / filename), "fold": fold})
    return rows


# ------------------------------------------------------------------------------------- Kinetics


def index_kinetics(
    root: Path,
    *,
    seed: int = 0,
    as_unpaired: bool = True,
    labelled: bool = False,
    sound_seconds: float = 2.0,
    workers: int = 1,
) -> list[Row]:
    """Kinetics-400 (Kay et al. 2017) videos under ``root/<split>/<class>/`` (split = train, val,
    test; or class folders directly under root), as pretrain rows. The image is the video's
    middle frame (image_time empty); the sound is the ``sound_seconds`` around the middle
    (offset max(0, middle - sound_seconds / 2)), the clip's duration read with PyAV. With
    ``as_unpaired`` (default) each clip gives a sound-only and an image-only row (ids
    ``.../sound``, ``.../image``, no pair_id), as the papers use Kinetics as unpaired data;
    otherwise one paired row. ``labelled`` keeps the class folder as the label. A clip whose
    duration cannot be read gets offset 0 (``check_manifest`` then reports the file).
    ``workers`` > 1 reads durations in that many processes. ``seed`` is unused."""
    name = "Kinetics"
    _require(root, name, folder=True)
    parents = [root / s for s in ("train", "val", "test") if (root / s).is_dir()] or [root]
    clips = [(class_dir.name, video) for parent in parents for class_dir in _subfolders(parent)
             for video in sorted(class_dir.iterdir()) if video.suffix.lower() in VIDEO_SUFFIXES]
    if not clips:
        raise ManifestError(f"{name}: no videos ({' '.join(VIDEO_SUFFIXES)}) in class folders under {root} "
                            f"(expected <root>/[train|val|test/]<class>/<video>)")
    videos = [str(video) for _, video in clips]
    if workers > 1:
        # spawn, not fork: forking a process whose torch thread pool has started can hang the child
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            seconds = list(pool.map(video_seconds, videos, chunksize=max(1, len(videos) // (workers * 8))))
    else:
        seconds = [video_seconds(v) for v in videos]
    rows = []
    for (label, video), duration in zip(clips, seconds):
        clip_id = f"kinetics/{video.relative_to(root).with_suffix('').as_posix()}"
        offset = round(max(0.0, duration / 2 - sound_seconds / 2), 3) if duration else 0.0
        common = {"split": "pretrain", "source": "kinetics", "label": label if labelled else ""}
        sound = {"sound": str(video), "sound_offset": offset, "sound_duration": sound_seconds}
        if as_unpaired:
            rows.append({"id": f"{clip_id}/sound", **common, **sound})
            rows.append({"id": f"{clip_id}/image", **common, "image": str(video)})
        else:
            rows.append({"id": clip_id, **common, "image": str(video), **sound})
    return rows


def video_seconds(path: str) -> float | None:
    """A video's duration in seconds (container, else longest stream), or None if unreadable."""
    import av

    try:
        with av.open(path) as container:
            if container.duration:
                return container.duration / 1e6
            spans = [float(s.duration * s.time_base) for s in container.streams if s.duration and s.time_base]
            return max(spans) if spans else None
    except Exception:  # noqa: BLE001 -- a broken clip is check_manifest's to report
        return None


# ------------------------------------------------------------------------------------- ACIVW


def index_acivw(
    root: Path, *, seed: int = 0, split_fractions: Sequence[float] = (0.7, 0.2, 0.1)
) -> list[Row]:
    """ACIVW-style clip folders ``root/<class>/<clip>/`` holding frame images (the middle one in
    sorted order is used) and exactly one sound file: one paired labelled row per clip. Within
    each class the clips are shuffled (by ``seed``) and cut into pretrain / train / test by
    ``split_fractions`` (the papers pretrain on 70 %); a class too small for a train clip gives
    its test clip to train, so that every test label is in train."""
    name = "ACIVW"
    _require(root, name, folder=True)
    fractions = [float(f) for f in split_fractions]
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ManifestError(f"{name}: split_fractions must be three fractions (pretrain, train, test) >= 0 "
                            f"summing to 1, got {tuple(split_fractions)}")
    classes = _subfolders(root)
    if not classes:
        raise ManifestError(f"{name}: no class folders under {root} (expected <root>/<class>/<clip>/)")
    rng = np.random.default_rng(seed)
    rows = []
    for class_dir in classes:
        clip_dirs = _subfolders(class_dir)
        n = len(clip_dirs)
        cut_pretrain = math.floor(fractions[0] * n + 0.5)
        cut_train = max(cut_pretrain, math.floor((fractions[0] + fractions[1]) * n + 0.5))
        if cut_train == cut_pretrain and cut_train < n:
            cut_train += 1  # a test clip whose label train lacks could never be classified
        position = np.empty(n, dtype=np.int64)
        position[rng.permutation(n)] = np.arange(n)
        for clip_dir, p in zip(clip_dirs, position):
            frames = sorted(f for f in clip_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            sounds = sorted(f for f in clip_dir.iterdir() if f.suffix.lower() in SOUND_SUFFIXES)
            if not frames:
                raise ManifestError(f"{name}: {clip_dir} has no frame images ({' '.join(IMAGE_SUFFIXES)})")
            if len(sounds) != 1:
                raise ManifestError(f"{name}: {clip_dir} has {len(sounds)} sound files "
                                    f"({' '.join(SOUND_SUFFIXES)}), expected exactly one")
            split = "pretrain" if p < cut_pretrain else "train" if p < cut_train else "test"
            rows.append({"id": f"acivw/{class_dir.name}/{clip_dir.name}", "split": split, "source": "acivw",
                         "label": class_dir.name, "image": str(frames[len(frames) // 2]), "sound": str(sounds[0])})
    if not rows:
        raise ManifestError(f"{name}: no clip folders under the class folders of {root}")
    return rows


# ------------------------------------------------------------------------------------- folder / CSV


def index_folder(root: Path, *, seed: int = 0, labelled: bool = False, split: str = "pretrain") -> list[Row]:
    """Every image (.png .jpg .jpeg) and sound (.wav .flac .ogg) under the folder ``root``, one
    row each, except that an image and a sound with the same stem in the same folder make one
    paired row; id = "folder/<path without suffix>"; label = the parent folder's name with
    ``labelled``. ``root`` may instead be a CSV with columns image and/or sound and optionally
    label (paths relative to the CSV's folder). Every row goes to ``split``. ``seed`` is unused."""
    name = "folder"
    if split not in SPLITS:
        raise ManifestError(f"{name}: split {split!r} is not a split (one of: {', '.join(SPLITS)})")
    if root.is_file() and root.suffix.lower() == ".csv":
        return _index_csv(root, split=split)
    _require(root, name, folder=True)
    if split in LABELLED_SPLITS and not labelled:
        raise ManifestError(f"{name}: split {split!r} needs labels: pass labelled=True (label = parent folder)")
    groups: dict[Path, dict[str, list[Path]]] = {}
    for file in sorted(f for f in root.rglob("*") if f.is_file()):
        kind = "image" if file.suffix.lower() in IMAGE_SUFFIXES else "sound" if (
            file.suffix.lower() in SOUND_SUFFIXES) else None
        if kind:
            groups.setdefault(file.with_suffix(""), {"image": [], "sound": []})[kind].append(file)
    if not groups:
        raise ManifestError(f"{name}: no images ({' '.join(IMAGE_SUFFIXES)}) or sounds "
                            f"({' '.join(SOUND_SUFFIXES)}) under {root}")
    rows = []
    for stem, files in groups.items():
        if len(files["image"]) > 1 or len(files["sound"]) > 1:
            clash = ", ".join(f.name for f in files["image"] + files["sound"])
            raise ManifestError(f"{name}: {stem.parent} has files sharing the stem {stem.name!r} ({clash}); "
                                f"a stem names at most one image and one sound")
        if labelled and stem.parent == root:
            raise ManifestError(f"{name}: {stem} is not in a class folder (labelled=True takes the parent "
                                f"folder's name as the label)")
        row: Row = {"id": f"folder/{stem.relative_to(root).as_posix()}", "split": split, "source": "folder",
                    "label": stem.parent.name if labelled else ""}
        if files["image"]:
            row["image"] = str(files["image"][0])
        if files["sound"]:
            row["sound"] = str(files["sound"][0])
        rows.append(row)
    return rows


def _index_csv(file: Path, *, split: str) -> list[Row]:
    name = "folder"
    records = _read_csv(file, name, need=())
    columns = set(records[0]) if records else set()
    unknown = sorted(columns - {"image", "sound", "label"})
    if unknown or not columns & {"image", "sound"}:
        raise ManifestError(f"{name}: {file} has columns {', '.join(sorted(columns)) or '(none)'}; expected image "
                            f"and/or sound, optionally label")
    rows = []
    for n, rec in enumerate(records, start=1):
        image, sound, label = rec.get("image", ""), rec.get("sound", ""), rec.get("label", "")
        if not image and not sound:
            raise ManifestError(f"{name}: {file} row {n}: neither an image nor a sound")
        if split in LABELLED_SPLITS and not label:
            raise ManifestError(f"{name}: {file} row {n}, column label: empty, but split {split!r} needs labels")
        row: Row = {"id": f"folder/{file.stem}/{n}", "split": split, "source": "folder", "label": label}
        if image:
            row["image"] = str(file.parent / image)
        if sound:
            row["sound"] = str(file.parent / sound)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- helpers


def _require(path: Path, name: str, *, folder: bool = False) -> None:
    if not (path.is_dir() if folder else path.is_file()):
        raise ManifestError(f"{name}: {path} not found")


def _check_split_names(name: str, *splits: str) -> None:
    for split in splits:
        if split not in LABELLED_SPLITS:
            raise ManifestError(f"{name}: {split!r} is not a labelled split (one of: {', '.join(LABELLED_SPLITS)})")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_csv(file: Path, name: str, *, need: Sequence[str]) -> list[dict[str, str]]:
    """Comma-separated records with a header, cells stripped."""
    try:
        with file.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            records = [{(k or "").strip(): (v or "").strip() for k, v in rec.items()} for rec in reader]
            header = [h.strip() for h in reader.fieldnames or []]
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ManifestError(f"{name}: {file} is not a readable CSV ({exc})") from None
    missing = [c for c in need if c not in header]
    if missing:
        raise ManifestError(f"{name}: {file} lacks columns {', '.join(missing)}")
    return records


def _read_tsv(file: Path, name: str) -> list[list[str]]:
    """Tab-separated lines as cells, blank lines and a header line (first cell "filename") dropped."""
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{name}: {file} is not UTF-8 text ({exc})") from None
    table = [[c.strip() for c in line.split("\t")] for line in lines if line.strip()]
    return table[1:] if table and table[0][0] == "filename" else table


INDEXERS: dict[str, Callable[..., list[Row]]] = {
    "esc50": index_esc50,
    "dcase2018": index_dcase2018,
    "kinetics": index_kinetics,
    "acivw": index_acivw,
    "folder": index_folder,
}
