"""Manifests of real datasets: each layout indexed from a tree built in its authors' layout,
written, read back and checked row by row; pools (pair merging, paired fractions, unpaired
counts); every validation error; and check_manifest's report on broken files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from methods.data.check import check_manifest
from methods.data.decode import DataError, FeatureSettings
from methods.data.layouts import LAYOUTS, index_layout
from methods.data.manifest import (
    COLUMNS,
    Item,
    ManifestError,
    read_manifest,
    write_manifest,
)
from methods.data.pools import POOLS

RATE = 8000
SETTINGS = FeatureSettings()  # 8 kHz, a 2 s window, 32 px images


# ------------------------------------------------------------------------------------- file makers


def write_wav(path: Path, *, seconds: float = 2.5, rate: int = RATE, data: np.ndarray | None = None,
              subtype: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        t = np.arange(int(seconds * rate)) / rate
        data = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    sf.write(str(path), data, rate, subtype=subtype)
    return path


def write_png(path: Path, colour: tuple[int, int, int] = (200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), colour).save(path)
    return path


def write_video(path: Path, *, seconds: float = 4.0, fps: int = 10, rate: int = 16000) -> Path:
    """An mpeg4 64x48 video with an aac mono sound track (a 440 Hz tone)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("aac", rate=rate)
        audio.layout = "mono"
        for i in range(int(seconds * fps)):
            img = np.full((48, 64, 3), (i * 6) % 256, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        t = np.arange(int(seconds * rate)) / rate
        wave = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
        for start in range(0, len(wave), 1024):
            frame = av.AudioFrame.from_ndarray(wave[None, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    """One 4 s and one 3 s video, copied wherever a tree needs one."""
    folder = tmp_path_factory.mktemp("videos")
    return {s: write_video(folder / f"clip{s}.mp4", seconds=s) for s in (4.0, 3.0)}


def round_trip(rows: list[dict], path: Path):
    return read_manifest(write_manifest(rows, path))


# ------------------------------------------------------------------------------------- layouts


def test_layouts_are_listed_and_unknown_ones_rejected(tmp_path: Path):
    assert LAYOUTS == ("esc50", "dcase2018", "kinetics", "acivw", "folder")
    with pytest.raises(ManifestError, match="unknown layout 'esc-50'"):
        index_layout("esc-50", tmp_path)


def make_esc50(root: Path) -> None:
    clips = [("1-100-A-0.wav", 1, 0, "dog"), ("2-200-A-1.wav", 2, 1, "rooster"), ("5-300-A-0.wav", 5, 0, "dog"),
             ("3-400-B-1.wav", 3, 1, "rooster"), ("5-500-A-1.wav", 5, 1, "rooster")]
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    for filename, fold, target, category in clips:
        write_wav(root / "audio" / filename)
        lines.append(f"{filename},{fold},{target},{category},False,{filename.split('-')[1]},A")
    (root / "meta").mkdir()
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")


def test_esc50(tmp_path: Path):
    root = tmp_path / "ESC-50-master"
    make_esc50(root)
    path = root / "manifest.csv"
    m = round_trip(index_layout("esc50", root), path)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    assert lines[1] == "esc50/1-100-A-0,train,,esc50,dog,,,audio/1-100-A-0.wav,,,1"  # paths relative to the folder
    assert [(r["id"], r["split"], r["label"], r["fold"], r["sound"], r["image"]) for r in m.rows] == [
        ("esc50/1-100-A-0", "train", "dog", "1", "audio/1-100-A-0.wav", ""),
        ("esc50/2-200-A-1", "train", "rooster", "2", "audio/2-200-A-1.wav", ""),
        ("esc50/5-300-A-0", "test", "dog", "5", "audio/5-300-A-0.wav", ""),
        ("esc50/3-400-B-1", "train", "rooster", "3", "audio/3-400-B-1.wav", ""),
        ("esc50/5-500-A-1", "test", "rooster", "5", "audio/5-500-A-1.wav", ""),
    ]
    assert m.classes == ["dog", "rooster"]
    pools = m.pools()
    assert tuple(pools) == POOLS
    assert [i.id for i in pools["train"]] == ["esc50/1-100-A-0", "esc50/2-200-A-1", "esc50/3-400-B-1"]
    assert pools["test"][0] == Item(id="esc50/5-300-A-0", sound=str(root / "audio" / "5-300-A-0.wav"), label=0,
                                    source="esc50", fold=5)
    assert pools["paired"] == pools["unpaired_sound"] == pools["transfer_train"] == []
    report = check_manifest(m, SETTINGS)
    assert (report.total, report.bad, report.sample_rates) == (5, [], {RATE: 5})

    rows = index_layout("esc50", root, test_fold=2, train_split="transfer_train", test_split="transfer_test")
    assert [r["split"] for r in rows] == ["transfer_train", "transfer_test"] + ["transfer_train"] * 3
    with pytest.raises(ManifestError, match="test_fold=7 is not a fold"):
        index_layout("esc50", root, test_fold=7)
    (root / "meta" / "esc50.csv").unlink()
    with pytest.raises(ManifestError, match=re.escape(f"ESC-50: {root}/meta/esc50.csv not found")):
        index_layout("esc50", root)


def make_dcase(root: Path) -> list[str]:
    names = ["airport-barcelona-0-0-a", "airport-helsinki-1-0-a", "park-london-2-0-a", "park-paris-3-0-a",
             "airport-lyon-4-0-a", "park-vienna-5-0-a"]
    for name in names:
        write_wav(root / "audio" / f"{name}.wav")
    meta = ["filename\tscene_label\tidentifier\tsource_label"]
    meta += [f"audio/{n}.wav\t{n.split('-')[0]}\t{n.split('-')[1]}-{n.split('-')[2]}\ta" for n in names]
    (root / "meta.csv").write_text("\n".join(meta) + "\n")
    (root / "evaluation_setup").mkdir()
    train = ["filename\tscene_label"] + [f"audio/{n}.wav\t{n.split('-')[0]}" for n in names[:4]]
    (root / "evaluation_setup" / "fold1_train.csv").write_text("\n".join(train) + "\n")
    evaluate = [f"audio/{n}.wav\t{n.split('-')[0]}" for n in names[4:]]  # no header line
    (root / "evaluation_setup" / "fold1_evaluate.csv").write_text("\n".join(evaluate) + "\n")
    return names


def test_dcase2018(tmp_path: Path):
    root = tmp_path / "TUT-urban-acoustic-scenes-2018-development"
    names = make_dcase(root)
    m = round_trip(index_layout("dcase2018", root), root / "manifest.csv")
    assert [(r["id"], r["split"], r["label"], r["fold"], r["sound"], r["source"]) for r in m.rows] == [
        (f"dcase2018/{n}", split, n.split("-")[0], "1", f"audio/{n}.wav", "dcase2018")
        for n, split in zip(names, ["train"] * 4 + ["test"] * 2)
    ]
    assert m.classes == ["airport", "park"]
    assert [(i.id, i.label) for i in m.pools()["test"]] == [(f"dcase2018/{names[4]}", 0), (f"dcase2018/{names[5]}", 1)]

    evaluate = root / "evaluation_setup" / "fold1_evaluate.csv"
    evaluate.write_text(f"audio/{names[4]}.wav\tpark\n")
    with pytest.raises(ManifestError, match=r"is 'park' here but 'airport' in meta.csv"):
        index_layout("dcase2018", root)
    evaluate.write_text(f"audio/{names[4]}.wav\n")  # no label column: taken from meta.csv
    assert index_layout("dcase2018", root)[-1]["label"] == "airport"
    evaluate.unlink()
    with pytest.raises(ManifestError, match=re.escape(f"DCASE-2018: {evaluate} not found")):
        index_layout("dcase2018", root)


def test_kinetics_unpaired(tmp_path: Path, videos: dict[float, Path]):
    root = tmp_path / "kinetics400"
    for rel, seconds in [("train/playing guitar/aaa_000010_000020.mp4", 4.0), ("train/dancing/bbb.mp4", 3.0),
                         ("val/dancing/ccc.mp4", 4.0)]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(videos[seconds], root / rel)
    (root / "train" / "dancing" / "notes.txt").write_text("not a video")
    m = round_trip(index_layout("kinetics", root), root / "manifest.csv")
    got = [(r["id"], r["split"], r["label"], r["image"], r["image_time"], r["sound"], r["sound_offset"],
            r["sound_duration"], r["pair_id"]) for r in m.rows]
    bbb, aaa, ccc = "train/dancing/bbb.mp4", "train/playing guitar/aaa_000010_000020.mp4", "val/dancing/ccc.mp4"
    assert got == [
        ("kinetics/train/dancing/bbb/sound", "pretrain", "", "", "", bbb, "0.5", "2.0", ""),
        ("kinetics/train/dancing/bbb/image", "pretrain", "", bbb, "", "", "", "", ""),
        ("kinetics/train/playing guitar/aaa_000010_000020/sound", "pretrain", "", "", "", aaa, "1.0", "2.0", ""),
        ("kinetics/train/playing guitar/aaa_000010_000020/image", "pretrain", "", aaa, "", "", "", "", ""),
        ("kinetics/val/dancing/ccc/sound", "pretrain", "", "", "", ccc, "1.0", "2.0", ""),
        ("kinetics/val/dancing/ccc/image", "pretrain", "", ccc, "", "", "", "", ""),
    ]
    pools = m.pools()
    assert pools["paired"] == [] and len(pools["unpaired_sound"]) == len(pools["unpaired_image"]) == 3
    assert pools["unpaired_sound"][0] == Item(id="kinetics/train/dancing/bbb/sound", sound=str(root / bbb),
                                              sound_offset=0.5, sound_duration=2.0, source="kinetics")
    assert pools["unpaired_image"][0] == Item(id="kinetics/train/dancing/bbb/image", image=str(root / bbb),
                                              source="kinetics")
    report = check_manifest(m, SETTINGS)  # the middle 2 s and the middle frame decode
    assert (report.total, report.bad, report.sample_rates) == (6, [], {16000: 3})


def test_kinetics_paired_labelled_without_split_folders(tmp_path: Path, videos: dict[float, Path]):
    root = tmp_path / "k400"
    for rel in ("abseiling/x1.mp4", "zumba/x2.mp4"):
        (root / rel).parent.mkdir(parents=True)
        shutil.copy(videos[4.0], root / rel)
    m = round_trip(index_layout("kinetics", root, as_unpaired=False, labelled=True), root / "manifest.csv")
    assert [(r["id"], r["label"], r["image"], r["sound"], r["sound_offset"]) for r in m.rows] == [
        ("kinetics/abseiling/x1", "abseiling", "abseiling/x1.mp4", "abseiling/x1.mp4", "1.0"),
        ("kinetics/zumba/x2", "zumba", "zumba/x2.mp4", "zumba/x2.mp4", "1.0"),
    ]
    assert [(i.id, i.label, i.image == i.sound) for i in m.pools()["paired"]] == [
        ("kinetics/abseiling/x1", 0, True), ("kinetics/zumba/x2", 1, True)]
    with pytest.raises(ManifestError, match=re.escape(f"Kinetics: {tmp_path / 'nowhere'} not found")):
        index_layout("kinetics", tmp_path / "nowhere")
    (tmp_path / "empty" / "abseiling").mkdir(parents=True)
    with pytest.raises(ManifestError, match="Kinetics: no videos"):
        index_layout("kinetics", tmp_path / "empty")


def make_acivw(root: Path, classes: tuple[str, ...] = ("drum", "violin"), clips: int = 10) -> None:
    for c, name in enumerate(classes):
        for k in range(clips):
            clip = root / name / f"clip{k:02d}"
            for f in range(3):
                write_png(clip / f"frame_{f:03d}.png", (60 * c, 20 * k, 80 * f))
            write_wav(clip / "audio.wav")


def test_acivw(tmp_path: Path):
    root = tmp_path / "acivw"
    make_acivw(root)
    m = round_trip(index_layout("acivw", root, seed=3), root / "manifest.csv")
    assert [r["id"] for r in m.rows] == [f"acivw/{c}/clip{k:02d}" for c in ("drum", "violin") for k in range(10)]
    for r in m.rows:
        clip = r["id"].removeprefix("acivw/")
        assert (r["label"], r["image"], r["sound"], r["source"], r["pair_id"]) == (
            clip.split("/")[0], f"{clip}/frame_001.png", f"{clip}/audio.wav", "acivw", "")
    for c in ("drum", "violin"):
        splits = [r["split"] for r in m.rows if r["label"] == c]
        assert (splits.count("pretrain"), splits.count("train"), splits.count("test")) == (7, 2, 1)
    pools = m.pools()
    assert len(pools["paired"]) == 14 and {i.label for i in pools["paired"]} == {0, 1}
    assert pools["paired"][0].image.endswith("frame_001.png") and pools["paired"][0].sound.endswith("audio.wav")
    assert [len(pools[s]) for s in ("train", "test")] == [4, 2]
    split_of = {seed: [r["split"] for r in index_layout("acivw", root, seed=seed)] for seed in (3, 4)}
    assert split_of[3] == [r["split"] for r in m.rows] and split_of[4] != split_of[3]

    small = tmp_path / "small"
    make_acivw(small, classes=("harp",), clips=4)  # 0.7 * 4 -> 3 pretrain, 1 train, none left for test
    assert sorted(r["split"] for r in index_layout("acivw", small)) == ["pretrain"] * 3 + ["train"]
    with pytest.raises(ManifestError, match="split_fractions must be three fractions"):
        index_layout("acivw", root, split_fractions=(0.5, 0.2, 0.2))
    (root / "drum" / "clip03" / "audio.wav").unlink()
    with pytest.raises(ManifestError, match=re.escape(f"{root}/drum/clip03 has 0 sound files")):
        index_layout("acivw", root)


def test_folder_and_csv(tmp_path: Path):
    root = tmp_path / "mine"
    write_png(root / "cat" / "a.png")
    write_wav(root / "cat" / "a.wav")
    write_png(root / "cat" / "b.jpg")
    write_wav(root / "dog" / "c.flac")
    (root / "dog" / "notes.txt").write_text("ignored")
    m = round_trip(index_layout("folder", root, labelled=True), tmp_path / "mine.csv")  # manifest outside root
    assert [(r["id"], r["split"], r["label"], r["image"], r["sound"]) for r in m.rows] == [
        ("folder/cat/a", "pretrain", "cat", "mine/cat/a.png", "mine/cat/a.wav"),
        ("folder/cat/b", "pretrain", "cat", "mine/cat/b.jpg", ""),
        ("folder/dog/c", "pretrain", "dog", "", "mine/dog/c.flac"),
    ]
    pools = m.pools()
    assert [[i.id for i in pools[p]] for p in ("paired", "unpaired_image", "unpaired_sound")] == [
        ["folder/cat/a"], ["folder/cat/b"], ["folder/dog/c"]]
    assert pools["paired"][0] == Item(id="folder/cat/a", image=str(root / "cat" / "a.png"),
                                      sound=str(root / "cat" / "a.wav"), label=0, source="folder")
    assert [r["label"] for r in index_layout("folder", root)] == ["", "", ""]
    with pytest.raises(ManifestError, match="split 'train' needs labels"):
        index_layout("folder", root, split="train")
    write_png(root / "cat" / "a.jpg")
    with pytest.raises(ManifestError, match="files sharing the stem 'a'"):
        index_layout("folder", root)

    table = tmp_path / "list.csv"
    table.write_text("image,sound,label\nmine/cat/a.png,mine/cat/a.wav,cat\n,mine/dog/c.flac,dog\n")
    rows = index_layout("folder", table, split="train")
    assert rows == [
        {"id": "folder/list/1", "split": "train", "source": "folder", "label": "cat",
         "image": str(table.parent / "mine/cat/a.png"), "sound": str(table.parent / "mine/cat/a.wav")},
        {"id": "folder/list/2", "split": "train", "source": "folder", "label": "dog",
         "sound": str(table.parent / "mine/dog/c.flac")},
    ]
    table.write_text("image,audio\nx.png,y.wav\n")
    with pytest.raises(ManifestError, match="expected image and/or sound"):
        index_layout("folder", table)


# ------------------------------------------------------------------------------------- pools


def pool_rows(folder: Path) -> list[dict]:
    """11 paired units (one merged from two halves), 3 unpaired sounds, 4 unpaired images,
    labelled train / test rows."""
    rows = [{"id": "p00", "split": "pretrain", "image": folder / "p00.png", "sound": folder / "p00.wav"},
            {"id": "half-image", "split": "pretrain", "pair_id": "c1", "image": folder / "c1.mp4",
             "image_time": 1.5, "label": "dog"},
            {"id": "s0", "split": "pretrain", "sound": folder / "s0.wav"}]
    rows += [{"id": f"p{k:02d}", "split": "pretrain", "image": folder / f"p{k:02d}.png",
              "sound": folder / f"p{k:02d}.wav"} for k in range(1, 5)]
    rows += [{"id": "half-sound", "split": "pretrain", "pair_id": "c1", "sound": folder / "c1.mp4",
              "sound_offset": 0.5, "sound_duration": 2.0, "label": "dog", "source": "kinetics"}]
    rows += [{"id": f"p{k:02d}", "split": "pretrain", "image": folder / f"p{k:02d}.png",
              "sound": folder / f"p{k:02d}.wav"} for k in range(5, 10)]
    rows += [{"id": f"s{k}", "split": "pretrain", "sound": folder / f"s{k}.wav"} for k in (1, 2)]
    rows += [{"id": f"i{k}", "split": "pretrain", "image": folder / f"i{k}.png"} for k in range(4)]
    rows += [{"id": "t0", "split": "train", "label": "dog", "sound": folder / "t0.wav"},
             {"id": "t1", "split": "train", "label": "cat", "image": folder / "t1.png"},
             {"id": "e0", "split": "test", "label": "cat", "image": folder / "e0.png", "sound": folder / "e0.wav"}]
    return rows


def test_pools(tmp_path: Path):
    m = round_trip(pool_rows(tmp_path), tmp_path / "manifest.csv")
    assert m.classes == ["cat", "dog"]
    pools = m.pools()
    assert tuple(pools) == POOLS
    all_paired = ["p00", "c1"] + [f"p{k:02d}" for k in range(1, 10)]
    assert [i.id for i in pools["paired"]] == all_paired  # the merged pair sits at its first half
    assert pools["paired"][1] == Item(id="c1", image=str(tmp_path / "c1.mp4"), image_time=1.5,
                                      sound=str(tmp_path / "c1.mp4"), sound_offset=0.5, sound_duration=2.0, label=1,
                                      source="")
    assert [i.id for i in pools["unpaired_sound"]] == ["s0", "s1", "s2"]
    assert [i.id for i in pools["unpaired_image"]] == ["i0", "i1", "i2", "i3"]
    assert [(i.id, i.label) for i in pools["train"] + pools["test"]] == [("t0", 1), ("t1", 0), ("e0", 0)]
    assert [i.id for i in m.items()] == all_paired[:2] + ["s0"] + all_paired[2:] + ["s1", "s2", "i0", "i1", "i2",
                                                                                      "i3", "t0", "t1", "e0"]

    half = [i.id for i in m.pools(paired_fraction=0.5, seed=0)["paired"]]
    assert len(half) == 6  # round(0.5 x 11) = 6 (half up)
    assert half == sorted(half, key=all_paired.index)  # manifest order kept
    assert half == [i.id for i in m.pools(paired_fraction=0.5, seed=0)["paired"]]
    assert half != [i.id for i in m.pools(paired_fraction=0.5, seed=1)["paired"]]
    assert len(m.pools(paired_fraction=0.01)["paired"]) == 1  # at least one
    few = m.pools(unpaired_sound_count=0, unpaired_image_count=2, seed=5)
    assert few["unpaired_sound"] == [] and len(few["unpaired_image"]) == 2
    assert [i.id for i in few["unpaired_image"]] == sorted(i.id for i in few["unpaired_image"])
    assert few["paired"] == pools["paired"] and few["train"] == pools["train"]
    # A multiple of all the manifest's pairs (11), before paired_fraction: 3/11 -> 3 sounds, 0 -> none.
    per_pair = m.pools(paired_fraction=0.5, unpaired_sound_per_pair=3 / 11, unpaired_image_per_pair=0, seed=2)
    assert len(per_pair["unpaired_sound"]) == 3 and per_pair["unpaired_image"] == []
    assert len(per_pair["paired"]) == 6
    for kwargs, message in [({"paired_fraction": 0.0}, "paired_fraction must be in"),
                            ({"unpaired_image_per_pair": 1}, "data.unpaired_image_per_pair=1 asks for 11 "
                                                             "unpaired_image items (1 x 11 pairs) but the manifest has 4"),
                            ({"paired_fraction": 1.5}, "paired_fraction must be in"),
                            ({"unpaired_image_count": 5}, "unpaired_image_count=5 but the manifest has 4"),
                            ({"unpaired_sound_count": -2}, "unpaired_sound_count must be an integer >= 0")]:
        with pytest.raises(ManifestError, match=re.escape(message)):
            m.pools(**kwargs)


def test_write_manifest(tmp_path: Path):
    path = tmp_path / "sub" / "m.csv"
    rows = [{"id": "a", "split": "pretrain", "sound": tmp_path / "sub" / "x" / "a.wav", "sound_offset": 0.25},
            {"id": "b", "split": "pretrain", "image": "/elsewhere/b.png"}]
    assert write_manifest(rows, path) == path
    assert path.read_text().splitlines()[1:] == ["a,pretrain,,,,,,x/a.wav,0.25,,",
                                                 "b,pretrain,,,,/elsewhere/b.png,,,,,"]
    write_manifest(rows[:1], path)  # replaces the file
    assert len(path.read_text().splitlines()) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.csv"]  # no temporary file left
    with pytest.raises(ManifestError, match="row 1: unknown columns lable"):
        write_manifest([{"id": "a", "split": "pretrain", "sound": "a.wav", "lable": "x"}], path)
    assert len(path.read_text().splitlines()) == 2  # a failed write leaves the old file


# ------------------------------------------------------------------------------------- validation

BASE = [
    {"id": "a", "split": "train", "label": "dog", "sound": "a.wav"},
    {"id": "b", "split": "test", "label": "dog", "sound": "b.wav"},
    {"id": "c", "split": "pretrain", "image": "c.png"},
]


def with_row(**cells) -> list[dict]:
    return [*BASE, {"id": "x", "split": "pretrain", "sound": "x.wav", **cells}]


@pytest.mark.parametrize(
    "rows, message",
    [
        (with_row(split="validation"), "row 4, column split: 'validation' is not a split (one of: pretrain,"),
        (with_row(id="a"), "row 4, column id: duplicate id 'a' (first at row 1)"),
        (with_row(id=""), "row 4, column id: empty id"),
        (with_row(sound=""), "row 4, column image: neither an image nor a sound"),
        (with_row(split="train"), "row 4, column label: empty label in the train split"),
        (with_row(sound_offset="abc"), "row 4, column sound_offset: 'abc' is not a number"),
        (with_row(sound_offset=-1.0), "row 4, column sound_offset: must be >= 0 seconds, got -1.0"),
        (with_row(sound_duration=0), "row 4, column sound_duration: must be > 0 seconds, got 0"),
        (with_row(image="v.mp4", image_time="nan"), "row 4, column image_time: 'nan' is not a finite number"),
        (with_row(fold="1.5"), "row 4, column fold: '1.5' is not an integer"),
        ([*BASE, {"id": "d", "split": "test", "label": "bird", "sound": "d.wav"},
          {"id": "e", "split": "transfer_train", "label": "rain", "sound": "e.wav"},
          {"id": "f", "split": "transfer_test", "label": "wind", "sound": "f.wav"}],
         "labels absent from a split: 1 labels of test are not in train: bird"),
        ([*BASE, {"id": "f", "split": "transfer_test", "label": "wind", "sound": "f.wav"}],
         "labels absent from a split: 1 labels of transfer_test are not in transfer_train: wind"),
        ([*BASE, *({"id": f"h{k}", "split": "pretrain", "pair_id": f"clip{k}", "image": f"h{k}.png"}
                   for k in range(7))],
         "7 pair ids without both halves (one image row and one sound row, or one row with both): "
         "clip0, clip1, clip2, clip3, clip4, ..."),
        ([*BASE, {"id": "h1", "split": "pretrain", "pair_id": "p", "image": "1.png"},
          {"id": "h2", "split": "pretrain", "pair_id": "p", "image": "2.png"}],
         "1 pair ids without both halves"),
        ([*BASE, {"id": "h1", "split": "pretrain", "pair_id": "p", "image": "1.png", "label": "dog"},
          {"id": "h2", "split": "pretrain", "pair_id": "p", "sound": "2.wav", "label": "cat"}],
         "rows 4 and 5, column label: the halves of pair 'p' disagree"),
        ([*BASE, {"id": "h1", "split": "pretrain", "pair_id": "a", "image": "1.png"},
          {"id": "h2", "split": "pretrain", "pair_id": "a", "sound": "2.wav"}],
         "row 1, column id: 'a' is also the pair_id of rows 4 and 5"),
    ],
)
def test_read_manifest_rejects(tmp_path: Path, rows: list[dict], message: str):
    path = write_manifest(rows, tmp_path / "m.csv")
    with pytest.raises(ManifestError, match=re.escape(f"{path}: {message}")):
        read_manifest(path)


def test_read_manifest_rejects_bad_files(tmp_path: Path):
    path = tmp_path / "m.csv"
    with pytest.raises(ManifestError, match=re.escape(f"{path}: manifest not found")):
        read_manifest(path)
    header = ",".join(COLUMNS)
    for text, message in [
        ("", "empty file"),
        (header + ",lable\n", "unknown columns lable (a manifest has exactly: id, split,"),
        (header.replace(",fold", "") + "\n", "header lacks columns fold"),
        (header + "\na,pretrain\n", "row 1: 2 cells, the header has 11"),
    ]:
        path.write_text(text)
        with pytest.raises(ManifestError, match=re.escape(f"{path}: {message}")):
            read_manifest(path)
    path.write_text(header + "\n" + ",".join(["a", "pretrain"] + [""] * 5 + ["a.wav", "", "", ""]) + "\n")
    m = read_manifest(path)
    assert m.items() == [Item(id="a", sound=str(tmp_path / "a.wav"))]
    assert len(m.content_hash) == 64 and m.content_hash != read_manifest(write_manifest(BASE, path)).content_hash


# ------------------------------------------------------------------------------------- checking


def broken_dataset(folder: Path) -> tuple[Path, dict[str, str]]:
    """A manifest of good and broken files, and the reason each bad item must get."""
    write_wav(folder / "good.wav")
    write_png(folder / "good.png")
    write_wav(folder / "high.wav", rate=16000)  # mixed rates, above the features' rate: fine
    (folder / "garbage.wav").write_bytes(b"RIFF\x00\x01garbage" * 40)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 10)
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    write_wav(folder / "short.wav", seconds=1.0)
    write_wav(folder / "silent.wav", data=np.zeros(int(2.5 * RATE), np.float32))
    nan = np.full(int(2.5 * RATE), 0.1, np.float32)
    nan[100] = np.nan
    write_wav(folder / "nan.wav", data=nan, subtype="FLOAT")
    write_wav(folder / "low.wav", rate=4000)
    items = {
        "good-sound": ("sound", "good.wav", ""), "good-image": ("image", "good.png", ""),
        "high": ("sound", "high.wav", ""),
        "missing": ("sound", "missing.wav", "missing file"),
        "garbage": ("sound", "garbage.wav", "unreadable audio"),
        "corrupt-image": ("image", "corrupt.png", "unreadable image"),
        "corrupt-video": ("both", "corrupt.mp4", "unreadable video"),
        "short": ("sound", "short.wav", "shorter than the 2.0 s window"),
        "silent": ("sound", "silent.wav", "silent clip"),
        "nan": ("sound", "nan.wav", "non-finite samples"),
        "low": ("sound", "low.wav", "sample rate 4000 Hz below the features' 8000 Hz"),
    }
    rows = []
    for item_id, (kind, file, _) in items.items():
        row = {"id": item_id, "split": "pretrain"}
        if kind in ("image", "both"):
            row["image"] = folder / file
        if kind in ("sound", "both"):
            row["sound"] = folder / file
        rows.append(row)
    return write_manifest(rows, folder / "manifest.csv"), {i: r for i, (_, _, r) in items.items() if r}


def test_check_manifest_reports_every_broken_file(tmp_path: Path):
    path, expected = broken_dataset(tmp_path)
    m = read_manifest(path)
    report = check_manifest(m, SETTINGS, skip_bad=True)
    assert report.total == 11
    assert [item_id for item_id, _, _ in report.bad] == list(expected)  # one entry each, manifest order
    for item_id, file, reason in report.bad:
        assert expected[item_id] in reason, (item_id, reason)
        assert Path(file).name == {"corrupt-video": "corrupt.mp4", "corrupt-image": "corrupt.png"}.get(
            item_id, f"{item_id}.wav")
    assert report.bad_ids == set(expected)
    assert report.sample_rates == {4000: 1, 8000: 4, 16000: 1}
    assert report.warnings == ["mixed sample rates (4 files at 8000 Hz, 1 at 16000 Hz, 1 at 4000 Hz); each is "
                               "resampled to 8000 Hz"]
    summary = report.summary()
    assert summary.splitlines()[0] == f"{path}: 11 items checked, 8 unusable"
    assert "mixed sample rates" in summary
    for item_id, reason in expected.items():
        assert re.search(rf"^  {item_id}: .*{re.escape(reason)}", summary, re.M), item_id

    message = (f"{path}: 8 of 11 items unusable; first: {tmp_path / 'missing.wav'}: missing file; "
               f"{tmp_path / 'garbage.wav'}: unreadable audio")
    with pytest.raises(DataError) as raised:
        check_manifest(m, SETTINGS)
    text = str(raised.value)
    assert text.startswith(message) and text.endswith("; ... (use --skip-bad to skip them)") and "\n" not in text
    with pytest.raises(DataError, match=re.escape(message)):
        report.raise_if_bad()

    # a sound window past the end of a good file is too short as well
    offset = read_manifest(write_manifest([{"id": "late", "split": "pretrain", "sound": tmp_path / "good.wav",
                                            "sound_offset": 1.0}], tmp_path / "late.csv"))
    [(_, _, reason)] = check_manifest(offset, SETTINGS, skip_bad=True).bad
    assert "shorter than the 2.0 s window" in reason


def test_check_manifest_in_processes_gives_the_same_report(tmp_path: Path):
    path, _ = broken_dataset(tmp_path)
    m = read_manifest(path)
    assert check_manifest(m, SETTINGS, skip_bad=True, workers=2) == check_manifest(m, SETTINGS, skip_bad=True)
