"""Sparse JL on CPU: a small C kernel, compiled on first use and called through ctypes.

The matrix is the one of kernels/README.md (``sjlt``): coordinate a = g * M + r adds
+-x[a] / sqrt(s) to column j * M + (h_j(g) + r) mod M of each slice j. A block of M coordinates
therefore lands on a rotated, contiguous run of every slice, and the kernel streams the input
once: for each row, for each block, for each slice, one or two vectorised loops of
``out[c] += x[a] with the sign bit flipped``. Signs are read from packed Philox words
(s bits per coordinate), so the only large memory stream is the input itself.

The kernel adds in the same order as ``reference.project_sjlt_reference`` (blocks in increasing
order, one exact fp32 add per non-zero), so the two agree bit for bit; the tests check that.

Plain torch ops cannot fuse the s adds per coordinate (measured: ~0.3x the throughput of a copy
of the input at s = 4), hence C. No C compiler means no fast path: ``status()`` says why and
``project_sjlt_cpu`` is not offered (``auto`` falls back to the reference with a warning).

Legend: B rows, P coordinates of this call, K = S * M columns, S non-zeros, G blocks, Q words.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .philox import split_seed
from .reference import check_input, check_sjlt

C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void philox(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int i = 0; i < 10; i++) {
        uint64_t pa = (uint64_t)0xD2511F53u * c[0], pb = (uint64_t)0xCD9E8D57u * c[2];
        uint32_t n0 = (uint32_t)(pb >> 32) ^ c[1] ^ k0, n2 = (uint32_t)(pa >> 32) ^ c[3] ^ k1;
        c[0] = n0; c[1] = (uint32_t)pb; c[2] = n2; c[3] = (uint32_t)pa;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
}

/* Sign words of coordinates [32 * q0, 32 * (q0 + nq)) for slices j < s -> words[j * nq + q - q0],
   and rotations of blocks [g0, g0 + ng) -> shifts[(g - g0) * s + j]. */
void das_sjlt_tables(uint64_t seed, int64_t s, int64_t m, int64_t q0, int64_t nq, int64_t g0,
                     int64_t ng, uint32_t *words, int64_t *shifts) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int64_t j = 0; j < s; j++) {
        for (int64_t q = q0; q < q0 + nq; q++) {
            uint64_t u = (uint64_t)q >> 2;
            uint32_t c[4] = {(uint32_t)u, (uint32_t)(u >> 32), (uint32_t)(2 * j), 3u};
            philox(c, k0, k1);
            words[j * nq + q - q0] = c[q & 3];
        }
    }
    for (int64_t g = g0; g < g0 + ng; g++) {
        for (int64_t j = 0; j < s; j++) {
            uint32_t c[4] = {(uint32_t)g, (uint32_t)((uint64_t)g >> 32), (uint32_t)(2 * (j / 4) + 1), 3u};
            philox(c, k0, k1);
            shifts[(g - g0) * s + j] = (int64_t)(((uint64_t)c[j & 3] * (uint64_t)m) >> 32);
        }
    }
}

/* out[i] += x[i] with the sign bit flipped where bit ((a + i) mod 32) of its word is set;
   a = first coordinate, w = words of slice j from word q0 on. LOAD(i) reads x[i] as uint32 bits. */
#define ADD_RUN(NAME, T, LOAD)                                                                  \
static inline void NAME(float *restrict out, const T *restrict x, const uint32_t *restrict w,   \
                        int64_t q0, int64_t a, int64_t n) {                                     \
    int64_t i = 0;                                                                              \
    for (; i < n && ((a + i) & 31); i++) {                                                      \
        uint32_t v = LOAD(i) ^ ((w[((a + i) >> 5) - q0] << (31 - ((a + i) & 31))) & 0x80000000u); \
        float f; memcpy(&f, &v, 4); out[i] += f;                                                \
    }                                                                                           \
    for (; i + 32 <= n; i += 32) {                                                              \
        uint32_t word = w[((a + i) >> 5) - q0];                                                 \
        for (int t = 0; t < 32; t++) {                                                          \
            uint32_t v = LOAD(i + t) ^ ((word << (31 - t)) & 0x80000000u);                      \
            float f; memcpy(&f, &v, 4); out[i + t] += f;                                        \
        }                                                                                       \
    }                                                                                           \
    for (; i < n; i++) {                                                                        \
        uint32_t v = LOAD(i) ^ ((w[((a + i) >> 5) - q0] << (31 - ((a + i) & 31))) & 0x80000000u); \
        float f; memcpy(&f, &v, 4); out[i] += f;                                                \
    }                                                                                           \
}

static inline uint32_t bits_f32(const float *x) { uint32_t v; memcpy(&v, x, 4); return v; }
#define LOAD_F32(i) bits_f32(x + (i))
#define LOAD_BF16(i) ((uint32_t)x[i] << 16)
ADD_RUN(add_run_f32, float, LOAD_F32)
ADD_RUN(add_run_bf16, uint16_t, LOAD_BF16)

/* Rows [0, rows) of x (float32 if dtype == 0, bfloat16 if 1; coordinates [a0, a0 + p), row
   stride sx elements) accumulated into out (row stride so, k = s * m columns, float32). Every
   output element receives its contributions in increasing block order, as in the reference. */
int das_sjlt_rows(const void *x, int dtype, int64_t rows, int64_t p, int64_t sx, float *out,
                  int64_t so, int64_t s, int64_t m, int64_t a0, const uint32_t *words, int64_t q0,
                  int64_t nq, const int64_t *shifts, int64_t g0) {
    int64_t a1 = a0 + p;
    for (int64_t b = 0; b < rows; b++) {
        float *orow = out + b * so;
        for (int64_t g = a0 / m; g * m < a1; g++) {
            int64_t lo = g * m > a0 ? g * m : a0, hi = (g + 1) * m < a1 ? (g + 1) * m : a1;
            int64_t n = hi - lo;
            for (int64_t j = 0; j < s; j++) {
                int64_t dest = (shifts[(g - g0) * s + j] + lo - g * m) % m;
                int64_t head = n < m - dest ? n : m - dest;
                const uint32_t *w = words + j * nq;
                float *o = orow + j * m;
                if (dtype == 0) {
                    const float *xs = (const float *)x + b * sx + (lo - a0);
                    add_run_f32(o + dest, xs, w, q0, lo, head);
                    if (head < n) add_run_f32(o, xs + head, w, q0, lo + head, n - head);
                } else {
                    const uint16_t *xs = (const uint16_t *)x + b * sx + (lo - a0);
                    add_run_bf16(o + dest, xs, w, q0, lo, head);
                    if (head < n) add_run_bf16(o, xs + head, w, q0, lo + head, n - head);
                }
            }
        }
    }
    return 0;
}
"""

_LIB: ctypes.CDLL | None = None
_STATUS: str | None = None  # None: not tried yet; "" ok; else the reason it is unavailable


def _cache_dir() -> Path:
    root = os.environ.get("DAS_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "das_pipeline")
    return Path(root)


def _cpu_id() -> str:
    """The machine the library is built for (-march=native): CPU model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return "\n".join(sorted({line for line in text.splitlines()
                                 if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _build() -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError(f"no C compiler found (CC={os.environ.get('CC', 'cc')!r} is not on PATH); "
                           f"install gcc or clang, or set CC")
    flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fPIC", "-shared", "-std=c99"]
    digest = hashlib.sha256("\0".join([C_SOURCE, compiler, *flags, _cpu_id()]).encode()).hexdigest()
    target = _cache_dir() / f"sjlt-{digest[:20]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "sjlt.c"
            src.write_text(C_SOURCE)
            result = subprocess.run([compiler, *flags, "-o", str(Path(tmp) / "sjlt.so"), str(src)],
                                    capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"{compiler} failed to build the sjlt kernel: "
                                   f"{result.stderr.strip()[-400:]}")
            os.replace(Path(tmp) / "sjlt.so", target)  # atomic: concurrent ranks never see half a file
    lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.das_sjlt_tables.argtypes = [ctypes.c_uint64, i64, i64, i64, i64, i64, i64, ptr, ptr]
    lib.das_sjlt_tables.restype = None
    lib.das_sjlt_rows.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, i64, i64, i64, i64, ptr, i64,
                                  i64, ptr, i64]
    lib.das_sjlt_rows.restype = ctypes.c_int
    return lib


def status() -> str:
    """'' when the compiled CPU kernel is usable, else the reason (compiled once per process)."""
    global _LIB, _STATUS
    if _STATUS is None:
        try:
            _LIB = _build()
            _STATUS = ""
        except (RuntimeError, OSError) as err:
            _STATUS = str(err)
    return _STATUS


def tables(seed: int, nonzeros: int, width: int, row_offset: int, num_rows: int):
    """Packed sign words (S, Q) int32 and rotations (G, S) int64 covering the coordinates."""
    assert status() == "", status()
    split_seed(seed)
    q0, q1 = row_offset // 32, (row_offset + num_rows - 1) // 32 + 1
    g0, g1 = row_offset // width, (row_offset + num_rows - 1) // width + 1
    words_SQ = torch.empty(nonzeros, q1 - q0, dtype=torch.int32)
    shifts_GS = torch.empty(g1 - g0, nonzeros, dtype=torch.int64)
    _LIB.das_sjlt_tables(seed, nonzeros, width, q0, q1 - q0, g0, g1 - g0, words_SQ.data_ptr(),
                         shifts_GS.data_ptr())
    return words_SQ, shifts_GS, q0, g0


_TABLES: dict[tuple, tuple] = {}
CHUNK_COORDS = 2**22  # sign words and rotations are built per chunk: 0.5 byte per coordinate at s=4


def project_sjlt_cpu(x_BP: torch.Tensor, dim: int, seed: int, nonzeros: int = 4, row_offset: int = 0,
                     num_threads: int | None = None) -> torch.Tensor:
    """Sparse JL of the rows of ``x_BP`` with the compiled kernel; equals the reference bit for bit.

    Args:
        x_BP: (B, P) CPU tensor, float32 or bfloat16 read in place (rows need unit stride);
            float16 is converted to float32 first.
        dim, seed, nonzeros, row_offset: as ``kernels.project``.
        num_threads: rows are split over this many threads (default ``torch.get_num_threads()``).
    Returns:
        (B, dim) float32.
    Raises:
        RuntimeError if the kernel cannot be built (``status()`` names the reason).
    """
    check_input(x_BP, dim)
    width = check_sjlt(dim, nonzeros)
    if status():
        raise RuntimeError(f"the compiled sjlt CPU kernel is unavailable: {status()}")
    if x_BP.device.type != "cpu":
        raise ValueError(f"project_sjlt_cpu needs a CPU tensor, got {x_BP.device}; use backend='auto'")
    if x_BP.dtype not in (torch.float32, torch.bfloat16):
        x_BP = x_BP.to(torch.float32)
    if x_BP.shape[1] and x_BP.stride(1) != 1:
        x_BP = x_BP.contiguous()
    num_rows_B, num_cols = x_BP.shape
    out_BK = torch.zeros(num_rows_B, dim, dtype=torch.float32)
    if num_cols == 0 or num_rows_B == 0:
        return out_BK
    dtype_code = 0 if x_BP.dtype == torch.float32 else 1
    threads = max(1, min(num_threads or torch.get_num_threads(), num_rows_B))
    bounds = [num_rows_B * i // threads for i in range(threads + 1)]
    parts = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]
    pool = ThreadPoolExecutor(len(parts)) if len(parts) > 1 else None  # ctypes releases the GIL
    # Chunks end on block boundaries, so each output still receives its adds in block order.
    step = max(width, CHUNK_COORDS // width * width)
    end = row_offset + num_cols
    cuts = [row_offset, *range((row_offset // step + 1) * step, end, step), end]
    try:
        for a0, a1 in zip(cuts[:-1], cuts[1:], strict=True):
            key = (seed, nonzeros, width, a0, a1 - a0)
            tables_ = _TABLES.get(key) or tables(seed, nonzeros, width, a0, a1 - a0)
            if len(cuts) == 2:  # a single chunk: keep its tables for the next call on these rows
                if len(_TABLES) >= 8:
                    _TABLES.pop(next(iter(_TABLES)))
                _TABLES[key] = tables_
            words_SQ, shifts_GS, q0, g0 = tables_

            def run(rows: tuple[int, int], a0=a0, a1=a1, words_SQ=words_SQ, shifts_GS=shifts_GS, q0=q0,
                    g0=g0) -> int:
                lo, hi = rows
                return _LIB.das_sjlt_rows(x_BP[lo, a0 - row_offset:].data_ptr(), dtype_code, hi - lo,
                                          a1 - a0, x_BP.stride(0), out_BK[lo].data_ptr(), dim, nonzeros,
                                          width, a0, words_SQ.data_ptr(), q0, words_SQ.shape[1],
                                          shifts_GS.data_ptr(), g0)

            codes = list(pool.map(run, parts)) if pool else [run(parts[0])]
            assert not any(codes), codes
    finally:
        if pool:
            pool.shutdown()
    return out_BK.mul_(1.0 / math.sqrt(nonzeros))
