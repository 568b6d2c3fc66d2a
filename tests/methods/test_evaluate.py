"""Downstream evaluation: each protocol against an independent loop, closed forms, invariants.

Legend: N samples, D feature size, C classes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch import nn
from torch.utils.data import Dataset

from methods.base import Method
from methods.encoders import EncoderConfig, build_encoder
from methods.evaluate import (
    DownstreamResult,
    EvalConfig,
    classification_metrics,
    confusion_matrix_figure,
    crop_windows,
    extract_block_features,
    extract_features,
    extract_sound_crop_features,
    fit_linear_svm,
    fit_logistic_probe,
    knn_accuracy,
    knn_predict,
    linear_probe,
    linear_svm,
    predict_clips,
    retrieval_rank_k,
    run_downstream,
    save_figure,
    solver_report,
)
from methods.metric_names import metric_names

# ---------------------------------------------------------------------------------------------
# Fakes: a tiny method with BatchNorm and an in-memory paired dataset.


class TinyMethod(Method):
    """Two tiny conv encoders with BatchNorm, projection heads, and a frozen eval-mode part."""

    name: ClassVar[str] = "tiny"

    def __init__(self, *, with_f: bool = True, with_h: bool = True) -> None:
        super().__init__()
        self.with_f, self.with_h = with_f, with_h
        self.image_enc = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.sound_enc = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head_v = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
        self.head_s = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
        self.teacher = nn.BatchNorm1d(6)  # kept in eval mode by its owner; must stay so

    def embed(
        self, *, images: torch.Tensor | None = None, sounds: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for x, enc, head, s in ((images, self.image_enc, self.head_v, "v"),
                                (sounds, self.sound_enc, self.head_s, "s")):
            if x is None:
                continue
            f = enc(x)
            h = self.teacher(f)
            if self.with_f:
                out[f"f_{s}"] = f
            if self.with_h:
                out[f"h_{s}"] = h
            out[f"z_{s}"] = head(h)
        return out


class PairDataset(Dataset):
    """Class-dependent images and log-mels, so features carry label information."""

    def __init__(self, n: int, *, num_classes: int = 3, seed: int = 0,
                 modalities: tuple[str, ...] = ("image", "sound")) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % num_classes
        offset = self.labels.float()[:, None, None, None]
        self.images = torch.rand(n, 3, 8, 8, generator=g) + offset
        self.sounds = torch.randn(n, 1, 6, 10, generator=g) + offset
        self.modalities = modalities

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"label": self.labels[i], "index": torch.tensor(i)}
        if "image" in self.modalities:
            item["image"] = self.images[i]
        if "sound" in self.modalities:
            item["sound"] = self.sounds[i]
        return item


def _trained_looking_method(**kwargs: bool) -> TinyMethod:
    torch.manual_seed(0)
    method = TinyMethod(**kwargs)
    method.train()
    method.teacher.eval()
    # Non-trivial running statistics, so that an accidental update would show.
    with torch.no_grad():
        for m in method.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    return method


def _snapshot(method: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def _assert_unchanged(method: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = method.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"
    modes = {name: m.training for name, m in method.named_modules()}
    assert modes.pop("teacher") is False
    assert all(modes.values()), "a module did not get its train mode back"


# ---------------------------------------------------------------------------------------------
# Linear probe.


def test_linear_probe_separable_clusters_are_perfect() -> None:
    rng = np.random.default_rng(0)
    centres_CD = rng.normal(size=(4, 16)) * 10
    y_train, y_test = np.repeat(np.arange(4), 30), np.repeat(np.arange(4), 10)
    X_train = centres_CD[y_train] + rng.normal(size=(120, 16)) * 0.1
    X_test = centres_CD[y_test] + rng.normal(size=(40, 16)) * 0.1
    result = linear_probe(torch.from_numpy(X_train), torch.from_numpy(y_train), X_test, y_test)
    assert result.accuracy == 1.0
    assert result.precision == result.recall == result.f1 == 1.0
    np.testing.assert_array_equal(result.confusion, np.diag([10, 10, 10, 10]))


def test_linear_probe_is_deterministic_and_sizes_confusion() -> None:
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(60, 5)), rng.integers(0, 3, size=60)
    a = linear_probe(X[:40], y[:40], X[40:], y[40:], seed=3, num_classes=5)
    b = linear_probe(X[:40], y[:40], X[40:], y[40:], seed=3, num_classes=5)
    assert a.accuracy == b.accuracy and a.f1 == b.f1
    np.testing.assert_array_equal(a.confusion, b.confusion)
    assert a.confusion.shape == (5, 5) and a.confusion.sum() == 20


def test_linear_probe_rejects_single_class() -> None:
    with pytest.raises(ValueError, match="train_y"):
        linear_probe(np.zeros((4, 2)), np.zeros(4, dtype=int), np.zeros((2, 2)), np.zeros(2, int))


def test_classification_metrics_match_hand_loop() -> None:
    # Class 3 is never predicted (precision 0/0 -> 0); class 2 is predicted but never true.
    y_true = np.array([0, 0, 0, 1, 1, 3, 3, 1, 0, 3])
    y_pred = np.array([0, 1, 0, 1, 2, 0, 1, 1, 0, 1])
    result = classification_metrics(y_true, y_pred, num_classes=4)

    classes = sorted(set(y_true) | set(y_pred))
    ps, rs, fs = [], [], []
    for c in classes:
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred) if t != c and p == c)
        fn = sum(1 for t, p in zip(y_true, y_pred) if t == c and p != c)
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        ps.append(p)
        rs.append(r)
        fs.append(2 * p * r / (p + r) if p + r else 0.0)
    assert result.accuracy == pytest.approx(5 / 10)
    assert result.precision == pytest.approx(sum(ps) / len(classes))
    assert result.recall == pytest.approx(sum(rs) / len(classes))
    assert result.f1 == pytest.approx(sum(fs) / len(classes))
    confusion = np.zeros((4, 4), dtype=int)
    for t, p in zip(y_true, y_pred):
        confusion[t, p] += 1
    np.testing.assert_array_equal(result.confusion, confusion)


# ---------------------------------------------------------------------------------------------
# kNN.


def _knn_loop(train_X, train_y, test_X, k, temperature=None):
    """Brute force: cosine similarity, k best, (weighted) vote, ties -> smallest class id."""
    preds = []
    for q in test_X:
        sims = [float(np.dot(q, x) / (np.linalg.norm(q) * np.linalg.norm(x))) for x in train_X]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes: dict[int, float] = {}
        for i in order:
            w = 1.0 if temperature is None else math.exp(sims[i] / temperature)
            votes[int(train_y[i])] = votes.get(int(train_y[i]), 0.0) + w
        best = max(votes.values())
        preds.append(min(c for c, v in votes.items() if math.isclose(v, best, rel_tol=1e-6)))
    return np.array(preds)


@pytest.mark.parametrize("k", [1, 4, 7, 100])
@pytest.mark.parametrize("temperature", [None, 0.1])
def test_knn_matches_loop(k: int, temperature: float | None) -> None:
    rng = np.random.default_rng(k)
    train_X = rng.normal(size=(40, 6)).astype(np.float32)
    train_y = rng.choice([2, 5, 9], size=40)  # non-contiguous class ids
    test_X = rng.normal(size=(25, 6)).astype(np.float32)
    expected = _knn_loop(train_X, train_y, test_X, k, temperature)
    got = knn_predict(train_X, train_y, test_X, k=k, temperature=temperature)
    np.testing.assert_array_equal(got.numpy(), expected)
    test_y = rng.choice([2, 5, 9], size=25)
    assert knn_accuracy(train_X, train_y, test_X, test_y, k=k, temperature=temperature) == (
        pytest.approx(float(np.mean(expected == test_y)))
    )


def test_knn_chunking_does_not_change_predictions() -> None:
    g = torch.Generator().manual_seed(0)
    train_X, test_X = torch.randn(50, 4, generator=g), torch.randn(33, 4, generator=g)
    train_y = torch.randint(0, 4, (50,), generator=g)
    whole = knn_predict(train_X, train_y, test_X, k=5)
    chunked = knn_predict(train_X, train_y, test_X, k=5, chunk_size=7)
    assert torch.equal(whole, chunked)


def test_knn_k1_on_training_points_is_perfect() -> None:
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 8, generator=g), torch.randint(0, 5, (30,), generator=g)
    assert knn_accuracy(X, y, X, y, k=1) == 1.0


# ---------------------------------------------------------------------------------------------
# Retrieval.


def _rank_k_loop(query_Z, query_y, gallery_Z, gallery_y, ks):
    hits = {k: 0 for k in ks}
    for q, qy in zip(query_Z, query_y):
        sims = [float(np.dot(q, g) / (np.linalg.norm(q) * np.linalg.norm(g))) for g in gallery_Z]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])
        for k in ks:
            hits[k] += any(gallery_y[i] == qy for i in order[:k])
    return {k: hits[k] / len(query_Z) for k in ks}


def test_retrieval_matches_loop() -> None:
    rng = np.random.default_rng(0)
    query_Z, gallery_Z = rng.normal(size=(30, 5)), rng.normal(size=(45, 5))
    query_y, gallery_y = rng.integers(0, 6, size=30), rng.integers(0, 6, size=45)
    ks = (1, 2, 3, 4, 5, 10)
    got = retrieval_rank_k(query_Z, query_y, gallery_Z, gallery_y, ks=ks)
    expected = _rank_k_loop(query_Z, query_y, gallery_Z, gallery_y, ks)
    assert got.keys() == expected.keys()
    for k in ks:
        assert got[k] == pytest.approx(expected[k])
    values = [got[k] for k in ks]
    assert values == sorted(values), "Rank-k must be non-decreasing in k"


def test_retrieval_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(12, 6, generator=g)
    unique_y = torch.arange(12)
    assert retrieval_rank_k(Z, unique_y, Z, unique_y)[1] == 1.0
    # A collapsed embedding (all items equally similar) must not look perfect.
    collapsed = torch.ones(12, 6)
    assert retrieval_rank_k(collapsed, unique_y, collapsed, unique_y, ks=(1,))[1] == 0.0
    # A query whose class is absent from the gallery never hits.
    assert retrieval_rank_k(Z[:1], torch.tensor([99]), Z, unique_y, ks=(12,))[12] == 0.0


# ---------------------------------------------------------------------------------------------
# Feature extraction and the suite leave the method untouched.


def test_extract_features_keeps_weights_buffers_and_modes() -> None:
    method = _trained_looking_method()
    before = _snapshot(method)
    feats = extract_features(method, PairDataset(10), batch_size=4)
    _assert_unchanged(method, before)
    assert set(feats) == {"f_v", "h_v", "z_v", "f_s", "h_s", "z_s", "label"}
    assert feats["h_v"].shape == (10, 6) and feats["z_s"].shape == (10, 5)
    assert torch.equal(feats["label"], torch.arange(10) % 3)
    # In order and independent of batching: eval-mode BatchNorm is per-sample.
    again = extract_features(method, PairDataset(10), batch_size=3)
    assert torch.allclose(feats["z_v"], again["z_v"], atol=1e-6)


def test_run_downstream_metrics_and_invariance() -> None:
    method = _trained_looking_method()
    before = _snapshot(method)
    cfg = EvalConfig(batch_size=8, features=("f", "h", "z"), knn_k=3, retrieval_ks=3)
    result = run_downstream(
        method, train_set=PairDataset(30, seed=1), test_set=PairDataset(12, seed=2),
        cfg=cfg, prefix="transfer_",
    )
    _assert_unchanged(method, before)
    expected = {f"transfer_retrieval_s2i_rank{k}" for k in (1, 2, 3)}
    expected |= {"transfer_image_z_mean_cos", "transfer_sound_z_mean_cos"}
    for modality in ("image", "sound"):
        for fam in ("f", "h", "z"):
            name = f"transfer_{modality}_{fam}"
            expected |= {f"{name}_linear_{m}" for m in ("acc", "precision", "recall", "f1", "iters")}
            expected.add(f"{name}_knn_acc")
    assert set(result.metrics) == expected == set(metric_names(cfg, prefix="transfer_"))  # the declared names
    assert all(-1.0 <= v <= 1.0 and isinstance(v, float) for k, v in result.metrics.items() if not k.endswith("_iters"))
    assert all(v >= 1 and v.is_integer() for k, v in result.metrics.items() if k.endswith("_iters"))
    assert result.unconverged == []
    ranks = [result.metrics[f"transfer_retrieval_s2i_rank{k}"] for k in (1, 2, 3)]
    assert ranks == sorted(ranks)
    assert set(result.confusions) == {
        f"transfer_{m}_{f}_linear" for m in ("image", "sound") for f in ("f", "h", "z")
    }
    assert all(c.shape == (3, 3) and c.sum() == 12 for c in result.confusions.values())
    figs = result.figures(["a", "b", "c", "d"])  # a 4th, absent class is padded
    assert set(figs) == set(result.confusions)
    assert all(isinstance(f, Figure) for f in figs.values())


def test_run_downstream_skips_missing_f_and_absent_modality() -> None:
    method = _trained_looking_method(with_f=False)
    cfg = EvalConfig(batch_size=16, features=("f", "h"), retrieval_ks=2)
    sound_only = PairDataset(12, modalities=("sound",))
    result = run_downstream(method, train_set=sound_only, test_set=sound_only, cfg=cfg)
    assert set(result.metrics) == {
        "sound_h_linear_acc", "sound_h_linear_precision", "sound_h_linear_recall",
        "sound_h_linear_f1", "sound_h_linear_iters", "sound_h_knn_acc",
    }
    # Declared: the sound names of both families (a method without f logs the h ones only).
    assert set(result.metrics) < set(metric_names(cfg, modalities=("sound",)))
    assert {m.replace("_f_", "_h_") for m in metric_names(cfg, modalities=("sound",))} == set(result.metrics)


def test_run_downstream_requires_h_and_z() -> None:
    method = _trained_looking_method(with_h=False)
    with pytest.raises(ValueError, match="h_v"):
        run_downstream(method, train_set=PairDataset(9), test_set=PairDataset(6),
                       cfg=EvalConfig(features=("h",)))


def test_downstream_result_figures_need_enough_names() -> None:
    result = DownstreamResult(metrics={}, confusions={"image_h_linear": np.eye(3, dtype=int)})
    with pytest.raises(ValueError, match="class_names"):
        result.figures(["a", "b"])


# ---------------------------------------------------------------------------------------------
# Config validation and figures.


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"features": ("h", "q")}, "features"),
        ({"features": "h"}, "features"),
        ({"features": ("h", "h")}, "features"),
        ({"batch_size": 0}, "batch_size"),
        ({"knn_k": -1}, "knn_k"),
        ({"retrieval_ks": 0}, "retrieval_ks"),
        ({"linear_max_iter": 0}, "linear_max_iter"),
        ({"linear_C": 0.0}, "linear_C"),
        ({"knn": "yes"}, "knn"),
    ],
)
def test_eval_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        EvalConfig(**kwargs)


def test_eval_config_accepts_list_features() -> None:
    assert EvalConfig(features=["z"]).features == ("z",)  # type: ignore[arg-type]


def test_confusion_figure_saves_png(tmp_path) -> None:
    fig = confusion_matrix_figure(np.array([[3, 1], [0, 4]]), ["dog", "cat"], title="image_h")
    path = tmp_path / "sub" / "confusion.png"
    save_figure(fig, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="class_names"):
        confusion_matrix_figure(np.eye(3), ["a", "b"], title="x")


def test_the_confusion_pngs_of_one_evaluation_are_drawn_as_figures_of_their_own_would_be(tmp_path) -> None:
    """One layout for the matrices of an evaluation, drawn once: every PNG has the pixels of the
    same matrix drawn in a figure of its own."""
    import matplotlib.image

    from methods.evaluate.plots import write_confusion_pngs

    rng = np.random.default_rng(0)
    names = [f"class_{i}" for i in range(6)]
    # The names an evaluation gives them (titles of one height, so one layout fits them all).
    confusions = {name: rng.integers(0, 9, (6, 6)) for name in ("image_h_linear", "sound_h_linear", "image_z_linear")}
    paths = write_confusion_pngs(confusions, names, tmp_path / "plots")
    assert [p.name for p in paths] == [f"confusion_{name}.png" for name in confusions]
    for (name, matrix), path in zip(confusions.items(), paths, strict=True):
        alone = tmp_path / f"alone_{name}.png"
        confusion_matrix_figure(matrix, names, title=name).savefig(alone)
        np.testing.assert_array_equal(matplotlib.image.imread(path), matplotlib.image.imread(alone))
    assert matplotlib.image.imread(paths[0]).tolist() != matplotlib.image.imread(paths[1]).tolist()


# ---------------------------------------------------------------------------------------------
# Per-block linear probes (AVID Table 1) on the stages of E_v / E_s.


@pytest.fixture
def one_thread():
    # Tiny convolutions run fastest on one thread, and the test machine's cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ResNetMethod(Method):
    """Tiny ResNet encoders E_v (ResNet-18) and E_s (ResNet-10) of width 8, as the methods use."""

    name: ClassVar[str] = "resnet_toy"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.E_v = build_encoder(EncoderConfig("resnet18", 8), in_channels=3)
        self.E_s = build_encoder(EncoderConfig("resnet10", 8), in_channels=1)
        self.g_v = nn.Linear(64, 4)
        self.g_s = nn.Linear(64, 4)

    def embed(
        self, *, images: torch.Tensor | None = None, sounds: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for x, enc, head, s in ((images, self.E_v, self.g_v, "v"), (sounds, self.E_s, self.g_s, "s")):
            if x is not None:
                out[f"h_{s}"] = enc(x)
                out[f"z_{s}"] = F.normalize(head(out[f"h_{s}"]), dim=1)
        return out


@pytest.mark.usefixtures("one_thread")
def test_block_features_have_per_block_channels_and_leave_method_unchanged() -> None:
    method = ResNetMethod().train()
    before = _snapshot(method)
    feats = extract_block_features(method, PairDataset(6), batch_size=4)
    assert all(m.training for m in method.modules()), "train modes not restored"
    for key, value in before.items():
        assert torch.equal(method.state_dict()[key], value), f"{key} changed"
    widths = {"block1": 8, "block2": 16, "block3": 32, "block4": 64}
    assert set(feats) == {f"{b}_{s}" for b in widths for s in ("v", "s")} | {"label"}
    for block, C in widths.items():
        assert feats[f"{block}_v"].shape == (6, C) and feats[f"{block}_s"].shape == (6, C)
    # block4 is the encoder output h, computed with frozen BatchNorm statistics.
    h = extract_features(method, PairDataset(6), batch_size=6)
    assert torch.allclose(feats["block4_v"], h["h_v"], atol=1e-6)
    assert torch.allclose(feats["block4_s"], h["h_s"], atol=1e-6)


class _MapEncoder(nn.Module):
    """forward_blocks returns unpooled (B, C, H, W) maps: the input and its square."""

    def forward_blocks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"block1": x, "block2": x**2}


def test_block_features_average_pool_feature_maps() -> None:
    method = TinyMethod()
    method.E_v, method.E_s = _MapEncoder(), _MapEncoder()
    data = PairDataset(5)
    feats = extract_block_features(method, data, batch_size=2)
    assert torch.allclose(feats["block1_v"], data.images.mean(dim=(2, 3)))
    assert torch.allclose(feats["block2_s"], (data.sounds**2).mean(dim=(2, 3)))


@pytest.mark.usefixtures("one_thread")
def test_run_downstream_block_probes() -> None:
    method = ResNetMethod().train()
    before = _snapshot(method)
    cfg = EvalConfig(batch_size=8, features=("h",), knn=False, retrieval=False, block_probes=True)
    result = run_downstream(method, train_set=PairDataset(24, seed=1), test_set=PairDataset(9, seed=2),
                            cfg=cfg, prefix="t_")
    for key, value in before.items():
        assert torch.equal(method.state_dict()[key], value), f"{key} changed"
    stats = ("acc", "precision", "recall", "f1", "iters")
    expected = {f"t_{m}_h_linear_{x}" for m in ("image", "sound") for x in stats}
    expected |= {
        f"t_{m}_block{k}_linear_{x}" for m in ("image", "sound") for k in range(1, 5) for x in stats
    }
    assert set(result.metrics) == expected == set(metric_names(cfg, prefix="t_"))
    assert "t_sound_block2_linear" in result.confusions
    # block4 pooled is h itself, so its probe is the h probe.
    for m in ("image", "sound"):
        for x in stats:
            assert result.metrics[f"t_{m}_block4_linear_{x}"] == result.metrics[f"t_{m}_h_linear_{x}"]


def test_block_probes_need_encoders_with_forward_blocks() -> None:
    cfg = EvalConfig(features=("h",), block_probes=True)
    with pytest.raises(ValueError, match=r"^eval\.block_probes: TinyMethod has no image encoder E_v"):
        run_downstream(
            _trained_looking_method(), train_set=PairDataset(9), test_set=PairDataset(6), cfg=cfg
        )
    method = _trained_looking_method()
    method.E_v = nn.Identity()  # an encoder, but without forward_blocks
    with pytest.raises(ValueError, match=r"^eval\.block_probes:"):
        extract_block_features(method, PairDataset(3))


# ---------------------------------------------------------------------------------------------
# Linear SVM and per-clip averaging.


def _clusters(num_classes: int, n: int, *, seed: int, crops: int | None = None):
    """Overlapping Gaussian clusters (so classifiers err), optionally with per-clip crops.

    The class centres are the same for every ``seed``; only the noise differs.
    """
    centres_CD = np.random.default_rng(1234).normal(size=(num_classes, 6))
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    shape = (n, 6) if crops is None else (n, crops, 6)
    noise = rng.normal(size=shape) * 1.5
    X = centres_CD[y] + noise if crops is None else centres_CD[y][:, None, :] + noise
    return X, y


@pytest.mark.parametrize("num_classes", [2, 4])
def test_linear_svm_equals_hand_pipeline(num_classes: int) -> None:
    train_X, train_y = _clusters(num_classes, 60, seed=0)
    test_X, test_y = _clusters(num_classes, 40, seed=1)
    hand = make_pipeline(StandardScaler(), LinearSVC(C=0.3, random_state=0)).fit(train_X, train_y)
    expected = hand.predict(test_X)
    got = predict_clips(fit_linear_svm(train_X, train_y, C=0.3), test_X)
    np.testing.assert_array_equal(got, expected)
    assert 0.3 < np.mean(expected == test_y) < 1.0  # a non-trivial case
    result = linear_svm(train_X, train_y, test_X, test_y, C=0.3, num_classes=5)
    assert result.accuracy == pytest.approx(np.mean(expected == test_y))
    hand_result = classification_metrics(test_y, expected, num_classes=5)
    np.testing.assert_array_equal(result.confusion, hand_result.confusion)


@pytest.mark.parametrize("classify", [linear_svm, linear_probe])
def test_standardisation_uses_train_statistics_only(classify) -> None:
    # 1-D: train classes at -1 and +1; the test set is the train set shifted by +100. With the
    # train mean and scale every test point lies far on the class-1 side (accuracy 1/2); a scaler
    # refitted on the test split would undo the shift and score 1.
    train_X = np.array([[-1.2], [-1.0], [-0.8], [0.8], [1.0], [1.2]])
    y = np.array([0, 0, 0, 1, 1, 1])
    test_X = train_X + 100.0
    assert classify(train_X, y, test_X, y).accuracy == 0.5
    leaked = LinearSVC().fit(StandardScaler().fit_transform(train_X), y)
    assert np.mean(leaked.predict(StandardScaler().fit_transform(test_X)) == y) == 1.0


def _crop_average_loop(classifier, test_NKD: np.ndarray) -> np.ndarray:
    """Average each clip's per-crop scores one crop at a time, then take the best class."""
    preds = []
    for clip in test_NKD:
        total = 0.0
        for crop in clip:
            if hasattr(classifier, "predict_proba"):
                total = total + classifier.predict_proba(crop[None])[0]
            else:
                total = total + classifier.decision_function(crop[None])[0]
        mean = total / len(clip)
        if np.ndim(mean) == 0:  # binary SVM: one score, positive means classes_[1]
            preds.append(classifier.classes_[int(mean > 0)])
        else:
            preds.append(classifier.classes_[int(np.argmax(mean))])
    return np.array(preds)


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("fit", [fit_linear_svm, fit_logistic_probe])
def test_per_clip_averaging_matches_crop_loop(num_classes: int, fit) -> None:
    train_X, train_y = _clusters(num_classes, 45, seed=2)
    test_NKD, test_y = _clusters(num_classes, 20, seed=3, crops=4)
    classifier = fit(train_X, train_y)
    expected = _crop_average_loop(classifier, test_NKD)
    np.testing.assert_array_equal(predict_clips(classifier, test_NKD), expected)
    # Averaging over crops is not the same as classifying the crops one by one.
    per_crop_NK = predict_clips(classifier, test_NKD.reshape(-1, 6)).reshape(20, 4)
    assert not np.array_equal(expected[:, None].repeat(4, 1), per_crop_NK)
    classify = linear_svm if fit is fit_linear_svm else linear_probe
    accuracy = classify(train_X, train_y, test_NKD, test_y).accuracy
    assert accuracy == pytest.approx(np.mean(expected == test_y))


def test_logistic_probe_classifier_is_the_linear_probe() -> None:
    train_X, train_y = _clusters(3, 45, seed=4)
    test_X, test_y = _clusters(3, 30, seed=5)
    hand = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000, random_state=0))
    expected = hand.fit(train_X, train_y).predict(test_X)
    got = predict_clips(fit_logistic_probe(train_X, train_y, C=0.5), test_X)
    np.testing.assert_array_equal(got, expected)
    assert linear_probe(train_X, train_y, test_X, test_y, C=0.5).accuracy == np.mean(expected == test_y)


def test_crop_windows_closed_forms() -> None:
    assert crop_windows(10, 1) == [(0, 10)]
    assert crop_windows(10, 2) == [(0, 5), (5, 10)]
    assert crop_windows(10, 3) == [(0, 5), (2, 7), (5, 10)]
    assert crop_windows(3, 4) == [(0, 1), (0, 1), (1, 2), (2, 3)]  # L = 1; more crops than starts
    assert crop_windows(1, 3) == [(0, 1)] * 3
    with pytest.raises(ValueError, match="crops"):
        crop_windows(10, 0)


@pytest.mark.usefixtures("one_thread")
def test_sound_crop_features_match_embed_loop() -> None:
    method = _trained_looking_method()
    before = _snapshot(method)
    data = PairDataset(7)
    feats = extract_sound_crop_features(method, data, crops=3, batch_size=4)
    _assert_unchanged(method, before)
    assert set(feats) == {"f_s", "h_s", "z_s", "label"}
    assert feats["z_s"].shape == (7, 3, 5)
    frozen = copy.deepcopy(method).eval()
    with torch.no_grad():
        for i in range(7):
            for k, (a, b) in enumerate([(0, 5), (2, 7), (5, 10)]):
                out = frozen.embed(sounds=data.sounds[i : i + 1, :, :, a:b])
                assert torch.allclose(feats["h_s"][i, k], out["h_s"][0], atol=1e-5)
                assert torch.allclose(feats["z_s"][i, k], out["z_s"][0], atol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_run_downstream_svm_and_clip_metrics_match_hand_pipelines() -> None:
    method = _trained_looking_method()
    before = _snapshot(method)
    train_set, test_set = PairDataset(30, seed=1), PairDataset(12, seed=2)
    cfg = EvalConfig(batch_size=8, features=("h",), knn=False, retrieval=False, sound_svm=True,
                     svm_C=0.5, sound_crops=3)
    result = run_downstream(method, train_set=train_set, test_set=test_set, cfg=cfg)
    _assert_unchanged(method, before)
    stats = ("acc", "precision", "recall", "f1", "iters")
    protocols = ("linear", "svm", "linear_clip", "svm_clip")
    expected = {f"sound_h_{p}_{x}" for p in protocols for x in stats}
    expected |= {f"image_h_linear_{x}" for x in stats}
    assert set(result.metrics) == expected == set(metric_names(cfg))
    assert set(result.confusions) == {f"sound_h_{p}" for p in protocols} | {"image_h_linear"}

    # Full clips: a hand StandardScaler + LinearSVC on the extracted h_s.
    train, test = extract_features(method, train_set), extract_features(method, test_set)
    hand = make_pipeline(StandardScaler(), LinearSVC(C=0.5, random_state=0))
    pred = hand.fit(train["h_s"].numpy(), train["label"].numpy()).predict(test["h_s"].numpy())
    truth = test["label"].numpy()
    assert result.metrics["sound_h_svm_acc"] == pytest.approx(np.mean(pred == truth))
    # Crops: train on each clip's mean crop feature, average the test crops' scores.
    train_c = extract_sound_crop_features(method, train_set, crops=3)
    test_c = extract_sound_crop_features(method, test_set, crops=3)
    for proto, estimator in (("svm_clip", LinearSVC(C=0.5, random_state=0)),
                             ("linear_clip", LogisticRegression(C=1.0, max_iter=1000, random_state=0))):
        hand = make_pipeline(StandardScaler(), estimator)
        hand.fit(train_c["h_s"].mean(dim=1).numpy(), train_c["label"].numpy())
        pred = _crop_average_loop(hand, test_c["h_s"].numpy().astype(np.float64))
        assert result.metrics[f"sound_h_{proto}_acc"] == pytest.approx(np.mean(pred == truth))
        np.testing.assert_array_equal(
            result.confusions[f"sound_h_{proto}"],
            classification_metrics(truth, pred, num_classes=3).confusion,
        )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sound_crops": 0}, "sound_crops"),
        ({"sound_crops": 2.5}, "sound_crops"),
        ({"svm_C": 0.0}, "svm_C"),
        ({"svm_C": -1}, "svm_C"),
        ({"svm_C": True}, "svm_C"),
        ({"svm_max_iter": 0}, "svm_max_iter"),
        ({"block_probes": "yes"}, "block_probes"),
        ({"sound_svm": 1}, "sound_svm"),
    ],
)
def test_eval_config_new_fields_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        EvalConfig(**kwargs)


def test_eval_config_new_protocols_are_off_by_default() -> None:
    cfg = EvalConfig()
    assert (cfg.block_probes, cfg.sound_svm, cfg.sound_crops) == (False, False, 1)


# --- binaural protocols: spatial probe and clip retrieval -------------------------------------


class _SceneSet(Dataset):
    """Items whose image and sound share a random code (so each sound's partner is findable)
    and whose features shift with an azimuth sector. ``shuffle_partners`` pairs each sound
    with another item's image."""

    def __init__(self, n: int, *, seed: int, sectors: int = 4, shuffle_partners: bool = False,
                 with_sector: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.code = torch.randn(n, 16, generator=g)
        self.sector = torch.arange(n) % sectors
        self.label = (torch.arange(n) // sectors) % 3
        self.partner = torch.randperm(n, generator=g) if shuffle_partners else torch.arange(n)
        self.with_sector = with_sector

    def __len__(self) -> int:
        return len(self.code)

    def _x(self, i: int, size: int) -> torch.Tensor:
        x = torch.zeros(size)
        x[:16] = self.code[i]
        x[16 + int(self.sector[i])] = 8.0  # a sector indicator a linear probe can read
        return x

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"image": self._x(int(self.partner[i]), 3 * 8 * 8).view(3, 8, 8),
                "sound": self._x(i, 60).view(1, 6, 10), "label": self.label[i], "index": torch.tensor(i)}
        if self.with_sector:
            item["sector"] = self.sector[i]
        return item


class _CodeMethod(Method):
    name: ClassVar[str] = "code"

    def embed(self, *, images=None, sounds=None):
        out = {}
        for x, s in ((images, "v"), (sounds, "s")):
            if x is not None:
                flat = x.flatten(1)
                out[f"h_{s}"] = flat[:, :24]
                out[f"z_{s}"] = F.normalize(flat[:, :16], dim=1)
        return out


def test_spatial_probe_reads_sectors_and_clip_retrieval_finds_the_partner() -> None:
    cfg = EvalConfig(features=("h",), knn=False, retrieval=False, spatial_probe=True, clip_retrieval=True,
                     retrieval_ks=3)
    result = run_downstream(_CodeMethod(), train_set=_SceneSet(48, seed=1), test_set=_SceneSet(24, seed=2), cfg=cfg)
    for modality in ("image", "sound"):
        assert result.metrics[f"{modality}_h_spatial_acc"] == 1.0
        assert result.metrics[f"{modality}_h_spatial_f1"] == 1.0
    assert [result.metrics[f"retrieval_s2i_clip_rank{k}"] for k in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert "retrieval_s2i_rank1" not in result.metrics
    assert set(result.metrics) == set(metric_names(cfg))

    shuffled = run_downstream(_CodeMethod(), train_set=_SceneSet(48, seed=1),
                              test_set=_SceneSet(24, seed=2, shuffle_partners=True), cfg=cfg)
    hits = [int(p) == i for i, p in enumerate(_SceneSet(24, seed=2, shuffle_partners=True).partner)]
    # Only the sounds whose partner happens to be their own index can still find their image.
    assert shuffled.metrics["retrieval_s2i_clip_rank1"] == pytest.approx(sum(hits) / 24)


def test_spatial_probe_needs_sector_labels() -> None:
    cfg = EvalConfig(features=("h",), spatial_probe=True)
    with pytest.raises(ValueError, match="eval.spatial_probe"):
        run_downstream(_CodeMethod(), train_set=_SceneSet(12, seed=1, with_sector=False),
                       test_set=_SceneSet(12, seed=2, with_sector=False), cfg=cfg)


def test_mean_pairwise_cosine_against_a_loop() -> None:
    from methods.evaluate.suite import mean_pairwise_cosine

    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 5, generator=g)
    u = torch.nn.functional.normalize(z, dim=1)
    loop = [float(u[i] @ u[j]) for i in range(9) for j in range(9) if i != j]
    assert abs(mean_pairwise_cosine(z) - sum(loop) / len(loop)) < 1e-6
    assert abs(mean_pairwise_cosine(torch.ones(4, 3) * torch.tensor([1.0, 2.0, 3.0])) - 1.0) < 1e-9  # collapsed


def test_validation_split_is_stratified_seeded_and_leaves_every_class_a_fitting_row() -> None:
    from methods.evaluate.selection import validation_split

    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    fit, val = validation_split(y, 0.2)
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(16))
    assert [int((y[val] == c).sum()) for c in (0, 1, 2)] == [2, 1, 0]  # round(0.2 x n), none of a singleton
    assert torch.equal(fit, validation_split(y, 0.2)[0])


def test_the_validation_protocol_chooses_on_the_training_split_only() -> None:
    """The chosen C / k are logged, belong to their grids, and do not move when the test labels
    do: the test split is never looked at to choose them."""
    method = _trained_looking_method()
    cfg = EvalConfig(batch_size=8, features=("h",), retrieval=False, protocol="validation",
                     linear_C_grid=(0.001, 1.0, 1000.0), knn_k_grid=(1, 3, 50))
    train, test = PairDataset(30, seed=1), PairDataset(12, seed=2)
    result = run_downstream(method, train_set=train, test_set=test, cfg=cfg)
    assert set(result.metrics) == set(metric_names(cfg))
    chosen = {k: v for k, v in result.metrics.items() if k.endswith(("_linear_C", "_knn_k"))}
    assert set(chosen) == {"image_h_linear_C", "image_h_knn_k", "sound_h_linear_C", "sound_h_knn_k"}
    assert all(v in (0.001, 1.0, 1000.0) for k, v in chosen.items() if k.endswith("_C"))
    assert all(v in (1, 3) for k, v in chosen.items() if k.endswith("_k"))  # 50 > the 24 fitting rows
    test.labels = test.labels.flip(0)
    again = run_downstream(method, train_set=train, test_set=test, cfg=cfg)
    assert {k: again.metrics[k] for k in chosen} == chosen


def test_with_a_validation_split_the_validation_protocol_chooses_on_it_alone() -> None:
    """Given the dataset's validation split, each probe's C / k is the grid value a hand loop picks
    by fitting on every training row and scoring that split; the test labels play no part."""
    method = _trained_looking_method()
    cfg = EvalConfig(batch_size=8, features=("h",), retrieval=False, protocol="validation",
                     linear_C_grid=(0.001, 1.0, 1000.0), knn_k_grid=(1, 3, 7))
    train, val, test = PairDataset(30, seed=1), PairDataset(15, seed=3), PairDataset(12, seed=2)
    result = run_downstream(method, train_set=train, test_set=test, cfg=cfg, val_set=val)
    assert set(result.metrics) == set(metric_names(cfg))
    tr, va = extract_features(method, train, batch_size=8), extract_features(method, val, batch_size=8)
    for modality, s in (("image", "v"), ("sound", "s")):
        X, y, vX, vy = tr[f"h_{s}"], tr["label"], va[f"h_{s}"], va["label"]
        scores = [linear_probe(X, y, vX, vy, C=c, num_classes=3).accuracy for c in cfg.linear_C_grid]
        assert result.metrics[f"{modality}_h_linear_C"] == cfg.linear_C_grid[scores.index(max(scores))]
        scores = [knn_accuracy(X, y, vX, vy, k=k) for k in cfg.knn_k_grid]
        assert result.metrics[f"{modality}_h_knn_k"] == cfg.knn_k_grid[scores.index(max(scores))]
    test.labels = test.labels.flip(0)
    again = run_downstream(method, train_set=train, test_set=test, cfg=cfg, val_set=val)
    assert {k: v for k, v in again.metrics.items() if k.endswith(("_C", "_k"))} == \
           {k: v for k, v in result.metrics.items() if k.endswith(("_C", "_k"))}


def test_the_fold_protocol_holds_each_fold_out_once_and_reports_the_mean() -> None:
    import statistics

    from methods.evaluate.protocol import check_folds, evaluate_splits

    class Folded:
        """Two splits whose rows carry folds 1..3, and an image-only + sound-only mix."""

        class_names = ["a", "b", "c"]

        def __init__(self):
            self.train, self.test = PairDataset(24, seed=1), PairDataset(12, seed=2)

        def split_folds(self, split):
            return [1 + i % 3 for i in range(len(self.train if split == "train" else self.test))]

        def eval_groups(self, train, test):
            from methods.data.real import EvalGroup

            return [EvalGroup(PairDataset(24, seed=1, modalities=(m,)), PairDataset(12, seed=2, modalities=(m,)),
                              self.split_folds("train"), self.split_folds("test")) for m in ("image", "sound")]

    cfg = EvalConfig(batch_size=8, features=("h",), protocol="folds", folds=3, knn_k_grid=(1, 3))
    data = Folded()
    check_folds(data, cfg)
    with pytest.raises(ValueError, match=r"^eval\.folds: 5 folds expected \(1\.\.5\), the manifest's train and test rows carry \[1, 2, 3\]"):
        check_folds(data, dataclasses.replace(cfg, folds=5))
    result = evaluate_splits(_trained_looking_method(), data, cfg)
    for modality in ("image", "sound"):
        per_fold = [result.metrics[f"{modality}_h_linear_acc_fold{k}"] for k in (1, 2, 3)]
        assert result.metrics[f"{modality}_h_linear_acc"] == pytest.approx(statistics.fmean(per_fold))
        assert f"{modality}_h_linear_C_fold2" in result.metrics
        # Every row is a test row once: the summed confusion matrix counts all 36 rows.
        assert int(result.confusions[f"{modality}_h_linear"].sum()) == 36
    assert "retrieval_s2i_rank1" not in result.metrics  # image-only and sound-only rows: no pairs
    assert set(result.metrics) <= set(metric_names(cfg))


# --- binaural protocols: the image probes on the foregrounds alone -----------------------------


class _ForegroundSet(Dataset):
    """8 x 8 images whose class lives only in a 2 x 2 foreground patch (mask 1 there), on a
    background of a random bright colour that carries no class; no sound."""

    def __init__(self, n: int, *, seed: int, with_mask: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.label = torch.arange(n) % 3
        self.noise = 20.0 * torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, 8, 8)
        self.with_mask = with_mask

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.zeros(1, 8, 8)
        row, col = 2 * (i % 4), 2 * ((i // 4) % 4)
        mask[:, row : row + 2, col : col + 2] = 1.0
        image = self.noise[i] * (1 - mask)
        image[int(self.label[i])] += 16.0 * mask[0]
        item = {"image": image, "label": self.label[i]}
        if self.with_mask:
            item["mask"] = mask
        return item


class _MeanColourMethod(Method):
    """h: each image's mean colour; z: the same, normalised."""

    name: ClassVar[str] = "mean_colour"

    def embed(self, *, images=None, sounds=None):
        h = images.mean(dim=(2, 3))
        return {"h_v": h, "z_v": F.normalize(h, dim=1)}


def test_foreground_probe_reads_the_class_from_the_objects_alone() -> None:
    from methods.evaluate import ForegroundImages

    cfg = EvalConfig(features=("h", "z"), knn_k=3, retrieval=False, foreground_probe=True)
    result = run_downstream(_MeanColourMethod(), train_set=_ForegroundSet(60, seed=1),
                            test_set=_ForegroundSet(30, seed=2), cfg=cfg)
    # On the foregrounds the mean colour is the class; on the whole image the background drowns it.
    for name in ("fg_image_h_linear_acc", "fg_image_h_knn_acc", "fg_image_z_linear_acc"):
        assert result.metrics[name] == 1.0, name
    assert result.metrics["image_h_linear_acc"] < 0.8
    assert set(result.metrics) == set(metric_names(cfg, modalities=("image",)))
    assert "fg_image_h_linear" in result.confusions and not any("sound" in n for n in result.metrics)
    item, raw = ForegroundImages(_ForegroundSet(5, seed=3))[4], _ForegroundSet(5, seed=3)[4]
    assert torch.equal(item["image"], raw["image"] * raw["mask"]) and set(item) == {"image", "label"}

    off = run_downstream(_MeanColourMethod(), train_set=_ForegroundSet(60, seed=1),
                         test_set=_ForegroundSet(30, seed=2), cfg=dataclasses.replace(cfg, foreground_probe=False))
    assert off.metrics == {k: v for k, v in result.metrics.items() if not k.startswith("fg_")}


def test_foreground_probe_needs_masks() -> None:
    cfg = EvalConfig(features=("h",), foreground_probe=True)
    with pytest.raises(ValueError, match=r"^eval\.foreground_probe: test items carry no 'mask'"):
        run_downstream(_MeanColourMethod(), train_set=_ForegroundSet(12, seed=1, with_mask=False),
                       test_set=_ForegroundSet(12, seed=2, with_mask=False), cfg=cfg)


@pytest.mark.usefixtures("one_thread")
def test_foreground_block_probes_on_binaural_scenes_log_what_is_declared() -> None:
    from torch.utils.data import Subset

    from methods.data import build_dataset
    from methods.registry import build_method
    from orchestrator.config import resolve

    cfg = resolve({}, preset="tiny", overrides=["method.name=multissl", "eval.block_probes=true"])
    assert cfg.eval.foreground_probe and cfg.eval.spatial_probe  # Multi-SSL's presets turn them on
    data = build_dataset(cfg.data)
    torch.manual_seed(0)
    method = build_method(cfg.method_name, cfg.method, data.info())
    ev = dataclasses.replace(cfg.eval, batch_size=16)
    result = run_downstream(method, train_set=Subset(data.pool("train"), range(40)),
                            test_set=Subset(data.pool("test"), range(20)), cfg=ev)
    assert set(result.metrics) == set(metric_names(ev))
    fg = {k for k in result.metrics if k.startswith("fg_")}
    assert {"fg_image_block1_linear_acc", "fg_image_h_knn_acc", "fg_image_z_linear_acc"} <= fg
    assert not any("sound" in k or "spatial" in k or "retrieval" in k for k in fg)
    # block4 pooled is h, on the foregrounds as on the whole panoramas.
    assert result.metrics["fg_image_block4_linear_acc"] == result.metrics["fg_image_h_linear_acc"]


def _random_init_like_features(rng: np.random.Generator, y: np.ndarray) -> np.ndarray:
    """Features shaped like a random-init encoder's: ReLU outputs of a random projection of weak
    class structure, half of them exactly zero, strongly correlated, float32 values."""
    means = np.random.default_rng(2).standard_normal((10, 32)) * 0.3
    W = np.random.default_rng(3).standard_normal((32, 128)) * np.logspace(0, -2, 32)[:, None] - 0.3
    x = np.maximum((means[y] + rng.standard_normal((len(y), 32))) @ W, 0)
    return x.astype(np.float32).astype(np.float64)


def test_a_converged_probe_is_unmoved_by_last_bit_changes_of_its_features() -> None:
    """Each feature times 1 + 1e-7 x N(0, 1) (what another CPU's SIMD kernels change in a float32)
    leaves every prediction of the probe as fitted by default, which runs L-BFGS to a gradient
    of 1e-10. At scikit-learn's default tolerance (1e-4) the same solver stops where the
    perturbation moves its coefficients a hundred times more (and, on these features, flips a
    test prediction: 0.305 or 0.310, benchmarks/RESULTS.md "Probe convergence")."""
    rng = np.random.default_rng(2)
    train_y, test_y = rng.integers(0, 10, 300), rng.integers(0, 10, 200)
    train_X, test_X = _random_init_like_features(rng, train_y), _random_init_like_features(rng, test_y)
    base = fit_logistic_probe(train_X, train_y)
    iterations, converged = solver_report(base)
    assert converged and iterations > 100
    predicted, tight_shift = base.predict(test_X), 0.0
    for _ in range(2):
        a, b = 1 + rng.standard_normal(train_X.shape) * 1e-7, 1 + rng.standard_normal(test_X.shape) * 1e-7
        moved = fit_logistic_probe(train_X * a, train_y)
        assert np.array_equal(moved.predict(test_X * b), predicted)
        tight_shift = max(tight_shift, float(np.abs(moved[-1].coef_ - base[-1].coef_).max()))
    loose = [fit_logistic_probe(X, train_y, tol=1e-4, max_iter=1000)[-1].coef_ for X in (train_X, train_X * a)]
    assert float(np.abs(loose[1] - loose[0]).max()) > 100 * tight_shift


def test_a_probe_that_runs_out_of_iterations_says_so() -> None:
    """A solver stopped at ``max_iter`` is reported (``converged`` False, its iterations) and the
    suite lists the probe in ``unconverged``; at the default settings nothing is listed."""
    rng = np.random.default_rng(2)
    train_y, test_y = rng.integers(0, 10, 300), rng.integers(0, 10, 200)
    train_X, test_X = _random_init_like_features(rng, train_y), _random_init_like_features(rng, test_y)
    short = linear_probe(train_X, train_y, test_X, test_y, max_iter=3)
    assert not short.converged and short.iterations == 3
    svm = linear_svm(train_X, train_y, test_X, test_y, max_iter=2)
    assert not svm.converged and svm.iterations == 2
    method = _trained_looking_method()
    cfg = EvalConfig(batch_size=8, features=("h",), knn=False, retrieval=False, linear_max_iter=1)
    result = run_downstream(method, train_set=PairDataset(30, seed=1), test_set=PairDataset(12, seed=2), cfg=cfg)
    assert result.unconverged == ["image_h_linear", "sound_h_linear"]
    assert result.metrics["image_h_linear_iters"] == 1.0
    ok = run_downstream(method, train_set=PairDataset(30, seed=1), test_set=PairDataset(12, seed=2),
                        cfg=dataclasses.replace(cfg, linear_max_iter=10000))
    assert ok.unconverged == [] and ok.metrics["image_h_linear_iters"] > 1
