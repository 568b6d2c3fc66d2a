"""BMA-Memory: weakly paired associative learning with a bimodal associative memory (paper 001).

Legend: B paired batch, U unpaired batch, c encoder feature size, n memory slots, D projection
size. f = encoder feature, h = representation [visual part ; sound part] (2c), z = projection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Batch, DataInfo, Method, StepOutput
from methods.distributed import gather_with_grad
from methods.encoders import PAPER_ENCODERS, SMALL_ENCODERS, TINY_ENCODERS, EncoderConfig, build_encoder
from methods.heads import ProjectionHead
from methods.losses import paired_associative_loss, unpaired_associative_loss


# Per avlab preset: this method's section, and what it changes in the other sections (data,
# train, eval), applied under the run file and the overrides. Values equal to the config's
# defaults (the paper's) are not repeated.
PRESETS = {
    "tiny": {"method": TINY_ENCODERS},
    "small": {
        # τ_l 0.2 (paper 0.1): at this budget it spreads the projections (mean cosine 0.64 -> 0.31)
        # and lifts image linear and Rank-1 on every seed (benchmarks/RESULTS-history.md, "BMA-Memory at the small budget").
        "method": {**SMALL_ENCODERS, "loss_temperature": 0.2},
        # L_pair on 16384 pairs x 4 epochs does not memorise the pool, and the paired augmentation
        # only costs it (image linear 0.376 vs 0.294, same seed; RESULTS.md).
        "train": {"paired_augment": "none"},
        # Unpaired sounds only, as in the paper's experiments (Table 5: unpaired sounds, no unpaired
        # images). With both pools L_unpair costs every probe and a run takes ~24 min on 2 cores;
        # with sounds only it takes ~10 (benchmarks/RESULTS-history.md, "Small preset with the small stem").
        "data": {"unpaired_image_size": 0},
    },
    "paper": {"method": PAPER_ENCODERS},
}


@dataclass(frozen=True)
class BMAConfig:
    """BMA-Memory hyperparameters; defaults are the paper's (§4.2)."""

    image_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig("resnet18", 64))
    sound_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig("resnet10", 64))
    memory_size: int = 1000  # n
    memory_temperature: float = 0.1  # tau_m
    loss_temperature: float = 0.1  # tau_l
    proj_hidden_dim: int = 0  # 0: 2c, the representation size, as in SimCLR
    proj_dim: int = 128
    paired_loss: bool = True  # False: L_unpair only (supp. Tables 3-5, first rows)
    unpaired_weight: float = 1.0  # lambda in L = L_pair + lambda * L_unpair
    # Initial slot norm of M^v, M^s. The paper does not say; 1.0 gives unit-norm slots in
    # expectation (N(0, 1/c) entries). A fresh encoder's features are longer and its queries read
    # hundreds of slots nearly uniformly, so the read-out starts at under 1 % of |f|; see the
    # mem_read_ratio_* metrics.
    memory_init_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.memory_size <= 0:
            raise ValueError(f"memory_size: must be a positive number of slots, got {self.memory_size}")
        for name in ("memory_temperature", "loss_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.proj_hidden_dim < 0 or self.proj_dim <= 0:
            raise ValueError("proj_hidden_dim / proj_dim: must be positive (proj_hidden_dim 0 = 2c)")
        if not 0 < self.memory_init_norm <= 1e4:
            raise ValueError(f"memory_init_norm: must be in (0, 1e4], got {self.memory_init_norm}")
        if self.unpaired_weight < 0:
            raise ValueError(f"unpaired_weight: must be >= 0, got {self.unpaired_weight}")
        if self.image_encoder.out_dim != self.sound_encoder.out_dim:
            raise ValueError(
                "image_encoder.base_width / sound_encoder.base_width: the memory needs equal feature "
                f"sizes, got {self.image_encoder.out_dim} and {self.sound_encoder.out_dim}"
            )


class BimodalAssociativeMemory(nn.Module):
    """Image and sound sub-memories M^v, M^s in R^{n x c}, learnt by backprop, with key-value
    switching: the query's own modality is the key, the other one the value (§3.1)."""

    def __init__(self, n: int, c: int, *, temperature: float, init_norm: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.M_v = nn.Parameter(torch.randn(n, c) * (init_norm / c**0.5))
        self.M_s = nn.Parameter(torch.randn(n, c) * (init_norm / c**0.5))
        self._unit_keys: dict[str, torch.Tensor] = {}  # "M_v"/"M_s" -> normalised, inside shared_keys()

    @contextmanager
    def shared_keys(self) -> Iterator[None]:
        """Within the block, every read uses keys normalised once: one training step reads the
        memory up to 8 times with the same M^v, M^s, and normalising (forward and backward) an
        n x c matrix per read costs a fifth of the reads at n = 5000."""
        self._unit_keys = {"M_v": F.normalize(self.M_v, dim=1), "M_s": F.normalize(self.M_s, dim=1)}
        try:
            yield
        finally:
            self._unit_keys = {}

    def address(self, query_Bc: torch.Tensor, key_nc: torch.Tensor, *, unit_key_nc: torch.Tensor | None = None) -> torch.Tensor:
        """w_r = softmax_r(cos(f, m_r) / tau_m) (eq. 1-2); returns (B, n).

        1/tau_m scales the (B, c) query rather than the (B, n) similarities: the same numbers,
        one pass over B x n less in the forward and the backward."""
        unit_key = F.normalize(key_nc, dim=1) if unit_key_nc is None else unit_key_nc
        logits_Bn = (F.normalize(query_Bc, dim=1) / self.temperature) @ unit_key.T
        return torch.softmax(logits_Bn, dim=1)

    def image_to_sound(self, f_v_Bc: torch.Tensor) -> torch.Tensor:
        """f^{s,mem} = sum_r w^v_r m^s_r, addressed by the image memory (eq. 3)."""
        return self.address(f_v_Bc, self.M_v, unit_key_nc=self._unit_keys.get("M_v")) @ self.M_s

    def sound_to_image(self, f_s_Bc: torch.Tensor) -> torch.Tensor:
        """f^{v,mem} = sum_r w^s_r m^v_r, addressed by the sound memory (eq. 3, roles swapped)."""
        return self.address(f_s_Bc, self.M_s, unit_key_nc=self._unit_keys.get("M_s")) @ self.M_v


class BMAMemory(Method):
    """Weakly paired associative learning: L = L_pair + lambda * L_unpair (paper 001, §3.2)."""

    name: ClassVar[str] = "bma"
    size_fields: ClassVar[dict[str, str]] = {**Method.size_fields, "M_v": "method.memory_size",
                                             "M_s": "method.memory_size"}
    uses_unpaired: ClassVar[bool] = True

    def __init__(self, cfg: BMAConfig, data_info: DataInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.E_v = build_encoder(cfg.image_encoder, in_channels=data_info.image_channels)
        self.E_s = build_encoder(cfg.sound_encoder, in_channels=data_info.sound_channels)
        c = self.E_v.out_dim
        self.memory = BimodalAssociativeMemory(
            cfg.memory_size, c, temperature=cfg.memory_temperature, init_norm=cfg.memory_init_norm
        )
        hidden = cfg.proj_hidden_dim or 2 * c
        self.head_v = ProjectionHead(2 * c, hidden, cfg.proj_dim)  # image-side representations
        self.head_s = ProjectionHead(2 * c, hidden, cfg.proj_dim)  # sound-side representations

    @classmethod
    def training_metrics(cls, cfg: BMAConfig) -> tuple[str, ...]:
        paired = ("loss_pair", "mem_read_ratio_v", "mem_read_ratio_s", "mem_slots_v", "mem_slots_s")
        unpaired = ("loss_unpair", "loss_unpair_sound", "loss_unpair_image")
        return ("loss", *(paired if cfg.paired_loss else ()), *unpaired)

    def may_leave_parameters_unused(self) -> bool:
        # Without L_pair, a run with one unpaired modality never uses the other encoder.
        return not self.cfg.paired_loss

    # Representations (§3.1): h^v = [f^v ; f^{s,mem}], h^s = [f^{v,mem} ; f^s].
    def image_representation(self, f_v_Bc: torch.Tensor) -> torch.Tensor:
        return torch.cat([f_v_Bc, self.memory.image_to_sound(f_v_Bc)], dim=1)

    def sound_representation(self, f_s_Bc: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.memory.sound_to_image(f_s_Bc), f_s_Bc], dim=1)

    def unpaired_sound_projections(
        self, x_s: torch.Tensor, x_s_aug: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cyclic path S->I->S on view 1 (image-side head) and the sound path on view 2 (§3.2.2)."""
        f_v_mem = self.memory.sound_to_image(self.E_s(x_s))  # pseudo image query
        f_s_mem = self.memory.image_to_sound(f_v_mem)
        z_vs = self.head_v(torch.cat([f_v_mem, f_s_mem], dim=1))
        z_sv = self.head_s(self.sound_representation(self.E_s(x_s_aug)))
        return z_vs, z_sv

    def unpaired_image_projections(
        self, x_v: torch.Tensor, x_v_aug: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cyclic path I->S->I on view 1 (sound-side head) and the image path on view 2."""
        f_s_mem = self.memory.image_to_sound(self.E_v(x_v))  # pseudo sound query
        f_v_mem = self.memory.sound_to_image(f_s_mem)
        z_sv = self.head_s(torch.cat([f_v_mem, f_s_mem], dim=1))
        z_vs = self.head_v(self.image_representation(self.E_v(x_v_aug)))
        return z_sv, z_vs

    def training_step(self, batch: Batch) -> StepOutput:
        with self.memory.shared_keys():
            return StepOutput(self._training_step(batch))

    def _training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        tau = self.cfg.loss_temperature
        out: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=self.memory.M_v.device)
        if self.cfg.paired_loss and "image" in batch:
            f_v, f_s = self.E_v(batch["image"]), self.E_s(batch["sound"])
            z_v = self.head_v(self.image_representation(f_v))
            z_s = self.head_s(self.sound_representation(f_s))
            out["loss_pair"] = paired_associative_loss(
                gather_with_grad(z_v), gather_with_grad(z_s), temperature=tau
            )
            loss = loss + out["loss_pair"]
            out.update(self.memory_diagnostics(f_v.detach(), f_s.detach()))
        unpaired = []
        if "usound" in batch:
            z_vs, z_sv = self.unpaired_sound_projections(batch["usound"], batch["usound_aug"])
            out["loss_unpair_sound"] = unpaired_associative_loss(
                gather_with_grad(z_vs), gather_with_grad(z_sv), temperature=tau
            )
            unpaired.append(out["loss_unpair_sound"])
        if "uimage" in batch:
            z_sv, z_vs = self.unpaired_image_projections(batch["uimage"], batch["uimage_aug"])
            out["loss_unpair_image"] = unpaired_associative_loss(
                gather_with_grad(z_sv), gather_with_grad(z_vs), temperature=tau
            )
            unpaired.append(out["loss_unpair_image"])
        if unpaired:
            out["loss_unpair"] = torch.stack(unpaired).sum()
            loss = loss + self.cfg.unpaired_weight * out["loss_unpair"]
        if not out:
            raise ValueError("bma: the batch has no paired data and no unpaired data to learn from")
        out["loss"] = loss
        return out

    @torch.no_grad()
    def memory_diagnostics(self, f_v_Bc: torch.Tensor, f_s_Bc: torch.Tensor) -> dict[str, torch.Tensor]:
        """Whether the memory is used (logged per epoch, not losses):

        - ``mem_read_ratio_v``: |f^{s,mem}| / |f^v|, the read-out an image query adds to h^v,
          relative to the image feature (``_s``: |f^{v,mem}| / |f^s|). Near 0, h ~ [f ; 0] and
          the memory half of the representation carries nothing.
        - ``mem_slots_v``: effective number of slots an image query addresses, exp(entropy of
          w^v), averaged over the batch (``_s`` for sound queries). n means uniform reads (every
          query reads the same mean slot), 1 means one slot per query.
        """
        m = self.memory
        out: dict[str, torch.Tensor] = {}
        for tag, f, key, value in (("v", f_v_Bc, m.M_v, m.M_s), ("s", f_s_Bc, m.M_s, m.M_v)):
            w_Bn = m.address(f, key.detach())
            read = w_Bn @ value.detach()
            out[f"mem_read_ratio_{tag}"] = (read.norm(dim=1) / f.norm(dim=1).clamp_min(1e-12)).mean()
            entropy_B = -(w_Bn * torch.log(w_Bn.clamp_min(1e-30))).sum(1)
            out[f"mem_slots_{tag}"] = torch.exp(entropy_B).mean()
        return out

    @torch.no_grad()
    def embed(
        self, *, images: torch.Tensor | None = None, sounds: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        with self.memory.shared_keys():
            return self._embed(images, sounds)

    def _embed(self, images: torch.Tensor | None, sounds: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["f_v"] = self.E_v(images)
            out["h_v"] = self.image_representation(out["f_v"])
            out["z_v"] = self.head_v(out["h_v"])
        if sounds is not None:
            out["f_s"] = self.E_s(sounds)
            out["h_s"] = self.sound_representation(out["f_s"])
            out["z_s"] = self.head_s(out["h_s"])
        return out
