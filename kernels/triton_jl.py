"""Fused Triton projection: the matrix of kernels/README.md generated tile by tile in registers.

Dense kinds. Each program owns a (BLOCK_K columns x BLOCK_B rows) tile of the transposed output
and walks its share of the input coordinates in steps of BLOCK_P:

    acc[BLOCK_K, BLOCK_B] += S^T[BLOCK_K, BLOCK_P] @ x^T[BLOCK_P, BLOCK_B]

S^T is never in memory: for ``rademacher`` one Philox call per (128 columns, coordinate) gives
four 32-bit words, whose bits become +-1 by moving the bit into the float sign
(``(word << (31 - i)) & 0x80000000 | 0x3F800000``) and the tile goes straight to the tensor
cores. The projection dimension is the MMA's M side (multiple of 64 for wgmma), the batch its
N side (16 ... 128), so small batches still use tensor cores.

Numerics (all accumulate in fp32): bf16 and fp16 inputs multiply exact +-1 tiles of their own
type; fp32 inputs are split into three bf16 parts (hi + mid + lo carries 24 mantissa bits) and
take three MMAs, so nothing is ever cast to fp16 and large gradients cannot overflow.
``gaussian`` tiles are fp32 (Box-Muller) and use ``tf32x3`` dots (about fp32 accuracy).

Under ``TRITON_INTERPRET=1`` (CPU tests) the dots run in fp32: the interpreter mishandles bf16
dots (it multiplies their raw bits), and fp32 products of bf16 values are exact anyway.

Sparse JL (``sjlt``): a gather kernel. Program (column tile, slice j, row tile) visits every
block g of M coordinates and adds the coordinate that lands on each of its columns, so every
output is summed in block order exactly like the reference (bit-for-bit equal) and nothing is
written twice (no atomics). The packed sign words and block rotations come from the reference.

Indexing is int64 wherever a product can pass 2**31 (rows x stride, coordinates, splits).

Legend: B batch rows, P coordinates, K projection dim, S sjlt non-zeros, M = K / S.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .philox import MASK32, philox4x32, split_seed
from .reference import DEFAULT_SJLT_NONZEROS, DENSE_KINDS, TAG, check_input, check_sjlt, sjlt_shifts

KIND_CODE = {"rademacher": 1, "gaussian": 2}
DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10, the same rounds as tl.randint4x and kernels/philox.py (uint32 tensors)."""
    ROUND_A: tl.constexpr = 0xD2511F53
    ROUND_B: tl.constexpr = 0xCD9E8D57
    KEY_A: tl.constexpr = 0x9E3779B9
    KEY_B: tl.constexpr = 0xBB67AE85
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(ROUND_B, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(ROUND_A, _c0) ^ c3 ^ k1
        c1 = ROUND_B * _c2
        c3 = ROUND_A * _c0
        k0 = k0 + KEY_A
        k1 = k1 + KEY_B
    return c0, c1, c2, c3


@triton.jit
def _stack4(w0, w1, w2, w3, N: tl.constexpr, BLOCK_P: tl.constexpr):
    """[N, BLOCK_P] x 4 -> [N, 4, BLOCK_P] with word i at index i."""
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [N, BLOCK_P, 2, 2]: (i, j) holds w_{2i+j}
    return tl.permute(tl.reshape(words, (N, BLOCK_P, 4)), (0, 2, 1))


# Integer arguments that vary between calls are not specialised (one compile per tile config and
# dtype, not per shape); the row stride and rows_per_split (a multiple of BLOCK_P) stay specialised
# so that the compiler sees 16-aligned rows and vectorises the input loads.
@triton.jit(do_not_specialize=["B", "P", "K", "row_offset", "seed_lo", "seed_hi"])
def _dense_kernel(x_ptr, out_ptr, B, P, K, stride_xb, row_offset, seed_lo, seed_hi, rows_per_split,
                  scale, KIND: tl.constexpr, IN_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    k_start = pid_k * BLOCK_K
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    row_ptr = x_ptr + offs_b.to(tl.int64)[None, :] * stride_xb  # [1, BLOCK_B]
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    p_lo = pid_s.to(tl.int64) * rows_per_split
    p_hi = tl.minimum(p_lo + rows_per_split, P)
    num_iters = tl.cdiv(p_hi - p_lo, BLOCK_P).to(tl.int32)
    acc = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32)
    if KIND == 1:
        NC: tl.constexpr = BLOCK_K // 128
        col_group = (k_start // 128 + tl.arange(0, NC)).to(tl.uint32)
        bit_shift = (31 - tl.arange(0, 32)).to(tl.uint32)
    else:
        NG: tl.constexpr = BLOCK_K // 4
        col_group = (k_start // 4 + tl.arange(0, NG)).to(tl.uint32)
    offs_p = p_lo + tl.arange(0, BLOCK_P).to(tl.int64)  # int64: a split may pass 2**31 rows
    for _ in range(0, num_iters):
        x_mask = (offs_p < p_hi)[:, None] & mask_b[None, :]
        x_t = tl.load(row_ptr + offs_p[:, None], mask=x_mask, other=0.0)  # [BLOCK_P, BLOCK_B]
        a = offs_p + row_offset
        a_lo = (a & 0xFFFFFFFF).to(tl.uint32)[None, :]
        a_hi = (a >> 32).to(tl.uint32)[None, :]
        if KIND == 1:
            zero = tl.zeros((NC, BLOCK_P), dtype=tl.uint32)
            w0, w1, w2, w3 = _philox(col_group[:, None] + zero, a_lo + zero, a_hi + zero, zero + 1, k0, k1)
            words = _stack4(w0, w1, w2, w3, NC, BLOCK_P)  # [NC, 4, BLOCK_P]
            bits = ((words[:, :, None, :] << bit_shift[None, None, :, None]) & 0x80000000) | 0x3F800000
            sign = tl.reshape(bits, (BLOCK_K, BLOCK_P)).to(tl.float32, bitcast=True)  # +-1
            if INTERPRET:
                acc = tl.dot(sign, x_t.to(tl.float32), acc, input_precision="ieee")
            elif IN_DTYPE == 0:
                acc = tl.dot(sign.to(tl.bfloat16), x_t, acc)
            elif IN_DTYPE == 1:
                acc = tl.dot(sign.to(tl.float16), x_t, acc)
            else:
                # fp32 = hi + mid + lo in bf16 (24 mantissa bits), three exact-sign MMAs
                sign16 = sign.to(tl.bfloat16)
                hi = x_t.to(tl.bfloat16)
                rest = x_t - hi.to(tl.float32)
                mid = rest.to(tl.bfloat16)
                lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
                acc = tl.dot(sign16, hi, acc)
                acc = tl.dot(sign16, mid, acc)
                acc = tl.dot(sign16, lo, acc)
        else:
            zero = tl.zeros((NG, BLOCK_P), dtype=tl.uint32)
            w0, w1, w2, w3 = _philox(col_group[:, None] + zero, a_lo + zero, a_hi + zero, zero + 2, k0, k1)
            u1 = ((w0 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
            u2 = (w1 >> 8).to(tl.float32) * 5.9604644775390625e-08
            radius = tl.sqrt_rn(-2.0 * tl.log(u1))
            z0 = radius * tl.cos(u2 * 6.283185307179586)
            z1 = radius * tl.sin(u2 * 6.283185307179586)
            u1 = ((w2 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
            u2 = (w3 >> 8).to(tl.float32) * 5.9604644775390625e-08
            radius = tl.sqrt_rn(-2.0 * tl.log(u1))
            z2 = radius * tl.cos(u2 * 6.283185307179586)
            z3 = radius * tl.sin(u2 * 6.283185307179586)
            values = tl.reshape(_stack4(z0, z1, z2, z3, NG, BLOCK_P), (BLOCK_K, BLOCK_P))
            if INTERPRET:
                acc = tl.dot(values, x_t.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(values, x_t.to(tl.float32), acc, input_precision="tf32x3")
        offs_p += BLOCK_P
    offs_k = k_start + tl.arange(0, BLOCK_K)
    out_mask = (offs_k < K)[:, None] & mask_b[None, :]
    out_ptrs = (out_ptr + pid_s.to(tl.int64) * B * K + offs_b.to(tl.int64)[None, :] * K
                + offs_k[:, None])
    tl.store(out_ptrs, acc * scale, mask=out_mask)


@triton.jit(do_not_specialize=["B", "P", "row_offset", "q0", "num_words", "g0", "num_blocks", "width"])
def _sjlt_kernel(x_ptr, out_ptr, words_ptr, shifts_ptr, B, P, stride_xb, row_offset, q0, num_words,
                 g0, num_blocks, width, scale, S: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_B: tl.constexpr):
    pid_n = tl.program_id(0)
    j = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_n = offs_n < width
    mask_b = offs_b < B
    row_ptr = x_ptr + offs_b.to(tl.int64)[:, None] * stride_xb  # [BLOCK_B, 1]
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for gi in range(0, num_blocks):
        shift = tl.load(shifts_ptr + gi * S + j)
        r = (offs_n + width - shift) % width  # coordinate offset that lands on column n
        a = (g0 + gi).to(tl.int64) * width + r
        valid = mask_n & (a >= row_offset) & (a < row_offset + P)
        word = tl.load(words_ptr + j.to(tl.int64) * num_words + (a >> 5) - q0, mask=valid, other=0)
        flip = ((word.to(tl.uint32, bitcast=True) >> (a & 31).to(tl.uint32)) & 1) == 1
        x = tl.load(row_ptr + (a - row_offset)[None, :], mask=valid[None, :] & mask_b[:, None],
                    other=0.0).to(tl.float32)
        acc += tl.where(flip[None, :], -x, x)
    out_ptrs = out_ptr + offs_b.to(tl.int64)[:, None] * (S * width) + j * width + offs_n[None, :]
    tl.store(out_ptrs, acc * scale, mask=mask_b[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch settings of the dense kernel (all results agree to fp32 rounding).

    block_k: output columns per program, a multiple of 128 (rademacher) or 4 (gaussian).
    block_p: input coordinates per step (>= 16, power of two).
    block_b: batch rows per program (>= 16, power of two).
    split: programs sharing one output tile along the coordinates; their partial sums are
        added in a fixed order, so results are deterministic for a given config. 0 = choose.
    """

    block_k: int = 128
    block_p: int = 64
    block_b: int = 64
    num_warps: int = 4
    num_stages: int = 3
    split: int = 0


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_config(batch: int, dim: int, kind: str, device: torch.device) -> LaunchConfig:
    """Heuristic launch settings: the batch fits one row tile up to 128 rows."""
    block_b = min(128, max(16, triton.next_power_of_2(batch)))
    if device.type == "cpu":  # interpreter: small tiles keep numpy fast
        return LaunchConfig(block_k=128, block_p=16, block_b=min(block_b, 32), num_warps=1,
                            num_stages=1, split=1)
    if kind == "gaussian":
        return LaunchConfig(block_k=64, block_p=32, block_b=min(block_b, 64), num_warps=4)
    return LaunchConfig(block_k=128, block_p=64, block_b=block_b, num_warps=8 if block_b > 64 else 4)


def _check_device(x_BP: torch.Tensor) -> None:
    if x_BP.device.type == "cpu" and not interpreting():
        raise ValueError("backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 set before "
                         "importing triton, for tests); on CPU use backend='auto' or 'reference'")


def project_triton(x_BP: torch.Tensor, dim: int, seed: int, kind: str = "rademacher",
                   row_offset: int = 0, config: LaunchConfig | None = None) -> torch.Tensor:
    """Dense JL with the fused kernel; equals ``project_reference`` to fp32 accumulation order.

    Args:
        x_BP: (B, P) float32, bfloat16 or float16 tensor on a CUDA device (CPU under
            TRITON_INTERPRET=1). Rows need unit stride (made contiguous otherwise).
        dim, seed, kind, row_offset: as ``kernels.project``; kind is rademacher or gaussian.
        config: launch settings; default from ``default_config``.
    Returns:
        (B, dim) float32.
    """
    check_input(x_BP, dim)
    if kind not in DENSE_KINDS:
        raise ValueError(f"project_triton handles kinds {DENSE_KINDS}, got kind={kind!r}")
    if x_BP.dtype not in DTYPE_CODE:
        raise ValueError(f"backend='triton' takes float32, bfloat16 or float16 input, got {x_BP.dtype}; "
                         f"use backend='reference' for float64")
    _check_device(x_BP)
    seed_lo, seed_hi = split_seed(seed)
    if row_offset < 0 or row_offset + x_BP.shape[1] > 2**63:
        raise ValueError(f"row_offset={row_offset} must be in [0, 2**63 - P)")
    batch, num_cols = x_BP.shape
    cfg = config or default_config(batch, dim, kind, x_BP.device)
    multiple = 128 if kind == "rademacher" else 4
    if cfg.block_k % multiple or cfg.block_k < 64:
        raise ValueError(f"LaunchConfig.block_k={cfg.block_k} must be a multiple of {multiple} and >= 64 "
                         f"for kind={kind!r}")
    if x_BP.shape[1] and x_BP.stride(1) != 1:
        x_BP = x_BP.contiguous()
    tiles = triton.cdiv(dim, cfg.block_k) * triton.cdiv(batch, cfg.block_b)
    split = cfg.split
    if split <= 0:  # enough programs for ~4 waves on a large GPU, at least 16 steps each
        split = max(1, min(triton.cdiv(1024, tiles), num_cols // (16 * cfg.block_p)))
    rows_per_split = triton.cdiv(triton.cdiv(max(num_cols, 1), split), cfg.block_p) * cfg.block_p
    split = max(1, triton.cdiv(num_cols, rows_per_split))
    out = torch.empty(split, batch, dim, dtype=torch.float32, device=x_BP.device)
    if num_cols == 0 or batch == 0:
        return out.zero_().sum(0)
    grid = (triton.cdiv(dim, cfg.block_k), triton.cdiv(batch, cfg.block_b), split)
    _dense_kernel[grid](x_BP, out, batch, num_cols, dim, x_BP.stride(0), row_offset, seed_lo, seed_hi,
                        rows_per_split, 1.0 / math.sqrt(dim), KIND=KIND_CODE[kind],
                        IN_DTYPE=DTYPE_CODE[x_BP.dtype], INTERPRET=x_BP.device.type == "cpu",
                        BLOCK_K=cfg.block_k, BLOCK_P=cfg.block_p, BLOCK_B=cfg.block_b,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out[0] if split == 1 else out.sum(0)


def sjlt_words(row_offset: int, num_rows: int, nonzeros: int, seed: int, device) -> tuple[torch.Tensor, int]:
    """Packed sign words (S, Q) int32 of coordinates [row_offset, row_offset + num_rows): word q
    holds coordinates [32 q, 32 q + 32); returns (words, first q)."""
    q0, q1 = row_offset // 32, (row_offset + num_rows - 1) // 32 + 1
    u_U1 = torch.arange(q0 // 4, (q1 - 1) // 4 + 1, dtype=torch.int64, device=device)[:, None]
    j_1J = 2 * torch.arange(nonzeros, dtype=torch.int64, device=device)[None, :]
    words = philox4x32(u_U1 & MASK32, u_U1 >> 32, j_1J, torch.full_like(u_U1, TAG["sjlt"]), seed)
    words_JQ = torch.stack(torch.broadcast_tensors(*words), dim=-1).transpose(0, 1).reshape(nonzeros, -1)
    first = q0 - 4 * (q0 // 4)
    return words_JQ[:, first:first + q1 - q0].to(torch.int32).contiguous(), q0


def project_sjlt_triton(x_BP: torch.Tensor, dim: int, seed: int,
                        nonzeros: int = DEFAULT_SJLT_NONZEROS, row_offset: int = 0,
                        block_n: int = 128, block_b: int = 32, num_warps: int = 4) -> torch.Tensor:
    """Sparse JL with the gather kernel; equals ``project_sjlt_reference`` bit for bit.

    Args:
        x_BP: (B, P) float32, bfloat16 or float16 on CUDA (CPU under TRITON_INTERPRET=1).
    Returns:
        (B, dim) float32.
    """
    check_input(x_BP, dim)
    width = check_sjlt(dim, nonzeros)
    if x_BP.dtype not in DTYPE_CODE:
        raise ValueError(f"backend='triton' takes float32, bfloat16 or float16 input, got {x_BP.dtype}; "
                         f"use backend='reference' for float64")
    _check_device(x_BP)
    split_seed(seed)
    batch, num_cols = x_BP.shape
    out = torch.zeros(batch, dim, dtype=torch.float32, device=x_BP.device)
    if num_cols == 0 or batch == 0:
        return out
    if x_BP.stride(1) != 1:
        x_BP = x_BP.contiguous()
    words_SQ, q0 = sjlt_words(row_offset, num_cols, nonzeros, seed, x_BP.device)
    g0 = row_offset // width
    num_blocks = (row_offset + num_cols - 1) // width - g0 + 1
    shifts_GS = sjlt_shifts(g0, num_blocks, nonzeros, width, seed, x_BP.device).contiguous()
    block_b = min(block_b, max(16, triton.next_power_of_2(batch)))
    grid = (triton.cdiv(width, block_n), nonzeros, triton.cdiv(batch, block_b))
    _sjlt_kernel[grid](x_BP, out, words_SQ, shifts_GS, batch, num_cols, x_BP.stride(0), row_offset, q0,
                       words_SQ.shape[1], g0, num_blocks, width, 1.0 / math.sqrt(nonzeros), S=nonzeros,
                       BLOCK_N=block_n, BLOCK_B=block_b, num_warps=num_warps)
    return out
