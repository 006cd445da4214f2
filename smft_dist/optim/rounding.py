"""Stochastic rounding of fp32 rows to bf16, with counter-based random bits
(`optim.memory_stochastic_rounding`: bf16 memory values trained without an fp32 master copy).

Shape legend: U rows, C rows of one chunk, D value dim.

Why: rounding an updated row to the nearest bf16 drops every per-element change under half a bf16
ulp (sparse.py's docstring: most of a small-lr update), which is why bf16 tables keep an fp32
"master" row (4 x D bytes per row with state). Rounding up with probability equal to the fractional
distance between the two neighbouring bf16 values makes the stored value right in expectation,
E[round(x)] = x, so small updates survive on average and the master copy can go: 2 bytes per value
plus the optimizer's row state.

How: an fp32 value has 16 more mantissa bits than a bf16. Read as an integer, add r uniform in
[0, 2^16) and clear the low 16 bits: the sum carries into the kept bits, i.e. the magnitude rounds
up to the next bf16, exactly when r >= 2^16 - low, which has probability low / 2^16, the fractional
distance of |x| above its lower bf16 neighbour. The bits order like the magnitudes (sign-magnitude,
across exponent boundaries and subnormals), so this holds for every finite x; an inf stays inf.

The random bits: r = hash(seed, step, global row id, element index), splitmix64's finaliser
absorbing the four keys one at a time, computed with int64 tensor ops where the rows are. A pure
function of those keys, not a draw from a stateful generator: an element's rounding does not
depend on which rank holds its row (world size, mp sharding), on the order or chunks in which rows
are processed, or on how many draws came before it. So a run is reproducible from its seed, and a
1-rank and an N-rank run, a resharded run and a resumed run round every element identically; a
generator would give each of them different bits. `step` is the row's own update count (the
optimizer's per-row "step" state, 1 at a row's first update): it changes at every update of a row,
and it is checkpointed and resharded with the row's state by global id, so a resumed run reads the
count an uninterrupted one would have.
"""
from __future__ import annotations

import torch


def _int64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch's integers are signed)."""
    return c - (1 << 64) if c >= 1 << 63 else c


CHUNK_ELEMENTS = 2**20  # elements rounded at a time: each int64 temporary of the hash is 8 MiB
GOLDEN = _int64(0x9E3779B97F4A7C15)  # splitmix64's increment (odd: k -> k x GOLDEN is a bijection mod 2^64)
MIX1, MIX2 = _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic: mask off the copied sign bits)."""
    return (z >> k).bitwise_and_((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in place on z (one temporary at a time): a bijection of 64-bit words
    whose every output bit depends on every input bit. int64 multiplication wraps mod 2^64, as the
    unsigned arithmetic it stands for."""
    z.bitwise_xor_(_shr(z, 30)).mul_(MIX1)
    z.bitwise_xor_(_shr(z, 27)).mul_(MIX2)
    return z.bitwise_xor_(_shr(z, 31))


def absorb(h: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """-> mix64(h + key x GOLDEN), a new tensor: for a fixed h, distinct keys give distinct words
    (both maps are bijections), so every (seed, step, row, element) gets its own hash."""
    return mix64(key * GOLDEN + h)


def rounding_bits(seed: int, step_C: torch.Tensor, ids_C: torch.Tensor, dim: int) -> torch.Tensor:
    """-> r_CD int64 in [0, 2^16): the random bits of each element of rows ids_C (global row ids) at
    their update count step_C, for this run's seed."""
    h_C = absorb(mix64(torch.full_like(ids_C, seed)), step_C.long())
    h_C = absorb(h_C, ids_C.long())
    h_CD = absorb(h_C[:, None], torch.arange(dim, device=ids_C.device)[None, :])
    return _shr(h_CD, 48)  # the top 16 bits


def stochastic_round_bf16(x_UD: torch.Tensor, seed: int, step_U: torch.Tensor, ids_U: torch.Tensor) -> torch.Tensor:
    """-> x_UD (fp32) rounded to bf16, up with probability equal to the fractional distance between
    its two bf16 neighbours, with the bits of `rounding_bits(seed, step_U, ids_U, D)`. CHUNK_ELEMENTS
    at a time, so the int64 temporaries stay a few chunks; elementwise, so the result of a row depends
    neither on the chunking nor on the other rows passed with it."""
    out_UD = torch.empty(x_UD.shape, dtype=torch.bfloat16, device=x_UD.device)
    rows = max(1, CHUNK_ELEMENTS // max(x_UD.shape[1], 1))
    for start in range(0, x_UD.shape[0], rows):
        part = slice(start, start + rows)
        out_UD[part] = _round_chunk(x_UD[part], seed, step_U[part], ids_U[part])
    return out_UD


def _round_chunk(x_CD: torch.Tensor, seed: int, step_C: torch.Tensor, ids_C: torch.Tensor) -> torch.Tensor:
    bits_CD = x_CD.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF  # the fp32 bits, unsigned
    bits_CD = (bits_CD + rounding_bits(seed, step_C, ids_C, x_CD.shape[1])) & 0xFFFF0000
    # back to a signed int32 of the same bits: a float32 with 16 zero low bits, exactly a bf16
    return (bits_CD - (_shr(bits_CD, 31) << 32)).int().view(torch.float32).to(torch.bfloat16)
