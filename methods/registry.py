"""The one place that lists the pretraining methods: name -> (config dataclass, method class,
presets). A new method is its module and one line here (docs/adding-a-method.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from methods import avid, bma, l3, multissl, supervised
from methods.base import DataInfo, Method

# avlab's presets: tiny (tests, minutes on two CPU cores), small (two CPU cores, the methods
# learn), paper (the papers' sizes). Every method gives its values for each.
PRESET_NAMES = ("tiny", "small", "paper")
# The sections a method's preset may set: its own, and what it needs of the others.
PRESET_SECTIONS = ("method", "data", "train", "optim", "eval")


class MethodEntry(NamedTuple):
    config_cls: type
    method_cls: type[Method]
    # preset name -> {section: settings}: the method's own section and what it changes in the
    # data, train, optim and eval sections under that preset.
    presets: Mapping[str, Mapping[str, Mapping[str, Any]]]


def _entry(config_cls: type, method_cls: type[Method], presets: Mapping[str, Mapping[str, Any]]) -> MethodEntry:
    """A registry line, checked when the registry loads: a method without its presets would
    otherwise train the paper's encoders under --preset tiny."""
    name = method_cls.name
    if set(presets) != set(PRESET_NAMES):
        raise TypeError(f"{name}: PRESETS must give exactly the presets {list(PRESET_NAMES)}, got {sorted(presets)}")
    for preset, sections in presets.items():
        unknown = set(sections) - set(PRESET_SECTIONS)
        if unknown or not isinstance(sections.get("method", {}), Mapping):
            raise TypeError(f"{name}: PRESETS[{preset!r}]: sections must be among {list(PRESET_SECTIONS)}, got {sorted(sections)}")
    return MethodEntry(config_cls, method_cls, presets)


METHODS: dict[str, MethodEntry] = {
    "bma": _entry(bma.BMAConfig, bma.BMAMemory, bma.PRESETS),
    "supervised": _entry(supervised.SupervisedConfig, supervised.Supervised, supervised.PRESETS),
    "l3": _entry(l3.L3Config, l3.L3, l3.PRESETS),
    "avid": _entry(avid.AVIDConfig, avid.AVID, avid.PRESETS),
    "multissl": _entry(multissl.MultiSSLConfig, multissl.MultiSSL, multissl.PRESETS),
}


def build_method(name: str, cfg: Any, data_info: DataInfo) -> Method:
    if name not in METHODS:
        raise ValueError(f"method.name: unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name].method_cls(cfg, data_info)
