"""BMA-Memory method: shapes, both unpaired paths, representations, config validation."""

import pytest
import torch

from methods.base import DataInfo
from methods.bma import BMAConfig, BMAMemory
from methods.encoders import EncoderConfig, build_encoder

TINY = dict(image_encoder=EncoderConfig("resnet18", 8), sound_encoder=EncoderConfig("resnet10", 8))


def make_batch(b=6, unpaired=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.rand(b, 3, 32, 32, generator=g), "sound": torch.randn(b, 1, 40, 64, generator=g)}
    if unpaired:
        batch.update(
            usound=torch.randn(b, 1, 40, 64, generator=g), usound_aug=torch.randn(b, 1, 40, 64, generator=g),
            uimage=torch.rand(b, 3, 32, 32, generator=g), uimage_aug=torch.rand(b, 3, 32, 32, generator=g),
        )
    return batch


def test_encoders_have_paper_shapes():
    r18 = build_encoder(EncoderConfig("resnet18", 64), in_channels=3)
    r10 = build_encoder(EncoderConfig("resnet10", 64), in_channels=1)
    assert [len(s) for s in r18.stages] == [2, 2, 2, 2] and [len(s) for s in r10.stages] == [1, 1, 1, 1]
    assert r10.stem[0].in_channels == 1 and r18.stem[0].kernel_size == (7, 7)
    assert r18(torch.rand(2, 3, 64, 64)).shape == (2, 512)
    blocks = r10.forward_blocks(torch.randn(2, 1, 64, 80))
    assert [blocks[f"block{i}"].shape[1] for i in range(1, 5)] == [64, 128, 256, 512]
    # ResNet-18 at width 64 is torchvision's resnet18 trunk: same parameter count without the fc.
    import torchvision

    tv = torchvision.models.resnet18()
    n_tv = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in r18.parameters()) == n_tv


def test_training_step_terms_and_gradients():
    torch.manual_seed(0)
    m = BMAMemory(BMAConfig(**TINY, memory_size=20, unpaired_weight=0.5), DataInfo())
    out = m(make_batch()).metrics
    diagnostics = {"mem_read_ratio_v", "mem_read_ratio_s", "mem_slots_v", "mem_slots_s"}
    assert set(out) == {"loss", "loss_pair", "loss_unpair", "loss_unpair_sound", "loss_unpair_image", *diagnostics}
    assert not any(out[k].requires_grad for k in diagnostics)
    expected = out["loss_pair"] + 0.5 * (out["loss_unpair_sound"] + out["loss_unpair_image"])
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name


def test_paired_only_and_unpaired_only():
    m = BMAMemory(BMAConfig(**TINY, memory_size=20), DataInfo())
    assert {k for k in m(make_batch(unpaired=False)).metrics if k.startswith("loss")} == {"loss", "loss_pair"}
    m2 = BMAMemory(BMAConfig(**TINY, memory_size=20, paired_loss=False), DataInfo())
    b = make_batch()
    out = m2({k: v for k, v in b.items() if k.startswith("u")}).metrics
    assert "loss_pair" not in out and torch.allclose(out["loss"], out["loss_unpair"])


def test_unpaired_sound_cyclic_path_reads_only_memories_for_view_one():
    # h^{v,s} = [f^{v,mem} ; f^{s,mem}] is made of memory reads only: with the memories' value
    # slots set to one shared vector, z^{v,s} is the same for every unpaired sound.
    m = BMAMemory(BMAConfig(**TINY, memory_size=5), DataInfo()).eval()
    with torch.no_grad():
        m.memory.M_v.copy_(torch.ones_like(m.memory.M_v))
        m.memory.M_s.copy_(torch.ones_like(m.memory.M_s))
    b = make_batch()
    z_vs, z_sv = m.unpaired_sound_projections(b["usound"], b["usound_aug"])
    assert torch.allclose(z_vs, z_vs[:1].expand_as(z_vs), atol=1e-6)
    assert not torch.allclose(z_sv, z_sv[:1].expand_as(z_sv), atol=1e-3)


def test_embed_representations():
    m = BMAMemory(BMAConfig(**TINY, memory_size=20), DataInfo()).eval()
    b = make_batch(unpaired=False)
    e = m.embed(images=b["image"], sounds=b["sound"])
    c = m.E_v.out_dim
    assert e["h_v"].shape == (6, 2 * c) and e["z_s"].shape == (6, 128)
    assert torch.equal(e["h_v"][:, :c], e["f_v"]) and torch.equal(e["h_s"][:, c:], e["f_s"])
    assert torch.allclose(e["h_v"][:, c:], m.memory.image_to_sound(e["f_v"]))
    assert torch.allclose(e["h_s"][:, :c], m.memory.sound_to_image(e["f_s"]))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(memory_size=0), "memory_size"),
        (dict(memory_temperature=0.0), "memory_temperature"),
        (dict(loss_temperature=-1.0), "loss_temperature"),
        (dict(unpaired_weight=-0.1), "unpaired_weight"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        BMAConfig(**TINY, **kwargs)


def test_linear_probe_leaves_bma_weights_unchanged():
    # MoCo's sanity check: downstream evaluation reads frozen features, the backbone, memories
    # and BatchNorm statistics do not move, and the training mode comes back as it was.
    from methods.evaluate import EvalConfig, run_downstream

    torch.manual_seed(0)
    m = BMAMemory(BMAConfig(**TINY, memory_size=20), DataInfo()).train()
    g = torch.Generator().manual_seed(3)
    items = [
        {"image": torch.rand(3, 32, 32, generator=g), "sound": torch.randn(1, 40, 64, generator=g),
         "label": torch.tensor(i % 4), "index": torch.tensor(i)}
        for i in range(40)
    ]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    result = run_downstream(m, train_set=items[:24], test_set=items[24:], cfg=EvalConfig(batch_size=8))
    assert "image_h_linear_acc" in result.metrics and "retrieval_s2i_rank1" in result.metrics
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_memory_diagnostics_against_a_loop():
    """mem_read_ratio_* = mean |read-out| / |f|, mem_slots_* = mean exp(entropy of w), computed
    here slot by slot from eq. 1-3."""
    torch.manual_seed(1)
    m = BMAMemory(BMAConfig(**TINY, memory_size=7, memory_temperature=0.5, memory_init_norm=3.0), DataInfo())
    assert torch.allclose(m.memory.M_v.norm(dim=1).mean(), torch.tensor(3.0), rtol=0.3)
    f_v, f_s = torch.randn(5, 64), torch.randn(5, 64)
    out = m.memory_diagnostics(f_v, f_s)
    for tag, f, key, value in (("v", f_v, m.memory.M_v, m.memory.M_s), ("s", f_s, m.memory.M_s, m.memory.M_v)):
        ratios, slots = [], []
        for b in range(5):
            cos = [torch.dot(f[b], key[r]) / (f[b].norm() * key[r].norm()) for r in range(7)]
            w = torch.softmax(torch.stack(cos) / 0.5, 0)
            read = sum(w[r] * value[r] for r in range(7))
            ratios.append(read.norm() / f[b].norm())
            slots.append(torch.exp(-(w * w.log()).sum()))
        assert torch.allclose(out[f"mem_read_ratio_{tag}"], torch.stack(ratios).mean(), rtol=1e-5)
        assert torch.allclose(out[f"mem_slots_{tag}"], torch.stack(slots).mean(), rtol=1e-5)
        assert 1 <= out[f"mem_slots_{tag}"] <= 7
    with pytest.raises(ValueError, match="memory_init_norm"):
        BMAConfig(**TINY, memory_init_norm=0.0)
