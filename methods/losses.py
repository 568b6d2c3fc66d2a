"""Loss functions, each a pure function of its inputs.

Legend: B batch, D projection size, N = 2B items in a contrastive set, J extra negatives per item.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_positive_nt_xent(
    z_ND: torch.Tensor, positives_NN: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """Multi-positive normalised-temperature cross-entropy (paper 001, eq. 4 and 5).

    For item i: -log( sum_{k in P(i)} exp(cos(z_i, z_k)/t) / sum_{j != i} exp(cos(z_i, z_j)/t) ),
    averaged over the N items. ``positives_NN`` is a boolean matrix, P(i) = {k : positives[i, k]};
    the diagonal must be False and every row needs at least one positive.
    """
    if z_ND.dim() != 2:
        raise ValueError(f"z_ND must be (N, D), got shape {tuple(z_ND.shape)}")
    n = z_ND.shape[0]
    if positives_NN.shape != (n, n):
        raise ValueError(f"positives_NN must be ({n}, {n}), got {tuple(positives_NN.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z_ND = F.normalize(z_ND, dim=1)
    logits_NN = z_ND @ z_ND.T / temperature
    self_NN = torch.eye(n, dtype=torch.bool, device=z_ND.device)
    logits_NN = logits_NN.masked_fill(self_NN, float("-inf"))
    log_denominator_N = torch.logsumexp(logits_NN, dim=1)
    log_numerator_N = torch.logsumexp(logits_NN.masked_fill(~positives_NN, float("-inf")), dim=1)
    return (log_denominator_N - log_numerator_N).mean()


def cross_pair_positives(b: int, *, device: torch.device | None = None) -> torch.Tensor:
    """Positive mask for the stacked set {a_1..a_B, b_1..b_B}: item i and item i+B are positives."""
    idx = torch.arange(2 * b, device=device)
    return (idx[:, None] - idx[None, :]).abs() == b


def paired_associative_loss(
    z_v_BD: torch.Tensor, z_s_BD: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """L_pair (paper 001, eq. 4): image and sound projections of the same clip are positives,
    every other item of Z^p = {z^v_1..z^v_B, z^s_1..z^s_B} is a negative."""
    if z_v_BD.shape != z_s_BD.shape:
        raise ValueError(f"z_v_BD {tuple(z_v_BD.shape)} and z_s_BD {tuple(z_s_BD.shape)} differ")
    b = z_v_BD.shape[0]
    z_ND = torch.cat([z_v_BD, z_s_BD], dim=0)
    return multi_positive_nt_xent(z_ND, cross_pair_positives(b, device=z_ND.device), temperature=temperature)


def unpaired_associative_loss(
    z_cyc_BD: torch.Tensor, z_aug_BD: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """L_unpair (paper 001, eq. 5): the cyclic-path projection of an unpaired sample (e.g. z^{v,s})
    and the ordinary-path projection of its second augmented view (z^{s,v}) are positives."""
    return paired_associative_loss(z_cyc_BD, z_aug_BD, temperature=temperature)


# --- Multi-SSL (paper 004, supplementary §1) ----------------------------------------------------


def huber(pred: torch.Tensor, target: torch.Tensor, *, delta: float) -> torch.Tensor:
    """Mean Huber loss: ½x² where |x| <= ε, ε|x| - ½ε² elsewhere (x = pred - target)."""
    return F.huber_loss(pred, target, delta=delta, reduction="mean")


def foreground_nce(
    a_BD: torch.Tensor, v_pos_BD: torch.Tensor, v_rot_BJD: torch.Tensor | None, *, temperature: float
) -> torch.Tensor:
    """Supp. eq. 2: -log e^{v_p·a_i/τ} / (e^{v_p·a_i/τ} + Σ_{v_n ∈ P_i} e^{v_n·a_i/τ}), averaged over
    i. P_i holds the other clips' aligned foregrounds and, if given, the clip's own foreground
    turned to the J wrong angles (``v_rot_BJD``). Inputs are unit vectors."""
    logits_BB = a_BD @ v_pos_BD.T / temperature  # column j: clip j's aligned foreground
    if v_rot_BJD is not None:
        logits_BJ = torch.einsum("bd,bjd->bj", a_BD, v_rot_BJD) / temperature
        logits_BB = torch.cat([logits_BB, logits_BJ], dim=1)
    target_B = torch.arange(a_BD.shape[0], device=a_BD.device)
    return F.cross_entropy(logits_BB, target_B)


def info_nce(q_BD: torch.Tensor, k_BD: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Symmetric-free InfoNCE over the batch: q_i must pick k_i among all k (unit vectors)."""
    logits_BB = q_BD @ k_BD.T / temperature
    return F.cross_entropy(logits_BB, torch.arange(q_BD.shape[0], device=q_BD.device))
