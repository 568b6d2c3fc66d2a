"""Supervised baseline: the same encoders trained from random weights with labels.

It is the "Supervised Learning" row of paper 001 Tables 1-2: an upper reference for what the
self-supervised encoders reach under the linear probe. Like the paper's, it trains with labels on
the same pretraining clips the self-supervised methods see without them (the ``paired`` pool);
it is the only method allowed to read labels.

Fine-tuning (paper 001 supp. Table 1) is the same method on the labelled ``train`` split
(``method.pool=train``), started from a pretrained run's encoders (``train.init_from=NAME``): every
weight trains. From random weights, the same run is the supervised-from-scratch baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Batch, DataInfo, FieldError, Method, StepOutput
from methods.encoders import PAPER_ENCODERS, SMALL_ENCODERS, TINY_ENCODERS, EncoderConfig, build_encoder

# Per avlab preset: this method's section, and what it changes in the other sections (data,
# train, eval), applied under the run file and the overrides. Values equal to the config's
# defaults (the paper's) are not repeated.
PRESETS = {
    "tiny": {"method": TINY_ENCODERS},
    "small": {"method": SMALL_ENCODERS},
    "paper": {"method": PAPER_ENCODERS},
}


@dataclass(frozen=True)
class SupervisedConfig:
    image_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig("resnet18", 64))
    sound_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig("resnet10", 64))
    # "paired": the pretraining clips with their labels (supervised pretraining, paper 001);
    # "train": the labelled split, the fine-tuning protocol of supp. Table 1 with train.init_from.
    # On a manifest, whose pairs carry no labels, the default is "train" (``data_defaults``).
    pool: str = "paired"

    def __post_init__(self) -> None:
        if self.pool not in ("paired", "train"):
            raise ValueError(f"pool: must be paired or train, got {self.pool!r}")


class Supervised(Method):
    """Cross-entropy on image labels and on sound labels, one linear classifier per encoder."""

    name: ClassVar[str] = "supervised"
    pretrain_pool: ClassVar[str] = "paired"

    @classmethod
    def pretraining_pool(cls, cfg: SupervisedConfig) -> str:
        return cfg.pool

    @classmethod
    def data_defaults(cls, data: Any) -> dict[str, Any]:
        # A manifest labels only its train and test splits, so its pairs cannot be the pool: the
        # labelled train split is the one pool this baseline can learn from there.
        return {"pool": "train"} if data.manifest else {}

    @classmethod
    def check_data(cls, cfg: SupervisedConfig, data_info: DataInfo) -> None:
        if cfg.pool == "paired" and not data_info.paired_labelled:
            raise FieldError("method.pool", "this dataset's pretraining pairs carry no labels (a manifest labels only its "
                             "train and test splits); use method.pool=train")

    def __init__(self, cfg: SupervisedConfig, data_info: DataInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.pretrain_pool = cfg.pool
        self.E_v = build_encoder(cfg.image_encoder, in_channels=data_info.image_channels)
        self.E_s = build_encoder(cfg.sound_encoder, in_channels=data_info.sound_channels)
        self.classifier_v = nn.Linear(self.E_v.out_dim, data_info.num_classes)
        self.classifier_s = nn.Linear(self.E_s.out_dim, data_info.num_classes)

    @classmethod
    def training_metrics(cls, cfg: SupervisedConfig) -> tuple[str, ...]:
        return ("loss", "loss_image_ce", "loss_sound_ce")

    def training_step(self, batch: Batch) -> StepOutput:
        loss_image = F.cross_entropy(self.classifier_v(self.E_v(batch["image"])), batch["label"])
        loss_sound = F.cross_entropy(self.classifier_s(self.E_s(batch["sound"])), batch["label"])
        return StepOutput({"loss": loss_image + loss_sound, "loss_image_ce": loss_image, "loss_sound_ce": loss_sound})

    @torch.no_grad()
    def embed(
        self, *, images: torch.Tensor | None = None, sounds: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        # h is the encoder feature; z is the class posterior, a space both modalities share,
        # so sound->image retrieval is meaningful for this baseline too.
        return self.embed_encoders(images, sounds, z_v=lambda h: torch.softmax(self.classifier_v(h), dim=1),
                                   z_s=lambda h: torch.softmax(self.classifier_s(h), dim=1))
