"""Plain-torch reference projector: defines every JL matrix and applies it with bounded memory.

The matrix ``P`` (p x k) is a pure function of (seed, input coordinate a, output column b)
computed with Philox4x32-10; kernels/README.md gives the exact formulas. Nothing depends on the
device, the batch, or how the input vector is chunked: projecting ``x[:, lo:hi]`` with
``row_offset=lo`` and summing the pieces equals projecting ``x`` (to fp32 rounding).

Memory: dense kinds generate P in row blocks of at most ``block_bytes`` and never hold it whole.
Within ``DEFAULT_CACHE_BYTES`` recently used blocks (small calls) or Rademacher sign words are
kept and reused; the values are identical, only the generation work is skipped. ``sjlt``
touches each input coordinate ``s`` times and needs O(k) extra memory.

Legend: B batch rows, P input coordinates (rows of the matrix), K projection dimension,
S sjlt non-zeros per coordinate, M = K / S slice width, G blocks of M coordinates.
"""

from __future__ import annotations

import math
import os
import sys
from collections import OrderedDict

import torch

from .philox import MASK32, philox4x32

RNG_VERSION = "philox4x32-10/v1"
KINDS = ("rademacher", "gaussian", "sjlt")
DENSE_KINDS = ("rademacher", "gaussian")
TAG = {"rademacher": 1, "gaussian": 2, "sjlt": 3}  # counter word c3: one stream per kind
DEFAULT_BLOCK_BYTES = 32 * 2**20
DEFAULT_SJLT_NONZEROS = 4


def _default_cache_bytes() -> int:
    """Matrix blocks kept between calls: DAS_PROJECTION_CACHE_MB, else 1/8 of the machine's
    memory within [256 MB, 4 GB] (a whole gaussian matrix of a small model fits: 1.45 GB for a
    177k-parameter UNet at k = 2048)."""
    if "DAS_PROJECTION_CACHE_MB" in os.environ:
        return int(float(os.environ["DAS_PROJECTION_CACHE_MB"]) * 2**20)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 2 * 2**30
    return int(min(4 * 2**30, max(256 * 2**20, total // 8)))


# Generated blocks (and packed Philox words of Rademacher blocks: 1 bit per entry) kept between
# calls, so a matrix is generated once per (seed, block), not once per batch.
DEFAULT_CACHE_BYTES = _default_cache_bytes()

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


def _word_bytes(words_N4: torch.Tensor) -> torch.Tensor:
    """Bytes of int64 words in [0, 2**32), least significant first, as a flat int tensor."""
    if sys.byteorder == "little":
        return words_N4.to(torch.int32).view(torch.uint8).reshape(-1).to(torch.int32)
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=words_N4.device)
    return ((words_N4[..., None] >> shifts) & 0xFF).reshape(-1)


class _WordCache:
    """LRU of packed Philox words keyed by (seed, row_start, num_rows, dim, device), in bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self.items: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key):
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.budget:
            return
        while self.used + size > self.budget:
            _, old = self.items.popitem(last=False)
            self.used -= old.numel() * old.element_size()
        self.items[key] = value
        self.used += size


_WORDS = _WordCache(DEFAULT_CACHE_BYTES)


def rademacher_signs(row_start: int, num_rows: int, dim: int, seed: int, device=None,
                     out: torch.Tensor | None = None, cache: bool = False) -> torch.Tensor:
    """Unscaled signs sigma(seed, a, b) for rows a in [row_start, row_start + num_rows).

    Column b takes bit (b mod 32) of output word ((b div 32) mod 4) of
    Philox(counter = (b div 128, a mod 2**32, a div 2**32, 1), key = seed).

    Args:
        out: optional float32 buffer with at least num_rows * ceil(dim / 128) * 128 elements,
            reused across calls to avoid page-faulting a fresh block each time.
        cache: keep the block's packed words (dim / 8 bytes per row) in a process-wide LRU
            bounded by ``DAS_PROJECTION_CACHE_MB`` (default 256) and reuse them.
    Returns:
        (num_rows, dim) float32 tensor of +-1 on ``device``.
    """
    device = torch.device(device or "cpu")
    num_blocks = -(-dim // 128)
    key = (seed, row_start, num_rows, dim, device)
    bytes_ = _WORDS.get(key) if cache else None
    if bytes_ is None:
        lo_R1, hi_R1 = _row_counters(row_start, num_rows, device)
        col_1C = torch.arange(num_blocks, dtype=torch.int64, device=device)[None, :]
        words = philox4x32(col_1C, lo_R1, hi_R1, torch.full_like(lo_R1, TAG["rademacher"]), seed)
        words_RC4 = torch.stack(torch.broadcast_tensors(*words), dim=-1)
        # Bytes of each word, least significant first; each byte expands to 8 signs (bit 0 first).
        bytes_ = _word_bytes(words_RC4)
        if cache:
            bytes_ = bytes_.to(torch.uint8)
            _WORDS.put(key, bytes_)
    numel = num_rows * num_blocks * 128
    if out is None:
        out = torch.empty(numel, dtype=torch.float32, device=device)
    signs = out.view(-1)[:numel].view(-1, 8)
    torch.index_select(_sign_lut(device), 0, bytes_.to(torch.int32), out=signs)
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


def check_sjlt(dim: int, nonzeros: int) -> int:
    """Validate the sjlt shape and return the slice width M = dim / nonzeros."""
    if nonzeros < 1:
        raise ValueError(f"sjlt_nonzeros={nonzeros} must be >= 1 (typical: 4)")
    if dim % nonzeros:
        raise ValueError(f"projection dim={dim} is not a multiple of sjlt_nonzeros={nonzeros}; use "
                         f"dim={dim - dim % nonzeros or nonzeros} or a nonzeros that divides {dim}")
    return dim // nonzeros


def sjlt_shifts(block_start: int, num_blocks: int, nonzeros: int, width: int, seed: int,
                device=None) -> torch.Tensor:
    """Rotation h_j(g) in [0, width) of blocks g in [block_start, block_start + num_blocks).

    h_j(g) = (w * width) >> 32, w = word (j mod 4) of
    Philox(counter = (g mod 2**32, g div 2**32, 2 * (j div 4) + 1, 3), key = seed).

    Returns:
        (num_blocks, nonzeros) int64 tensor.
    """
    device = torch.device(device or "cpu")
    g_G1 = torch.arange(num_blocks, dtype=torch.int64, device=device)[:, None] + block_start
    group_1J = 2 * torch.arange(-(-nonzeros // 4), dtype=torch.int64, device=device)[None, :] + 1
    words = philox4x32(g_G1 & MASK32, g_G1 >> 32, group_1J, torch.full_like(g_G1, TAG["sjlt"]), seed)
    words_GJ4 = torch.stack(torch.broadcast_tensors(*words), dim=-1)
    return (words_GJ4.reshape(num_blocks, -1)[:, :nonzeros] * width) >> 32


def sjlt_signs(row_start: int, num_rows: int, nonzeros: int, seed: int, device=None) -> torch.Tensor:
    """Signs sigma_j(a) of coordinates a in [row_start, row_start + num_rows), slices j < nonzeros.

    sigma_j(a) = 1 - 2 * bit, bit = bit (a mod 32) of word ((a div 32) mod 4) of
    Philox(counter = ((a div 128) mod 2**32, (a div 128) div 2**32, 2 * j, 3), key = seed).

    Returns:
        (nonzeros, num_rows) float32 tensor of +-1.
    """
    device = torch.device(device or "cpu")
    first, last = row_start // 128, (row_start + num_rows - 1) // 128
    u_U1 = torch.arange(first, last + 1, dtype=torch.int64, device=device)[:, None]
    j_1J = 2 * torch.arange(nonzeros, dtype=torch.int64, device=device)[None, :]
    words = philox4x32(u_U1 & MASK32, u_U1 >> 32, j_1J, torch.full_like(u_U1, TAG["sjlt"]), seed)
    words_JU4 = torch.stack(torch.broadcast_tensors(*words), dim=-1).transpose(0, 1)
    signs = _sign_lut(device)[_word_bytes(words_JU4.contiguous())].view(nonzeros, -1)
    skip = row_start - first * 128
    return signs[:, skip:skip + num_rows]


def sjlt_columns(row_start: int, num_rows: int, dim: int, nonzeros: int, seed: int,
                 device=None) -> torch.Tensor:
    """Column of each non-zero: j * M + (h_j(a div M) + a mod M) mod M, as (nonzeros, num_rows) int64."""
    width = check_sjlt(dim, nonzeros)
    device = torch.device(device or "cpu")
    rows_R = torch.arange(num_rows, dtype=torch.int64, device=device) + row_start
    first = row_start // width
    shifts_GJ = sjlt_shifts(first, (row_start + num_rows - 1) // width - first + 1, nonzeros, width,
                            seed, device)
    shift_JR = shifts_GJ[rows_R // width - first].T
    slice_J1 = torch.arange(nonzeros, dtype=torch.int64, device=device)[:, None] * width
    return slice_J1 + (shift_JR + rows_R % width) % width


def matrix_block(kind: str, row_start: int, num_rows: int, dim: int, seed: int, device=None,
                 sjlt_nonzeros: int = DEFAULT_SJLT_NONZEROS):
    """Rows [row_start, row_start + num_rows) of the unscaled matrix sigma, float32.

    For ``sjlt`` the block is materialised densely (tests and small problems only).
    """
    if kind == "rademacher":
        return rademacher_signs(row_start, num_rows, dim, seed, device)
    if kind == "gaussian":
        return gaussian_values(row_start, num_rows, dim, seed, device)
    if kind == "sjlt":
        cols_JR = sjlt_columns(row_start, num_rows, dim, sjlt_nonzeros, seed, device)
        signs_JR = sjlt_signs(row_start, num_rows, sjlt_nonzeros, seed, device)
        block = torch.zeros(num_rows, dim, dtype=torch.float32, device=cols_JR.device)
        return block.scatter_(1, cols_JR.T, signs_JR.T)
    raise ValueError(f"projection kind={kind!r} is not one of {KINDS}; pick one of them")


def scale_of(kind: str, dim: int, sjlt_nonzeros: int = DEFAULT_SJLT_NONZEROS) -> float:
    """The factor applied to sigma: 1/sqrt(k) for dense kinds, 1/sqrt(s) for sjlt."""
    return 1.0 / math.sqrt(sjlt_nonzeros if kind == "sjlt" else dim)


def materialize(num_rows: int, dim: int, seed: int, kind: str = "rademacher", row_offset: int = 0,
                device=None, sjlt_nonzeros: int = DEFAULT_SJLT_NONZEROS) -> torch.Tensor:
    """The scaled matrix P[row_offset : row_offset + num_rows] as a dense (num_rows, dim) tensor.

    For tests and small problems only: it allocates num_rows * dim floats.
    """
    block = matrix_block(kind, row_offset, num_rows, dim, seed, device, sjlt_nonzeros)
    return block * scale_of(kind, dim, sjlt_nonzeros)


def check_input(x_BP: torch.Tensor, dim: int) -> None:
    """Shared argument checks of every backend."""
    if dim < 1:
        raise ValueError(f"projection dim={dim} must be >= 1 (typical: 2048 to 32768)")
    if x_BP.ndim != 2:
        raise ValueError(f"x_BP must be 2-D (batch, params), got shape {tuple(x_BP.shape)}; "
                         f"reshape it with x.view(batch, -1)")
    if not (x_BP.is_floating_point()):
        raise ValueError(f"x_BP has dtype {x_BP.dtype}; pass float32, bfloat16, float16 or float64")


def project_reference(x_BP: torch.Tensor, dim: int, seed: int, kind: str = "rademacher",
                      row_offset: int = 0, block_bytes: int = DEFAULT_BLOCK_BYTES,
                      sjlt_nonzeros: int = DEFAULT_SJLT_NONZEROS, cache: bool = True) -> torch.Tensor:
    """Project rows of ``x_BP`` with P: returns ``x_BP @ P[row_offset : row_offset + P]``.

    Args:
        x_BP: (B, P) tensor, any float dtype, any device.
        dim: projection dimension k >= 1.
        seed: projection seed in [0, 2**64).
        kind: ``rademacher``, ``gaussian`` or ``sjlt``.
        row_offset: index of x_BP's first column in the full parameter vector.
        block_bytes: memory bound for one generated block of P (dense kinds).
        sjlt_nonzeros: s, non-zeros per input coordinate (``sjlt`` only); must divide ``dim``.
        cache: reuse cached Rademacher words (same values, less Philox work).
    Returns:
        (B, dim) tensor, float64 if ``x_BP`` is float64 else float32 (fp32 accumulation).
    """
    check_input(x_BP, dim)
    if kind == "sjlt":
        return project_sjlt_reference(x_BP, dim, seed, sjlt_nonzeros, row_offset)
    if kind not in DENSE_KINDS:
        raise ValueError(f"projection kind={kind!r} is not one of {KINDS}; pick one of them")
    out_dtype = torch.float64 if x_BP.dtype == torch.float64 else torch.float32
    num_rows = x_BP.shape[1]
    out_BK = torch.zeros(x_BP.shape[0], dim, dtype=out_dtype, device=x_BP.device)
    rows_per_block = max(1, block_bytes // (4 * dim))
    buffer = None
    if kind == "rademacher":
        buffer = torch.empty(min(rows_per_block, num_rows) * (-(-dim // 128)) * 128,
                             dtype=torch.float32, device=x_BP.device)
    # Cache only when every block of this call fits, so that a sweep never thrashes the LRU.
    # Rademacher: the expanded +-1 blocks when they take at most a quarter of the budget (small
    # models: the projection becomes one matmul), else the packed words (1 bit per entry).
    # Gaussian values have no packed form (Box-Muller is the cost): their blocks are kept
    # whenever the whole matrix fits the budget, else they are regenerated (use sjlt on CPU).
    share = 1 if kind == "gaussian" else 4
    keep_blocks = cache and num_rows * dim * 4 <= _WORDS.budget // share
    cache = cache and num_rows * (-(-dim // 128)) * 16 <= _WORDS.budget
    for start in range(0, num_rows, rows_per_block):
        stop = min(num_rows, start + rows_per_block)
        key = (kind, seed, row_offset + start, stop - start, dim, x_BP.device)
        block_RK = _WORDS.get(key) if keep_blocks else None
        if block_RK is None:
            if kind == "rademacher":
                block_RK = rademacher_signs(row_offset + start, stop - start, dim, seed, x_BP.device,
                                            out=None if keep_blocks else buffer,
                                            cache=cache and not keep_blocks)
            else:
                block_RK = matrix_block(kind, row_offset + start, stop - start, dim, seed, x_BP.device)
            if keep_blocks:
                block_RK = block_RK.contiguous()
                _WORDS.put(key, block_RK)
        out_BK.addmm_(x_BP[:, start:stop].to(out_dtype), block_RK.to(out_dtype))
    return out_BK.mul_(1.0 / math.sqrt(dim))


def project_sjlt_reference(x_BP: torch.Tensor, dim: int, seed: int,
                           nonzeros: int = DEFAULT_SJLT_NONZEROS, row_offset: int = 0) -> torch.Tensor:
    """Sparse JL in plain torch: each coordinate adds +-x/sqrt(s) to one column of each slice.

    Blocks of M = dim / s consecutive coordinates are processed in increasing order; within a
    block, slice j receives the block rotated by h_j(g), so each slice is one or two contiguous
    ``addcmul_`` calls. Every output element sums its contributions in block order, which the
    compiled CPU kernel (kernels/sjlt.py) repeats exactly: the two agree bit for bit.

    Args:
        x_BP: (B, P) tensor, any float dtype and device.
    Returns:
        (B, dim) float32 (float64 for float64 input).
    """
    check_input(x_BP, dim)
    width = check_sjlt(dim, nonzeros)
    out_dtype = torch.float64 if x_BP.dtype == torch.float64 else torch.float32
    num_rows = x_BP.shape[1]
    out_BK = torch.zeros(x_BP.shape[0], dim, dtype=out_dtype, device=x_BP.device)
    if num_rows == 0:
        return out_BK
    end = row_offset + num_rows
    first = row_offset // width
    shifts = sjlt_shifts(first, (end - 1) // width - first + 1, nonzeros, width, seed, x_BP.device).tolist()
    for g, shifts_J in enumerate(shifts, start=first):
        lo, hi = max(row_offset, g * width), min(end, (g + 1) * width)
        x_Bn = x_BP[:, lo - row_offset:hi - row_offset].to(out_dtype)
        signs_Jn = sjlt_signs(lo, hi - lo, nonzeros, seed, x_BP.device).to(out_dtype)
        for j, shift in enumerate(shifts_J):
            dest = (shift + lo - g * width) % width
            head = min(hi - lo, width - dest)
            out_slice = out_BK[:, j * width:(j + 1) * width]
            out_slice[:, dest:dest + head].addcmul_(x_Bn[:, :head], signs_Jn[j, :head])
            if head < hi - lo:
                out_slice[:, :hi - lo - head].addcmul_(x_Bn[:, head:], signs_Jn[j, head:])
    return out_BK.mul_(1.0 / math.sqrt(nonzeros))
