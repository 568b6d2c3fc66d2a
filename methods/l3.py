"""L3: audio-visual correspondence (paper 003, after Arandjelovic & Zisserman's L3-Net).

A binary classifier learns whether an image and a sound come from the same clip (label 1) or
from different clips (label 0). Two VGG-style subnetworks encode the image and the sound; their
features are concatenated and a fusion head (FC 128 -> ReLU -> FC 2) predicts the label, trained
with cross-entropy (§3.1, Fig. 1). Positive and negative pairs are half and half.

Pairs are built inside each batch: image i with sound i is a positive; image i with the sound of
another clip in the batch is a negative. Batches come from a sampler without replacement, so
distinct batch positions are distinct clips, and a permutation without fixed points gives every
negative a sound from another clip. Under DDP each worker pairs within its own shard.

Legend: B batch, c_v / c_s image / sound feature size, K fusion hidden size.
f = encoder feature, y = correspondence label (1 same clip, 0 different clips).
"""

from __future__ import annotations

from functools import partial

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Batch, DataInfo, Method, StepOutput
from methods.encoders import EncoderConfig, build_encoder

# Per avlab preset: this method's section, and what it changes in the other sections (data,
# train, eval), applied under the run file and the overrides. Values equal to the config's
# defaults (the paper's) are not repeated.
# Paper 003: two VGG-style subnetworks, 64-128-256-512 channels (16-32-64-128 on CPU).
_VGG16 = {"image_encoder": {"arch": "vgg", "base_width": 16}, "sound_encoder": {"arch": "vgg", "base_width": 16}}
PRESETS = {
    "tiny": {"method": _VGG16},
    "small": {"method": _VGG16},
    "paper": {"method": {"image_encoder": {"arch": "vgg", "base_width": 64}, "sound_encoder": {"arch": "vgg", "base_width": 64}}},
}


@dataclass(frozen=True)
class L3Config:
    """L3 hyperparameters; defaults are the paper's (§3.1, Fig. 1)."""

    image_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig("vgg", 64))
    sound_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig("vgg", 64))
    fusion_hidden: int = 128  # K
    negative_fraction: float = 0.5  # share of each batch paired with another clip's sound

    def __post_init__(self) -> None:
        if self.fusion_hidden <= 0:
            raise ValueError(f"fusion_hidden: must be a positive layer size, got {self.fusion_hidden}")
        if not 0.0 < self.negative_fraction < 1.0:
            raise ValueError(
                f"negative_fraction: must lie strictly between 0 and 1 (0.5 = half and half), "
                f"got {self.negative_fraction}"
            )


def derangement(n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of range(n) without fixed points (n >= 2); returns (n,) int64.

    A random order sigma is closed into one cycle, sigma_k -> sigma_{k+1 mod n}, so no element
    maps to itself. The randomness comes from ``generator`` (default: the global CPU RNG, which
    the trainer checkpoints).
    """
    if n < 2:
        raise ValueError(f"derangement: needs at least 2 elements, got {n}")
    sigma = torch.randperm(n, generator=generator)
    pi = torch.empty(n, dtype=torch.int64)
    pi[sigma] = sigma.roll(-1)
    return pi


def correspondence_pairs(
    batch_size: int, *, negative_fraction: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which sound goes with image i, and whether the pair corresponds.

    The first B - floor(B * negative_fraction) images keep their own sound (y = 1, positives,
    ceil(B/2) of them at 0.5); the rest take the sound of another clip through a derangement of
    the batch (y = 0). Returns ``sound_idx_B`` and ``y_B``, both int64 on the CPU.
    """
    n_neg = int(batch_size * negative_fraction)
    n_pos = batch_size - n_neg
    sound_idx_B = torch.arange(batch_size)
    y_B = torch.ones(batch_size, dtype=torch.int64)
    if n_neg > 0:  # then batch_size >= 2, since negative_fraction < 1
        sound_idx_B[n_pos:] = derangement(batch_size, generator=generator)[n_pos:]
        y_B[n_pos:] = 0
    return sound_idx_B, y_B


def correspondence_loss(logits_B2: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the two-way correspondence classifier (paper 003 §3.3):
    L = -1/B sum_i log softmax(logits_i)[y_i]."""
    if logits_B2.dim() != 2 or logits_B2.shape[1] != 2 or y_B.shape != logits_B2.shape[:1]:
        raise ValueError(
            f"correspondence_loss: expects logits (B, 2) and labels (B,), got "
            f"{tuple(logits_B2.shape)} and {tuple(y_B.shape)}"
        )
    return F.cross_entropy(logits_B2, y_B)


class L3(Method):
    """Audio-visual correspondence: E_v, E_s and a fusion head classifying same-clip vs not.

    The two subnetworks are trained only through the fusion head and never share an embedding
    space, so ``embed``'s z_v and z_s (the L2-normalised features) are not comparable across
    modalities: bimodal retrieval numbers for L3 are expected near chance. Its encoders are
    evaluated by the linear probe and kNN on h_v / h_s.
    """

    name: ClassVar[str] = "l3"
    pretrain_pool: ClassVar[str] = "paired"

    def __init__(self, cfg: L3Config, data_info: DataInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.E_v = build_encoder(cfg.image_encoder, in_channels=data_info.image_channels)
        self.E_s = build_encoder(cfg.sound_encoder, in_channels=data_info.sound_channels)
        self.fusion = nn.Sequential(
            nn.Linear(self.E_v.out_dim + self.E_s.out_dim, cfg.fusion_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.fusion_hidden, 2),
        )

    def correspondence_logits(self, f_v_Bc: torch.Tensor, f_s_Bc: torch.Tensor) -> torch.Tensor:
        """Fusion head on [f^v ; f^s]: logits (B, 2), column 1 = "same clip"."""
        return self.fusion(torch.cat([f_v_Bc, f_s_Bc], dim=1))

    @classmethod
    def training_metrics(cls, cfg: L3Config) -> tuple[str, ...]:
        return ("loss", "l3_acc")  # l3_acc: the correspondence accuracy on the training pairs

    @classmethod
    def held_out_metrics(cls, cfg: L3Config) -> tuple[str, ...]:
        return ("l3_heldout_acc",)

    @torch.no_grad()
    def held_out_scores(self, features: dict[str, torch.Tensor]) -> dict[str, float]:
        """Correspondence accuracy on held-out clips (paper 003, Fig. 3: 64 % on its test set against
        77 % on its training pairs): every clip's image with its own sound, and with the sound of
        the clip half the split away (a fixed derangement), half and half as in training."""
        f_v_Nc, f_s_Nc = features["f_v"], features["f_s"]
        n = f_v_Nc.shape[0]
        if n < 2:
            return {}
        device = next(self.fusion.parameters()).device
        f_v_Nc, f_s_Nc = f_v_Nc.to(device), f_s_Nc.to(device)
        other_N = torch.roll(torch.arange(n, device=device), n // 2)  # n // 2 >= 1: no clip keeps its sound
        logits_2N2 = torch.cat([self.correspondence_logits(f_v_Nc, f_s_Nc),
                                self.correspondence_logits(f_v_Nc, f_s_Nc[other_N])])
        y_2N = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)]).to(device)
        return {"l3_heldout_acc": (logits_2N2.argmax(dim=1) == y_2N).float().mean().item()}

    def training_step(self, batch: Batch) -> StepOutput:
        x_v, x_s = batch["image"], batch["sound"]
        if x_v.shape[0] != x_s.shape[0]:
            raise ValueError(f"l3: images and sounds must pair up, got {x_v.shape[0]} and {x_s.shape[0]}")
        sound_idx_B, y_B = correspondence_pairs(x_v.shape[0], negative_fraction=self.cfg.negative_fraction)
        sound_idx_B, y_B = sound_idx_B.to(x_s.device), y_B.to(x_s.device)
        f_v_Bc = self.E_v(x_v)
        # Each sound is encoded once and its feature reused by its pairs: BatchNorm statistics
        # count every clip of the batch once, as for the images.
        f_s_Bc = self.E_s(x_s)[sound_idx_B]
        logits_B2 = self.correspondence_logits(f_v_Bc, f_s_Bc)
        loss = correspondence_loss(logits_B2, y_B)
        acc = (logits_B2.detach().argmax(dim=1) == y_B).float().mean()
        return StepOutput({"loss": loss, "l3_acc": acc})

    @torch.no_grad()
    def embed(
        self, *, images: torch.Tensor | None = None, sounds: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        # h is the subnetwork feature; z is the same feature on the unit sphere. The spaces of
        # z_v and z_s are unrelated (see the class docstring).
        unit = partial(F.normalize, dim=1)
        return self.embed_encoders(images, sounds, z_v=unit, z_s=unit)
