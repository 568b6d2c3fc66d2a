"""AVID+CMA's positive sets: the instances that agree with each memory slot in both memory
spaces (paper 002 §3.2, eq. 6-7, and the other rules of its Fig. 4a), chosen block by block.

Legend: N memory slots, D projection size, R rows and C columns of one block, k positives.
"""

from __future__ import annotations

import torch

__all__ = ["CMA_RULES", "cma_positive_sets", "cma_score"]

CMA_RULES = ("agreement", "video", "audio", "either")


def cma_score(sim_v: torch.Tensor, sim_a: torch.Tensor, rule: str) -> torch.Tensor:
    """Similarity that ranks candidate positives (Fig. 4a): ``agreement`` is rho_ij =
    min(v̄_i·v̄_j, ā_i·ā_j) (eq. 6); ``video`` / ``audio`` use one space only; ``either``
    (audio-visual expansion, similar in either space) is max(v̄_i·v̄_j, ā_i·ā_j)."""
    if rule == "agreement":
        return torch.minimum(sim_v, sim_a)
    if rule == "either":
        return torch.maximum(sim_v, sim_a)
    if rule == "video":
        return sim_v
    if rule == "audio":
        return sim_a
    raise ValueError(f"cma_rule: unknown positive-set rule {rule!r}; choose one of {list(CMA_RULES)}")


@torch.no_grad()
def cma_positive_sets(
    bank_v_ND: torch.Tensor, bank_a_ND: torch.Tensor, *, k: int, rule: str, chunk_size: int
) -> torch.Tensor:
    """P_i = TopK_{j != i} score(i, j) for every memory slot i (eq. 7), as an (N, k) index
    tensor with each row sorted ascending.

    Scores are computed block by block, ``chunk_size`` rows against ``chunk_size`` columns, with
    a running top-k per row, so memory stays O(chunk_size * (chunk_size + k)) and N = 230k
    never materialises an N x N matrix.
    """
    n = bank_v_ND.shape[0]
    if not 0 < k < n:
        raise ValueError(f"cma_positives: need 0 < k < N = {n} memory slots, got {k}")
    device = bank_v_ND.device
    out_Nk = torch.empty(n, k, dtype=torch.long, device=device)
    for i0 in range(0, n, chunk_size):
        i1 = min(i0 + chunk_size, n)
        rows_R = torch.arange(i0, i1, device=device)
        best_val_Rk = bank_v_ND.new_empty(i1 - i0, 0)
        best_idx_Rk = torch.empty(i1 - i0, 0, dtype=torch.long, device=device)
        for j0 in range(0, n, chunk_size):
            j1 = min(j0 + chunk_size, n)
            cols_C = torch.arange(j0, j1, device=device)
            sim_v = bank_v_ND[i0:i1] @ bank_v_ND[j0:j1].T if rule != "audio" else None
            sim_a = bank_a_ND[i0:i1] @ bank_a_ND[j0:j1].T if rule != "video" else None
            score_RC = cma_score(sim_v, sim_a, rule)  # type: ignore[arg-type]
            score_RC = score_RC.masked_fill(rows_R[:, None] == cols_C[None, :], float("-inf"))
            val = torch.cat([best_val_Rk, score_RC], dim=1)
            idx = torch.cat([best_idx_Rk, cols_C.expand(i1 - i0, -1)], dim=1)
            top = val.topk(min(k, val.shape[1]), dim=1)
            best_val_Rk, best_idx_Rk = top.values, idx.gather(1, top.indices)
        out_Nk[i0:i1] = best_idx_Rk.sort(dim=1).values
    return out_Nk
