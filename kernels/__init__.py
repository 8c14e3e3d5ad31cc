"""JL projection kernels. ``project`` is the one entry point; kernels/README.md defines the matrix."""

from .reference import KINDS, RNG_VERSION, materialize, project_reference

__all__ = ["KINDS", "RNG_VERSION", "materialize", "project", "project_reference", "identity"]


def identity(kind: str, dim: int, seed: int, backend: str = "reference") -> dict:
    """What makes two projections equal; recorded in the store's fingerprint."""
    return {"kind": kind, "dim": dim, "seed": seed, "rng": RNG_VERSION}


def project(x_BP, dim: int, seed: int, kind: str = "rademacher", row_offset: int = 0,
            backend: str = "auto"):
    """Project the rows of ``x_BP`` (B, P) to (B, dim) with the matrix of kernels/README.md."""
    if backend not in ("auto", "reference"):
        raise ValueError(f"projection backend={backend!r} is unknown; use 'auto' or 'reference'")
    return project_reference(x_BP, dim, seed, kind, row_offset)
