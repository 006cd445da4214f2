"""Product-key slot selection (Lample et al. 2019), docs/design.md §1.1.

Shape legend: T tokens, C model dim, H memory heads, n sub-keys per half (slots N = n*n),
P = k_dim // 2 (half key dim), K knn (slots kept per head).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class ProductKeys(nn.Module):
    """Query projection and per-head sub-keys; maps tokens to K slots per head with scores.

    forward(x_TC) -> (slots_THK int64 in [0, n*n), scores_THK float)
    """

    def __init__(self, dim: int, n_keys: int, heads: int, knn: int, k_dim: int, qk_norm: bool = False):
        super().__init__()
        if k_dim % 2:
            raise ValueError(f"k_dim={k_dim} must be even")
        if knn > n_keys:
            raise ValueError(f"knn={knn} must be <= n_keys={n_keys}")
        self.n_keys, self.heads, self.knn, self.k_dim, self.qk_norm = n_keys, heads, knn, k_dim, qk_norm
        self.query = nn.Linear(dim, heads * k_dim, bias=True)
        # keys_H2nP: sub-keys of each head for the two query halves
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, k_dim // 2))
        self.reset_keys()

    def reset_keys(self) -> None:
        bound = 1.0 / math.sqrt(self.k_dim)
        nn.init.uniform_(self.keys, -bound, bound)

    def forward(self, x_TC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T, H, K, n = x_TC.shape[0], self.heads, self.knn, self.n_keys
        q_TH2P = self.query(x_TC).view(T, H, 2, self.k_dim // 2)
        keys = self.keys
        if self.qk_norm:
            q_TH2P, keys = _rms(q_TH2P), _rms(keys)
        # s_TH2n: scores of each half-query against its sub-keys
        s_TH2n = torch.einsum("thip,hinp->thin", q_TH2P, keys.to(q_TH2P.dtype))
        s_TH2K, i_TH2K = s_TH2n.topk(K, dim=-1)
        # cartesian sums: cand_THKK[a, b] = s1[a] + s2[b], slot = i1[a] * n + i2[b]
        cand_THKK = s_TH2K[:, :, 0, :, None] + s_TH2K[:, :, 1, None, :]
        slot_THKK = i_TH2K[:, :, 0, :, None] * n + i_TH2K[:, :, 1, None, :]
        scores_THK, best = cand_THKK.flatten(2).topk(K, dim=-1)
        slots_THK = slot_THKK.flatten(2).gather(-1, best)
        return slots_THK, scores_THK


def brute_force_topk(module: ProductKeys, x_TC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: score all n*n slots of every head and keep the top K (O(T H N); tests only)."""
    T, H, n = x_TC.shape[0], module.heads, module.n_keys
    q = module.query(x_TC).view(T, H, 2, module.k_dim // 2)
    keys = module.keys
    if module.qk_norm:
        q, keys = _rms(q), _rms(keys)
    s = torch.einsum("thip,hinp->thin", q, keys)
    full_THN = (s[:, :, 0, :, None] + s[:, :, 1, None, :]).flatten(2)  # slot a*n+b
    scores, slots = full_THN.topk(module.knn, dim=-1)
    return slots, scores


def softmax_weights(scores_THK: torch.Tensor) -> torch.Tensor:
    """Per-head softmax over the K kept slots (fp32 for stability)."""
    return F.softmax(scores_THK.float(), dim=-1).to(scores_THK.dtype)
