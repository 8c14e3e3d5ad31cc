"""Adapter for fast-jl, TRAK's CUDA projection kernel (optional extra ``das-pipeline[fastjl]``).

fast-jl's matrix is NOT ours: it comes from per-thread cuRAND states whose layout depends on the
GPU's multiprocessor count, so the same seed gives different projections on different GPUs and
no CPU code reproduces it. Features made with it are therefore tagged with their own identity
(``identity``: RNG "fast-jl/curand-xorwow" and the SM count) and are never mixed with ours.

What the adapter fixes around the kernel (the defects traker users meet with it):
- the dimension must be a multiple of 512, the seed below 2**32: checked up front, with the fix;
- the matrix changes with chunking, so ``row_offset`` must be 0 (one call per whole vector);
- inputs are never cast to fp16 unscaled: fp32 and bf16 are passed as fp32 (recent fast-jl reads
  fp32); an fp16-only build gets the input scaled by a power of two so that nothing overflows;
- launch errors surface: the call synchronises the device and checks for non-finite output;
- the output is scaled by 1/sqrt(k) like our matrices (fast-jl returns raw +-1 sums).
"""

from __future__ import annotations

import importlib
import math

import torch

FASTJL_RNG = "fast-jl/curand-xorwow"
INSTALL_HINT = ("fast-jl is built from source against a CUDA toolkit: with nvcc on PATH and a CUDA "
                "build of torch, run `pip install --no-build-isolation fast-jl` (or "
                "`pip install 'das-pipeline[fastjl]'`); it cannot be built with a CPU-only torch. "
                "backend='triton' needs no build and gives the same matrix on every device")


def load():
    """Import fast_jl or raise ImportError naming the install problem."""
    try:
        return importlib.import_module("fast_jl")
    except ImportError as err:  # includes the undefined-symbol errors of a build for another torch
        raise ImportError(f"projection backend='fastjl' is unavailable: {err}. {INSTALL_HINT}") from None


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("fast_jl")
    except Exception:  # metadata missing for in-place builds
        return "unknown"


def check_settings(kind: str, dim: int, seed: int) -> None:
    """Raise ValueError for settings fast-jl cannot honour (before any work)."""
    if kind not in ("rademacher", "gaussian"):
        raise ValueError(f"backend='fastjl' implements kinds rademacher and gaussian, not kind={kind!r}; "
                         f"use backend='auto'")
    if dim % 512:
        raise ValueError(f"backend='fastjl' needs dim to be a multiple of 512, got dim={dim}; use "
                         f"dim={max(512, dim // 512 * 512)} or backend='triton'")
    if not 0 <= seed < 2**32:
        raise ValueError(f"backend='fastjl' takes seeds below 2**32, got seed={seed}")


def sm_count(device=None) -> int:
    if not torch.cuda.is_available():
        raise ValueError("backend='fastjl' needs a CUDA device; none is visible")
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.cuda.get_device_properties(device).multi_processor_count


def identity(kind: str, dim: int, seed: int, device=None) -> dict:
    """The identity of a fast-jl projection: its matrix depends on the SM count and the build."""
    check_settings(kind, dim, seed)
    load()
    return {"kind": kind, "dim": dim, "seed": seed, "rng": FASTJL_RNG, "sm_count": sm_count(device),
            "fast_jl": version()}


def project_fastjl(x_BP: torch.Tensor, dim: int, seed: int, kind: str = "rademacher",
                   row_offset: int = 0) -> torch.Tensor:
    """Project with fast-jl (its own matrix, see the module docstring).

    Args:
        x_BP: (B, P) CUDA tensor, float32, bfloat16 or float16.
    Returns:
        (B, dim) float32, scaled by 1/sqrt(dim).
    """
    check_settings(kind, dim, seed)
    fast_jl = load()
    if row_offset:
        raise ValueError(f"backend='fastjl' cannot project a slice (row_offset={row_offset}): its matrix "
                         f"changes with chunking; project the whole vector or use backend='triton'")
    if x_BP.device.type != "cuda":
        raise ValueError(f"backend='fastjl' needs a CUDA tensor, got {x_BP.device}")
    batch = x_BP.shape[0]
    width = 8 if batch <= 8 else 16 if batch <= 16 else 32
    fn = getattr(fast_jl, f"project_{'normal' if kind == 'gaussian' else 'rademacher'}_{width}")
    num_sms = sm_count(x_BP.device)
    x = x_BP.contiguous()
    if x.dtype == torch.float16:
        out = fn(x, dim, seed, num_sms)
    else:
        try:
            out = fn(x.float(), dim, seed, num_sms)
        except RuntimeError as err:
            if "fp16" not in str(err):
                raise
            # fp16-only build: scale by a power of two so the largest entry is 2**14 (< 65504)
            peak = float(x.abs().max())
            exp = 0 if peak == 0 else 14 - math.frexp(peak)[1]
            out = fn((x.float() * 2.0**exp).half(), dim, seed, num_sms) * 2.0**-exp
    torch.cuda.synchronize(x.device)  # fast-jl does not check its launches; this surfaces errors
    if not torch.isfinite(out).all():
        raise RuntimeError("fast-jl returned non-finite values (a failed launch or an overflow); "
                           "use backend='triton'")
    return out.float().mul_(1.0 / math.sqrt(dim))
