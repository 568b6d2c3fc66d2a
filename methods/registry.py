"""The one place that lists the pretraining methods: name -> (config dataclass, method class)."""

from __future__ import annotations

from typing import Any, NamedTuple

from methods.avid import AVID, AVIDConfig
from methods.base import DataInfo, Method
from methods.bma import BMAConfig, BMAMemory
from methods.l3 import L3, L3Config
from methods.multissl import MultiSSL, MultiSSLConfig
from methods.supervised import Supervised, SupervisedConfig


class MethodEntry(NamedTuple):
    config_cls: type
    method_cls: type[Method]


METHODS: dict[str, MethodEntry] = {
    "bma": MethodEntry(BMAConfig, BMAMemory),
    "supervised": MethodEntry(SupervisedConfig, Supervised),
    "l3": MethodEntry(L3Config, L3),
    "avid": MethodEntry(AVIDConfig, AVID),
    "multissl": MethodEntry(MultiSSLConfig, MultiSSL),
}


def build_method(name: str, cfg: Any, data_info: DataInfo) -> Method:
    if name not in METHODS:
        raise ValueError(f"method.name: unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name].method_cls(cfg, data_info)
