"""Triton kernels against the reference.

On CPU (CI) the kernels run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when CUDA is absent): awkward shapes are kept tiny because the interpreter
runs numpy per program. Tolerances, as max |triton - reference| / max |reference|:
- rademacher: 1e-6 for every input dtype (exact +-1 products, only the fp32 summation order
  differs; fp32 input is split into three bf16 parts in the compiled kernel, ~2^-24 relative);
- gaussian: 1e-5 (transcendental ulps of Box-Muller, tf32x3 dots on GPU);
- sjlt: bit for bit (same summation order as the reference).

Tests marked ``gpu`` run the compiled kernels on CUDA, across launch settings, at sizes that
need int64 indexing; they skip without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from das_pipeline.kernels import materialize, project
from das_pipeline.kernels.philox import philox4x32
from das_pipeline.kernels.reference import project_reference

triton = pytest.importorskip("triton", reason="triton is not installed")
tl = pytest.importorskip("triton.language")
triton_jl = pytest.importorskip("das_pipeline.kernels.triton_jl")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
SEED = 12_345_678_901  # both key words non-zero
TOL = {"rademacher": 1e-6, "gaussian": 1e-5}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@triton.jit
def _philox_probe(out_ptr, c0_ptr, seed_lo, seed_hi, N: tl.constexpr):
    offs = tl.arange(0, N)
    c0 = tl.load(c0_ptr + offs).to(tl.uint32, bitcast=True)
    w0, w1, w2, w3 = triton_jl._philox(c0, c0 ^ 0x55555555, c0 * 3, c0 + 1, seed_lo.to(tl.uint32),
                                       seed_hi.to(tl.uint32))
    tl.store(out_ptr + offs * 4 + 0, w0.to(tl.int32, bitcast=True))
    tl.store(out_ptr + offs * 4 + 1, w1.to(tl.int32, bitcast=True))
    tl.store(out_ptr + offs * 4 + 2, w2.to(tl.int32, bitcast=True))
    tl.store(out_ptr + offs * 4 + 3, w3.to(tl.int32, bitcast=True))


def test_triton_philox_equals_torch_philox():
    gen = torch.Generator().manual_seed(0)
    c0 = torch.randint(-2**31, 2**31 - 1, (16,), generator=gen, dtype=torch.int32)
    out = torch.zeros(16, 4, dtype=torch.int32, device=DEVICE)
    _philox_probe[(1,)](out, c0.to(DEVICE), SEED & 0xFFFFFFFF, SEED >> 32, N=16)
    u = c0.to(torch.int64) & 0xFFFFFFFF
    want = torch.stack(philox4x32(u, u ^ 0x55555555, (u * 3) & 0xFFFFFFFF, (u + 1) & 0xFFFFFFFF, SEED), 1)
    assert torch.equal(out.cpu().to(torch.int64) & 0xFFFFFFFF, want), "Triton Philox words differ from torch"


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, num_cols, dim", [(1, 37, 200), (3, 101, 130), (17, 61, 129)])
def test_dense_kernel_equals_reference_on_awkward_shapes(kind, dtype, batch, num_cols, dim):
    gen = torch.Generator().manual_seed(batch * 1000 + num_cols)
    x = (torch.randn(batch, num_cols, generator=gen) * 300).to(dtype)
    offset = 2**33 + 7
    got = project(x.to(DEVICE), dim, SEED, kind, row_offset=offset, backend="triton")
    want = project_reference(x.double(), dim, SEED, kind, offset)
    assert got.dtype == torch.float32 and got.shape == (batch, dim)
    err = rel_err(got.cpu(), want)
    assert err <= TOL[kind], f"{kind} {dtype} B={batch} P={num_cols} k={dim}: rel err {err:.1e} > {TOL[kind]}"


def test_split_programs_and_wide_tiles_equal_reference():
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    want = project_reference(x.double(), 300, SEED, "rademacher", 11)
    for cfg in (triton_jl.LaunchConfig(block_k=256, block_p=16, block_b=16, num_warps=1, split=3),
                triton_jl.LaunchConfig(block_k=128, block_p=32, block_b=16, num_warps=1, split=0)):
        got = triton_jl.project_triton(x.to(DEVICE), 300, SEED, "rademacher", 11, config=cfg)
        err = rel_err(got.cpu(), want)
        assert err <= 1e-6, f"{cfg}: rel err {err:.1e} > 1e-6"


def test_triton_chunks_equal_reference_whole():
    """A projection made on one backend and one chunking equals the reference on another."""
    x = torch.randn(3, 250, generator=torch.Generator().manual_seed(2))
    whole = project_reference(x, 128, SEED, "rademacher")
    parts = sum(project(x[:, lo:hi].to(DEVICE), 128, SEED, "rademacher", row_offset=lo,
                        backend="triton").cpu() for lo, hi in ((0, 97), (97, 128), (128, 250)))
    err = rel_err(parts, whole)
    assert err <= 1e-6, f"triton chunks vs reference whole: rel err {err:.1e} > 1e-6"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, num_cols, dim, offset", [(3, 301, 64, 0), (17, 257, 256, 2**32 - 100)])
def test_sjlt_kernel_equals_reference_bit_for_bit(dtype, batch, num_cols, dim, offset):
    x = torch.randn(batch, num_cols, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = project(x.to(DEVICE), dim, SEED, "sjlt", row_offset=offset, backend="triton")
    want = project_reference(x, dim, SEED, "sjlt", offset)
    diff = (got.cpu() - want).abs().max()
    assert torch.equal(got.cpu(), want), f"sjlt triton != reference (max diff {diff:.2g})"


# ---------------------------------------------------------------- compiled kernels (CUDA only)

CONFIGS = [
    triton_jl.LaunchConfig(),
    triton_jl.LaunchConfig(block_k=128, block_p=32, block_b=16, num_warps=4, num_stages=2),
    triton_jl.LaunchConfig(block_k=128, block_p=128, block_b=64, num_warps=4, num_stages=3),
    triton_jl.LaunchConfig(block_k=256, block_p=64, block_b=64, num_warps=8, num_stages=3),
    triton_jl.LaunchConfig(block_k=128, block_p=64, block_b=128, num_warps=8, num_stages=3, split=1),
    triton_jl.LaunchConfig(block_k=128, block_p=64, block_b=32, num_warps=4, num_stages=4, split=7),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_launch_settings_agree_with_reference(dtype):
    x = torch.randn(64, 100_003, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(dtype)
    want = project_reference(x.float(), 1024, SEED, "rademacher", 2**40)
    # every setting for bf16 (the production dtype), three for the others (compile time)
    for cfg in CONFIGS if dtype == torch.bfloat16 else CONFIGS[:2] + CONFIGS[-1:]:
        got = triton_jl.project_triton(x, 1024, SEED, "rademacher", 2**40, config=cfg)
        err = rel_err(got, want)
        assert err <= 1e-5, f"{dtype} {cfg}: rel err {err:.1e} > 1e-5"
    runs = [triton_jl.project_triton(x, 1024, SEED, "rademacher", 2**40, config=CONFIGS[-1])
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]), "two runs of one launch configuration differ"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("batch, dim", [(1, 1), (3, 130), (17, 4097), (200, 640)])
def test_gpu_awkward_shapes(kind, batch, dim):
    x = torch.randn(batch, 30_011, device="cuda", generator=torch.Generator("cuda").manual_seed(batch))
    got = project(x.to(torch.bfloat16), dim, SEED, kind, backend="auto")
    want = project_reference(x.to(torch.bfloat16).float(), dim, SEED, kind)
    err = rel_err(got, want)
    assert err <= 10 * TOL[kind], f"{kind} B={batch} k={dim}: rel err {err:.1e} > {10 * TOL[kind]}"


@gpu
@pytest.mark.gpu
def test_gpu_large_fp32_values_do_not_overflow():
    x = torch.randn(16, 50_000, device="cuda", generator=torch.Generator("cuda").manual_seed(1)) * 1e6
    x[0, :10] = 3e37  # far beyond fp16; bf16 keeps fp32's range
    got = project(x, 2048, SEED, "rademacher", backend="triton")
    want = project_reference(x.double(), 2048, SEED, "rademacher")
    assert torch.isfinite(got).all(), "fp32 input overflowed"
    err = rel_err(got[1:], want[1:])
    assert err <= 1e-5, f"large fp32 inputs: rel err {err:.1e} > 1e-5"


@gpu
@pytest.mark.gpu
def test_gpu_int64_indexing_past_2_31_elements():
    """B * P > 2**31 and coordinates past 2**40: only a few non-zeros, so the reference is cheap."""
    num_cols = 2**30 + 12_345
    x = torch.zeros(3, num_cols, dtype=torch.bfloat16, device="cuda")
    hits = [(0, 5), (1, num_cols - 1), (2, num_cols - 129), (2, 2**30 + 1)]
    for b, a in hits:
        x[b, a] = 1.5 + b
    offset = 2**40 + 3
    got = project(x, 256, SEED, "rademacher", row_offset=offset, backend="triton")
    want = torch.zeros(3, 256, dtype=torch.float64)
    for b, a in hits:
        want[b] += (1.5 + b) * materialize(1, 256, SEED, "rademacher", offset + a).double()[0]
    err = rel_err(got.cpu(), want)
    assert err <= 1e-6, f"int64 indexing: rel err {err:.1e} > 1e-6"


@gpu
@pytest.mark.gpu
def test_gpu_sjlt_and_chunks():
    x = torch.randn(64, 200_003, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    got = project(x.to(torch.bfloat16), 4096, SEED, "sjlt", row_offset=77, backend="triton")
    want = project_reference(x.to(torch.bfloat16), 4096, SEED, "sjlt", 77)
    assert torch.equal(got, want), "compiled sjlt differs from the reference"
    whole = project_reference(x, 2048, SEED, "rademacher")
    parts = sum(project(x[:, lo:hi], 2048, SEED, "rademacher", row_offset=lo, backend="triton")
                for lo, hi in ((0, 70_001), (70_001, 200_003)))
    err = rel_err(parts, whole)
    assert err <= 1e-5, f"compiled chunks vs reference whole: rel err {err:.1e} > 1e-5"
