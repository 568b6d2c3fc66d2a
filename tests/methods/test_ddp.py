"""Under 2 DDP workers (gloo) the loss and gradients equal those of 1 worker on the global batch.

Negatives come from the global batch (projections gathered with gradients) and BatchNorm is
synchronised, so the number of workers does not change what is optimised (docs/spec.md §2).
"""

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from methods.distributed import convert_global_batchnorm

from methods.base import DataInfo
from methods.bma import BMAConfig, BMAMemory
from methods.encoders import EncoderConfig

CFG = BMAConfig(
    image_encoder=EncoderConfig("resnet18", 8), sound_encoder=EncoderConfig("resnet10", 8), memory_size=16
)
B = 8  # global batch


def global_batch():
    g = torch.Generator().manual_seed(123)
    return {
        "image": torch.rand(B, 3, 32, 32, generator=g), "sound": torch.randn(B, 1, 40, 64, generator=g),
        "usound": torch.randn(B, 1, 40, 64, generator=g), "usound_aug": torch.randn(B, 1, 40, 64, generator=g),
        "uimage": torch.rand(B, 3, 32, 32, generator=g), "uimage_aug": torch.rand(B, 3, 32, 32, generator=g),
    }


def make_model():
    torch.manual_seed(7)
    return BMAMemory(CFG, DataInfo()).double()


def _worker(rank, world):
    model = convert_global_batchnorm(make_model())
    ddp = DDP(model, find_unused_parameters=True)
    shard = {k: v[rank * B // world : (rank + 1) * B // world].double() for k, v in global_batch().items()}
    out = ddp(shard).metrics
    out["loss"].backward()
    return {"loss": {k: v.detach() for k, v in out.items()},
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def test_two_workers_equal_one_worker_on_the_global_batch(ddp):
    model = make_model()
    out = model({k: v.double() for k, v in global_batch().items()}).metrics
    out["loss"].backward()
    ref_grads = {n: p.grad for n, p in model.named_parameters()}

    rank0 = ddp(_worker)[0]
    for k, v in out.items():
        if k.startswith("loss"):  # the mem_* diagnostics are per-worker means, averaged when logged
            assert torch.allclose(rank0["loss"][k], v.detach(), rtol=1e-9, atol=1e-10), k
    assert rank0["grads"].keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert torch.allclose(rank0["grads"][name], g, rtol=1e-7, atol=1e-10), name
