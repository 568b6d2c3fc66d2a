"""AVID / AVID+CMA (paper 002): the NCE against a per-sample loop and a closed form, the memory
bank (EMA, Z̄, negatives), CMA positive sets against brute force, checkpoint round trip, DDP on
2 workers against 1 worker, and a few training steps of every variant on tiny inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from methods.avid import AVID, AVIDConfig, ema_memory, memory_nce, skip_excluded
from methods.base import DataInfo
from methods.cma import CMA_RULES, cma_positive_sets
from methods.distributed import convert_global_batchnorm
from methods.encoders import EncoderConfig

TINY = dict(
    image_encoder=EncoderConfig("resnet18", 8), sound_encoder=EncoderConfig("resnet10", 8),
    proj_hidden_dim=32, proj_dim=16, num_negatives=12,
)
CMA = dict(cma=True, cma_positives=3, cma_negatives=10, cma_chunk_size=7)
N = 40  # paired pool size
INFO = DataInfo(paired_size=N)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convolutions run fastest on one thread, and the test machine's cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(b=8, seed=0, index=None):
    g = torch.Generator().manual_seed(seed)
    if index is None:
        index = torch.randperm(N, generator=g)[:b]
    return {"image": torch.rand(b, 3, 32, 32, generator=g), "sound": torch.randn(b, 1, 40, 64, generator=g),
            "index": index}


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return AVID(AVIDConfig(**{**TINY, **kw}), INFO)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


# --- NCE ------------------------------------------------------------------------------------


def nce_loop(x, pos, neg, tau, z_bar):
    """eq. 1-2 and 8, one sample at a time: h = P / (P + K/N), P = exp(s) / (N Z̄)."""
    n_pool = 1000.0  # N cancels; any value gives the same loss
    k = neg.shape[1]
    total = 0.0
    for b in range(x.shape[0]):
        def h(target):
            p = math.exp(float(x[b] @ target) / tau) / (n_pool * z_bar)
            return p / (p + k / n_pool)
        loss_pos = sum(-math.log(h(pos[b, p])) for p in range(pos.shape[1])) / pos.shape[1]
        loss_neg = sum(-math.log(1 - h(neg[b, j])) for j in range(k))
        total += loss_pos + loss_neg
    return total / x.shape[0]


@pytest.mark.parametrize("p", [1, 4])
def test_memory_nce_matches_per_sample_loop(p):
    x, pos, neg = unit(5, 6, seed=1), unit(5, p, 6, seed=2), unit(5, 9, 6, seed=3)
    got = memory_nce(x, pos, neg, temperature=0.1, z_bar=2.3)
    assert math.isclose(float(got), nce_loop(x, pos, neg, 0.1, 2.3), rel_tol=1e-10)
    if p == 1:  # a (B, D) positive is one positive per sample
        assert torch.allclose(memory_nce(x, pos[:, 0], neg, temperature=0.1, z_bar=2.3), got)


def test_memory_nce_closed_form():
    # Memory equal to the feature (s = 1/tau) and negatives orthogonal to it (s = 0):
    # L = log(1 + K Z e^{-1/tau}) + K log((1 + K Z) / (K Z)).
    tau, z, k = 0.07, 2.2045, 6
    x = torch.zeros(1, 4, dtype=torch.float64)
    x[0, 0] = 1
    neg = torch.zeros(1, k, 4, dtype=torch.float64)
    neg[..., 1] = 1
    expected = math.log(1 + k * z * math.exp(-1 / tau)) + k * math.log((1 + k * z) / (k * z))
    assert math.isclose(float(memory_nce(x, x, neg, temperature=tau, z_bar=z)), expected, rel_tol=1e-12)


# --- memory bank ----------------------------------------------------------------------------


def test_training_step_has_no_side_effects_and_after_step_applies_ema():
    m = make_model()
    batch = make_batch()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = m(batch)
    # The method's own state is untouched (BatchNorm running statistics are torch's business).
    own = [k for k in before if "." not in k]
    assert set(own) == {"sampling_seed", "step", "bank_v", "bank_a", "z_bar", "z_bar_ready"}
    assert all(torch.equal(m.state_dict()[k], before[k]) for k in own)
    again = m(batch)
    assert torch.equal(out.metrics["loss"], again.metrics["loss"])  # same draws, same Z̄: training_step is pure
    m.after_step(batch, out)
    mom = m.cfg.memory_momentum
    for bank, x in (("bank_v", out.state["v"]), ("bank_a", out.state["a"])):
        old, new = before[bank], getattr(m, bank)
        touched = set(batch["index"].tolist())
        for i in range(N):
            if i in touched:
                row = batch["index"].tolist().index(i)
                u = mom * old[i] + (1 - mom) * x[row]
                assert torch.allclose(new[i], u / u.norm(), atol=1e-6)
            else:
                assert torch.equal(new[i], old[i])
    assert int(m.step) == 1
    assert torch.allclose(ema_memory(old[:2], x[:2], momentum=0.0), x[:2], atol=1e-6)


def test_z_bar_is_estimated_on_the_first_batch_then_frozen():
    m = make_model()
    tau = m.cfg.temperature
    b1 = make_batch(seed=1)
    neg = m.sample_negative_indices(b1["index"])
    out = m(b1)
    v, a = out.state["v"], out.state["a"]
    # Cross-AVID: negatives of v are audio memories; Z̄ = mean of exp(score) over v→a's, the first
    # term the authors' one criterion sees (a→v's does not enter).
    z1 = sum(math.exp(float(v[i] @ m.bank_a[j]) / tau) for i in range(8) for j in neg[i].tolist())
    expected = z1 / neg.numel()
    assert math.isclose(float(out.state["z_bar"]), expected, rel_tol=1e-5)
    # The first step's loss already uses it.
    i = b1["index"]
    ref = (memory_nce(v, m.bank_a[i], m.bank_a[neg], temperature=tau, z_bar=expected)
           + memory_nce(a, m.bank_v[i], m.bank_v[neg], temperature=tau, z_bar=expected)) / 2
    assert torch.allclose(out.metrics["loss_cross"], ref, rtol=1e-5)
    assert not bool(m.z_bar_ready)
    m.after_step(b1, out)
    assert bool(m.z_bar_ready) and math.isclose(float(m.z_bar), expected, rel_tol=1e-5)
    frozen = m.z_bar.clone()
    out2 = m(make_batch(seed=2))
    assert "z_bar" not in out2.state
    m.after_step(make_batch(seed=2), out2)
    assert torch.equal(m.z_bar, frozen)


def test_negatives_are_uniform_over_the_others_and_never_the_sample():
    g = torch.Generator().manual_seed(0)
    n = 10
    index = torch.arange(n)
    draws = torch.randint(0, n - 1, (n, 20000), generator=g)
    neg = skip_excluded(draws, index[:, None])
    assert not (neg == index[:, None]).any() and neg.min() >= 0 and neg.max() < n
    for i in range(n):
        counts = torch.bincount(neg[i], minlength=n).double()
        assert counts[i] == 0
        others = torch.cat([counts[:i], counts[i + 1:]])
        assert (others - 20000 / 9).abs().max() < 0.06 * 20000 / 9  # uniform within ~5 sigma
    # Several exclusions per row (the sample and its positives, sorted).
    excluded = torch.tensor([[0, 3, 4, 9], [2, 5, 6, 7]])
    neg = skip_excluded(torch.randint(0, n - 4, (2, 5000), generator=g), excluded)
    for row in range(2):
        assert set(neg[row].tolist()) == set(range(n)) - set(excluded[row].tolist())


def test_method_negatives_exclude_the_sample_and_cma_positives_over_many_steps():
    m = make_model(**CMA)
    index = torch.arange(N)
    seen = torch.zeros(N, N, dtype=torch.bool)
    for step in range(30):
        m.step.fill_(step)
        neg = m.sample_negative_indices(index)
        assert neg.shape == (N, max(m.cfg.num_negatives, m.cfg.cma_negatives))
        seen[index[:, None].expand_as(neg), neg] = True
    assert not seen.diagonal().any()
    assert not seen.gather(1, m.positives).any()
    assert seen.sum(1).eq(N - 1 - m.cfg.cma_positives).all()  # every other instance drawn at some point
    m.step.fill_(3)
    assert torch.equal(m.sample_negative_indices(index), m.sample_negative_indices(index))


# --- CMA positive sets ----------------------------------------------------------------------


def brute_force_positives(bank_v, bank_a, k, rule):
    sv, sa = bank_v @ bank_v.T, bank_a @ bank_a.T
    score = {"agreement": torch.minimum(sv, sa), "either": torch.maximum(sv, sa), "video": sv, "audio": sa}[rule]
    score = score.masked_fill(torch.eye(len(score), dtype=torch.bool), float("-inf"))
    return score.topk(k, dim=1).indices.sort(dim=1).values


@pytest.mark.parametrize("rule", CMA_RULES)
def test_chunked_positive_sets_equal_brute_force(rule):
    bank_v, bank_a = unit(37, 8, seed=4), unit(37, 8, seed=5)
    expected = brute_force_positives(bank_v, bank_a, 5, rule)
    for chunk in (1, 7, 36, 37, 100):
        got = cma_positive_sets(bank_v, bank_a, k=5, rule=rule, chunk_size=chunk)
        assert torch.equal(got, expected), chunk
    assert not (expected == torch.arange(37)[:, None]).any()


def test_positive_search_never_allocates_an_n_by_n_block():
    n, chunk = 600, 64
    bank_v, bank_a = unit(n, 8, seed=6).float(), unit(n, 8, seed=7).float()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        cma_positive_sets(bank_v, bank_a, k=4, rule="agreement", chunk_size=chunk)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= chunk * (chunk + 4) * 8  # one block of scores with its running top-k
    assert largest < n * n * 4 / 10


def test_cma_schedule_refreshes_positive_sets_every_e_epochs_from_s():
    m = make_model(**CMA, cma_start_epoch=2, cma_refresh_epochs=3)
    assert int(m.positives_epoch) == -1 and not m.cma_active
    out = m(make_batch())
    assert set(out.metrics) == {"loss", "loss_cross"} and set(out.state) == {"z_bar", "v", "a"}
    computed = {}
    for epoch in range(7):
        with torch.no_grad():  # stand-in for training moving the banks between epochs
            m.bank_v.copy_(unit(N, 16, seed=10 + epoch).float())
        m.on_epoch_end(epoch)
        computed[epoch + 1] = int(m.positives_epoch)
        if int(m.positives_epoch) == epoch + 1:
            assert torch.equal(m.positives, cma_positive_sets(m.bank_v, m.bank_a, k=3, rule="agreement", chunk_size=7))
    assert computed == {1: -1, 2: 2, 3: 2, 4: 2, 5: 5, 6: 5, 7: 5}
    assert m.cma_active and "loss_cma" in m(make_batch()).metrics


@pytest.mark.parametrize("reestimate", [False, True])
def test_z_bar_is_estimated_again_on_the_first_cma_step_only_with_cma_reestimate_z(reestimate):
    m = make_model(**CMA, cma_start_epoch=2, cma_refresh_epochs=1, cma_reestimate_z=reestimate)
    for step in range(3):  # Cross-AVID epochs 0 (steps 0, 1) and 1 (step 2): Z̄ from step 0 only
        b = make_batch(seed=step)
        out = m(b)
        assert ("z_bar" in out.state) == (step == 0)
        m.after_step(b, out)
        if step == 1:
            assert m.on_epoch_end(0) is None and bool(m.z_bar_ready)
    cross_z = float(m.z_bar)
    m.on_epoch_end(1)  # positive sets for epoch 2: CMA starts
    assert m.cma_active and bool(m.z_bar_ready) != reestimate
    b = make_batch(seed=5)
    neg = m.sample_negative_indices(b["index"])
    out = m(b)
    if not reestimate:
        assert "z_bar" not in out.state
        m.after_step(b, out)
        assert float(m.z_bar) == cross_z
        return
    # The mean of exp(score / tau) over the negatives of this step's first term, v→a (K negatives).
    v, tau = out.state["v"].double(), m.cfg.temperature
    expected = float(torch.exp(torch.einsum("bd,bkd->bk", v, m.bank_a.double()[neg[:, :m.cfg.num_negatives]])
                               / tau).mean())
    assert math.isclose(float(out.state["z_bar"]), expected, rel_tol=1e-5) and not math.isclose(expected, cross_z, rel_tol=1e-3)
    m.after_step(b, out)
    assert math.isclose(float(m.z_bar), expected, rel_tol=1e-5) and bool(m.z_bar_ready)
    m.on_epoch_end(2)  # a later refresh of the positive sets keeps the new Z̄
    assert bool(m.z_bar_ready) and "z_bar" not in m(make_batch(seed=6)).state


@pytest.mark.parametrize("start, reestimate", [(0, True), (0, False), (2, True)])
def test_init_from_a_trained_run_gives_cma_the_copied_banks_positive_sets(tmp_path, start, reestimate):
    """``train.init_from`` (``checkpoint.initialise_from``) into AVID+CMA: with CMA from epoch 0
    the positive sets are those of the copied banks, not of the constructor's random ones, and
    ``cma_reestimate_z`` lets the first step estimate Z̄ again (without it Z̄ is the copied one);
    with CMA from a later epoch the copied run's positive sets do not switch CMA on early."""
    from orchestrator import checkpoint as ckpt

    source = make_model(seed=1, **CMA, cma_start_epoch=1, cma_refresh_epochs=1)
    for step in range(3):  # Cross-AVID steps move the banks and freeze Z̄; then positive sets
        b = make_batch(seed=step)
        source.after_step(b, source(b))
    source.on_epoch_end(0)
    b = make_batch(seed=3)  # one CMA step more: its positive sets are older than its banks
    source.after_step(b, source(b))
    assert source.cma_active and bool(source.z_bar_ready)
    ckpt.save(tmp_path, {"model": source.state_dict(), "optimizer": {}, "epoch": 0, "rng": [], "loaders": {}})

    m = make_model(seed=2, **CMA, cma_start_epoch=start, cma_refresh_epochs=1, cma_reestimate_z=reestimate)
    random_positives = m.positives.clone()
    ckpt.initialise_from(m, str(tmp_path), torch.device("cpu"))
    assert torch.equal(m.bank_v, source.bank_v) and float(m.z_bar) == float(source.z_bar)
    if start > 0:
        assert not m.cma_active and "loss_cma" not in m(make_batch(seed=5)).metrics
        return
    expected = cma_positive_sets(source.bank_v, source.bank_a, k=m.cfg.cma_positives, rule=m.cfg.cma_rule,
                                 chunk_size=m.cfg.cma_chunk_size)
    assert m.cma_active and torch.equal(m.positives, expected) and not torch.equal(expected, random_positives)
    assert not torch.equal(expected, source.positives)
    assert bool(m.z_bar_ready) != reestimate and ("z_bar" in m(make_batch(seed=5)).state) == reestimate


def test_cma_positive_precision_is_the_share_of_positives_of_their_instance_class():
    labels = torch.arange(N) % 4
    m = make_model(**CMA, cma_start_epoch=1, cma_refresh_epochs=1)
    assert m.on_epoch_end(0) == {}  # positive sets for epoch 1, but no slot's class known yet
    for step in range(3):  # items seen with their labels: their slots learn their class
        b = make_batch(seed=step)
        b["label"] = labels[b["index"]]
        m.after_step(b, m(b))
    seen = m.bank_label >= 0
    assert 0 < int(seen.sum()) < N and torch.equal(m.bank_label[seen], labels[seen])
    assert (m.bank_label[~seen] == -1).all()
    diag = m.on_epoch_end(1)
    known = seen[:, None] & seen[m.positives]
    expected = ((labels[:, None] == labels[m.positives]) & known).sum() / known.sum()
    assert diag == {"cma_positive_precision": pytest.approx(float(expected))}
    # Banks where each class is one tight cluster: every positive is of its instance's class.
    with torch.no_grad():
        centre = unit(4, 16, seed=20).float()
        m.bank_v.copy_(F.normalize(centre[labels] + 0.01 * unit(N, 16, seed=21).float(), dim=1))
        m.bank_a.copy_(F.normalize(centre[labels] + 0.01 * unit(N, 16, seed=22).float(), dim=1))
        m.bank_label.copy_(labels)
    assert m.on_epoch_end(2) == {"cma_positive_precision": 1.0}
    # A pool without labels keeps no class per slot and reports nothing.
    unlabelled = AVID(AVIDConfig(**{**TINY, **CMA, "cma_start_epoch": 0}), DataInfo(paired_size=N, paired_labelled=False))
    assert not hasattr(unlabelled, "bank_label") and not unlabelled.on_epoch_end(0)


def test_a_checkpoint_from_before_slots_kept_their_class_still_loads():
    a = make_model(**CMA, cma_start_epoch=1)
    old = {k: v for k, v in a.state_dict().items() if k != "bank_label"}
    b = make_model(seed=1, **CMA, cma_start_epoch=1)
    b.load_state_dict(old)  # strict, as a resume loads it
    assert torch.equal(b.bank_v, a.bank_v) and (b.bank_label == -1).all()


# --- checkpoint, DDP ------------------------------------------------------------------------


def test_memory_state_survives_state_dict_round_trip():
    a = make_model(**CMA, cma_start_epoch=1)
    for step in range(2):
        b = make_batch(seed=step)
        a.after_step(b, a(b))
    a.on_epoch_end(0)  # positive sets from the trained banks
    b = make_model(seed=1, **CMA, cma_start_epoch=1)
    assert not torch.equal(a.bank_v, b.bank_v)
    b.load_state_dict(a.state_dict())
    b.load_extra_state(a.extra_state())
    for step in range(2, 4):
        batch = make_batch(seed=step)
        out_a, out_b = a(batch), b(batch)
        assert "loss_cma" in out_a.metrics
        for k in ("loss", "loss_cross", "loss_cma"):
            assert torch.equal(out_a.metrics[k], out_b.metrics[k]), k
        a.after_step(batch, out_a)
        b.after_step(batch, out_b)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


G = 8  # global batch of the DDP test


def _ddp_model():
    torch.manual_seed(3)
    return AVID(AVIDConfig(**TINY, **CMA), INFO).double()


def _ddp_batches():
    return [{k: (v.double() if v.is_floating_point() else v) for k, v in make_batch(G, seed=s).items()}
            for s in (11, 12)]


def _ddp_worker(rank, world):
    model = convert_global_batchnorm(_ddp_model())
    ddp = DDP(model)
    losses = []
    for batch in _ddp_batches():
        shard = {k: v[rank * G // world : (rank + 1) * G // world] for k, v in batch.items()}
        out = ddp(shard)
        out.metrics["loss"].backward()
        model.after_step(shard, out)
        losses.append({k: v.detach() for k, v in out.metrics.items()})
    return {"losses": losses, "state": model.state_dict()}


def test_two_ddp_workers_update_the_bank_like_one_worker_on_the_global_batch(ddp):
    model = _ddp_model()
    losses = []
    for batch in _ddp_batches():
        out = model(batch)
        out.metrics["loss"].backward()
        model.after_step(batch, out)
        losses.append(out)
    ranks = ddp(_ddp_worker)
    for r in ranks:
        for k in ("bank_v", "bank_a", "z_bar", "z_bar_ready", "step", "positives"):
            assert torch.allclose(r["state"][k], model.state_dict()[k], rtol=1e-9, atol=1e-12), k
    assert not torch.equal(model.bank_v, _ddp_model().bank_v)  # the step did write the bank
    for step, ref in enumerate(losses):  # the workers' mean loss is the one-worker loss
        for k in ("loss", "loss_cross", "loss_cma"):
            mean = (ranks[0]["losses"][step][k] + ranks[1]["losses"][step][k]) / 2
            assert torch.allclose(mean, ref.metrics[k].detach(), rtol=1e-9), (step, k)


# --- training and interface -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, terms",
    [
        (dict(variant="self"), {"loss_self"}),
        (dict(variant="cross"), {"loss_cross"}),
        (dict(variant="joint"), {"loss_self", "loss_cross"}),
        (dict(**CMA, cma_start_epoch=1, cma_weight=0.5), {"loss_cross", "loss_cma"}),
    ],
)
def test_each_variant_trains_a_few_steps(kw, terms):
    m = make_model(**kw)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    batches = [make_batch(seed=s, index=torch.arange(8 * (s % 5), 8 * (s % 5) + 8)) for s in range(5)]
    history = []
    for epoch in range(2):
        for batch in batches:
            out = m(batch)
            opt.zero_grad()
            out.metrics["loss"].backward()
            assert all(p.grad is not None for p in m.parameters())
            opt.step()
            m.after_step(batch, out)
            history.append(float(out.metrics["loss"].detach()))
            expected = {"loss"} | (terms - {"loss_cma"} if epoch == 0 and m.cfg.cma else terms)
            assert set(out.metrics) == expected and set(out.state) - {"z_bar"} == {"v", "a"}
        m.on_epoch_end(epoch)
    assert all(math.isfinite(x) for x in history)
    if "loss_cma" in terms:
        assert torch.allclose(out.metrics["loss"], out.metrics["loss_cross"] + 0.5 * out.metrics["loss_cma"])
    if terms == {"loss_self", "loss_cross"}:  # Joint: the authors' coefficients sum to 1, ¼ a direction
        assert torch.allclose(out.metrics["loss"], (out.metrics["loss_self"] + out.metrics["loss_cross"]) / 2)


def test_embed_returns_encoder_features_and_unit_projections():
    m = make_model().eval()
    b = make_batch()
    e = m.embed(images=b["image"], sounds=b["sound"])
    assert e["h_v"].shape == (8, m.E_v.out_dim) and torch.equal(e["h_v"], e["f_v"])
    assert e["z_s"].shape == (8, 16) and torch.allclose(e["z_s"].norm(dim=1), torch.ones(8))
    assert torch.allclose(e["z_v"], F.normalize(m.head_v(m.E_v(b["image"])), dim=1))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(variant="both"), "variant"),
        (dict(temperature=0.0), "temperature"),
        (dict(num_negatives=0), "num_negatives"),
        (dict(memory_momentum=1.0), "memory_momentum"),
        (dict(proj_dim=0), "proj_hidden_dim / proj_dim"),
        (dict(cma=True, variant="joint"), "variant"),
        (dict(cma_rule="union"), "cma_rule"),
        (dict(cma_weight=-1.0), "cma_weight"),
        (dict(cma_positives=0), "cma_positives"),
        (dict(cma_refresh_epochs=0), "cma_refresh_epochs"),
        (dict(cma_start_epoch=-1), "cma_start_epoch"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        AVIDConfig(**{**TINY, **kwargs})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_negatives=N), "num_negatives"),
        (dict(**{**CMA, "cma_negatives": N - 3}), "cma_negatives"),
        (dict(**{**CMA, "cma_positives": N}), "cma_positives"),
    ],
)
def test_pool_too_small_for_the_negatives_is_rejected(kwargs, field):
    from methods.base import FieldError

    with pytest.raises(FieldError, match=f"^method.{field}:") as caught:
        AVID(AVIDConfig(**{**TINY, **kwargs}), INFO)
    assert caught.value.field == f"method.{field}"


# --- collapse ---------------------------------------------------------------------------------


def _trivial_nce(z_bar: float, k: int) -> float:
    """The NCE of a term whose projection is orthogonal to every memory (s = 0 for the positive
    and all K negatives): where a collapsed, uninformative state sits."""
    log_kz = math.log(k * z_bar)
    return F.softplus(torch.tensor(log_kz)).item() + k * F.softplus(torch.tensor(-log_kz)).item()


def _train_cross_avid(head_batchnorm: bool, output_batchnorm: bool = False,
                      steps: int = 160) -> tuple[float, float, float, float]:
    """Cross-AVID on 512 procedural pairs (light paired augmentation, Adam at lr 1e-3, the small
    preset's recipe at a test's size). Returns (last-16-step loss, trivial loss, mean pairwise
    cosine of the projections of the 512 images, of the 512 sounds, in eval mode)."""
    from methods.data import ProceduralAV, DataConfig
    from methods.data.batch_augment import PairedAugment, hashed_uniform
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    av = ProceduralAV(DataConfig(paired_size=512, unpaired_sound_size=0, unpaired_image_size=0,
                                       image_size=16, n_mels=16, n_frames=32, train_size=1, test_size=1))
    pool = next(iter(DataLoader(av.pool("paired"), batch_size=512)))
    cfg = AVIDConfig(image_encoder=EncoderConfig("resnet18", 8), sound_encoder=EncoderConfig("resnet10", 8),
                     variant="cross", num_negatives=128, proj_hidden_dim=64, proj_dim=32,
                     head_batchnorm=head_batchnorm, head_output_batchnorm=output_batchnorm)
    m = AVID(cfg, DataInfo(paired_size=512, image_size=16, n_mels=16, n_frames=32))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-5)
    aug, g, losses = PairedAugment(), torch.Generator().manual_seed(0), []
    for step in range(steps):
        epoch, i = divmod(step, 8)
        if i == 0:
            perm = torch.randperm(512, generator=g)
        idx = perm[i * 64 : (i + 1) * 64]
        u = hashed_uniform(0, 1, epoch, idx, aug.DRAWS)
        batch = {"image": aug.image(pool["image"][idx], u), "sound": aug.sound(pool["sound"][idx], u), "index": idx}
        out = m(batch)
        opt.zero_grad()
        out.metrics["loss"].backward()
        opt.step()
        m.after_step(batch, out)
        losses.append(out.metrics["loss"].item())
    m.eval()
    with torch.no_grad():
        z = m.embed(images=pool["image"], sounds=pool["sound"])
    spread = [((x @ x.T).sum() - len(x)).item() / (len(x) * (len(x) - 1)) for x in (z["z_v"], z["z_s"])]
    return sum(losses[-16:]) / 16, _trivial_nce(float(m.z_bar), cfg.num_negatives), spread[0], spread[1]


def test_cross_avid_does_not_collapse_with_the_small_presets_head():
    """After 160 steps the projections of the small preset's recipe (BatchNorm after the head's
    hidden layers and on its output) are spread, in eval mode on the whole pool, and its loss is
    below the trivial value; the paper's head (no BatchNorm) on the same data and steps has
    collapsed every projection into a narrow cone, which is what this check exists to catch
    (benchmarks/RESULTS-history.md, "AVID collapse" and "AVID at the small budget"). Measured: cos
    0.10 / 0.02 with both BatchNorms, 0.59 / 0.55 with the hidden layers' only, 0.95 / 0.96 without."""
    loss, trivial, cos_v, cos_a = _train_cross_avid(head_batchnorm=True, output_batchnorm=True)
    assert cos_v < 0.5 and cos_a < 0.5, (cos_v, cos_a)
    assert loss < trivial, (loss, trivial)
    _, _, cos_v0, cos_a0 = _train_cross_avid(head_batchnorm=False)
    assert min(cos_v0, cos_a0) > 0.9, (cos_v0, cos_a0)  # the collapsing recipe is caught


def _released_criterion_loop(v, a, bank_v, bank_a, index, drawn, neg, z, tau, weight):
    """The authors' released criterion (AVID_CMA with NCECriterion), written out per sample:
    cross-modal positives are the instance and its drawn positives, within-modal positives the
    drawn ones; P_m = e^s / (e^s + K Z), the positive term averaged over positives, the negative
    term summed; each modality pair halved, the within-modal one weighed by lambda."""
    def nce(x, pos, negs):
        k = len(negs)
        pm = [math.exp(float(x @ p) / tau) / (math.exp(float(x @ p) / tau) + k * z) for p in pos]
        pn = [k * z / (math.exp(float(x @ q) / tau) + k * z) for q in negs]
        return -sum(math.log(p) for p in pm) / len(pm) - sum(math.log(p) for p in pn)

    b = len(index)
    total = 0.0
    for i in range(b):
        own, ps = int(index[i]), [int(j) for j in drawn[i]]
        total += (nce(v[i], [bank_a[j] for j in [own, *ps]], [bank_a[j] for j in neg[i]])
                  + nce(a[i], [bank_v[j] for j in [own, *ps]], [bank_v[j] for j in neg[i]])) / 2
        total += weight * (nce(v[i], [bank_v[j] for j in ps], [bank_v[j] for j in neg[i]])
                           + nce(a[i], [bank_a[j] for j in ps], [bank_a[j] for j in neg[i]])) / 2
    return total / b


def test_the_released_cma_criterion_is_the_authors_formula():
    """cma_criterion=released against an independent per-sample writing of the authors' criterion,
    on the draws the model made: each step draws its own positives from every sample's set, with
    replacement, and they are CMA positives of that sample."""
    m = make_model(**{**CMA, "cma_negatives": 12}, cma_start_epoch=1, cma_refresh_epochs=1, cma_weight=0.7,
                   num_negatives=12, cma_criterion="released", cma_sampled_positives=2)
    for step in range(2):  # one Cross-AVID epoch of two steps, then CMA
        b = make_batch(seed=step)
        m.after_step(b, m(b))
    m.on_epoch_end(0)
    assert m.cma_active
    b = make_batch(seed=7)
    neg = m.sample_negative_indices(b["index"])
    drawn = m.sample_positive_indices(b["index"])
    assert drawn.shape == (8, 2)
    assert all(int(j) in m.positives[int(i)].tolist() for i, row in zip(b["index"], drawn) for j in row)
    bank_v, bank_a = m.bank_v.clone().double(), m.bank_a.clone().double()
    out = m(b)
    v, a = out.state["v"].double(), out.state["a"].double()
    expected = _released_criterion_loop(v, a, bank_v, bank_a, b["index"], drawn, neg[:, :12], float(m.z_bar),
                                        m.cfg.temperature, 0.7)
    assert math.isclose(float(out.metrics["loss"].detach()), expected, rel_tol=1e-4)
    m.after_step(b, out)
    assert not torch.equal(m.sample_positive_indices(b["index"]), drawn)  # redrawn every step
    with pytest.raises(ValueError, match=r"^cma_sampled_positives: must be in 1\.\.cma_positives=3"):
        AVIDConfig(**{**TINY, **CMA, "cma_criterion": "released", "cma_sampled_positives": 4})
