"""`das doctor`: which projection backends work on this machine, each self-tested on tiny inputs.

Self-tests compare against ``x @ P`` with P materialised from the reference formulas (awkward
shapes: 3 rows, 301 coordinates, dim 384, row offset past 2**32). A backend that is missing is
reported with the reason and the fix; a backend that runs but disagrees fails the doctor.
"""

from __future__ import annotations

import os
import platform

import torch

from .reference import materialize, project_reference

TOLERANCE = {"rademacher": 1e-5, "gaussian": 1e-4, "sjlt": 1e-6}  # max |err| / max |ref|
OFFSET = 2**32 + 5


def _expected(x: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
    return x.double() @ materialize(x.shape[1], dim, 11, kind, OFFSET).double()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want).abs().max() / want.abs().max())


def _self_test(fn, device: str, kinds=("rademacher", "gaussian", "sjlt"),
               dtype=torch.float32) -> tuple[bool, str]:
    """Run ``fn(x, dim, seed, kind, row_offset)`` per kind; (ok, summary)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 301, generator=gen)
    worst, ok = [], True
    for kind in kinds:
        want = _expected(x.to(dtype).float(), kind, 384)
        got = fn(x.to(device=device, dtype=dtype), 384, 11, kind, OFFSET)
        err = _rel_err(got, want)
        ok &= err <= TOLERANCE[kind]
        worst.append(f"{kind} {err:.1e}")
    return ok, "max rel err vs x @ P: " + ", ".join(worst)


def report(quick: bool = False) -> tuple[list[str], bool]:
    """Lines to print and whether every available backend passed its self-test."""
    lines = ["das doctor: projection backends",
             f"  python {platform.python_version()}, torch {torch.__version__}"]
    all_ok = True
    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        lines.append(f"  CUDA: {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("  CUDA: not available (CPU backends only; Triton runs through its interpreter)")

    def row(name: str, state: str, detail: str) -> None:
        lines.append(f"  {name:<12} {state:<4} {detail}")

    if quick:
        row("reference", "ok", "plain torch, always available")
    else:
        ok, detail = _self_test(lambda x, d, s, k, o: project_reference(x, d, s, k, o), "cpu")
        all_ok &= ok
        row("reference", "ok" if ok else "FAIL", detail)

    from . import sjlt

    reason = sjlt.status()
    if reason:
        row("sjlt-cpu", "no", f"{reason} (sjlt falls back to plain torch, ~3x slower)")
    elif quick:
        row("sjlt-cpu", "ok", "compiled C kernel")
    else:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(5, 1001, generator=gen)
        same = torch.equal(sjlt.project_sjlt_cpu(x, 256, 3, 4, OFFSET),
                           project_reference(x, 256, 3, "sjlt", OFFSET))
        all_ok &= same
        row("sjlt-cpu", "ok" if same else "FAIL", "compiled C kernel, "
            + ("bit-identical to the reference" if same else "DIFFERS from the reference"))

    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton_jl is imported
    try:
        import triton

        from . import triton_jl
    except ImportError as err:
        row("triton", "no", f"{err}; install triton (pip install triton) for the fused GPU kernel")
    else:
        mode = "compiled" if cuda else ("interpreter" if triton_jl.interpreting() else "unusable")
        if quick or mode == "unusable":
            row("triton", "ok" if mode != "unusable" else "no", f"triton {triton.__version__} ({mode})")
        else:
            device = "cuda" if cuda else "cpu"

            def run(x, d, s, k, o):
                if k == "sjlt":
                    return triton_jl.project_sjlt_triton(x, d, s, 4, o)
                return triton_jl.project_triton(x, d, s, k, o)

            ok, detail = _self_test(run, device)
            ok16, detail16 = _self_test(run, device, ("rademacher",), torch.bfloat16)
            all_ok &= ok and ok16
            row("triton", "ok" if ok and ok16 else "FAIL",
                f"triton {triton.__version__} ({mode}); fp32 {detail}; bf16 {detail16.split(': ')[1]}")

    from . import fastjl

    try:
        fastjl.load()
    except ImportError as err:
        row("fastjl", "no", str(err))
    else:
        if not cuda:
            row("fastjl", "no", "fast_jl imports but needs a CUDA device")
        else:
            x = torch.randn(8, 4096, device="cuda")
            y = fastjl.project_fastjl(x, 512, 0)
            ratio = float((y.norm(dim=1) / x.norm(dim=1)).mean())
            ok = y.shape == (8, 512) and 0.8 < ratio < 1.2
            all_ok &= ok
            row("fastjl", "ok" if ok else "FAIL", f"fast-jl {fastjl.version()} (its own matrix, "
                f"{fastjl.sm_count()} SMs); norm ratio {ratio:.3f}")

    from . import resolve_backend

    picks = []
    for kind in ("rademacher", "sjlt"):
        x = torch.zeros(1, 1, device="cuda" if cuda else "cpu")
        picks.append(f"{kind} -> {resolve_backend('auto', kind, x)}")
    lines.append("  auto picks: " + ", ".join(picks))
    lines.append("  result: " + ("all available backends agree with the reference" if all_ok
                                 else "SELF-TEST FAILURE: do not use the failing backend"))
    return lines, all_ok
