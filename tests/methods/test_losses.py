"""L_pair / L_unpair (paper 001, eq. 4-5) and memory addressing (eq. 1-3) against loop
implementations written from the formulas, plus closed-form cases."""

import math

import pytest
import torch

from methods.bma import BimodalAssociativeMemory
from methods.losses import multi_positive_nt_xent, paired_associative_loss, unpaired_associative_loss


def cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def loop_associative_loss(za, zb, tau):
    """Eq. 4 literally: Z = {za_1..za_B, zb_1..zb_B}; positives of i are the same-clip items."""
    Z = [za[i] for i in range(len(za))] + [zb[i] for i in range(len(zb))]
    B, N = len(za), 2 * len(za)
    total = 0.0
    for i in range(N):
        positives = [k for k in range(N) if k != i and k % B == i % B]
        num = sum(math.exp(cos(Z[i], Z[k]) / tau) for k in positives)
        den = sum(math.exp(cos(Z[i], Z[j]) / tau) for j in range(N) if j != i)
        total += math.log(num / den)
    return -total / N


def loop_address(f, keys, values, tau):
    sims = [cos(f, keys[r]) / tau for r in range(len(keys))]
    mx = max(sims)
    e = [math.exp(s - mx) for s in sims]
    w = [x / sum(e) for x in e]
    out = torch.zeros(values.shape[1], dtype=torch.float64)
    for r in range(len(keys)):
        out += w[r] * values[r]
    return w, out


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_paired_loss_matches_loop(tau):
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    got = paired_associative_loss(za, zb, temperature=tau)
    assert got.item() == pytest.approx(loop_associative_loss(za, zb, tau), rel=1e-10)
    got_u = unpaired_associative_loss(za, zb, temperature=tau)
    assert got_u.item() == pytest.approx(got.item(), rel=1e-12)


def test_paired_loss_closed_form_aligned_orthogonal():
    # B orthonormal directions, each pair perfectly aligned: for item i, cos = 1 with its partner,
    # 0 with the 2B-2 others, so the loss is -log(e^{1/t} / (e^{1/t} + (2B-2))).
    B, tau = 4, 0.1
    z = torch.eye(B, dtype=torch.float64)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * B - 2))
    assert paired_associative_loss(z, z.clone(), temperature=tau).item() == pytest.approx(expected, rel=1e-12)


def test_paired_loss_scale_invariant_and_decreases_with_alignment():
    g = torch.Generator().manual_seed(1)
    za = torch.randn(8, 16, generator=g)
    noise = torch.randn(8, 16, generator=g)
    far = paired_associative_loss(za, noise, temperature=0.1)
    near = paired_associative_loss(za, za + 0.01 * noise, temperature=0.1)
    assert near < far
    assert paired_associative_loss(3 * za, noise, temperature=0.1).item() == pytest.approx(far.item(), rel=1e-5)


def test_multi_positive_rejects_bad_shapes():
    with pytest.raises(ValueError, match="positives_NN"):
        multi_positive_nt_xent(torch.randn(4, 3), torch.zeros(3, 3, dtype=torch.bool), temperature=0.1)
    with pytest.raises(ValueError, match="temperature"):
        multi_positive_nt_xent(torch.randn(4, 3), torch.zeros(4, 4, dtype=torch.bool), temperature=0.0)


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_memory_addressing_matches_loop(tau):
    g = torch.Generator().manual_seed(2)
    mem = BimodalAssociativeMemory(7, 5, temperature=tau).double()
    with torch.no_grad():
        mem.M_v.copy_(torch.randn(7, 5, generator=g))
        mem.M_s.copy_(torch.randn(7, 5, generator=g))
    f = torch.randn(3, 5, generator=g, dtype=torch.float64)
    w = mem.address(f, mem.M_v)
    i2s, s2i = mem.image_to_sound(f), mem.sound_to_image(f)
    for b in range(3):
        w_loop, out_loop = loop_address(f[b], mem.M_v.detach(), mem.M_s.detach(), tau)
        assert torch.allclose(w[b], torch.tensor(w_loop, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(i2s[b], out_loop, atol=1e-12)
        _, out_loop = loop_address(f[b], mem.M_s.detach(), mem.M_v.detach(), tau)  # key-value switched
        assert torch.allclose(s2i[b], out_loop, atol=1e-12)


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_shared_keys_give_the_same_reads_and_gradients(tau):
    # One step's reads share keys normalised once (methods/bma.py, for speed); the loss is a chain of
    # reads like the unpaired cycle, and its value and gradients must not change.
    torch.manual_seed(3)
    mem = BimodalAssociativeMemory(9, 6, temperature=tau).double()
    f = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    def step():
        return (mem.image_to_sound(mem.sound_to_image(f)) ** 2).sum() + mem.sound_to_image(f).sum()

    mem.zero_grad()
    plain = step()
    plain.backward()
    grads = [mem.M_v.grad.clone(), mem.M_s.grad.clone(), f.grad.clone()]
    mem.zero_grad()
    f.grad = None
    with mem.shared_keys():
        shared = step()
    shared.backward()
    assert torch.allclose(plain, shared, rtol=1e-12)
    for a, b in zip(grads, [mem.M_v.grad, mem.M_s.grad, f.grad]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert not mem._unit_keys  # the block does not leak normalised keys into later steps


def test_one_hot_addressing_reads_the_matching_value_slot():
    # Orthonormal keys and a very low temperature: addressing is one-hot on the key the query
    # points to, so the read is exactly that slot of the value memory.
    mem = BimodalAssociativeMemory(4, 4, temperature=1e-3).double()
    with torch.no_grad():
        mem.M_v.copy_(torch.eye(4))
        mem.M_s.copy_(torch.arange(16, dtype=torch.float64).view(4, 4))
    f = torch.tensor([[0.0, 0.0, 2.0, 0.0], [5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    w = mem.address(f, mem.M_v)
    assert torch.allclose(w, torch.tensor([[0, 0, 1.0, 0], [1.0, 0, 0, 0]], dtype=torch.float64))
    assert torch.allclose(mem.image_to_sound(f), mem.M_s.detach()[[2, 0]])


def test_addressing_weights_are_a_distribution_and_memories_get_gradients():
    mem = BimodalAssociativeMemory(10, 8, temperature=0.1)
    f = torch.randn(5, 8)
    w = mem.address(f, mem.M_s)
    assert torch.allclose(w.sum(1), torch.ones(5)) and (w >= 0).all()
    mem.image_to_sound(f).sum().backward()
    assert mem.M_v.grad.abs().sum() > 0 and mem.M_s.grad.abs().sum() > 0
