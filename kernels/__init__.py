"""JL projection kernels. ``project`` is the one entry point; kernels/README.md defines the matrices.

Backends (all but fast-jl compute the same matrix, so they are interchangeable):
- ``reference``: plain torch, any device, bounded memory (kernels/reference.py);
- ``triton``: fused Triton kernels, CUDA (or CPU under TRITON_INTERPRET=1) (kernels/triton_jl.py);
- ``fastjl``: TRAK's CUDA kernel, its own SM-count-dependent matrix (kernels/fastjl.py);
- ``auto``: Triton on CUDA for float32/bfloat16/float16 input, the reference otherwise; for
  ``sjlt`` on CPU the compiled C kernel (kernels/sjlt.py) when a C compiler is available.
"""

from __future__ import annotations

import warnings

import torch

from .reference import DEFAULT_SJLT_NONZEROS, KINDS, RNG_VERSION, check_sjlt, materialize, project_reference

BACKENDS = ("auto", "reference", "triton", "fastjl")

__all__ = ["BACKENDS", "DEFAULT_SJLT_NONZEROS", "KINDS", "RNG_VERSION", "check_settings", "identity",
           "materialize", "project", "project_reference", "resolve_backend"]

_WARNED: set[str] = set()


def check_settings(kind: str, dim: int, seed: int, backend: str = "auto",
                   sjlt_nonzeros: int = DEFAULT_SJLT_NONZEROS) -> None:
    """Raise ValueError naming the setting, the value and the fix; call before any work."""
    if kind not in KINDS:
        raise ValueError(f"projection kind={kind!r} is not one of {KINDS}; pick one of them")
    if backend not in BACKENDS:
        raise ValueError(f"projection backend={backend!r} is unknown; choose one of {BACKENDS}")
    if dim < 1:
        raise ValueError(f"projection dim={dim} must be >= 1 (typical: 2048 to 32768)")
    if not 0 <= seed < 2**64:
        raise ValueError(f"projection seed={seed} is outside [0, 2**64); pick a smaller seed")
    if kind == "sjlt":
        check_sjlt(dim, sjlt_nonzeros)
    if backend == "fastjl":
        from .fastjl import check_settings as check_fastjl

        check_fastjl(kind, dim, seed)


def identity(kind: str, dim: int, seed: int, backend: str = "auto",
             sjlt_nonzeros: int = DEFAULT_SJLT_NONZEROS, device=None) -> dict:
    """What makes two projections equal; recorded in the store's fingerprint.

    Our backends share one matrix, so the backend is not part of it. fast-jl's matrix depends on
    the GPU's SM count, which therefore enters its identity (features from an A100 and an H100
    are refused as a mix). Raises ValueError / ImportError for unusable settings.
    """
    check_settings(kind, dim, seed, backend, sjlt_nonzeros)
    if backend == "fastjl":
        from .fastjl import identity as fastjl_identity

        return fastjl_identity(kind, dim, seed, device)
    ident = {"kind": kind, "dim": dim, "seed": seed, "rng": RNG_VERSION}
    if kind == "sjlt":
        ident["nonzeros"] = sjlt_nonzeros
    return ident


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, kind: str, x_BP: torch.Tensor) -> str:
    """The implementation ``project`` runs: reference, triton, sjlt-cpu or fastjl."""
    if backend != "auto":
        return backend
    if x_BP.device.type == "cuda" and x_BP.dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            import triton  # noqa: F401
        except ImportError:
            _warn_once("backend='auto' on CUDA found no triton; using the (slower) reference projector. "
                       "Install triton (pip install triton) for the fused kernel")
            return "reference"
        return "triton"
    if kind == "sjlt" and x_BP.device.type == "cpu" and x_BP.dtype != torch.float64:
        from .sjlt import status

        if status() == "":
            return "sjlt-cpu"
        _warn_once(f"the compiled sjlt CPU kernel is unavailable ({status()}); using the (slower) "
                   f"plain-torch sjlt")
    return "reference"


def project(x_BP: torch.Tensor, dim: int, seed: int, kind: str = "rademacher", row_offset: int = 0,
            backend: str = "auto", sjlt_nonzeros: int = DEFAULT_SJLT_NONZEROS) -> torch.Tensor:
    """Project the rows of ``x_BP`` with the matrix of kernels/README.md: ``x_BP @ P[rows]``.

    Args:
        x_BP: (B, P) float tensor (float32, bfloat16, float16; float64 on the reference), any
            device the backend supports.
        dim: projection dimension k.
        seed: matrix seed in [0, 2**64).
        kind: ``rademacher`` (+-1/sqrt(k)), ``gaussian`` (N(0,1)/sqrt(k)) or ``sjlt``
            (``sjlt_nonzeros`` entries +-1/sqrt(s) per input coordinate).
        row_offset: index of x_BP's first column in the full parameter vector; projecting slices
            with their offsets and summing equals projecting the whole vector (to fp32 rounding).
        backend: one of ``BACKENDS``.
        sjlt_nonzeros: s for ``sjlt``; must divide ``dim``.
    Returns:
        (B, dim) float32 (float64 for float64 input on the reference).
    Raises:
        ValueError for bad settings or inputs; ImportError when backend='fastjl' is not installed.
    """
    check_settings(kind, dim, seed, backend, sjlt_nonzeros)
    impl = resolve_backend(backend, kind, x_BP)
    if impl == "reference":
        return project_reference(x_BP, dim, seed, kind, row_offset, sjlt_nonzeros=sjlt_nonzeros)
    if impl == "sjlt-cpu":
        from .sjlt import project_sjlt_cpu

        return project_sjlt_cpu(x_BP, dim, seed, sjlt_nonzeros, row_offset)
    if impl == "triton":
        try:
            from .triton_jl import project_sjlt_triton, project_triton
        except ImportError as err:
            raise ImportError(f"projection backend='triton' is unavailable: {err}. Install triton "
                              f"(`pip install triton`, Linux) or use backend='auto'") from None

        if kind == "sjlt":
            return project_sjlt_triton(x_BP, dim, seed, sjlt_nonzeros, row_offset)
        return project_triton(x_BP, dim, seed, kind, row_offset)
    from .fastjl import project_fastjl

    return project_fastjl(x_BP, dim, seed, kind, row_offset)

