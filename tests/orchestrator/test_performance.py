"""The speed settings keep the numbers: bf16 autocast and NHWC layout train the same model, and
the cost a run logs (training time, throughput) is computed from its own epoch history."""

import pytest
import torch
from mlflow.tracking import MlflowClient

from methods.data import ProceduralAV
from methods.registry import build_method
from orchestrator import tracking
from orchestrator.config import resolve
from orchestrator.loaders import to_device
from orchestrator.tracking import training_cost


def tiny_bma_and_batch(b: int = 16):
    cfg = resolve({}, preset="tiny", overrides=["method.memory_size=64"])
    torch.manual_seed(0)
    method = build_method("bma", cfg.method, ProceduralAV(cfg.data).info())
    d = cfg.data
    g = torch.Generator().manual_seed(1)
    batch = {k: torch.rand(b, 3, d.image_size, d.image_size, generator=g) for k in ("image", "uimage", "uimage_aug")}
    batch |= {k: torch.randn(b, 1, d.n_mels, d.n_frames, generator=g) for k in ("sound", "usound", "usound_aug")}
    batch["index"] = torch.arange(b)
    return method, batch


def loss_and_grads(method, batch):
    method.zero_grad(set_to_none=True)
    loss = method(batch).metrics["loss"]
    loss.backward()
    return loss.detach().float(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def test_channels_last_moves_4d_batches_to_nhwc_and_trains_the_same_model():
    method, batch = tiny_bma_and_batch()
    method.train()
    ref_loss, ref_grads = loss_and_grads(method, batch)
    moved = to_device(batch, torch.device("cpu"), channels_last=True)
    assert moved["image"].is_contiguous(memory_format=torch.channels_last)
    assert not moved["image"].is_contiguous()  # really NHWC, not a no-op
    assert torch.equal(moved["image"], batch["image"]) and torch.equal(moved["index"], batch["index"])
    method = method.to(memory_format=torch.channels_last)
    loss, grads = loss_and_grads(method, moved)
    assert loss == pytest.approx(float(ref_loss), rel=1e-5)
    for name, g in ref_grads.items():  # another convolution algorithm: equal up to rounding
        assert float((grads[name] - g).norm() / g.norm()) < 1e-3, name


def test_bf16_autocast_step_is_close_to_fp32():
    method, batch = tiny_bma_and_batch()
    method.train()
    ref_loss, ref_grads = loss_and_grads(method, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(batch).metrics
    method.zero_grad(set_to_none=True)
    out["loss"].backward()
    assert float(out["loss"].detach()) == pytest.approx(float(ref_loss), rel=0.03)
    for name, p in method.named_parameters():
        if p.grad is not None:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    # bf16 changes the arithmetic: the gradient points the same way, not exactly. The heads' large
    # gradients agree closely; BatchNorm's small, cancelling sums are the least precise.
    def cosine(names):
        a = torch.cat([dict(method.named_parameters())[n].grad.flatten() for n in names])
        b = torch.cat([ref_grads[n].flatten() for n in names])
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    assert 0.8 < cosine(list(ref_grads)) < 1.0
    assert cosine([n for n in ref_grads if n.startswith("head_")]) > 0.99


def test_training_cost_is_the_run_history_weighted_by_epoch_time(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = tracking.create_run(tracking_uri=uri, home=tmp_path, experiment="t", run_name="r", params={},
                                 tags={}, config_yaml="")
    # Two epochs (the second logged by a restarted worker): 10 s at 100 pairs/s, 30 s at 200 pairs/s.
    tracking.log_metrics(client, run_id, {"epoch_time_s": 10.0, "pairs_per_s": 100.0}, step=0)
    tracking.log_metrics(client, run_id, {"epoch_time_s": 30.0, "pairs_per_s": 200.0}, step=1)
    cost = training_cost(client, run_id)
    assert cost["train_time_s"] == pytest.approx(40.0)
    assert cost["train_pairs_per_s"] == pytest.approx((1000 + 6000) / 40)
