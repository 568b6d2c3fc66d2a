"""Multi-SSL (paper 004): the losses against their closed forms and loops, the rotation and
slicing helpers, and every task and combination training through all of its stages on CPU and
resuming from a checkpoint bit-identically."""

import copy
import dataclasses
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from methods.data import ProceduralConfig, build_dataset
from methods.encoders import EncoderConfig
from methods.multissl import (
    COMBINATIONS,
    MultiSSL,
    MultiSSLConfig,
    azimuth_feature,
    cut_slices,
    foreground_nce,
    huber,
    info_nce,
)
from orchestrator.config import ConfigError, resolve

TINY_ENC = {"image_encoder": EncoderConfig("resnet18", 8), "sound_encoder": EncoderConfig("resnet10", 8)}
DATA = ProceduralConfig(binaural=True, clip_seconds=4.0, n_frames=128, panorama_width=128, paired_size=32,
                        unpaired_sound_size=0, unpaired_image_size=0, train_size=16, test_size=16,
                        transfer_train_size=0, transfer_test_size=0)


@pytest.fixture(scope="module")
def scenes():
    data = build_dataset(DATA)
    batches = list(DataLoader(data.pool("paired"), batch_size=8, shuffle=False))
    return data, batches


# --- losses and helpers -----------------------------------------------------------------------


def test_huber_matches_its_closed_form_on_both_branches():
    eps = 1.5
    pred = torch.tensor([0.0, 1.0, -1.2, 3.0, -4.0])
    target = torch.tensor([0.5, -0.4, 0.0, 0.0, 0.5])
    expected = []
    for p, t in zip(pred.tolist(), target.tolist()):
        x = abs(p - t)
        expected.append(0.5 * x * x if x <= eps else eps * x - 0.5 * eps * eps)
    assert [abs(p - t) > eps for p, t in zip(pred.tolist(), target.tolist())] == [False, False, False, True, True]
    assert huber(pred, target, delta=eps).item() == pytest.approx(sum(expected) / len(expected), rel=1e-6)


def test_foreground_nce_matches_a_loop_over_anchors():
    torch.manual_seed(0)
    b, j, d, tau = 5, 3, 7, 0.1
    a = F.normalize(torch.randn(b, d), dim=1)
    v = F.normalize(torch.randn(b, d), dim=1)
    v_rot = F.normalize(torch.randn(b, j, d), dim=2)
    for with_rot in (False, True):
        total = 0.0
        for i in range(b):
            pos = math.exp(float(a[i] @ v[i]) / tau)
            negs = [math.exp(float(a[i] @ v[k]) / tau) for k in range(b) if k != i]
            if with_rot:
                negs += [math.exp(float(a[i] @ v_rot[i, r]) / tau) for r in range(j)]
            total += -math.log(pos / (pos + sum(negs)))
        got = foreground_nce(a, v, v_rot if with_rot else None, temperature=tau)
        assert got.item() == pytest.approx(total / b, rel=1e-5)


def test_info_nce_is_minus_log_softmax_of_the_matching_key():
    torch.manual_seed(1)
    q, k = F.normalize(torch.randn(4, 6), dim=1), F.normalize(torch.randn(4, 6), dim=1)
    loop = sum(-math.log(math.exp(float(q[i] @ k[i]) / 0.2) / sum(math.exp(float(q[i] @ k[m]) / 0.2)
                                                                   for m in range(4))) for i in range(4)) / 4
    assert info_nce(q, k, temperature=0.2).item() == pytest.approx(loop, rel=1e-5)


def test_azimuth_feature_rolls_with_the_map():
    m = torch.randn(2, 4, 3, 8)
    for shift in range(4):
        rolled = azimuth_feature(torch.roll(m, shifts=2 * shift, dims=-1), 4)
        assert rolled.shape == (2, 4, 4)
        assert torch.allclose(rolled, torch.roll(azimuth_feature(m, 4), shift, dims=2))


def test_slices_are_the_frames_at_their_starts_and_the_gap_is_normalised():
    sound = torch.arange(3 * 2 * 4 * 20, dtype=torch.float32).reshape(3, 2, 4, 20)
    g = torch.Generator().manual_seed(0)
    first, second, gap = cut_slices(sound, 5, g)
    assert first.shape == second.shape == (3, 2, 4, 5)
    for i in range(3):
        t1, t2 = int(first[i, 0, 0, 0]) % 20, int(second[i, 0, 0, 0]) % 20
        assert torch.equal(first[i], sound[i, :, :, t1:t1 + 5]) and torch.equal(second[i], sound[i, :, :, t2:t2 + 5])
        assert gap[i].item() == pytest.approx((t2 - t1) / 15)
    assert gap.abs().max() <= 1
    with pytest.raises(ValueError, match="gap_slice_frames"):
        cut_slices(sound, 20)


# --- training, stages, resume -----------------------------------------------------------------


VARIANTS = [
    ("multitask", ("spatial",)),
    ("multitask", ("foreground",)),
    ("multitask", ("gap",)),
    *[(c, ("spatial", "foreground", "gap")) for c in COMBINATIONS],
]


def _train(method, opt, batches, epochs, start_epoch=0):
    losses = []
    for epoch in range(start_epoch, epochs):
        method.train()
        for batch in batches[:2]:
            out = method(batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            method.after_step(batch, out)
            losses.append({k: float(v.detach()) for k, v in out.items()})
        method.on_epoch_end(epoch)
    return losses


def _build(combination, tasks, epochs, data):
    cfg = MultiSSLConfig(**TINY_ENC, tasks=tasks, combination=combination, rotations=4, gap_slice_frames=32)
    method = MultiSSL(cfg, data.info())
    method.configure_training(epochs)
    return method, torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-3)


@pytest.mark.parametrize("combination, tasks", VARIANTS)
def test_each_task_and_combination_trains_every_stage_and_resumes_exactly(scenes, combination, tasks):
    data, batches = scenes
    epochs = max(2, MultiSSLConfig(tasks=tasks, combination=combination).num_stages)
    torch.manual_seed(0)
    method, opt = _build(combination, tasks, epochs, data)
    before = copy.deepcopy(method.state_dict())
    losses = _train(method, opt, batches, epochs)
    stage_terms = [sorted(k for k in step if k.startswith("loss_")) for step in losses[::2]]
    if combination == "multitask":
        assert stage_terms == [[f"loss_{t}" for t in sorted(tasks)]] * epochs
    else:
        expected = [[f"loss_{t}"] for t in tasks]
        if combination == "incremental":
            expected = [expected[0]] + [sorted([f"loss_{t}", "loss_distill"]) for t in tasks[1:]]
        if combination in ("euclidean", "contrastive"):
            expected.append(["loss_distill"])
        assert stage_terms == expected
    assert all(math.isfinite(step["loss"]) for step in losses)
    changed = {k.split(".")[0] for k, v in method.state_dict().items() if not torch.equal(v, before[k])}
    if tasks == ("gap",):  # a sound-only task: the image encoder stays as initialised
        assert "E_s" in changed and "E_v" not in changed
    else:
        assert {"E_v", "E_s"} <= changed or "task_pairs" in changed

    # Interrupted after the first epoch and restored from a checkpoint: the rest is bit-identical.
    torch.manual_seed(0)
    first, opt1 = _build(combination, tasks, epochs, data)
    _train(first, opt1, batches, 1)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "rng": torch.get_rng_state()}, buf)
    buf.seek(0)
    state = torch.load(buf)
    resumed, opt2 = _build(combination, tasks, epochs, data)
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    rest = _train(resumed, opt2, batches, epochs, start_epoch=1)
    assert rest == losses[2:]
    for k, v in method.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k

    test = next(iter(DataLoader(data.pool("test"), batch_size=8)))
    feats = resumed.embed(images=test["image"], sounds=test["sound"])
    width = 64 * (len(tasks) if combination == "concat" else 1)
    assert feats["h_v"].shape == (8, width) and feats["h_s"].shape == (8, width)
    assert feats["z_v"].shape == feats["z_s"].shape and torch.isfinite(feats["z_v"]).all()


def test_finished_teachers_do_not_change_in_the_student_stage(scenes):
    data, batches = scenes
    torch.manual_seed(0)
    method, opt = _build("euclidean", ("spatial", "gap"), 3, data)
    _train(method, opt, batches, 2)
    teachers = copy.deepcopy(method.task_pairs.state_dict())
    _train(method, opt, batches, 3, start_epoch=2)
    for k, v in method.task_pairs.state_dict().items():
        assert torch.equal(v, teachers[k]), k  # weights and BatchNorm statistics


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="^tasks:"):
        MultiSSLConfig(tasks=("spatial", "rotation"))
    with pytest.raises(ValueError, match="^combination:"):
        MultiSSLConfig(combination="sum")
    with pytest.raises(ConfigError, match=r"^train\.epochs:"):
        resolve({}, preset="tiny", overrides=["method.name=multissl", "method.combination=euclidean", "train.epochs=3"])
    with pytest.raises(ConfigError, match=r"binaural"):
        resolve({}, preset="tiny", overrides=["method.name=multissl", "data.binaural=false"])
    cfg = resolve({}, preset="tiny", overrides=["method.name=multissl"])
    assert cfg.data.binaural and cfg.eval.spatial_probe and cfg.eval.clip_retrieval
    assert dataclasses.asdict(cfg.method)["combination"] == "multitask"
