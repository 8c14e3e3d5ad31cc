"""Philox4x32-10 against Random123's known answers, and an independent scalar Python model of
every matrix entry (kernels/README.md), used here and by tests/test_kernels*.py.

The scalar functions below are written from the README formulas only (plain Python integers,
no torch), so that a mistake shared by all our backends would still be caught.
"""

from __future__ import annotations

import math
import random
import struct

import torch

from das_pipeline.kernels.philox import philox4x32

M32 = 0xFFFFFFFF

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key, expected output)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_py(counter: tuple[int, int, int, int], seed: int) -> tuple[int, int, int, int]:
    """Scalar Philox4x32-10: key = (seed mod 2**32, seed div 2**32)."""
    c0, c1, c2, c3 = counter
    k0, k1 = seed & M32, seed >> 32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def rademacher_entry(seed: int, a: int, b: int) -> int:
    """Unscaled sign sigma(seed, a, b) in {-1, +1}."""
    word = philox_py((b // 128, a & M32, a >> 32, 1), seed)[(b // 32) % 4]
    return 1 - 2 * ((word >> (b % 32)) & 1)


def gaussian_entry(seed: int, a: int, b: int) -> float:
    """Unscaled N(0, 1) value by Box-Muller (in double: agrees with float32 backends to ~1e-6)."""
    w = philox_py((b // 4, a & M32, a >> 32, 2), seed)
    even, odd = (w[0], w[1]) if b % 4 < 2 else (w[2], w[3])
    u1 = ((even >> 8) + 1) * 2.0**-24
    u2 = (odd >> 8) * 2.0**-24
    angle = _f32(_f32(2 * math.pi) * u2)
    radius = math.sqrt(-2.0 * math.log(u1))
    return radius * (math.cos(angle) if b % 2 == 0 else math.sin(angle))


def sjlt_nonzeros_of(seed: int, a: int, dim: int, s: int) -> list[tuple[int, int]]:
    """The s (column, sign) pairs of coordinate a."""
    width = dim // s
    g, r = divmod(a, width)
    out = []
    for j in range(s):
        w = philox_py((g & M32, g >> 32, 2 * (j // 4) + 1, 3), seed)[j % 4]
        shift = (w * width) >> 32
        u = a // 128
        sign_word = philox_py((u & M32, u >> 32, 2 * j, 3), seed)[(a // 32) % 4]
        out.append((j * width + (shift + r) % width, 1 - 2 * ((sign_word >> (a % 32)) & 1)))
    return out


def matrix_py(kind: str, rows: range, dim: int, seed: int, s: int = 4) -> torch.Tensor:
    """Scaled P[rows] as a float64 tensor, entry by entry from the scalar formulas."""
    out = torch.zeros(len(rows), dim, dtype=torch.float64)
    for i, a in enumerate(rows):
        if kind == "sjlt":
            for col, sign in sjlt_nonzeros_of(seed, a, dim, s):
                out[i, col] = sign / math.sqrt(s)
        else:
            entry = rademacher_entry if kind == "rademacher" else gaussian_entry
            out[i] = torch.tensor([entry(seed, a, b) for b in range(dim)], dtype=torch.float64)
            out[i] /= math.sqrt(dim)
    return out


def test_known_answer_vectors():
    for counter, (k0, k1), expected in KAT:
        seed = k0 | (k1 << 32)
        assert philox_py(counter, seed) == expected, "scalar model fails Random123 KAT"
        words = philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in counter), seed)
        got = tuple(int(w) for w in words)
        assert got == expected, f"torch Philox {got} != Random123 {expected}"


def test_torch_philox_equals_scalar_model_on_random_counters():
    rng = random.Random(0)
    counters = [tuple(rng.getrandbits(32) for _ in range(4)) for _ in range(64)]
    seed = rng.getrandbits(64)
    tensors = [torch.tensor([c[i] for c in counters], dtype=torch.int64) for i in range(4)]
    words = torch.stack(philox4x32(*tensors, seed), dim=1).tolist()
    assert words == [list(philox_py(c, seed)) for c in counters]


def test_seed_must_fit_64_bits():
    zero = torch.zeros(1, dtype=torch.int64)
    for bad in (-1, 2**64):
        try:
            philox4x32(zero, zero, zero, zero, bad)
        except ValueError as err:
            assert "seed" in str(err) and "2**64" in str(err)
        else:
            raise AssertionError(f"seed={bad} was accepted")
