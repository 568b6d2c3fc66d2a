"""Multi-SSL (paper 004): the losses against their closed forms and loops, the rotation and
slicing helpers, the width-circular image encoder's exact roll equivariance and the rotated
foreground negatives against truly rotated panoramas, and every task and combination training
through all of its stages on CPU and resuming from a checkpoint bit-identically."""

import copy
import dataclasses
import io
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

from methods.binaural_views import azimuth_feature, cut_slices, rolls_exactly, rotated_azimuth_features
from methods.data import DataConfig, build_dataset
from methods.data.binaural import rotate_panorama
from methods.encoders import EncoderConfig, WidthCircularConv2d, WidthCircularMaxPool2d, build_encoder
from methods.losses import foreground_nce, huber, info_nce
from methods.multissl import COMBINATIONS, MultiSSL, MultiSSLConfig, PanoramaEncoderConfig
from orchestrator.config import ConfigError, resolve

TINY_ENC = {"image_encoder": PanoramaEncoderConfig("resnet18", 8), "sound_encoder": EncoderConfig("resnet10", 8)}
DATA = DataConfig(binaural=True, clip_seconds=4.0, n_frames=128, panorama_width=128, paired_size=32,
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


def test_gap_zero_err_is_the_error_of_answering_zero_and_the_head_beats_it_given_an_arrow_of_time(scenes):
    """``gap_zero_err`` is mean |δ| of the step's own slices; on clips whose level rises through
    the clip (an arrow of time) the gap head falls far below it within tens of steps, so a
    ``gap_abs_err`` that stays at ``gap_zero_err`` says the clips carry nothing to learn from."""
    data, batches = scenes
    assert {"gap_abs_err", "gap_zero_err"} <= set(MultiSSL.training_metrics(MultiSSLConfig(tasks=("gap",))))
    cfg = MultiSSLConfig(**TINY_ENC, tasks=("gap",), gap_slice_frames=32)
    torch.manual_seed(0)
    method = MultiSSL(cfg, data.info())
    method.configure_training(1)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    t = DATA.n_frames
    b = len(batches[0]["sound"])
    ramp = torch.linspace(-1.0, 1.0, t).expand(b, 2, DATA.n_mels, t)
    errs, zero_errs = [], []
    for step in range(100):
        sound = ramp + 0.1 * torch.randn(b, 2, DATA.n_mels, t)
        state = torch.get_rng_state()
        out = method({**batches[0], "sound": sound}).metrics
        torch.set_rng_state(state)
        _, _, gap = cut_slices(sound, cfg.gap_slice_frames)  # the slices the step drew
        assert out["gap_zero_err"].item() == pytest.approx(gap.abs().mean().item(), rel=1e-6)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        errs.append(out["gap_abs_err"].item())
        zero_errs.append(out["gap_zero_err"].item())
    assert sum(errs[-20:]) < 0.5 * sum(zero_errs[-20:]), (errs[-20:], zero_errs[-20:])


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
            out.metrics["loss"].backward()
            opt.step()
            method.after_step(batch, out)
            losses.append({k: float(v.detach()) for k, v in out.metrics.items()})
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


def test_default_config_errors_and_the_padding_option():
    with pytest.raises(ValueError, match="^padding: "):
        EncoderConfig(padding="reflect")
    assert EncoderConfig().padding == "zeros" and MultiSSLConfig().image_encoder.padding == "circular"
    assert MultiSSLConfig().sound_encoder.padding == "zeros"
    cfg = resolve({}, preset="tiny", overrides=["method.name=multissl"])
    assert cfg.method.image_encoder.padding == "circular" and cfg.method.sound_encoder.padding == "zeros"
    # The tiny preset's panoramas roll exactly: 128 / 4 = 32 columns, the ImageNet stem's stride.
    assert rolls_exactly(cfg.method.image_encoder, cfg.data.panorama_width, cfg.method.rotations)
    old = resolve({}, preset="tiny", overrides=["method.name=multissl", "method.image_encoder.padding=zeros"])
    assert old.method.image_encoder.padding == "zeros"
    assert resolve({}, preset="tiny", overrides=["method.name=bma"]).method.image_encoder.padding == "zeros"
    with pytest.raises(ConfigError, match=r"^method\.image_encoder\.padding: "):
        resolve({}, preset="tiny", overrides=["method.name=multissl", "method.image_encoder.padding=wrap"])


# --- width-circular padding: exact roll equivariance ------------------------------------------

R = 4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _encoder(stem: str, padding: str, arch: str = "resnet18", seed: int = 0):
    torch.manual_seed(seed)
    return build_encoder(EncoderConfig(arch, 4, stem=stem, padding=padding), in_channels=3).eval()


def _turn(x: torch.Tensor, k: int, rotations: int) -> torch.Tensor:
    """The panorama turned by k·360/R, written as slicing (independent of ``rotate_panorama``):
    its last k·W/R columns come round to the front (a turn to the right)."""
    s = k * x.shape[-1] // rotations
    return torch.cat([x[..., x.shape[-1] - s:], x[..., : x.shape[-1] - s]], dim=-1) if s else x


def _rolled_vs_rotated(enc, x_BCHW: torch.Tensor) -> list[float]:
    """Relative difference between the map of each turned panorama and the original's map
    rolled by k·W'/R columns, k = 1 .. R-1."""
    with torch.no_grad():
        map_BCHW = enc.forward_map(x_BCHW)
        step = map_BCHW.shape[-1] // R
        return [_rel(torch.roll(map_BCHW, shifts=k * step, dims=-1), enc.forward_map(_turn(x_BCHW, k, R)))
                for k in range(1, R)]


def test_turning_slices_the_same_way_as_rotate_panorama():
    x = torch.randn(2, 3, 4, 16)
    for k in range(R):
        assert torch.equal(_turn(x, k, R), rotate_panorama(x, k, R))


@pytest.mark.parametrize("arch, stem, width", [("resnet18", "imagenet", 128), ("resnet18", "small", 32),
                                               ("vgg", "imagenet", 64)])
def test_circular_width_padding_makes_the_encoder_exactly_roll_equivariant(arch, stem, width):
    cfg = EncoderConfig(arch, 4, stem=stem, padding="circular")
    assert (width // R) % cfg.map_stride == 0 and rolls_exactly(cfg, width, R)
    enc = _encoder(stem, "circular", arch)
    torch.manual_seed(1)
    x_BCHW = torch.randn(2, 3, 32, width)
    assert enc.forward_map(x_BCHW).shape[-1] == width // cfg.map_stride
    assert max(_rolled_vs_rotated(enc, x_BCHW)) < 1e-5


@pytest.mark.parametrize("stem, width", [("imagenet", 128), ("small", 32)])
def test_zero_padding_is_far_from_roll_equivariant(stem, width):
    """Why the option exists: with zeros beyond both borders of the strip, the map of a turned
    panorama is not the rolled map (measured: 0.50-0.79 of its norm here)."""
    torch.manual_seed(1)
    x_BCHW = torch.randn(2, 3, 32, width)
    assert min(_rolled_vs_rotated(_encoder(stem, "zeros"), x_BCHW)) > 0.2


def test_circular_padding_wraps_width_only_and_rolls_need_whole_feature_columns():
    # The top and bottom rows are not neighbours: a conv on a map that is non-zero only in its
    # top row leaves the bottom row of the output untouched, unlike nn.Conv2d's circular mode.
    conv = WidthCircularConv2d.from_conv(torch.nn.Conv2d(1, 1, 3, padding=1, bias=False))
    torch.nn.init.ones_(conv.weight)
    x = torch.zeros(1, 1, 4, 6)
    x[0, 0, 0, 0] = 1.0
    y = conv(x)
    assert y[0, 0, -1].abs().sum() == 0 and y[0, 0, 0, -1] == 1 and y[0, 0, 1, -1] == 1  # wraps in width
    pool = WidthCircularMaxPool2d.from_pool(torch.nn.MaxPool2d(3, 2, 1))
    assert torch.equal(pool(-torch.ones(1, 1, 4, 4)), -torch.ones(1, 1, 2, 2))  # -inf, not 0, in height
    # A 64-column panorama turned by 16 columns, half a column of the ImageNet stem's map: no
    # roll of whole bins gives the turned panorama's feature.
    cfg = EncoderConfig("resnet18", 4, padding="circular")
    assert not rolls_exactly(cfg, 64, R) and rolls_exactly(cfg, 128, R)
    assert not rolls_exactly(EncoderConfig("resnet18", 4), 128, R)
    enc = _encoder("imagenet", "circular")
    torch.manual_seed(1)
    x_BCHW = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        rolled = rotated_azimuth_features(enc, x_BCHW, R, roll=True)
        true = rotated_azimuth_features(enc, x_BCHW, R, roll=False)
    assert _rel(rolled[:, 1:], true[:, 1:]) > 0.05


# --- the foreground-alignment negatives are the rotated panoramas' features --------------------


def _azimuth_loop(enc, x_BCHW: torch.Tensor, rotations: int) -> torch.Tensor:
    """(B, K, C·R) independently: encode each turned panorama on its own and average its map over
    the height and over each of R column sectors, sector i spanning columns
    floor(i·W'/R) .. ceil((i+1)·W'/R) - 1 (adaptive average pooling's sectors; equal ones when R
    divides W', overlapping ones when the map has fewer columns than bins)."""
    out = []
    with torch.no_grad():
        for k in range(rotations):
            map_BCHW = enc.forward_map(_turn(x_BCHW, k, rotations))
            w = map_BCHW.shape[-1]
            sectors = [map_BCHW[..., (i * w) // rotations: -(-(i + 1) * w // rotations)].mean(dim=(2, 3))
                       for i in range(rotations)]
            out.append(torch.stack(sectors, dim=2).flatten(1))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("stem, padding, width, rolls", [
    ("imagenet", "circular", 128, True),   # the tiny preset: one bin is 32 columns = 1 map column
    ("small", "circular", 128, True),      # 32 columns = 4 map columns of the small stem
    ("imagenet", "zeros", 128, False),     # zero padding: encode the turned panoramas
    ("imagenet", "circular", 64, False),   # 16 columns: half a map column
])
def test_foreground_negatives_are_the_features_of_truly_rotated_panoramas(scenes, stem, padding, width, rolls):
    data, batches = scenes
    cfg = MultiSSLConfig(image_encoder=PanoramaEncoderConfig("resnet18", 8, stem=stem, padding=padding),
                         sound_encoder=EncoderConfig("resnet10", 8), tasks=("foreground",), rotations=R)
    assert rolls_exactly(cfg.image_encoder, width, R) == rolls
    torch.manual_seed(0)
    method = MultiSSL(cfg, data.info()).eval()  # BatchNorm on running statistics: one clip at a time
    batch = {k: v[..., :width] if k in ("image", "mask") else v for k, v in batches[0].items()}
    seen = []
    hook = method.heads.fa_v.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    loss = method(batch).metrics["loss_foreground"]
    hook.remove()
    v_pos_BD, v_rot_BJD = seen  # what the method fed its projection head: aligned, then turned
    expected_BKD = _azimuth_loop(method.E_v, batch["image"] * batch["mask"], R)
    assert v_rot_BJD.shape == expected_BKD[:, 1:].shape
    assert torch.allclose(v_pos_BD, expected_BKD[:, 0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(v_rot_BJD, expected_BKD[:, 1:], rtol=1e-5, atol=1e-6)
    # ... and the loss is supp. eq. 2 on them.
    with torch.no_grad():
        heads = method.heads
        a = F.normalize(heads.fa_s(method.E_s(batch["sound"])), dim=1)
        v_pos = F.normalize(heads.fa_v(expected_BKD[:, 0]), dim=1)
        v_rot = F.normalize(heads.fa_v(expected_BKD[:, 1:]), dim=2)
    assert loss.item() == pytest.approx(foreground_nce(a, v_pos, v_rot, temperature=cfg.fa_temperature).item(),
                                        rel=1e-5)


def test_rolled_and_encoded_rotations_agree_in_training_mode():
    """With batch statistics too: rolled maps have the same per-channel mean and variance, so
    encoding the R turned panoramas in one batch equals rolling the aligned one's feature."""
    enc = _encoder("imagenet", "circular").train()
    torch.manual_seed(1)
    x_BCHW = torch.randn(4, 3, 32, 128)
    with torch.no_grad():
        rolled = rotated_azimuth_features(enc, x_BCHW, R, roll=True)
        encoded = rotated_azimuth_features(enc, x_BCHW, R, roll=False)
    assert rolled.shape == (4, R, 32, R) and _rel(rolled, encoded) < 1e-5


# --- the default encoder is unchanged ----------------------------------------------------------


def _resnet_keys(blocks: tuple[int, ...]) -> list[str]:
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["stem.0.weight", *[f"stem.1.{p}" for p in bn]]
    for i, n in enumerate(blocks):
        for j in range(n):
            for c in ("1", "2"):
                keys += [f"stages.{i}.{j}.conv{c}.weight", *[f"stages.{i}.{j}.bn{c}.{p}" for p in bn]]
            if i > 0 and j == 0:
                keys += [f"stages.{i}.0.downsample.0.weight", *[f"stages.{i}.0.downsample.1.{p}" for p in bn]]
    return keys


def test_default_encoder_keys_and_outputs_are_unchanged_and_circular_shares_them():
    for arch, blocks in (("resnet10", (1, 1, 1, 1)), ("resnet18", (2, 2, 2, 2))):
        torch.manual_seed(0)
        zeros = build_encoder(EncoderConfig(arch, 8), in_channels=3)
        torch.manual_seed(0)
        circular = build_encoder(EncoderConfig(arch, 8, padding="circular"), in_channels=3)
        assert sorted(zeros.state_dict()) == sorted(_resnet_keys(blocks))
        assert not any(isinstance(m, (WidthCircularConv2d, WidthCircularMaxPool2d)) for m in zeros.modules())
        # Same keys and, from one seed, the same weights: checkpoints load across paddings.
        assert list(circular.state_dict()) == list(zeros.state_dict())
        assert all(torch.equal(v, circular.state_dict()[k]) for k, v in zeros.state_dict().items())
        circular.load_state_dict(zeros.state_dict(), strict=True)
    # The default forward is torchvision's ResNet-18, bit for bit.
    torch.manual_seed(0)
    ours = build_encoder(EncoderConfig("resnet18", 64), in_channels=3).eval()
    ref = torchvision.models.resnet18().eval()
    renamed = {k.replace("stem.0.", "conv1.").replace("stem.1.", "bn1."): v for k, v in ours.state_dict().items()}
    renamed = {(f"layer{int(k.split('.')[1]) + 1}." + k.split(".", 2)[2] if k.startswith("stages.") else k): v
               for k, v in renamed.items()}
    missing, unexpected = ref.load_state_dict(renamed, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    x_BCHW = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x_BCHW))))
        h = ref.layer4(ref.layer3(ref.layer2(ref.layer1(h))))
        assert torch.equal(ours.forward_map(x_BCHW), h)
