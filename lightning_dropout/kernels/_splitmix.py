"""SplitMix64 streams (Steele, Lea & Flood 2014; Java's SplittableRandom), the random words
of the CPU path's masks and noise.

Word ``k`` of the stream keyed by ``seed`` is a bijective mix of ``seed + (k + 1) * GAMMA``:
any word is computed without the others, so each thread of a pass draws its own piece, and
the keys come from torch's generator. :mod:`._compiled` computes the words in numba; here
they are in torch ops, for the path without numba (the same words from the same keys).
"""

from __future__ import annotations

from torch import Tensor

GAMMA, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def splitmix(counters: Tensor, seed: int) -> Tensor:
    """Words ``counters`` (int64) of the stream keyed by ``seed`` (int64), as int64 bits.

    Example:
        >>> import torch
        >>> hex(splitmix(torch.tensor([0]), 0).item() % 2**64)  # SplitMix64's first output from 0
        '0xe220a8397b1dcdaf'
    """
    z = (counters + 1) * _signed(GAMMA) + seed  # int64 arithmetic wraps as uint64's does
    z = (z ^ shifted(z, 30)) * _signed(MIX1)
    z = (z ^ shifted(z, 27)) * _signed(MIX2)
    return z ^ shifted(z, 31)


def _signed(word: int) -> int:
    return word - (1 << 64) if word >= 1 << 63 else word


def shifted(z: Tensor, bits: int) -> Tensor:
    """``z >> bits`` on the uint64 bits of int64 ``z`` (a logical shift)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)
