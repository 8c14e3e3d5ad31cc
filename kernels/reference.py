"""Plain-torch reference projector: defines the JL matrix and applies it with bounded memory.

The matrix ``P`` (p x k) has entries ``P[a, b] = sigma(seed, a, b) / sqrt(k)`` where sigma is a
pure function of (seed, input coordinate a, output column b) computed with Philox4x32-10
(kernels/README.md gives the exact formula). Nothing depends on the device, the batch, or how
the input vector is chunked: projecting ``x[:, lo:hi]`` with ``row_offset=lo`` and summing the
pieces equals projecting ``x``.

Memory: P is generated in row blocks of at most ``block_bytes`` and never held whole.

Legend: B batch rows, P input coordinates (rows of the matrix), K projection dimension.
"""

from __future__ import annotations

import math
import sys

import torch

from .philox import MASK32, philox4x32

RNG_VERSION = "philox4x32-10/v1"
KINDS = ("rademacher", "gaussian")
TAG = {"rademacher": 1, "gaussian": 2, "sjlt": 3}  # counter word c3: one stream per kind
DEFAULT_BLOCK_BYTES = 32 * 2**20

_SIGN_LUT: dict[torch.device, torch.Tensor] = {}


def _sign_lut(device: torch.device) -> torch.Tensor:
    """(256, 8) float32: row v holds 1 - 2 * bit_j(v) for j = 0..7 (bit 0 first)."""
    if device not in _SIGN_LUT:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)[None, :]) & 1
        _SIGN_LUT[device] = (1 - 2 * bits).to(torch.float32).to(device)
    return _SIGN_LUT[device]


def _row_counters(row_start: int, num_rows: int, device: torch.device):
    rows_R = torch.arange(num_rows, dtype=torch.int64, device=device) + row_start
    return (rows_R & MASK32)[:, None], (rows_R >> 32)[:, None]


def rademacher_signs(row_start: int, num_rows: int, dim: int, seed: int, device=None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Unscaled signs sigma(seed, a, b) for rows a in [row_start, row_start + num_rows).

    Column b takes bit (b mod 32) of output word ((b div 32) mod 4) of
    Philox(counter = (b div 128, a mod 2**32, a div 2**32, 1), key = seed).

    Args:
        out: optional float32 buffer with at least num_rows * ceil(dim / 128) * 128 elements,
            reused across calls to avoid page-faulting a fresh block each time.
    Returns:
        (num_rows, dim) float32 tensor of +-1 on ``device``.
    """
    device = torch.device(device or "cpu")
    num_blocks = -(-dim // 128)
    lo_R1, hi_R1 = _row_counters(row_start, num_rows, device)
    col_1C = torch.arange(num_blocks, dtype=torch.int64, device=device)[None, :]
    words = philox4x32(col_1C, lo_R1, hi_R1, torch.full_like(lo_R1, TAG["rademacher"]), seed)
    words_RC4 = torch.stack(torch.broadcast_tensors(*words), dim=-1)
    # Bytes of each word, least significant first; each byte expands to 8 signs (bit 0 first).
    if sys.byteorder == "little":
        bytes_ = words_RC4.to(torch.int32).view(torch.uint8).reshape(-1).to(torch.int32)
    else:
        shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=device)
        bytes_ = ((words_RC4[..., None] >> shifts) & 0xFF).reshape(-1)
    numel = num_rows * num_blocks * 128
    if out is None:
        out = torch.empty(numel, dtype=torch.float32, device=device)
    signs = out.view(-1)[:numel].view(-1, 8)
    torch.index_select(_sign_lut(device), 0, bytes_, out=signs)
    return signs.view(num_rows, num_blocks * 128)[:, :dim]


def gaussian_values(row_start: int, num_rows: int, dim: int, seed: int, device=None) -> torch.Tensor:
    """Standard normal sigma(seed, a, b) by Box-Muller on Philox words (float32 arithmetic).

    Column b uses Philox(counter = (b div 4, a mod 2**32, a div 2**32, 2), key = seed); the word
    pair (w0, w1) gives columns 4c, 4c+1 and (w2, w3) gives 4c+2, 4c+3:
    u1 = ((w_even >> 8) + 1) / 2**24, u2 = (w_odd >> 8) / 2**24,
    z = sqrt(-2 ln u1) * (cos 2 pi u2, sin 2 pi u2).

    Returns:
        (num_rows, dim) float32 tensor on ``device``.
    """
    device = torch.device(device or "cpu")
    num_groups = -(-dim // 4)
    lo_R1, hi_R1 = _row_counters(row_start, num_rows, device)
    col_1C = torch.arange(num_groups, dtype=torch.int64, device=device)[None, :]
    w0, w1, w2, w3 = philox4x32(col_1C, lo_R1, hi_R1, torch.full_like(lo_R1, TAG["gaussian"]), seed)
    scale = 2.0**-24
    out = []
    for w_even, w_odd in ((w0, w1), (w2, w3)):
        u1 = ((w_even >> 8) + 1).to(torch.float32) * scale
        u2 = (w_odd >> 8).to(torch.float32) * scale
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * u2
        out += [radius * torch.cos(angle), radius * torch.sin(angle)]
    values_RC4 = torch.stack(torch.broadcast_tensors(*out), dim=-1)
    return values_RC4.reshape(num_rows, num_groups * 4)[:, :dim]


def matrix_block(kind: str, row_start: int, num_rows: int, dim: int, seed: int, device=None):
    """Rows [row_start, row_start + num_rows) of the unscaled matrix sigma, float32."""
    if kind == "rademacher":
        return rademacher_signs(row_start, num_rows, dim, seed, device)
    if kind == "gaussian":
        return gaussian_values(row_start, num_rows, dim, seed, device)
    raise ValueError(f"projection kind={kind!r} is not one of {KINDS}; pick one of them")


def materialize(num_rows: int, dim: int, seed: int, kind: str = "rademacher", row_offset: int = 0,
                device=None) -> torch.Tensor:
    """The scaled matrix P[row_offset : row_offset + num_rows] as a dense (num_rows, dim) tensor.

    For tests and small problems only: it allocates num_rows * dim floats.
    """
    return matrix_block(kind, row_offset, num_rows, dim, seed, device) / math.sqrt(dim)


def project_reference(x_BP: torch.Tensor, dim: int, seed: int, kind: str = "rademacher",
                      row_offset: int = 0, block_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """Project rows of ``x_BP`` with P: returns ``x_BP @ P[row_offset : row_offset + P]``.

    Args:
        x_BP: (B, P) tensor, any float dtype, any device.
        dim: projection dimension k >= 1.
        seed: projection seed in [0, 2**64).
        kind: ``rademacher`` or ``gaussian``.
        row_offset: index of x_BP's first column in the full parameter vector.
        block_bytes: memory bound for one generated block of P.
    Returns:
        (B, dim) tensor, float64 if ``x_BP`` is float64 else float32 (fp32 accumulation).
    """
    if dim < 1:
        raise ValueError(f"projection dim={dim} must be >= 1")
    if x_BP.ndim != 2:
        raise ValueError(f"x_BP must be 2-D (batch, params), got shape {tuple(x_BP.shape)}")
    out_dtype = torch.float64 if x_BP.dtype == torch.float64 else torch.float32
    num_rows = x_BP.shape[1]
    out_BK = torch.zeros(x_BP.shape[0], dim, dtype=out_dtype, device=x_BP.device)
    rows_per_block = max(1, block_bytes // (4 * dim))
    buffer = None
    if kind == "rademacher":
        buffer = torch.empty(min(rows_per_block, num_rows) * (-(-dim // 128)) * 128,
                             dtype=torch.float32, device=x_BP.device)
    for start in range(0, num_rows, rows_per_block):
        stop = min(num_rows, start + rows_per_block)
        if kind == "rademacher":
            block_RK = rademacher_signs(row_offset + start, stop - start, dim, seed, x_BP.device,
                                        out=buffer)
        else:
            block_RK = matrix_block(kind, row_offset + start, stop - start, dim, seed, x_BP.device)
        out_BK.addmm_(x_BP[:, start:stop].to(out_dtype), block_RK.to(out_dtype))
    return out_BK.mul_(1.0 / math.sqrt(dim))
