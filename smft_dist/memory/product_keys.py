"""Product-key slot selection (Lample et al. 2019), docs/design.md §1.1.

Shape legend: T tokens, C model dim, H memory heads, n sub-keys per half (slots N = n*n),
P = k_dim // 2 (half key dim), K knn (slots kept per head).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def candidate_pairs(K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (a_C, b_C): the rank pairs (a, b) with (a + 1)(b + 1) <= K, C of them (50 for K = 16, 119
    for K = 32, against K^2). Only these can be among the top K of the K^2 sums s1[a] + s2[b] of two
    descending lists: the (a + 1)(b + 1) pairs (a' <= a, b' <= b) all score >= s1[a] + s2[b], so a pair
    with (a + 1)(b + 1) > K has at least K others scoring as much (it can only tie the K-th).
    Built once per (K, device): no host-device copy per forward."""
    pairs = [(a, b) for a in range(K) for b in range(K) if (a + 1) * (b + 1) <= K]
    return (torch.tensor([a for a, _ in pairs], device=device), torch.tensor([b for _, b in pairs], device=device))


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
        """Scores in fp32 with autocast off, whatever the caller's autocast: with qk-norm a half-score
        reaches +-k_dim/2, where bf16's spacing (0.125-2) would decide near-ties, and evaluation
        (no autocast) would then read other slots than bf16 training wrote. Only the query
        projection runs in the caller's dtype; its output is upcast before scoring."""
        T, H, K, n = x_TC.shape[0], self.heads, self.knn, self.n_keys
        q_TH2P = self.query(x_TC).view(T, H, 2, self.k_dim // 2)
        with torch.profiler.record_function("smft/scoring"), torch.autocast(x_TC.device.type, enabled=False):
            q_TH2P, keys = q_TH2P.float(), self.keys.float()
            if self.qk_norm:
                q_TH2P, keys = _rms(q_TH2P), _rms(keys)
            # s_TH2n: scores of each half-query against its sub-keys
            s_TH2n = torch.einsum("thip,hinp->thin", q_TH2P, keys)
            s_TH2K, i_TH2K = s_TH2n.topk(K, dim=-1)  # sorted: rank a of half 0, rank b of half 1
            # candidate c is the pair (a_c, b_c) of ranks, scored s1[a_c] + s2[b_c], slot i1[a_c] * n + i2[b_c]
            a_C, b_C = candidate_pairs(K, x_TC.device)
            cand_THC = s_TH2K[:, :, 0].index_select(-1, a_C) + s_TH2K[:, :, 1].index_select(-1, b_C)
            scores_THK, best_THK = cand_THC.topk(K, dim=-1)
            # the winners' slot ids from their ranks alone: no int64 T x H x K^2 slot tensor
            a_THK = i_TH2K[:, :, 0].gather(-1, a_C[best_THK])
            b_THK = i_TH2K[:, :, 1].gather(-1, b_C[best_THK])
            return a_THK * n + b_THK, scores_THK


def brute_force_topk(module: ProductKeys, x_TC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: score all n*n slots of every head and keep the top K (O(T H N); tests only). The
    query in the caller's dtype, the scores in fp32 with autocast off, as `ProductKeys.forward`."""
    T, H, n = x_TC.shape[0], module.heads, module.n_keys
    q = module.query(x_TC).view(T, H, 2, module.k_dim // 2)
    with torch.autocast(x_TC.device.type, enabled=False):
        q, keys = q.float(), module.keys.float()
        if module.qk_norm:
            q, keys = _rms(q), _rms(keys)
        s = torch.einsum("thip,hinp->thin", q, keys)
        full_THN = (s[:, :, 0, :, None] + s[:, :, 1, None, :]).flatten(2)  # slot a*n+b
        scores, slots = full_THN.topk(module.knn, dim=-1)
    return slots, scores


def softmax_weights(scores_THK: torch.Tensor) -> torch.Tensor:
    """Per-head softmax over the K kept slots (fp32 for stability)."""
    return F.softmax(scores_THK.float(), dim=-1).to(scores_THK.dtype)
