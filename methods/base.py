"""The small interface every pretraining method implements, and the batch layout it reads.

A batch is a dict of tensors. Keys (absent when the method or config does not use them):
    image        (B, 3, H, W)  paired images, intensities in [0, 1]
    sound        (B, 1, F, T)  paired log-mel spectrograms (F mel bins, T frames)
    label        (B,)          class ids; only supervised baselines may read them
    index        (B,)          sample index within its pool
    usound, usound_aug         (U, 1, F, T) two augmented views of unpaired sounds
    uimage, uimage_aug         (U, 3, H, W) two augmented views of unpaired images

Legend: B paired batch, U unpaired batch, D feature size, n memory slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


# Metadata key of a dataclass field: the value at which the field leaves a config's identity.
IDENTITY_NEUTRAL = "avlab_identity_neutral"
_SAME = object()


def neutral_field(default: Any, neutral: Any = _SAME) -> Any:
    """A config field added to a section that configurations were already run with:
    ``x: bool = neutral_field(False)``. ``neutral`` (default: ``default``) is the value that
    behaves as the code did before the field existed; at that value the field is left out of
    the config's identity (``orchestrator.config.ExperimentConfig.identity``), so runs made
    before the upgrade keep their identity, checkpoints and reusable results. A new default
    that changes behaviour keeps ``neutral`` at the old behaviour's value, so configurations
    that take the new default get a new identity."""
    return field(default=default, metadata={IDENTITY_NEUTRAL: default if neutral is _SAME else neutral})


class FieldError(ValueError):
    """A setting that the data or the training length cannot serve, raised by ``check_data`` and
    ``check_schedule`` with the field's full path (``data.binaural``, ``method.num_negatives``,
    ``train.epochs``), which the config check reports as it is."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about its data to build itself."""

    image_channels: int = 3
    sound_channels: int = 1
    image_size: int = 32
    n_mels: int = 40
    n_frames: int = 64
    num_classes: int = 10
    paired_size: int = 0
    unpaired_sound_size: int = 0
    unpaired_image_size: int = 0
    # Whether the paired (pretraining) pool's items carry class labels: the embedded datasets'
    # do; a manifest's pretraining rows do not (only its labelled splits do).
    paired_labelled: bool = True
    # Whether the paired items carry a foreground ``mask``: only the procedural binaural scenes'.
    paired_masks: bool = False
    # The labelled splits: what the downstream probes fit on and score (and, for a method that
    # pretrains on ``train``, its pool).
    train_size: int = 0
    test_size: int = 0
    val_size: int = 0  # the validation split: choices are made on it, never on test
    transfer_train_size: int = 0
    transfer_test_size: int = 0


class StepOutput(NamedTuple):
    """What one training step returns. ``metrics``: ``loss`` (the total that is back-propagated)
    and every other scalar the step logs (its per-epoch mean, named in ``training_metrics``);
    ``state``: tensors that ``after_step`` needs (a memory bank's new entries, say), never logged.
    A named tuple: DistributedDataParallel finds the tensors in it as in a plain tuple."""

    metrics: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor] | None = None


class Method(nn.Module):
    """A pretraining method: losses from a batch, and frozen features for evaluation.

    ``forward`` is ``training_step`` so that DistributedDataParallel sees the call; it must not
    write memories or buffers as a side effect. Explicit state updates go to ``after_step``.
    """

    name: ClassVar[str]
    # Which labelled-or-not pool the pretraining epochs iterate; "train" is the labelled split.
    pretrain_pool: ClassVar[str] = "paired"
    # Whether the training step reads unpaired pools (usound / uimage keys).
    uses_unpaired: ClassVar[bool] = False
    # The config field that sizes each large tensor, by the name of the top-level module,
    # parameter or buffer that holds it; the memory check names that field when it dominates.
    size_fields: ClassVar[dict[str, str]] = {"E_v": "method.image_encoder.base_width",
                                             "E_s": "method.sound_encoder.base_width"}

    @classmethod
    def pretraining_pool(cls, cfg: Any) -> str:
        """The pool a run of ``cfg`` pretrains on, known before the method is built (for
        validation and for ordering a sweep's trials by their work). Default: ``pretrain_pool``."""
        return cls.pretrain_pool

    @classmethod
    def data_defaults(cls, data: Any) -> dict[str, Any]:
        """Settings of the method's section whose default depends on the ``data`` section (a
        ``DataConfig``), applied where the config leaves them unset. A default here must be
        the one value that can run on that data, so no configuration that ran before it changes.
        Default: none."""
        return {}

    @classmethod
    def training_metrics(cls, cfg: Any) -> tuple[str, ...]:
        """Every name ``training_step`` may return as a metric under ``cfg`` (its per-epoch mean
        is logged). Search spaces may optimise any of
        them; a test checks each method's steps against this list. Default: the total loss."""
        return ("loss",)

    @classmethod
    def held_out_metrics(cls, cfg: Any) -> tuple[str, ...]:
        """Every name ``held_out_scores`` returns under ``cfg``: the method's own task scored on
        an evaluation split after training (logged with the split's prefix, like the probes).
        Default: none."""
        return ()

    @torch.no_grad()
    def held_out_scores(self, features: dict[str, torch.Tensor]) -> dict[str, float]:
        """The method's own task on a held-out split whose items pair an image with a sound,
        from its frozen ``embed`` features (``extract_features``' keys, CPU tensors, item i's
        image and sound from one clip). Default: none."""
        return {}

    @classmethod
    def check_data(cls, cfg: Any, data_info: DataInfo) -> None:
        """Reject a config the data cannot serve (``FieldError`` naming the field, e.g.
        ``method.num_negatives``), before any compute starts; e.g. more memory-bank negatives
        than the pool holds. Default: none."""

    @classmethod
    def check_schedule(cls, cfg: Any, epochs: int) -> None:
        """Reject a training length the method cannot use (``FieldError("train.epochs", ...)``),
        before any compute starts; e.g. fewer epochs than stages. Default: any length."""

    def configure_training(self, epochs: int) -> None:
        """Called once by the trainer after construction, before any checkpoint is loaded, with
        the run's total number of epochs (for methods whose schedule depends on it)."""

    def training_step(self, batch: Batch) -> StepOutput:
        """``StepOutput({"loss": total, <term>: value, ...})``, every term a scalar tensor, and in
        its ``state`` what ``after_step`` needs."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> StepOutput:  # noqa: D102
        return self.training_step(batch)

    @torch.no_grad()
    def after_step(self, batch: Batch, outputs: StepOutput) -> None:
        """Explicit state updates after the optimiser step (memory banks, EMA). Default: none."""

    @torch.no_grad()
    def embed(
        self, *, images: torch.Tensor | None = None, sounds: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Frozen features for downstream evaluation.

        Keys: for images ``h_v`` (the representation probed for image tasks) and ``z_v`` (the
        projection used for retrieval); for sounds ``h_s`` and ``z_s``. Methods may add more
        (e.g. ``f_v``, ``f_s``).
        """
        raise NotImplementedError

    def embed_encoders(
        self,
        images: torch.Tensor | None,
        sounds: torch.Tensor | None,
        *,
        z_v: Callable[[torch.Tensor], torch.Tensor],
        z_s: Callable[[torch.Tensor], torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """``embed`` for methods whose representation is the encoder output: f = h = E(x), and
        z = ``z_v(f_v)`` / ``z_s(f_s)``. Needs encoders ``E_v`` and ``E_s``."""
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["f_v"] = out["h_v"] = self.E_v(images)
            out["z_v"] = z_v(out["f_v"])
        if sounds is not None:
            out["f_s"] = out["h_s"] = self.E_s(sounds)
            out["z_s"] = z_s(out["f_s"])
        return out

    def may_leave_parameters_unused(self) -> bool:
        """Whether some step may not touch every parameter (DDP then looks for unused ones)."""
        return False

    def ddp_broadcast_buffers(self) -> bool:
        """Whether DDP copies rank 0's buffers to all workers every step. A method whose buffers
        every rank updates identically (memory banks from gathered features) turns it off."""
        return True

    def after_initialise_from(self) -> None:
        """Hook called once ``train.init_from`` has copied another run's tensors into this new
        run, before its first step: state computed in the constructor from tensors that were
        just replaced is computed again. Default: none."""

    def on_epoch_end(self, epoch: int) -> dict[str, float] | None:
        """Hook for per-epoch method logic (e.g. refreshing positive sets). It may return
        diagnostics, logged with the epoch's metrics (names declared in ``training_metrics``).
        Default: none."""
        return None

    def extra_state(self) -> dict[str, Any]:
        """Method state that is not in ``state_dict`` (counters, positive sets)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no extra state, got keys {sorted(state)}")
