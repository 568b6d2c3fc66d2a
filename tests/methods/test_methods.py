"""Every registered method, built from its tiny preset exactly as a run builds it, trains on real
procedural batches (paired and unpaired pools) and yields the features evaluation reads."""

import pytest
import torch
from torch.utils.data import DataLoader

from methods.data import build_dataset
from methods.registry import METHODS, build_method
from orchestrator.config import resolve
from orchestrator.loaders import DeviceAugment, build_pretraining_data


@pytest.mark.parametrize("name, overrides", [
    *[(n, []) for n in METHODS],
    ("avid", ["method.variant=joint"]),
    ("avid", ["method.cma=true", "method.cma_start_epoch=0", "method.cma_rule=either"]),
    ("multissl", ["method.combination=incremental"]),
])
def test_every_method_trains_from_its_tiny_preset(name, overrides):
    torch.manual_seed(0)
    # The preset's own sizes: items are made as the loaders ask for them (two batches here).
    cfg = resolve({}, preset="tiny", overrides=[f"method.name={name}", *overrides])
    data = build_dataset(cfg.data)
    method = build_method(name, cfg.method, data.info())
    pools = build_pretraining_data(cfg, method)
    augment = DeviceAugment(cfg)
    loaders = {k: iter(DataLoader(p, batch_size=16, shuffle=True)) for k, p in pools.items()}
    opt = torch.optim.Adam(method.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    logged = set()
    for _ in range(2):
        batch = augment.paired_batch(next(loaders["main"]), 0)
        for key in ("usound", "uimage"):
            if key in loaders:
                batch.update(augment.unpaired_views(key, next(loaders[key]), 0))
        out = method(batch)
        assert torch.isfinite(out.metrics["loss"]) and out.metrics["loss"].requires_grad
        assert all(v.dim() == 0 for v in out.metrics.values())  # loss terms are scalars
        logged |= set(out.metrics)
        opt.zero_grad()
        out.metrics["loss"].backward()
        opt.step()
        method.after_step(batch, out)
    diagnostics = method.on_epoch_end(0) or {}
    logged |= set(diagnostics)
    # Every metric a step or an epoch's end logs is declared, so a search space may optimise it.
    declared = METHODS[name].method_cls.training_metrics(cfg.method)
    assert "loss" in logged and logged <= set(declared), logged - set(declared)
    if "method.cma=true" in overrides:  # the procedural pool's labels reach the positive sets' precision
        assert 0.0 <= diagnostics["cma_positive_precision"] <= 1.0
    changed = [k for k, v in method.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("E_v.") for k in changed) and any(k.startswith("E_s.") for k in changed)
    test = next(iter(DataLoader(data.pool("test"), batch_size=8)))
    method.eval()
    feats = method.embed(images=test["image"], sounds=test["sound"])
    for key in ("h_v", "z_v", "h_s", "z_s"):
        assert feats[key].shape[0] == 8 and torch.isfinite(feats[key]).all(), key
