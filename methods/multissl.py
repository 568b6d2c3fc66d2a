"""Multi-SSL on binaural sound: three pretext tasks and five ways of combining them (paper 004,
Vasudevan, Dai and Van Gool; docs/spec.md §5).

Tasks, on binaural scenes (a 360° panorama, its foreground mask, a 2-channel clip):

- ``spatial``: rotate the panorama by one of R angles k·360/R and predict k from the rotated
  image and the (unrotated) sound, cross-entropy (supp. eq. 1). k = 0 is the aligned scene.
- ``foreground``: InfoNCE between the sound feature a_i and the feature of its aligned masked
  foreground v_p, against misaligned ones (supp. eq. 2): the other clips' foregrounds and, with
  ``fa_rotated_negatives``, its own foreground rotated by the R - 1 other angles.
- ``gap``: two slices of one sound clip at random times, predict their normalised gap
  δ = (t2 - t1) / (T - L) in [-1, 1]; Huber loss with ε = ``huber_delta`` = 1.5 (supp. eq. 3-4).

Image features that must know where things are (spatial, foreground) read the encoder's last
feature map average-pooled to R azimuth bins (height pooled away): a (C·R) "azimuth feature".
The representation that downstream protocols probe is the global-average-pooled encoder output
h, as for every method.

The rotated negatives of foreground alignment (misaligned segments in P_i of supp. eq. 2: the
clip's own foreground turned to the R - 1 wrong angles) are the features of the truly rotated
foreground panoramas E_v(rotate(x ⊙ m, k)), k = 1 .. R-1, whichever way they are computed.
Rolling is used only where it is exact (``rolls_exactly``): the image encoder pads circularly
along the width (``image_encoder.padding: circular``, the default here, see
``PanoramaEncoderConfig``) and a rotation step of W / R panorama columns is a multiple of the
encoder's total stride (``map_stride``: 32 for the ImageNet stem, 8 for the small one, 16 for
VGG). Then the encoder is exactly roll-equivariant, E_v(rotate(x, k)) = roll(E_v(x), k·W'/R) on
its W'-column map, each of the R azimuth bins is W'/R whole columns, and the rotated features
are the azimuth feature rolled by k bins: one forward pass. Elsewhere the R rotated panoramas
are encoded, in one batch of B·R: R - 1 more forward passes' worth of compute, and the same
loss. That is with ``padding: zeros``, where the strip's two borders are not neighbours and the
rolled feature is not the rotated one's (0.56-0.70 of its norm apart for a fresh tiny-preset
encoder in eval mode on tiny-preset scenes), and with a step that is not whole feature columns.
In training mode the two ways agree too: rolled maps have the same BatchNorm batch statistics.

Combinations (``combination``; the main paper's Fig. 2 and supp. Fig. 1), in one run each so a
single search space compares them:

- ``multitask``: one encoder pair, L = Σ_t w_t L_t over ``tasks`` (one task: single-task SSL).
- ``concat``: one encoder pair per task, trained one after the other (one stage per task);
  h is the concatenation of the task encoders' features.
- ``incremental``: one encoder pair trained on the tasks in order; from the second stage on, the
  encoders are also pulled towards a frozen copy of themselves taken at the end of the previous
  stage, λ·MSE(f, f_prev) (``distill_weight``), so earlier tasks are not forgotten.
- ``euclidean``: the task encoders of ``concat`` as teachers, then a last stage trains a fresh
  student pair to regress each teacher's features through a linear map (MSE).
- ``contrastive``: the same, with an InfoNCE between the student's and each teacher's projected
  features over the batch (temperature ``distill_temperature``) instead of the MSE.

Stages split ``train.epochs`` evenly (``configure_training``); the stage is a function of the
epoch counter, a buffer, so a resumed run continues in the right stage. A finished stage's
encoders are never in a later stage's graph with gradients (teachers run under ``no_grad`` and in
eval mode, so their BatchNorm statistics stay as their stage left them); they are checkpointed
with the model.

Legend: B batch, C encoder width, R rotations (and azimuth bins), K the R angles k = 0 .. R-1,
J the R - 1 wrong ones, H/W panorama height/width, F mel bins, T frames, L slice frames, D sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Batch, DataInfo, FieldError, Method, StepOutput
from methods.binaural_views import azimuth_feature, cut_slices, rolls_exactly, rotated_azimuth_features
from methods.data.binaural import rotate_panorama
from methods.encoders import PAPER_ENCODERS, TINY_ENCODERS, Encoder, EncoderConfig, build_encoder
from methods.losses import foreground_nce, huber, info_nce

TASKS = ("spatial", "foreground", "gap")
COMBINATIONS = ("multitask", "concat", "incremental", "euclidean", "contrastive")

# Per avlab preset: this method's section, and what it changes in the other sections (data,
# train, eval), applied under the run file and the overrides. Values equal to the config's
# defaults (the paper's) are not repeated.
# Multi-SSL runs on binaural scenes: 360° panoramas and 4 s two-channel clips, long enough for
# several temporal slices, and adds the spatial probe, clip retrieval and the probes on the
# foregrounds alone to the evaluation.
_BINAURAL_TINY_DATA = {"binaural": True, "clip_seconds": 4.0, "n_frames": 128, "panorama_width": 128, "paired_size": 2048}
_BINAURAL_EVAL = {"spatial_probe": True, "clip_retrieval": True, "foreground_probe": True}
PRESETS = {
    "tiny": {"method": TINY_ENCODERS, "data": _BINAURAL_TINY_DATA, "eval": _BINAURAL_EVAL},
    # Binaural panoramas cannot take the light paired augmentation (a shift or flip turns the scene
    # against the ears). The scenes are the paper's kind, without class glides: data.glide_octaves
    # (a course through the clip that the temporal gap can learn, benchmarks/RESULTS-history.md, "Multi-SSL's
    # temporal gap with class glides") is avlab's engineered positive control, a labelled row of
    # search_spaces/multissl_tasks_small.yaml, never the preset's data.
    "small": {"method": TINY_ENCODERS, "data": {**_BINAURAL_TINY_DATA, "paired_size": 4096},
              "eval": _BINAURAL_EVAL,
              "train": {"paired_augment": "none", "epochs": 8}},
    # Paper 004 uses a ResNet-50 for images; the encoders here stay those of the other methods.
    "paper": {"method": PAPER_ENCODERS,
              "data": {"binaural": True, "clip_seconds": 4.0, "n_frames": 400, "panorama_width": 896},
              "eval": _BINAURAL_EVAL},
}


@dataclass(frozen=True)
class PanoramaEncoderConfig(EncoderConfig):
    """The image encoder of Multi-SSL: an ``EncoderConfig`` whose padding defaults to
    ``circular``, since its inputs are 360° panoramas (see the module docstring). The config
    loader builds ``method.image_encoder`` as this class, so the default holds under every
    preset; ``method.image_encoder.padding=zeros`` gives the zero-padded encoder back."""

    padding: str = "circular"


@dataclass(frozen=True)
class MultiSSLConfig:
    """Multi-SSL hyperparameters; ε = 1.5 is the paper's, the rest are this implementation's."""

    image_encoder: PanoramaEncoderConfig = field(default_factory=lambda: PanoramaEncoderConfig("resnet18", 64))
    sound_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig("resnet10", 64))
    tasks: tuple[str, ...] = TASKS  # in training order for the staged combinations
    combination: str = "multitask"
    spatial_weight: float = 1.0  # w_t of the multi-task sum
    foreground_weight: float = 1.0
    gap_weight: float = 1.0
    rotations: int = 4  # R: the panorama turns by k * 360 / R, k = 0 .. R-1
    head_hidden_dim: int = 512  # hidden units of the spatial and gap prediction heads
    fa_dim: int = 128  # foreground-alignment embedding size
    fa_temperature: float = 0.07  # tau of supp. eq. 2
    fa_rotated_negatives: bool = True  # the clip's own foreground turned to the R-1 wrong angles
    gap_slice_frames: int = 32  # L: frames per sound slice
    huber_delta: float = 1.5  # epsilon of the Huber loss (supp. §1)
    distill_weight: float = 1.0  # incremental: lambda of the feature distillation
    distill_dim: int = 128  # contrastive distillation: projection size
    distill_temperature: float = 0.1  # contrastive distillation: InfoNCE temperature

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not isinstance(self.tasks, (tuple, list)) or not self.tasks:
            raise ValueError(f"tasks: expected a non-empty list from {list(TASKS)}, got {self.tasks!r}")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks: unknown task(s) {unknown}; choose from {list(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: list each task once, got {list(self.tasks)}")
        if self.combination not in COMBINATIONS:
            raise ValueError(f"combination: unknown {self.combination!r}; choose one of {list(COMBINATIONS)}")
        for name in ("spatial_weight", "foreground_weight", "gap_weight", "distill_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.rotations < 2:
            raise ValueError(f"rotations: need at least 2 angles, got {self.rotations}")
        for name in ("head_hidden_dim", "fa_dim", "gap_slice_frames", "distill_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("fa_temperature", "huber_delta", "distill_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")

    @property
    def num_stages(self) -> int:
        if self.combination == "multitask":
            return 1
        if self.combination in ("concat", "incremental"):
            return len(self.tasks)
        return len(self.tasks) + 1  # teachers, then the student


# --- helpers ----------------------------------------------------------------------------------


@torch.no_grad()
def _teacher(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A frozen encoder's features: no gradients, BatchNorm on its running statistics."""
    was_training = encoder.training
    encoder.eval()
    try:
        return encoder(x)
    finally:
        encoder.train(was_training)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


# --- the method -----------------------------------------------------------------------------


class TaskHeads(nn.Module):
    """The prediction heads of the tasks trained on one encoder pair."""

    def __init__(self, tasks: tuple[str, ...], c_v: int, c_s: int, cfg: MultiSSLConfig) -> None:
        super().__init__()
        r = cfg.rotations
        if "spatial" in tasks:
            self.spatial = _mlp(c_v * r + c_s, cfg.head_hidden_dim, r)
        if "foreground" in tasks:
            self.fa_v = _mlp(c_v * r, cfg.head_hidden_dim, cfg.fa_dim)
            self.fa_s = _mlp(c_s, cfg.head_hidden_dim, cfg.fa_dim)
        if "gap" in tasks:
            self.gap = _mlp(2 * c_s, cfg.head_hidden_dim, 1)


class EncoderPair(nn.Module):
    def __init__(self, cfg: MultiSSLConfig, data_info: DataInfo) -> None:
        super().__init__()
        self.E_v: Encoder = build_encoder(cfg.image_encoder, in_channels=data_info.image_channels)
        self.E_s: Encoder = build_encoder(cfg.sound_encoder, in_channels=data_info.sound_channels)


def _spatial_loss(cfg: MultiSSLConfig, E_v: Encoder, E_s: Encoder, heads: TaskHeads, batch: Batch
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Spatial alignment: which of the R turns of the panorama matches the sound."""
    r, image = cfg.rotations, batch["image"]
    k_B = torch.randint(0, r, (image.shape[0],)).to(image.device)
    v_BD = azimuth_feature(E_v.forward_map(rotate_panorama(image, k_B, r)), r).flatten(1)
    logits = heads.spatial(torch.cat([v_BD, E_s(batch["sound"])], dim=1))
    loss = F.cross_entropy(logits, k_B)
    return loss, {"spatial_acc": (logits.argmax(1) == k_B).float().mean()}


def _foreground_loss(cfg: MultiSSLConfig, E_v: Encoder, E_s: Encoder, heads: TaskHeads, batch: Batch
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Foreground alignment: the sound against its own foreground, the other clips' and (with
    ``fa_rotated_negatives``) its own turned to the R - 1 wrong angles."""
    r = cfg.rotations
    fg_BCHW = batch["image"] * batch["mask"]
    if cfg.fa_rotated_negatives:  # k = 0 the aligned foreground, k >= 1 the negatives
        roll = rolls_exactly(cfg.image_encoder, fg_BCHW.shape[-1], r)
        v_BKCR = rotated_azimuth_features(E_v, fg_BCHW, r, roll=roll)
    else:
        v_BKCR = azimuth_feature(E_v.forward_map(fg_BCHW), r)[:, None]
    v_pos = F.normalize(heads.fa_v(v_BKCR[:, 0].flatten(1)), dim=1)
    v_rot = F.normalize(heads.fa_v(v_BKCR[:, 1:].flatten(2)), dim=2) if cfg.fa_rotated_negatives else None
    a = F.normalize(heads.fa_s(E_s(batch["sound"])), dim=1)
    return foreground_nce(a, v_pos, v_rot, temperature=cfg.fa_temperature), {}


def _gap_loss(cfg: MultiSSLConfig, E_v: Encoder, E_s: Encoder, heads: TaskHeads, batch: Batch
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Temporal gap: the distance between two slices of the sound, regressed (Huber).

    ``gap_zero_err`` is the error of answering δ = 0 on the same slices (0.337 on average at
    T = 128, L = 32): the best a head can do when nothing in two slices tells which came first,
    so ``gap_abs_err`` at that level means the task gives the encoder nothing to learn."""
    first, second, gap_B = cut_slices(batch["sound"], cfg.gap_slice_frames)
    pred_B = heads.gap(torch.cat([E_s(first), E_s(second)], dim=1)).squeeze(1)
    loss = huber(pred_B, gap_B, delta=cfg.huber_delta)
    return loss, {"gap_abs_err": (pred_B - gap_B).abs().mean().detach(), "gap_zero_err": gap_B.abs().mean()}


TASK_LOSSES = {"spatial": _spatial_loss, "foreground": _foreground_loss, "gap": _gap_loss}
TASK_METRICS = {"spatial": ("spatial_acc",), "foreground": (), "gap": ("gap_abs_err", "gap_zero_err")}


def _task_term(m: MultiSSL, task: str, pair: nn.Module, heads: TaskHeads, batch: Batch,
               out: dict[str, torch.Tensor]) -> torch.Tensor:
    """One task's loss on ``pair``'s encoders, logged as ``loss_<task>`` with its metrics."""
    term, extra = TASK_LOSSES[task](m.cfg, pair.E_v, pair.E_s, heads, batch)
    out[f"loss_{task}"] = term
    out.update(extra)
    return term


# --- the combinations (module docstring) ------------------------------------------------------


class _Multitask:
    """One encoder pair, L = sum_t w_t L_t over the tasks."""

    distills: ClassVar[bool] = False

    def build(self, m: MultiSSL, data_info: DataInfo) -> None:
        cfg = m.cfg
        pair = EncoderPair(cfg, data_info)
        m.E_v, m.E_s = pair.E_v, pair.E_s
        m.heads = TaskHeads(cfg.tasks, cfg.image_encoder.out_dim, cfg.sound_encoder.out_dim, cfg)

    def step(self, m: MultiSSL, batch: Batch, stage: int, out: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = m.cfg
        weights = {"spatial": cfg.spatial_weight, "foreground": cfg.foreground_weight, "gap": cfg.gap_weight}
        loss = torch.zeros((), device=batch["image"].device)
        for t in cfg.tasks:
            loss = loss + weights[t] * _task_term(m, t, m, m.heads, batch, out)
        return loss

    def stage_ended(self, m: MultiSSL) -> None:
        pass

    def embedding_pairs(self, m: MultiSSL) -> tuple[list, tuple | None]:
        """The (encoder pair, heads) whose features make h, and the one that gives z (None: h)."""
        pairs = [(m, m.heads)]
        return pairs, (pairs[0] if "foreground" in m.cfg.tasks else None)


class _Incremental(_Multitask):
    """One encoder pair, one task per stage, pulled towards its copy from the previous stage."""

    distills: ClassVar[bool] = True

    def build(self, m: MultiSSL, data_info: DataInfo) -> None:
        super().build(m, data_info)
        # Frozen copy of the encoders from the end of the previous stage (filled at the stage
        # boundary; unused in stage 0).
        m.prev = EncoderPair(m.cfg, data_info)
        m.prev.requires_grad_(False)

    def step(self, m: MultiSSL, batch: Batch, stage: int, out: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = m.cfg
        loss = torch.zeros((), device=batch["image"].device)
        loss = loss + _task_term(m, cfg.tasks[stage], m, m.heads, batch, out)
        if stage > 0:
            f_v_prev, f_s_prev = _teacher(m.prev.E_v, batch["image"]), _teacher(m.prev.E_s, batch["sound"])
            distill = F.mse_loss(m.E_v(batch["image"]), f_v_prev) + F.mse_loss(m.E_s(batch["sound"]), f_s_prev)
            out["loss_distill"] = distill
            loss = loss + cfg.distill_weight * distill
        return loss

    def stage_ended(self, m: MultiSSL) -> None:
        # The encoders as the finished stage left them become the distillation target.
        m.prev.E_v.load_state_dict(m.E_v.state_dict())
        m.prev.E_s.load_state_dict(m.E_s.state_dict())


class _Concat(_Multitask):
    """One encoder pair and its heads per task, trained one after the other."""

    def build(self, m: MultiSSL, data_info: DataInfo) -> None:
        cfg, c_v, c_s = m.cfg, m.cfg.image_encoder.out_dim, m.cfg.sound_encoder.out_dim
        m.task_pairs = nn.ModuleDict({t: EncoderPair(cfg, data_info) for t in cfg.tasks})
        m.task_heads = nn.ModuleDict({t: TaskHeads((t,), c_v, c_s, cfg) for t in cfg.tasks})

    def step(self, m: MultiSSL, batch: Batch, stage: int, out: dict[str, torch.Tensor]) -> torch.Tensor:
        t = m.cfg.tasks[stage]
        loss = torch.zeros((), device=batch["image"].device)
        return loss + _task_term(m, t, m.task_pairs[t], m.task_heads[t], batch, out)

    def embedding_pairs(self, m: MultiSSL) -> tuple[list, tuple | None]:
        tasks = m.cfg.tasks
        pairs = [(m.task_pairs[t], m.task_heads[t]) for t in tasks]
        return pairs, ((m.task_pairs["foreground"], m.task_heads["foreground"]) if "foreground" in tasks else None)


class _Distill(_Concat):
    """The task encoders of ``concat`` as teachers, then a student pair distilled from them, by a
    linear regression (``euclidean``, MSE) or an InfoNCE between projections (``contrastive``)."""

    distills: ClassVar[bool] = True

    def __init__(self, contrastive: bool) -> None:
        self.contrastive = contrastive

    def build(self, m: MultiSSL, data_info: DataInfo) -> None:
        super().build(m, data_info)
        cfg, c_v, c_s = m.cfg, m.cfg.image_encoder.out_dim, m.cfg.sound_encoder.out_dim
        student = EncoderPair(cfg, data_info)
        m.E_v, m.E_s = student.E_v, student.E_s
        out_v, out_s = (cfg.distill_dim, cfg.distill_dim) if self.contrastive else (c_v, c_s)
        # Student -> teacher-t maps (the regressors of the MSE, or the student projections).
        m.student_v = nn.ModuleDict({t: nn.Linear(c_v, out_v) for t in cfg.tasks})
        m.student_s = nn.ModuleDict({t: nn.Linear(c_s, out_s) for t in cfg.tasks})
        if self.contrastive:
            m.teacher_v = nn.ModuleDict({t: nn.Linear(c_v, cfg.distill_dim) for t in cfg.tasks})
            m.teacher_s = nn.ModuleDict({t: nn.Linear(c_s, cfg.distill_dim) for t in cfg.tasks})

    def step(self, m: MultiSSL, batch: Batch, stage: int, out: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = m.cfg
        if stage < len(cfg.tasks):  # a teacher's stage
            return super().step(m, batch, stage, out)
        f_v, f_s = m.E_v(batch["image"]), m.E_s(batch["sound"])
        distill = torch.zeros((), device=f_v.device)
        for t in cfg.tasks:
            pair = m.task_pairs[t]
            g_v, g_s = _teacher(pair.E_v, batch["image"]), _teacher(pair.E_s, batch["sound"])
            if not self.contrastive:
                distill = distill + F.mse_loss(m.student_v[t](f_v), g_v) + F.mse_loss(m.student_s[t](f_s), g_s)
                continue
            for q, k in ((m.student_v[t](f_v), m.teacher_v[t](g_v)), (m.student_s[t](f_s), m.teacher_s[t](g_s))):
                distill = distill + info_nce(F.normalize(q, dim=1), F.normalize(k, dim=1),
                                             temperature=cfg.distill_temperature)
        out["loss_distill"] = distill
        return torch.zeros((), device=batch["image"].device) + distill

    def embedding_pairs(self, m: MultiSSL) -> tuple[list, tuple | None]:
        return [(m, None)], None  # the student's features; z is h normalised


STRATEGIES = {"multitask": _Multitask(), "incremental": _Incremental(), "concat": _Concat(),
              "euclidean": _Distill(contrastive=False), "contrastive": _Distill(contrastive=True)}


class MultiSSL(Method):
    """Spatial alignment, foreground alignment and temporal-gap prediction on binaural scenes,
    alone or combined (see the module docstring for the five combinations)."""

    name: ClassVar[str] = "multissl"
    pretrain_pool: ClassVar[str] = "paired"

    def __init__(self, cfg: MultiSSLConfig, data_info: DataInfo) -> None:
        super().__init__()
        self.check_data(cfg, data_info)
        self.cfg = cfg
        self.strategy = STRATEGIES[cfg.combination]
        self.strategy.build(self, data_info)
        self.register_buffer("epoch", torch.tensor(0, dtype=torch.int64))  # epochs finished
        self.register_buffer("total_epochs", torch.tensor(cfg.num_stages, dtype=torch.int64))

    @classmethod
    def check_data(cls, cfg: MultiSSLConfig, data_info: DataInfo) -> None:
        if data_info.sound_channels != 2:
            raise FieldError(
                "data.binaural", f"multissl needs binaural scenes (2-channel sound, panoramas); "
                f"set data.binaural=true (got {data_info.sound_channels}-channel sound)"
            )
        if "foreground" in cfg.tasks and not data_info.paired_masks:
            raise FieldError(
                "method.tasks", "foreground alignment reads each scene's foreground mask, which only the "
                "procedural binaural scenes carry (a manifest's rows have none); leave foreground out of "
                "method.tasks, or use no data.manifest"
            )
        if "gap" in cfg.tasks and not 0 < cfg.gap_slice_frames < data_info.n_frames:
            raise FieldError(
                "method.gap_slice_frames", f"need 0 < L < n_frames = {data_info.n_frames}, got {cfg.gap_slice_frames}"
            )

    @classmethod
    def check_schedule(cls, cfg: MultiSSLConfig, epochs: int) -> None:
        if 0 < epochs < cfg.num_stages:
            raise FieldError(
                "train.epochs", f"combination {cfg.combination!r} trains {cfg.num_stages} stages one after the "
                f"other and needs at least {cfg.num_stages} epochs, got {epochs}"
            )

    def configure_training(self, epochs: int) -> None:
        self.check_schedule(self.cfg, epochs)
        self.total_epochs.fill_(max(epochs, 1))

    def may_leave_parameters_unused(self) -> bool:
        # Staged combinations leave the other stages' modules out; temporal gap alone never
        # touches the image encoder.
        return self.cfg.combination != "multitask" or self.cfg.tasks == ("gap",)

    # -- stages --

    @property
    def stage(self) -> int:
        """Stage of the current epoch: ``train.epochs`` split evenly over the stages."""
        n, total = self.cfg.num_stages, int(self.total_epochs)
        return min(int(self.epoch) * n // total, n - 1)

    def on_epoch_end(self, epoch: int) -> None:
        before = self.stage
        self.epoch.fill_(epoch + 1)
        if self.stage != before:
            self.strategy.stage_ended(self)

    @classmethod
    def training_metrics(cls, cfg: MultiSSLConfig) -> tuple[str, ...]:
        names = ["loss", *(f"loss_{t}" for t in cfg.tasks), *(x for t in cfg.tasks for x in TASK_METRICS[t])]
        if STRATEGIES[cfg.combination].distills:
            names.append("loss_distill")
        return tuple(names)

    def training_step(self, batch: Batch) -> StepOutput:
        out: dict[str, torch.Tensor] = {}
        out["loss"] = self.strategy.step(self, batch, self.stage, out)
        return StepOutput(out)

    # -- evaluation --

    @torch.no_grad()
    def embed(
        self, *, images: torch.Tensor | None = None, sounds: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """h: the global-average-pooled encoder output (for ``concat``, the task encoders'
        concatenated); z: the foreground-alignment embeddings when the encoders that give h were
        trained on that task, else h normalised (then sound->image retrieval is not meaningful)."""
        r = self.cfg.rotations
        out: dict[str, torch.Tensor] = {}
        pairs, fa_pair = self.strategy.embedding_pairs(self)
        if images is not None:
            maps = [p.E_v.forward_map(images) for p, _ in pairs]
            out["f_v"] = out["h_v"] = torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)
            if fa_pair is not None:
                pair, heads = fa_pair
                out["z_v"] = F.normalize(heads.fa_v(azimuth_feature(pair.E_v.forward_map(images), r).flatten(1)), dim=1)
            else:
                out["z_v"] = F.normalize(out["h_v"], dim=1)
        if sounds is not None:
            out["f_s"] = out["h_s"] = torch.cat([p.E_s(sounds) for p, _ in pairs], dim=1)
            if fa_pair is not None:
                pair, heads = fa_pair
                out["z_s"] = F.normalize(heads.fa_s(pair.E_s(sounds)), dim=1)
            else:
                out["z_s"] = F.normalize(out["h_s"], dim=1)
        return out
