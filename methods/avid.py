"""AVID and AVID+CMA: audio-visual instance discrimination against a memory bank, and
cross-modal agreement positives (paper 002, Morgado, Vasconcelos and Misra).

Each training instance i (an index in the paired pool, ``batch["index"]``) owns two slow
"memory" features v̄_i, ā_i (EMA of its unit-norm projections v_i, a_i). A projection must pick
its own target memory out of K uniformly drawn others with noise-contrastive estimation (eq. 1-2):
Self-AVID uses the same modality's memories, Cross-AVID the other modality's, Joint-AVID both
(eq. 3-5). AVID+CMA adds within-modal discrimination of the instances that agree with i in both
memory spaces (eq. 6-9).

Numbers follow the authors' code where the paper leaves them open (docs/spec.md §3): Z̄ is the mean of
exp(score) over the negatives of the very first batch's v→a term (v→v for Self-AVID; averaged
over workers), the first term the authors' one NCE criterion sees, and then frozen
(``cma_reestimate_z``: estimated again on CMA's first step); each direction (v→a, a→v) carries
weight ½, and Joint-AVID's ¼ (the authors normalise the two coefficients to sum 1); negatives never include the sample itself; memories are updated with the features of
the whole global batch after the scores were computed.

State and side effects. ``training_step`` (= ``forward``) writes nothing: it reads the banks,
draws negatives from a generator seeded by (``sampling_seed``, ``step``), and returns the losses
and, in the ``StepOutput``'s ``state``, what ``after_step`` needs: ``v`` and ``a`` (the detached
(B, D) projections) and, on the first step only, ``z_bar``. ``after_step`` gathers indices and projections from all workers,
applies the EMA, freezes Z̄ and counts the step; ``on_epoch_end`` refreshes the CMA positive sets
and, when the pool's items carry class labels, returns ``cma_positive_precision``: the share of
the new positives that share their instance's class (the paper's Fig. 4c, inside every run; a
diagnostic, never used by the losses). Every piece of state is a registered buffer (banks, Z̄ and
its flag, the step counter, the seed, the positive sets and the epoch they were computed for,
the class label of each slot, -1 until its item is seen), so ``state_dict`` alone checkpoints it
and DDP's start-up broadcast makes the workers' copies equal; after that every rank applies the
same updates, so the per-step buffer broadcast is switched off (``ddp_broadcast_buffers``).

Legend: B batch on this worker, G global batch (all workers), c encoder feature size, D
projection size, N memory slots (= paired pool size), K negatives, P positives per sample, E
excluded indices per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from methods.base import Batch, DataInfo, FieldError, Method, StepOutput, neutral_field
from methods.cma import CMA_RULES, cma_positive_sets
from methods import distributed
from methods.distributed import world_size
from methods.encoders import PAPER_ENCODERS, SMALL_ENCODERS, TINY_ENCODERS, EncoderConfig, build_encoder

# Per avlab preset: this method's section, and what it changes in the other sections (data,
# train, eval), applied under the run file and the overrides. Values equal to the config's
# defaults (the paper's) are not repeated.
# Paper 002 §4.2 (the defaults): tau 0.07, K 1024, m 0.5, 128-d; CMA with K_p 32, lambda 1, E 50.
PRESETS = {
    # K = 1024 negatives as in the paper (the tiny pool holds 8192 pairs); CMA refreshes its
    # positive sets every epoch of a short run.
    "tiny": {"method": {**TINY_ENCODERS, "cma_refresh_epochs": 1}},
    # BatchNorm in the head: without it the projections collapse (benchmarks/RESULTS-history.md, "AVID collapse"); on
    # its output too: without it they stay in a narrow cone (mean cosine 0.86; benchmarks/RESULTS-history.md, "AVID
    # at the small budget"). Z̄ kept from Cross-AVID when CMA starts, as the authors do (the
    # cma_reestimate_z modification is an option, off).
    "small": {"method": {**SMALL_ENCODERS, "cma_refresh_epochs": 1, "head_batchnorm": True,
                         "head_output_batchnorm": True}},
    "paper": {"method": PAPER_ENCODERS},
}

VARIANTS = ("self", "cross", "joint")
CMA_CRITERIA = ("paper", "released")
_SEED_STRIDE = 0x9E3779B97F4A7C15  # odd 64-bit constant: successive steps get unrelated seeds
_POSITIVE_STREAM = 0x5851F42D4C957F2D  # offsets the positives' draws from the negatives' of a step


@dataclass(frozen=True)
class AVIDConfig:
    """AVID / AVID+CMA hyperparameters; defaults are the paper's (§3.3, §4.2).

    CMA schedule: with ``cma`` on, epochs ``0 .. cma_start_epoch-1`` train plain Cross-AVID and
    CMA takes over from epoch ``cma_start_epoch`` (S) on. This is the paper's "initialise from a
    Cross-AVID checkpoint of epoch S, then train with L_CMA" in one run, so a sweep needs no
    checkpoint hand-over; the positive sets are computed from the memory banks at the start of
    epoch S and refreshed every ``cma_refresh_epochs`` (E) epochs. S = 0 runs CMA from the first
    step, with positive sets taken from the (random) initial banks.
    """

    image_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig("resnet18", 64))
    sound_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig("resnet10", 64))
    variant: str = "cross"  # self | cross | joint (Table 1)
    proj_hidden_dim: int = 512  # MLP of three FC layers with 512 hidden units (§3.3)
    # BatchNorm after each hidden layer of the head (SimCLR's head). The paper's and the authors'
    # heads have none; without it the projections of a fresh encoder share one direction and
    # Adam collapses them (benchmarks/RESULTS-history.md, "AVID collapse").
    head_batchnorm: bool = False
    # A BatchNorm without affine parameters on the head's output, before the L2 normalisation
    # (as MoCo v3's projector): it removes the projections' common direction, so a batch cannot
    # sit in one narrow cone, where a memory-bank NCE at small tau scores lower than spread out.
    head_output_batchnorm: bool = False
    proj_dim: int = 128
    temperature: float = 0.07  # tau
    num_negatives: int = 1024  # K
    memory_momentum: float = 0.5  # m in v̄_i <- normalise(m v̄_i + (1 - m) v_i)
    cma: bool = False  # AVID+CMA: L_CMA = L_Cross-AVID + lambda * L_wMPD (eq. 9)
    cma_weight: float = 1.0  # lambda
    cma_positives: int = 32  # K_p
    cma_negatives: int = 1024  # K_n
    cma_rule: str = "agreement"  # agreement | video | audio | either (Fig. 4)
    cma_refresh_epochs: int = 50  # E
    cma_start_epoch: int = 0  # S
    # Estimate Z̄ again on CMA's first step (S > 0), not keep Cross-AVID's as the authors do: a
    # modification (off in every preset: the authors' behaviour is the reproduction). It was
    # chosen when L_wMPD undid Cross-AVID's image learning at the small preset (benchmarks/RESULTS-history.md,
    # "AVID+CMA after a longer Cross-AVID"); why that happens is not known (the first step's Z̄ is
    # 2.18 with the paper's head and 2.20 with the BatchNorm head, the paper's 2.2045).
    cma_reestimate_z: bool = False
    cma_chunk_size: int = 4096  # rows and columns per block of the positive-set search
    # "paper": eq. 8-9 as the paper writes them (every sample's K_p positives in L_wMPD, the
    # instance alone as the cross-modal positive). "released": the authors' released criterion
    # (criterions/avid_cma.py of facebookresearch/AVID-CMA): every step draws
    # cma_sampled_positives of the K_p (with replacement) per sample, which are L_wMPD's
    # positives and join the instance as the cross-modal term's positives.
    cma_criterion: str = neutral_field("paper")
    cma_sampled_positives: int = neutral_field(8)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: unknown AVID variant {self.variant!r}; choose one of {list(VARIANTS)}")
        if self.proj_hidden_dim <= 0 or self.proj_dim <= 0:
            raise ValueError(
                f"proj_hidden_dim / proj_dim: must be positive, got {self.proj_hidden_dim} / {self.proj_dim}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be positive, got {self.temperature}")
        if self.num_negatives <= 0:
            raise ValueError(f"num_negatives: must be a positive number of memories, got {self.num_negatives}")
        if not 0 <= self.memory_momentum < 1:
            raise ValueError(f"memory_momentum: must be in [0, 1), got {self.memory_momentum}")
        if self.cma and self.variant != "cross":
            raise ValueError(f"variant: AVID+CMA builds on Cross-AVID (eq. 9); set variant=cross, got {self.variant!r}")
        if self.cma_weight < 0:
            raise ValueError(f"cma_weight: must be >= 0, got {self.cma_weight}")
        if self.cma_criterion not in CMA_CRITERIA:
            raise ValueError(f"cma_criterion: must be one of {', '.join(CMA_CRITERIA)}, got {self.cma_criterion!r}")
        if self.cma_criterion == "released" and not 0 < self.cma_sampled_positives <= self.cma_positives:
            raise ValueError(f"cma_sampled_positives: must be in 1..cma_positives={self.cma_positives}, "
                             f"got {self.cma_sampled_positives}")
        for name in ("cma_positives", "cma_negatives", "cma_refresh_epochs", "cma_chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.cma_rule not in CMA_RULES:
            raise ValueError(f"cma_rule: unknown positive-set rule {self.cma_rule!r}; choose one of {list(CMA_RULES)}")
        if self.cma_start_epoch < 0:
            raise ValueError(
                f"cma_start_epoch: must be >= 0 (0 = CMA from the first epoch), got {self.cma_start_epoch}"
            )


# --- pure functions -------------------------------------------------------------------------


def memory_nce(
    x_BD: torch.Tensor,
    pos_BPD: torch.Tensor,
    neg_BKD: torch.Tensor,
    *,
    temperature: float,
    z_bar: float | torch.Tensor,
) -> torch.Tensor:
    """Memory-bank NCE loss (paper 002, eq. 1-2 and 8), averaged over the batch.

    P(i | x) = exp(x·x̄_i / tau) / (N Z̄) and h(x, x̄) = P / (P + K/N) = e^s / (e^s + K Z̄) with
    s = x·x̄ / tau, so N cancels. L = -log h(x, x̄_pos) - sum_{j in negatives} log(1 - h(x, x̄_j)).
    ``pos_BPD`` may hold P positives per sample (or be (B, D) for one): the positive term is then
    averaged over them, which is eq. 8's 1/K_p sum_p L_NCE(x; x̄_p, N') since the negative term
    does not depend on p. Written with softplus for stability:
    -log h = softplus(log(K Z̄) - s), -log(1 - h) = softplus(s - log(K Z̄)).
    """
    if pos_BPD.dim() == 2:
        pos_BPD = pos_BPD.unsqueeze(1)
    if x_BD.dim() != 2 or pos_BPD.dim() != 3 or neg_BKD.dim() != 3:
        raise ValueError(
            f"memory_nce expects x (B, D), pos (B, P, D) or (B, D), neg (B, K, D); got "
            f"{tuple(x_BD.shape)}, {tuple(pos_BPD.shape)}, {tuple(neg_BKD.shape)}"
        )
    b, d = x_BD.shape
    if pos_BPD.shape[0] != b or neg_BKD.shape[0] != b or pos_BPD.shape[2] != d or neg_BKD.shape[2] != d:
        raise ValueError(
            f"memory_nce: batch or feature sizes differ: x {tuple(x_BD.shape)}, pos {tuple(pos_BPD.shape)}, "
            f"neg {tuple(neg_BKD.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    k = neg_BKD.shape[1]
    log_kz = torch.log(torch.as_tensor(z_bar, dtype=x_BD.dtype, device=x_BD.device) * k)
    s_pos_BP = torch.einsum("bd,bpd->bp", x_BD, pos_BPD) / temperature
    s_neg_BK = torch.einsum("bd,bkd->bk", x_BD, neg_BKD) / temperature
    loss_B = F.softplus(log_kz - s_pos_BP).mean(1) + F.softplus(s_neg_BK - log_kz).sum(1)
    return loss_B.mean()


def mean_exp_score(x_BD: torch.Tensor, neg_BKD: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """The first-batch estimate of Z̄: mean of exp(x·x̄_j / tau) over the negatives j (eq. 1)."""
    return torch.exp(torch.einsum("bd,bkd->bk", x_BD, neg_BKD) / temperature).mean()


def skip_excluded(draws_BK: torch.Tensor, excluded_BE: torch.Tensor) -> torch.Tensor:
    """Map uniform draws from [0, N - E) to uniform draws from {0..N-1} minus each row's E
    excluded indices (distinct, sorted ascending): the r-th allowed index is r plus the number of
    excluded indices e_k with e_k - k <= r (e_k - k allowed indices lie below e_k)."""
    e = excluded_BE.shape[1]
    ref_BE = excluded_BE - torch.arange(e, device=excluded_BE.device)
    return draws_BK + (draws_BK.unsqueeze(2) >= ref_BE.unsqueeze(1)).sum(2)


def ema_memory(old_GD: torch.Tensor, x_GD: torch.Tensor, *, momentum: float) -> torch.Tensor:
    """Memory update v̄_i <- normalise(m v̄_i + (1 - m) v_i) (paper 002 §3.1, m = 0.5)."""
    return F.normalize(momentum * old_GD + (1 - momentum) * x_GD, dim=1)


# --- the method -----------------------------------------------------------------------------


class AVIDHead(nn.Sequential):
    """Projection MLP: three FC layers with ReLU between them (paper 002 §3.3: "three fully
    connected layers with 512 hidden units"), c -> hidden -> hidden -> D; with ``batchnorm``, a
    BatchNorm after each hidden FC layer, with ``output_batchnorm`` an affine-free BatchNorm on the
    D outputs (the FC layer before a BatchNorm then carries no bias)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, batchnorm: bool = False,
                 output_batchnorm: bool = False) -> None:
        def hidden(d_in: int) -> list[nn.Module]:
            if batchnorm:
                return [nn.Linear(d_in, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            return [nn.Linear(d_in, hidden_dim), nn.ReLU(inplace=True)]

        last: list[nn.Module] = [nn.Linear(hidden_dim, out_dim, bias=not output_batchnorm)]
        if output_batchnorm:
            last.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*hidden(in_dim), *hidden(hidden_dim), *last)


class AVID(Method):
    """Self-, Cross- or Joint-AVID (eq. 3-5), and AVID+CMA (eq. 9) with ``cfg.cma``.

    Loss terms (each direction weighted ½, as in the authors' code):
    L_self = ½[NCE(v; v̄) + NCE(a; ā)], L_cross = ½[NCE(v; ā) + NCE(a; v̄)],
    L_wMPD = ½ · 1/K_p sum_{p in P_i} [NCE(v; v̄_p, N'_i) + NCE(a; ā_p, N'_i)].
    loss = L_self | L_cross | L_self + L_cross, plus lambda · L_wMPD once CMA is on. While CMA is
    on, all negatives are drawn from N'_i = everything but P_i and i (the complement of eq. 7),
    for the cross-modal term too, as the authors do: agreeing instances are not pushed away.
    """

    name: ClassVar[str] = "avid"
    # One slot per paired item: the memory banks and CMA's positive sets grow with the pool.
    size_fields: ClassVar[dict[str, str]] = {**Method.size_fields, "bank_v": "data.paired_size",
                                             "bank_a": "data.paired_size", "positives": "data.paired_size"}
    pretrain_pool: ClassVar[str] = "paired"

    def __init__(self, cfg: AVIDConfig, data_info: DataInfo) -> None:
        super().__init__()
        self.cfg = cfg
        n = data_info.paired_size
        self.check_data(cfg, data_info)
        self.E_v = build_encoder(cfg.image_encoder, in_channels=data_info.image_channels)
        self.E_s = build_encoder(cfg.sound_encoder, in_channels=data_info.sound_channels)
        heads = {"batchnorm": cfg.head_batchnorm, "output_batchnorm": cfg.head_output_batchnorm}
        self.head_v = AVIDHead(self.E_v.out_dim, cfg.proj_hidden_dim, cfg.proj_dim, **heads)
        self.head_a = AVIDHead(self.E_s.out_dim, cfg.proj_hidden_dim, cfg.proj_dim, **heads)

        # One draw from the global RNG (seeded by the trainer) fixes the banks' initial values
        # and every later negative draw; DDP broadcasts rank 0's buffers, so workers agree.
        # (The draw is on the CPU and the banks are filled in place, so that the method can also be
        # built on the meta device, where avlab estimates a run's memory before starting it.)
        seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("sampling_seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))  # after_step calls so far
        self.register_buffer("bank_v", F.normalize(torch.empty(n, cfg.proj_dim).normal_(generator=g), dim=1))
        self.register_buffer("bank_a", F.normalize(torch.empty(n, cfg.proj_dim).normal_(generator=g), dim=1))
        self.register_buffer("z_bar", torch.tensor(0.0))
        self.register_buffer("z_bar_ready", torch.tensor(False))
        if cfg.cma:
            self.register_buffer("positives", torch.zeros(n, cfg.cma_positives, dtype=torch.int64))
            # The epoch whose start the positive sets were computed for; -1: none yet (CMA off).
            self.register_buffer("positives_epoch", torch.tensor(-1, dtype=torch.int64))
            if data_info.paired_labelled:  # each slot's class, for cma_positive_precision only
                self.register_buffer("bank_label", torch.full((n,), -1, dtype=torch.int64))
            if cfg.cma_start_epoch == 0:
                self.refresh_positives(epoch=0)

    def ddp_broadcast_buffers(self) -> bool:
        return False  # banks are updated identically on every rank from gathered features

    @classmethod
    def check_data(cls, cfg: AVIDConfig, data_info: DataInfo) -> None:
        n = data_info.paired_size
        # K other instances are drawn per sample (with replacement, like the authors); asking
        # for more than the pool holds is rejected rather than silently clamped.
        if n <= 1:
            raise FieldError("data.paired_size", f"the memory bank needs the pretraining pool size (> 1), got {n}")
        if cfg.cma and cfg.cma_positives >= n:
            raise FieldError("method.cma_positives", f"must be < paired_size={n}, got {cfg.cma_positives}")
        excluded = 1 + (cfg.cma_positives if cfg.cma else 0)
        if cfg.num_negatives > n - excluded:
            raise FieldError(
                "method.num_negatives", f"{cfg.num_negatives} negatives need more than {cfg.num_negatives + excluded - 1} "
                f"pairs in the pool, got paired_size={n}; lower num_negatives"
            )
        if cfg.cma and cfg.cma_negatives > n - excluded:
            raise FieldError(
                "method.cma_negatives", f"{cfg.cma_negatives} negatives outside the positive set need more than "
                f"{cfg.cma_negatives + excluded - 1} pairs, got paired_size={n}; lower cma_negatives"
            )

    # -- state reads (no writes) --

    @property
    def cma_active(self) -> bool:
        return self.cfg.cma and int(self.positives_epoch) >= 0

    def project(self, f_BC: torch.Tensor, head: nn.Module) -> torch.Tensor:
        return F.normalize(head(f_BC), dim=1)

    def sample_negative_indices(self, index_B: torch.Tensor) -> torch.Tensor:
        """Negative memory indices for this step, (B, K) or (B, max(K, K_n)) under CMA.

        Uniform over the other instances (over the complement of P_i and i under CMA). Draws are
        a function of (``sampling_seed``, ``step``) only: rows are drawn for the whole global batch
        and each worker takes its own slice, so W workers draw what one worker would draw on the
        same global batch (workers hold equal shards, as the sampler drops the ragged tail).
        """
        n = self.bank_v.shape[0]
        b, world = index_B.shape[0], world_size()
        index_B = index_B.long()
        if self.cma_active:
            k = max(self.cfg.num_negatives, self.cfg.cma_negatives)
            excluded_BE = torch.cat([index_B[:, None], self.positives[index_B]], dim=1).sort(dim=1).values
        else:
            k = self.cfg.num_negatives
            excluded_BE = index_B[:, None]
        seed = (int(self.sampling_seed) + (int(self.step) + 1) * _SEED_STRIDE) % 2**63
        g = torch.Generator().manual_seed(seed)
        draws_GK = torch.randint(0, n - excluded_BE.shape[1], (b * world, k), generator=g)
        rank = distributed.rank()
        draws_BK = draws_GK[rank * b : (rank + 1) * b].to(index_B.device)
        return skip_excluded(draws_BK, excluded_BE)

    def sample_positive_indices(self, index_B: torch.Tensor) -> torch.Tensor:
        """``cma_criterion: released``: this step's (B, cma_sampled_positives) draw from each
        sample's positive set, uniform with replacement, a function of (``sampling_seed``,
        ``step``) like the negatives (another stream), drawn for the global batch and sliced."""
        b, world, s = index_B.shape[0], world_size(), self.cfg.cma_sampled_positives
        seed = (int(self.sampling_seed) + (int(self.step) + 1) * _SEED_STRIDE + _POSITIVE_STREAM) % 2**63
        g = torch.Generator().manual_seed(seed)
        draws_GS = torch.randint(0, self.cfg.cma_positives, (b * world, s), generator=g)
        rank = distributed.rank()
        draws_BS = draws_GS[rank * b : (rank + 1) * b].to(index_B.device)
        return self.positives[index_B.long()].gather(1, draws_BS)

    # -- the Method interface --

    @classmethod
    def training_metrics(cls, cfg: AVIDConfig) -> tuple[str, ...]:
        terms = {"self": ("loss_self",), "cross": ("loss_cross",), "joint": ("loss_self", "loss_cross")}[cfg.variant]
        return ("loss", *terms, *(("loss_cma", "cma_positive_precision") if cfg.cma else ()))

    def training_step(self, batch: Batch) -> StepOutput:
        cfg, tau = self.cfg, self.cfg.temperature
        index_B = batch["index"].long()
        v_BD = self.project(self.E_v(batch["image"]), self.head_v)
        a_BD = self.project(self.E_s(batch["sound"]), self.head_a)

        with torch.no_grad():
            neg_BK = self.sample_negative_indices(index_B)
            k = cfg.num_negatives
            # (query, positive memories, negative memories) of each NCE term, by name.
            terms: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
            if cfg.variant in ("self", "joint"):
                terms["v2v"] = (v_BD, self.bank_v[index_B], self.bank_v[neg_BK[:, :k]])
                terms["a2a"] = (a_BD, self.bank_a[index_B], self.bank_a[neg_BK[:, :k]])
            if cfg.variant in ("cross", "joint"):
                terms["v2a"] = (v_BD, self.bank_a[index_B], self.bank_a[neg_BK[:, :k]])
                terms["a2v"] = (a_BD, self.bank_v[index_B], self.bank_v[neg_BK[:, :k]])
            if self.cma_active:
                pos_BP, kn = self.positives[index_B], cfg.cma_negatives
                if cfg.cma_criterion == "released":  # this step's draw joins the instance cross-modally
                    pos_BP = self.sample_positive_indices(index_B)
                    both_BP = torch.cat([index_B[:, None], pos_BP], dim=1)
                    terms["v2a"] = (v_BD, self.bank_a[both_BP], self.bank_a[neg_BK[:, :k]])
                    terms["a2v"] = (a_BD, self.bank_v[both_BP], self.bank_v[neg_BK[:, :k]])
                terms["v2v_cma"] = (v_BD, self.bank_v[pos_BP], self.bank_v[neg_BK[:, :kn]])
                terms["a2a_cma"] = (a_BD, self.bank_a[pos_BP], self.bank_a[neg_BK[:, :kn]])

            out: dict[str, torch.Tensor] = {}
            state: dict[str, torch.Tensor] = {}  # for after_step, not metrics
            if bool(self.z_bar_ready):
                z_bar = self.z_bar
            else:  # first step: estimate Z̄ here; after_step freezes it
                # As the authors' one NCE criterion does: from the first term it scores, v→a
                # (v→v for Self-AVID), not a mean over the terms.
                x, _, neg = terms["v2a" if "v2a" in terms else "v2v"]
                z_bar = mean_exp_score(x.detach(), neg, temperature=tau)
                if world_size() > 1:
                    dist.all_reduce(z_bar)
                    z_bar = z_bar / world_size()
                state["z_bar"] = z_bar

        nce = {
            name: memory_nce(x, pos, neg, temperature=tau, z_bar=z_bar) for name, (x, pos, neg) in terms.items()
        }
        loss = torch.zeros((), dtype=v_BD.dtype, device=v_BD.device)
        if "v2v" in nce:
            out["loss_self"] = (nce["v2v"] + nce["a2a"]) / 2
            loss = loss + out["loss_self"]
        if "v2a" in nce:
            out["loss_cross"] = (nce["v2a"] + nce["a2v"]) / 2
            loss = loss + out["loss_cross"]
        if cfg.variant == "joint":  # the authors' coefficients sum to 1: each direction weighs ¼
            loss = loss / 2
        if "v2v_cma" in nce:
            out["loss_cma"] = (nce["v2v_cma"] + nce["a2a_cma"]) / 2
            loss = loss + cfg.cma_weight * out["loss_cma"]
        out["loss"] = loss
        state["v"], state["a"] = v_BD.detach(), a_BD.detach()
        return StepOutput(out, state)

    @torch.no_grad()
    def after_step(self, batch: Batch, outputs: StepOutput) -> None:
        """Freeze Z̄ after the first step, write the global batch into the memory banks (EMA),
        count the step. Every worker applies the same update, so the banks stay identical."""
        state = outputs.state
        if "z_bar" in state:
            self.z_bar.fill_(float(state["z_bar"]))
            self.z_bar_ready.fill_(True)
        index_G = distributed.all_gather(batch["index"].long().to(self.bank_v.device))
        for bank, x_BD in ((self.bank_v, state["v"]), (self.bank_a, state["a"])):
            x_GD = distributed.all_gather(x_BD.to(bank.dtype))
            # Indices within one global batch are distinct (sampling without replacement).
            bank.index_copy_(0, index_G, ema_memory(bank[index_G], x_GD, momentum=self.cfg.memory_momentum))
        if hasattr(self, "bank_label") and "label" in batch:
            self.bank_label.index_copy_(0, index_G, distributed.all_gather(batch["label"].long().to(index_G.device)))
        self.step += 1

    @torch.no_grad()
    def refresh_positives(self, *, epoch: int) -> None:
        """Recompute the positive sets P_i from the current memory banks (eq. 7) for ``epoch``;
        on the first computation, with ``cma_reestimate_z``, let the next step estimate Z̄ anew."""
        cfg = self.cfg
        if cfg.cma_reestimate_z and int(self.positives_epoch) < 0:
            self.z_bar_ready.fill_(False)
        self.positives.copy_(
            cma_positive_sets(self.bank_v, self.bank_a, k=cfg.cma_positives, rule=cfg.cma_rule,
                              chunk_size=cfg.cma_chunk_size)
        )
        self.positives_epoch.fill_(epoch)

    @torch.no_grad()
    def after_initialise_from(self) -> None:
        """``train.init_from`` copied a run's banks (and Z̄, and a CMA run's positive sets) into a
        new run: CMA from epoch 0 takes its positive sets from the copied banks, not the random
        ones of the constructor (with ``cma_reestimate_z``, the first step estimates Z̄ again);
        CMA from a later epoch has no positive sets until then."""
        if self.cfg.cma:
            self.positives_epoch.fill_(-1)
            if self.cfg.cma_start_epoch == 0:
                self.refresh_positives(epoch=0)

    def on_epoch_end(self, epoch: int) -> dict[str, float] | None:
        """CMA schedule: positive sets for epochs S, S + E, S + 2E, ... (paper: E = 50), and the
        class precision of each new set over the slots whose class is known."""
        if not self.cfg.cma:
            return None
        nxt, s = epoch + 1, self.cfg.cma_start_epoch
        if nxt >= s and (nxt - s) % self.cfg.cma_refresh_epochs == 0:
            self.refresh_positives(epoch=nxt)
            return self.positive_precision()
        return None

    @torch.no_grad()
    def positive_precision(self) -> dict[str, float]:
        """``cma_positive_precision``: of the positives whose class and whose instance's class are
        known, the share of the same class (chance: 1 / classes); none when no class is known."""
        if not hasattr(self, "bank_label"):
            return {}
        own_N1, theirs_NP = self.bank_label[:, None], self.bank_label[self.positives]
        known = (own_N1 >= 0) & (theirs_NP >= 0)
        if not bool(known.any()):
            return {}
        return {"cma_positive_precision": float(((own_N1 == theirs_NP) & known).sum() / known.sum())}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints older than bank_label: it starts unknown (-1) and fills as items are seen.
        if hasattr(self, "bank_label") and prefix + "bank_label" not in state_dict:
            state_dict[prefix + "bank_label"] = torch.full_like(self.bank_label, -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def embed(self, *, images: torch.Tensor | None = None,
              sounds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        # h is the encoder feature (what the paper probes); z the unit-norm projection v_i / a_i.
        return self.embed_encoders(images, sounds, z_v=lambda f: self.project(f, self.head_v),
                                   z_s=lambda f: self.project(f, self.head_a))
