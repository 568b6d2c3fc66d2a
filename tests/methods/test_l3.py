"""L3 audio-visual correspondence: VGG encoder, balanced pairs, loss, training, embeddings."""

import math

import pytest
import torch
from torch import nn

from methods.base import DataInfo
from methods.encoders import EncoderConfig, VGGEncoder, build_encoder
from methods.l3 import L3, L3Config, correspondence_loss, correspondence_pairs, derangement

TINY = dict(image_encoder=EncoderConfig("vgg", 8), sound_encoder=EncoderConfig("vgg", 8))


def make_batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(b, 3, 32, 32, generator=g),
        "sound": torch.randn(b, 1, 40, 64, generator=g),
        "index": torch.randperm(1000, generator=g)[:b],
    }


# --- VGG encoder --------------------------------------------------------------------------------


def test_vgg_width_64_has_the_paper_channel_plan_and_output():
    cfg = EncoderConfig(arch="vgg", base_width=64)
    assert cfg.out_dim == 512
    enc = build_encoder(cfg, in_channels=3)
    assert isinstance(enc, VGGEncoder) and enc.out_dim == 512
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    plan = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]
    assert [(c.in_channels, c.out_channels) for c in convs] == plan
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs)
    # Every stage: conv-BN-ReLU, conv-BN-ReLU, 2x2/2 max-pool.
    for stage in enc.stages:
        kinds = [type(m) for m in stage]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2 + [nn.MaxPool2d]
        assert stage[-1].kernel_size == 2 and stage[-1].stride == 2
    n_params = sum(p.numel() for p in enc.parameters())
    assert n_params == sum(9 * c_in * c_out + 2 * c_out for c_in, c_out in plan)  # convs + BN affine

    x = torch.rand(2, 3, 32, 32)
    assert enc(x).shape == (2, 512)
    # 224x224 -> 14x14 before the global pool, as in L3-Net.
    h = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        enc.eval()
        for stage in enc.stages:
            h = stage(h)
    assert h.shape == (1, 512, 14, 14)


def test_vgg_blocks_and_sound_input():
    enc = build_encoder(EncoderConfig("vgg", 8), in_channels=1).eval()
    x = torch.randn(3, 1, 40, 64)
    with torch.no_grad():
        blocks = enc.forward_blocks(x)
        f = enc(x)
    assert list(blocks) == ["block1", "block2", "block3", "block4"]
    # Each 2x2 max-pool halves mel bins and frames: 40x64 -> 20x32 -> 10x16 -> 5x8 -> 2x4.
    shapes = [tuple(blocks[f"block{i}"].shape) for i in range(1, 5)]
    assert shapes == [(3, 8, 20, 32), (3, 16, 10, 16), (3, 32, 5, 8), (3, 64, 2, 4)]
    # The global pool is a max over the last stage's map.
    assert f.shape == (3, 64) and torch.equal(f, blocks["block4"].amax(dim=(2, 3)))


def test_encoder_config_validation():
    assert EncoderConfig("vgg", 16).out_dim == 128
    with pytest.raises(ValueError, match="arch"):
        EncoderConfig("vgg16", 64)
    with pytest.raises(ValueError, match="base_width"):
        EncoderConfig("vgg", 0)


# --- pairs and loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("b", [2, 3, 7, 8, 33])
def test_pairs_are_balanced_and_never_self(b):
    torch.manual_seed(b)
    sound_idx, y = correspondence_pairs(b, negative_fraction=0.5)
    # Explicit loop over the batch: the first ceil(B/2) keep their own sound.
    n_pos = math.ceil(b / 2)
    negatives = []
    for i in range(b):
        if i < n_pos:
            assert y[i] == 1 and sound_idx[i] == i
        else:
            assert y[i] == 0 and sound_idx[i] != i
            negatives.append(int(sound_idx[i]))
    assert len(negatives) == b // 2 and int((y == 0).sum()) == b // 2
    assert len(set(negatives)) == len(negatives)  # drawn from a permutation: no sound twice
    assert all(0 <= j < b for j in negatives)


def test_pairs_follow_the_global_rng():
    torch.manual_seed(3)
    a = correspondence_pairs(16, negative_fraction=0.5)
    torch.manual_seed(3)
    b = correspondence_pairs(16, negative_fraction=0.5)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    draws = {tuple(correspondence_pairs(16, negative_fraction=0.5)[0].tolist()) for _ in range(20)}
    assert len(draws) > 1


def test_derangement_has_no_fixed_points():
    torch.manual_seed(0)
    for n in (2, 3, 5, 64):
        for _ in range(20):
            pi = derangement(n)
            assert sorted(pi.tolist()) == list(range(n))
            assert not (pi == torch.arange(n)).any()
    with pytest.raises(ValueError):
        derangement(1)


def test_other_negative_fractions_and_batch_of_one():
    sound_idx, y = correspondence_pairs(10, negative_fraction=0.3)
    assert y.tolist() == [1] * 7 + [0] * 3 and (sound_idx[7:] != torch.arange(7, 10)).all()
    sound_idx, y = correspondence_pairs(1, negative_fraction=0.5)
    assert y.tolist() == [1] and sound_idx.tolist() == [0]


def test_negatives_pair_different_clips_by_index():
    m = L3(L3Config(**TINY), DataInfo())
    batch = make_batch()
    torch.manual_seed(5)
    sound_idx, y = correspondence_pairs(8, negative_fraction=0.5)
    clip_v, clip_s = batch["index"], batch["index"][sound_idx]
    assert torch.equal((clip_v == clip_s).long(), y)
    assert m.name == "l3"


def test_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    m = L3(L3Config(**TINY), DataInfo()).eval()  # eval: per-sample features, batch-independent
    with torch.no_grad():
        for p in m.fusion.parameters():
            p.copy_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape))
    batch = make_batch()
    torch.manual_seed(11)
    out = m.training_step(batch).metrics
    torch.manual_seed(11)
    sound_idx, y = correspondence_pairs(8, negative_fraction=0.5)

    W1, b1 = m.fusion[0].weight.detach(), m.fusion[0].bias.detach()
    W2, b2 = m.fusion[2].weight.detach(), m.fusion[2].bias.detach()
    total, correct = 0.0, 0
    with torch.no_grad():
        for i in range(8):
            j = int(sound_idx[i])
            f_v = m.E_v(batch["image"][i : i + 1])[0]
            f_s = m.E_s(batch["sound"][j : j + 1])[0]
            x = torch.cat([f_v, f_s]).double()
            hidden = [max(0.0, float(W1[k].double() @ x + b1[k])) for k in range(W1.shape[0])]
            logits = [
                sum(float(W2[c, k]) * hidden[k] for k in range(len(hidden))) + float(b2[c]) for c in (0, 1)
            ]
            log_z = math.log(math.exp(logits[0]) + math.exp(logits[1]))
            total += log_z - logits[int(y[i])]
            correct += int((logits[1] > logits[0]) == bool(y[i]))
    assert out["loss"].item() == pytest.approx(total / 8, rel=1e-4, abs=1e-5)
    assert out["l3_acc"].item() == pytest.approx(correct / 8)


def test_correspondence_loss_closed_form_and_shape_check():
    # Equal logits give log 2 whatever the labels.
    loss = correspondence_loss(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]))
    assert loss.item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="correspondence_loss"):
        correspondence_loss(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64))


def test_config_validation():
    with pytest.raises(ValueError, match="negative_fraction"):
        L3Config(negative_fraction=0.0)
    with pytest.raises(ValueError, match="negative_fraction"):
        L3Config(negative_fraction=1.0)
    with pytest.raises(ValueError, match="fusion_hidden"):
        L3Config(fusion_hidden=0)
    cfg = L3Config()
    assert (cfg.image_encoder, cfg.sound_encoder) == (EncoderConfig("vgg", 64), EncoderConfig("vgg", 64))
    assert cfg.fusion_hidden == 128 and cfg.negative_fraction == 0.5


# --- training and embeddings --------------------------------------------------------------------


def test_training_steps_reduce_loss_and_reach_both_encoders():
    # An optimisation sanity check on one fixed batch (which the model may partly memorise), not
    # evidence of learning correspondence.
    torch.manual_seed(0)
    m = L3(L3Config(**TINY), DataInfo())
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    batch = make_batch()
    losses = []
    for step in range(12):
        out = m(batch).metrics
        assert set(out) == {"loss", "l3_acc"} and out["l3_acc"].dim() == 0
        assert 0.0 <= out["l3_acc"].item() <= 1.0
        opt.zero_grad()
        out["loss"].backward()
        if step == 0:
            for name, enc in (("E_v", m.E_v), ("E_s", m.E_s)):
                grads = [p.grad for p in enc.parameters()]
                assert all(g is not None for g in grads), name
                assert sum(float(g.abs().sum()) for g in grads) > 0, name
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_embed_keys_and_shapes():
    m = L3(L3Config(**TINY), DataInfo()).eval()
    batch = make_batch(b=5)
    e = m.embed(images=batch["image"], sounds=batch["sound"])
    assert set(e) == {"f_v", "h_v", "z_v", "f_s", "h_s", "z_s"}
    for key in e:
        assert e[key].shape == (5, 64), key
    assert torch.equal(e["h_v"], e["f_v"]) and torch.equal(e["h_s"], e["f_s"])
    assert torch.allclose(e["z_v"].norm(dim=1), torch.ones(5))
    assert torch.allclose(e["z_s"].norm(dim=1), torch.ones(5))
    assert torch.allclose(e["z_v"], e["f_v"] / e["f_v"].norm(dim=1, keepdim=True))
    assert set(m.embed(sounds=batch["sound"])) == {"f_s", "h_s", "z_s"}


def test_the_held_out_correspondence_scores_each_clip_with_its_sound_and_with_another_clips():
    """The paper's held-out accuracy (64 % on its test set): each clip's image with its own sound
    (label 1) and with the sound of the clip half the split away (label 0), by the fusion head,
    against a loop over the clips; a head that says "same clip" to everything scores 0.5."""
    torch.manual_seed(0)
    m = L3(L3Config(**TINY), DataInfo()).eval()
    batch = make_batch(b=7, seed=3)
    feats = m.embed(images=batch["image"], sounds=batch["sound"])
    correct = 0
    for i in range(7):
        for j, same in ((i, 1), ((i - 3) % 7, 0)):  # roll by 7 // 2: clip i meets clip i - 3's sound
            assert j != i or same
            logits = m.fusion(torch.cat([feats["f_v"][i], feats["f_s"][j]])[None])
            correct += int(logits.argmax(dim=1).item() == same)
    assert m.held_out_scores(feats) == {"l3_heldout_acc": pytest.approx(correct / 14)}
    assert L3.held_out_metrics(L3Config(**TINY)) == ("l3_heldout_acc",)
    with torch.no_grad():
        m.fusion[2].weight.zero_()
        m.fusion[2].bias.copy_(torch.tensor([0.0, 1.0]))  # always "same clip"
    assert m.held_out_scores(feats)["l3_heldout_acc"] == 0.5
    assert m.held_out_scores({"f_v": feats["f_v"][:1], "f_s": feats["f_s"][:1]}) == {}
