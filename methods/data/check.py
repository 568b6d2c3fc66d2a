"""``avlab data check``: decode every item of a manifest once, as training will, and list the
broken files, so a run fails before training (or skips them) instead of in the middle of an epoch."""

from __future__ import annotations

import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

from methods.data.decode import DataError, FeatureSettings, is_video, load_image, load_sound
from methods.data.manifest import Item, Manifest


@dataclass
class CheckReport:
    """What ``check_manifest`` found: ``bad`` lists (item id, file, reason) for each problem, in
    manifest order; ``sample_rates`` maps each native rate to its number of sound files."""

    manifest: str
    total: int
    bad: list[tuple[str, str, str]]
    sample_rates: dict[int, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def bad_ids(self) -> set[str]:
        """The items to skip."""
        return {item_id for item_id, _, _ in self.bad}

    def summary(self) -> str:
        lines = [f"{self.manifest}: {self.total} items checked, {len(self.bad_ids)} unusable"]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  {item_id}: {file}: {reason}" for item_id, file, reason in self.bad]
        return "\n".join(lines)

    def raise_if_bad(self) -> None:
        """One-line DataError naming the count and the first few problems, if any."""
        if not self.bad:
            return
        first = "; ".join(f"{file}: {reason}" for _, file, reason in self.bad[:3])
        more = "; ..." if len(self.bad) > 3 else ""
        raise DataError(f"{self.manifest}: {len(self.bad_ids)} of {self.total} items unusable; first: {first}{more} "
                        f"(use --skip-bad to skip them)")


def check_manifest(
    manifest: Manifest, settings: FeatureSettings, *, skip_bad: bool = False, workers: int = 1
) -> CheckReport:
    """Decode every item as training will (``decode.load_sound`` from the item's offset and
    duration, ``decode.load_image`` at its image_time) and collect what fails: missing files,
    unreadable audio, images or videos, clips shorter than the window, silent or non-finite audio.

    Sample rates: every sound is resampled to ``settings.sample_rate``, so mixed native rates
    only earn a warning ("mixed sample rates (N files at X Hz, M at Y Hz)") -- except a file
    whose native rate is below ``settings.sample_rate``: upsampling it would leave the top of its
    spectrum empty, a cue that tells those files apart, so it is a bad item (lower
    ``sample_rate`` to keep it).

    Raises DataError (``CheckReport.raise_if_bad``) unless ``skip_bad``; with ``skip_bad`` the
    caller skips ``report.bad_ids``. ``workers`` > 1 decodes in that many processes; the report
    is the same.
    """
    items = manifest.items()
    if workers > 1 and len(items) > 1:
        # spawn, not fork: a forked child of a process whose torch thread pool has started can hang
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_single_threaded) as pool:
            chunk = max(1, len(items) // (workers * 8))
            results = list(pool.map(_check_item, items, repeat(settings), chunksize=chunk))
    else:
        results = [_check_item(item, settings) for item in items]
    rate_of: dict[str, int] = {}
    for _, rates in results:
        rate_of.update(rates)
    counts = Counter(rate_of.values())
    warnings = []
    if len(counts) > 1:
        parts = [f"{n} files at {rate} Hz" if i == 0 else f"{n} at {rate} Hz"
                 for i, (rate, n) in enumerate(counts.most_common())]
        warnings.append(f"mixed sample rates ({', '.join(parts)}); each is resampled to {settings.sample_rate} Hz")
    bad: list[tuple[str, str, str]] = []
    for item, (problems, rates) in zip(items, results):
        bad += [(item.id, file, reason) for file, reason in problems]
        failed = {file for file, _ in problems}
        for file, rate in rates:
            if rate < settings.sample_rate and file not in failed:
                bad.append((item.id, file, f"sample rate {rate} Hz below the features' {settings.sample_rate} Hz "
                                           f"(upsampling would invent the top band; lower sample_rate or drop it)"))
    report = CheckReport(manifest=str(manifest.path), total=len(items), bad=bad,
                         sample_rates=dict(sorted(counts.items())), warnings=warnings)
    if not skip_bad:
        report.raise_if_bad()
    return report


def _single_threaded() -> None:
    import torch

    torch.set_num_threads(1)  # one decoding process per core


def _check_item(item: Item, settings: FeatureSettings) -> tuple[list[tuple[str, str]], list[tuple[str, int]]]:
    """(file, reason) problems of one item, and (file, native rate) of its sound."""
    problems: list[tuple[str, str]] = []
    rates: list[tuple[str, int]] = []
    if item.sound is not None:
        try:
            load_sound(item.sound, settings, offset=item.sound_offset, duration=item.sound_duration)
        except Exception as exc:  # noqa: BLE001 -- one broken file must not stop the check
            problems.append((item.sound, _reason(exc, item.sound)))
        rate = _native_rate(item.sound)
        if rate is not None:
            rates.append((item.sound, rate))
    if item.image is not None:
        try:
            load_image(item.image, settings, time=item.image_time)
        except Exception as exc:  # noqa: BLE001
            problems.append((item.image, _reason(exc, item.image)))
    return list(dict.fromkeys(problems)), rates  # a video that is both image and sound fails once


def _reason(exc: Exception, file: str) -> str:
    message = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
    message = message.removeprefix(f"{Path(file)}: ")
    return " ".join(message.split())  # one line


def _native_rate(file: str) -> int | None:
    """The file's own sample rate, or None when it cannot be read (the decode error says why)."""
    try:
        if is_video(file):
            import av

            with av.open(file) as container:
                return int(container.streams.audio[0].sample_rate) if container.streams.audio else None
        import soundfile as sf

        return int(sf.info(file).samplerate)
    except Exception:  # noqa: BLE001
        return None
