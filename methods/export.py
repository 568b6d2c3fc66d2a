"""Encoders as files a researcher can take away: ``encoders.safetensors`` (the image and sound
encoders' weights and buffers, no pickle) and ``encoders.json`` (what builds them again: each
encoder's architecture, its input channels and shape, the feature size, and the run's resolved
config).

    from methods.export import load_encoders
    enc = load_encoders("exported/bma-run")        # a folder `avlab export` wrote
    features = enc.image(images)                   # (B, 3, H, W) in [0, 1] -> (B, D)
    features = enc.sound(log_mels)                 # (B, 1, n_mels, n_frames) -> (B, D)

The features are the encoders' pooled outputs, the ``h`` that the downstream suite probes for
every method except where a method's ``embed`` reads its memory (BMA's ``f``, which is this
encoder output too): the ``f`` family of every method. Loading checks the file's format, every
field, and every tensor's name and shape as the weights file's header declares them against the
encoders that ``encoders.json`` declares (built on the meta device, which allocates nothing), so a
folder from elsewhere cannot make it allocate more than its weights file holds; it names the file
when something is wrong.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from methods.encoders import Encoder, EncoderConfig, build_encoder

WEIGHTS_FILE = "encoders.safetensors"
META_FILE = "encoders.json"
FORMAT = 1
META_MAX_BYTES = 1 << 20  # two encoder entries and a run's resolved config take a few kB
MODALITIES = {"image": "E_v", "sound": "E_s"}  # exported name -> the method's attribute


class ExportError(ValueError):
    """An exported-encoder folder that cannot be loaded; the message names the file."""


@dataclass
class Encoders:
    """The encoders of one run, in eval mode on CPU; ``meta`` is ``encoders.json``."""

    image: Encoder
    sound: Encoder
    meta: dict[str, Any]

    def to(self, device: torch.device | str) -> Encoders:
        self.image.to(device)
        self.sound.to(device)
        return self


def exportable(method: torch.nn.Module) -> bool:
    """Whether ``method`` has one image and one sound encoder to export (``E_v``, ``E_s``). Multi-SSL's
    ``concat`` combination has none: its h joins the features of one encoder pair per task."""
    return all(isinstance(getattr(method, attr, None), torch.nn.Module) for attr in MODALITIES.values())


def save_encoders(method: torch.nn.Module, folder: str | Path, *, config: dict[str, Any],
                  input_shapes: dict[str, list[int]], run_id: str | None = None) -> Path:
    """Write ``method``'s encoders (``E_v``, ``E_s``) into ``folder``; return the folder.
    ``config`` is the run's resolved config (``ExperimentConfig.to_dict``), ``input_shapes`` each
    encoder's input (C, H, W) without the batch."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, encoders = {}, {}
    for name, attr in MODALITIES.items():
        encoder = getattr(method, attr)
        for key, value in encoder.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous().clone()
        encoders[name] = {
            "config": dataclasses.asdict(encoder.cfg),
            "in_channels": int(input_shapes[name][0]),
            "input_shape": [int(v) for v in input_shapes[name]],
            "feature_dim": int(encoder.cfg.out_dim),
        }
    meta = {"format": FORMAT, "method": config.get("method", {}).get("name"), "run_id": run_id,
            "encoders": encoders, "config": config}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": str(FORMAT)})
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return folder


def _encoder_entry(meta: dict[str, Any], name: str, path: Path) -> tuple[EncoderConfig, int]:
    encoders = meta.get("encoders")
    entry = encoders.get(name) if isinstance(encoders, dict) else None
    if not isinstance(entry, dict):
        raise ExportError(f"{path}: encoders.{name}: missing")
    config = entry.get("config")
    if not isinstance(config, dict):
        raise ExportError(f"{path}: encoders.{name}.config: missing")
    for f in dataclasses.fields(EncoderConfig):  # the declared types: a float width builds nothing
        value = config.get(f.name, f.default)
        if isinstance(value, bool) or not isinstance(value, type(f.default)):
            raise ExportError(f"{path}: encoders.{name}.config.{f.name}: expected {type(f.default).__name__}, "
                              f"got {value!r}")
    channels = entry.get("in_channels")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ExportError(f"{path}: encoders.{name}.in_channels: must be a positive integer, got {channels!r}")
    try:
        cfg = EncoderConfig(**config)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{path}: encoders.{name}: {exc}") from None
    return cfg, channels


def _read_meta(path: Path) -> dict[str, Any]:
    """``encoders.json``, bounded in size and depth before anything is built from it."""
    try:
        size = path.stat().st_size
        if size > META_MAX_BYTES:
            raise ExportError(f"{path}: {size} bytes; an {META_FILE} holds two encoders and a run's config "
                              f"(at most {META_MAX_BYTES} bytes)")
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise ExportError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(f"{path}: format: expected {FORMAT}, got {found!r}")
    return meta


def _declared_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape as the safetensors header declares it; reads no tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{path}: not a safetensors file: {exc}") from None


def _meta_encoder(cfg: EncoderConfig, channels: int, name: str, path: Path) -> Encoder:
    """The declared encoder on the meta device: its state's names and shapes, no memory."""
    try:
        with torch.device("meta"):
            return build_encoder(cfg, in_channels=channels)
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: encoders.{name}: cannot be built: {first}") from None


def load_encoders(folder: str | Path, *, device: torch.device | str = "cpu") -> Encoders:
    """The encoders ``save_encoders`` wrote into ``folder``, in eval mode on ``device``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise ExportError(f"{path}: not found (a folder `avlab export` wrote holds {META_FILE} and {WEIGHTS_FILE})")
    meta = _read_meta(meta_path)
    shapes = _declared_shapes(weights_path)
    declared = {name: _encoder_entry(meta, name, meta_path) for name in MODALITIES}
    for name, (cfg, channels) in declared.items():
        own = {k: tuple(v.shape) for k, v in _meta_encoder(cfg, channels, name, meta_path).state_dict().items()}
        held = {k.removeprefix(f"{name}."): v for k, v in shapes.items() if k.startswith(f"{name}.")}
        missing, extra = sorted(set(own) - set(held)), sorted(set(held) - set(own))
        wrong = [k for k in own if k in held and held[k] != own[k]]
        if missing or extra or wrong:
            first = (f"missing {name}.{missing[0]}" if missing else f"unexpected {name}.{extra[0]}" if extra
                     else f"{name}.{wrong[0]} has shape {held[wrong[0]]}, the encoder {own[wrong[0]]}")
            raise ExportError(f"{weights_path}: does not match {META_FILE}: {first}")
    # The declaration matches the file: building the encoders takes what the file holds, no more.
    tensors = load_file(str(weights_path))
    built = {}
    for name, (cfg, channels) in declared.items():
        encoder = build_encoder(cfg, in_channels=channels)
        state = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        encoder.load_state_dict(state, strict=True)
        built[name] = encoder.eval().to(device)
    return Encoders(image=built["image"], sound=built["sound"], meta=meta)


class EncoderFeatures(torch.nn.Module):
    """Exported encoders as a method for the downstream suite: ``embed`` gives their pooled
    outputs, the ``f`` family (``f_v``, ``f_s``) that every method's ``embed`` computes with the
    same encoders. A method's ``h`` and ``z`` may read more than its encoders (a memory, a
    projection), which are not exported: they are absent here."""

    def __init__(self, encoders: Encoders) -> None:
        super().__init__()
        self.E_v, self.E_s = encoders.image, encoders.sound

    @torch.no_grad()
    def embed(self, *, images: torch.Tensor | None = None,
              sounds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["f_v"] = self.E_v(images)
        if sounds is not None:
            out["f_s"] = self.E_s(sounds)
        return out
