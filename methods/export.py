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
encoder output too). Loading checks the file's format, every field and every tensor's name and
shape, and names the file when something is wrong.
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
    entry = meta.get("encoders", {}).get(name)
    if not isinstance(entry, dict):
        raise ExportError(f"{path}: encoders.{name}: missing")
    try:
        cfg = EncoderConfig(**entry["config"])
        channels = int(entry["in_channels"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{path}: encoders.{name}: {exc}") from None
    if channels < 1:
        raise ExportError(f"{path}: encoders.{name}.in_channels: must be positive, got {channels}")
    return cfg, channels


def load_encoders(folder: str | Path, *, device: torch.device | str = "cpu") -> Encoders:
    """The encoders ``save_encoders`` wrote into ``folder``, in eval mode on ``device``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise ExportError(f"{path}: not found (a folder `avlab export` wrote holds {META_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{meta_path}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(f"{meta_path}: format: expected {FORMAT}, got {found!r}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{weights_path}: not a safetensors file: {exc}") from None
    built = {}
    for name in MODALITIES:
        cfg, channels = _encoder_entry(meta, name, meta_path)
        encoder = build_encoder(cfg, in_channels=channels)
        own = encoder.state_dict()
        state = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or extra or wrong:
            first = (f"missing {name}.{missing[0]}" if missing else f"unexpected {name}.{extra[0]}" if extra
                     else f"{name}.{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the encoder "
                          f"{tuple(own[wrong[0]].shape)}")
            raise ExportError(f"{weights_path}: does not match {META_FILE}: {first}")
        encoder.load_state_dict(state, strict=True)
        built[name] = encoder.eval().to(device)
    return Encoders(image=built["image"], sound=built["sound"], meta=meta)
