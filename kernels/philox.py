"""Philox4x32-10 in plain torch: the counter-based RNG that defines every projection matrix.

This is the same generator that Triton's ``tl.randint4x`` and Random123's ``philox4x32_R(10)``
compute (checked against Random123's known-answer vectors in tests/test_philox.py), so the
Triton kernel and this reference produce bit-identical words for the same (key, counter).

Words are held in int64 tensors whose values are in [0, 2**32). The 32x32 -> 64 bit product
wraps in int64 two's complement; its bit pattern, and hence both 32-bit halves extracted with
shifts and masks, is exact.

Legend: ``c0..c3`` counter words, ``k0, k1`` key words; all int64 tensors of one shape.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
ROUND_A = 0xD2511F53  # Random123 PHILOX_M4x32_0
ROUND_B = 0xCD9E8D57  # Random123 PHILOX_M4x32_1
KEY_A = 0x9E3779B9  # golden ratio, Weyl increment of key word 0
KEY_B = 0xBB67AE85  # sqrt(3) - 1, Weyl increment of key word 1
NUM_ROUNDS = 10


def split_seed(seed: int) -> tuple[int, int]:
    """Key words (k0, k1) of a non-negative seed below 2**64: low and high 32 bits."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"projection seed={seed} is outside [0, 2**64); pick a smaller seed")
    return seed & MASK32, seed >> 32


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of the counters (c0, c1, c2, c3) under the key derived from ``seed``.

    Args:
        c0..c3: int64 tensors (broadcastable) with values in [0, 2**32).
        seed: non-negative int below 2**64; key = (seed low 32 bits, seed high 32 bits).
    Returns:
        Four int64 tensors with values in [0, 2**32), the generator's output words.
    """
    k0, k1 = split_seed(seed)
    for _ in range(NUM_ROUNDS):
        prod_a = c0 * ROUND_A
        prod_b = c2 * ROUND_B
        c0, c1, c2, c3 = (
            ((prod_b >> 32) & MASK32) ^ c1 ^ k0,
            prod_b & MASK32,
            ((prod_a >> 32) & MASK32) ^ c3 ^ k1,
            prod_a & MASK32,
        )
        k0 = (k0 + KEY_A) & MASK32
        k1 = (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3
