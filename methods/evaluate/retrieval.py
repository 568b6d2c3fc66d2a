"""Cross-modal retrieval Rank-k accuracy (paper 001 §4.3, Table 3: sound → image).

Each test sound queries the test images by cosine similarity of the projections z^s, z^v; a query
counts as a hit at k when a same-class image is among its k most similar gallery items. This
measures whether the paired (associative) objective aligned the two modalities' spaces.

Legend: M queries, N gallery items, Q queries in one chunk, D projection size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from methods.evaluate.knn import ArrayLike, _as_tensor

__all__ = ["first_hit_rank", "retrieval_rank_k"]



def first_hit_rank(
    query_Z: ArrayLike,
    query_y: ArrayLike,
    gallery_Z: ArrayLike,
    gallery_y: ArrayLike,
    *,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """0-based rank of the first same-class gallery item for each query, by cosine similarity.

    The rank is the number of *other-class* gallery items at least as similar as the best
    same-class item: ties are resolved against the query. This keeps a collapsed embedding (all
    similarities equal) from scoring a perfect Rank-1; without ties it equals the position in a
    sorted list. A query with no same-class item in the gallery gets rank N (never a hit).

    Returns:
        (M,) int64 ranks.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: must be positive, got {chunk_size}")
    query_MD = F.normalize(_as_tensor(query_Z).float(), dim=1)
    gallery_ND = F.normalize(_as_tensor(gallery_Z).float(), dim=1)
    query_M = _as_tensor(query_y).long()
    gallery_N = _as_tensor(gallery_y).long()
    if query_MD.ndim != 2 or gallery_ND.ndim != 2 or query_MD.shape[1] != gallery_ND.shape[1]:
        raise ValueError(
            f"gallery_Z: expected (N, {query_MD.shape[-1]}) like query_Z, "
            f"got {tuple(gallery_ND.shape)}"
        )
    if query_M.shape != (query_MD.shape[0],):
        raise ValueError(
            f"query_y: expected shape ({query_MD.shape[0]},), got {tuple(query_M.shape)}"
        )
    if gallery_N.shape != (gallery_ND.shape[0],):
        raise ValueError(
            f"gallery_y: expected shape ({gallery_ND.shape[0]},), got {tuple(gallery_N.shape)}"
        )
    ranks: list[torch.Tensor] = []
    for start in range(0, query_MD.shape[0], chunk_size):
        sim_QN = query_MD[start : start + chunk_size] @ gallery_ND.T
        same_QN = query_M[start : start + chunk_size, None] == gallery_N[None, :]
        best_same_Q = sim_QN.masked_fill(~same_QN, float("-inf")).max(dim=1).values
        rank_Q = ((sim_QN >= best_same_Q[:, None]) & ~same_QN).sum(dim=1)
        ranks.append(rank_Q)
    return torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)


def retrieval_rank_k(
    query_Z: ArrayLike,
    query_y: ArrayLike,
    gallery_Z: ArrayLike,
    gallery_y: ArrayLike,
    *,
    ks: Sequence[int] = (1, 2, 3, 4, 5),
) -> dict[int, float]:
    """Rank-k accuracy: share of queries whose k most similar gallery items hold a same-class one.

    Paper 001 Table 3 reports Rank-1..Rank-5 for sound queries (z^s) against images (z^v). Ties
    in similarity count against the query (see :func:`first_hit_rank`).

    Returns:
        ``{k: accuracy}`` for every k in ``ks``; non-decreasing in k.
    """
    if not ks or any(int(k) != k or k <= 0 for k in ks):
        raise ValueError(f"ks: expected positive integers, got {tuple(ks)}")
    rank_M = first_hit_rank(query_Z, query_y, gallery_Z, gallery_y)
    if rank_M.numel() == 0:
        raise ValueError("query_Z: no queries")
    return {int(k): float((rank_M < k).double().mean()) for k in ks}
