"""Projection heads (SimCLR-style MLPs) mapping representations to the contrastive space."""

from __future__ import annotations

from torch import nn


class ProjectionHead(nn.Sequential):
    """2-layer MLP: Linear(in, hidden) -> BatchNorm -> ReLU -> Linear(hidden, out) (paper 001 §3.2.1,
    following SimCLR)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
