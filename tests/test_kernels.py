"""The projection contract on CPU: reference == x @ P (P from the scalar formulas of
tests/test_philox.py), chunking, determinism, the JL property, identity, errors, fast-jl adapter.

Tolerances: float64 projections agree to 1e-12 (exact matrix, double sums); the Gaussian matrix
to 1e-6 relative (float32 Box-Muller against a double model).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from test_philox import matrix_py

from das_pipeline.kernels import check_settings, fastjl, identity, materialize, project, resolve_backend
from das_pipeline.kernels.reference import project_reference

SEED = 0x1234_5678_9ABC  # both key words non-zero
OFFSET = 2**32 - 3  # slices straddle the 2**32 boundary of the counter's low word


@pytest.mark.parametrize("kind, tol", [("rademacher", 1e-7), ("gaussian", 1e-6), ("sjlt", 1e-7)])
def test_materialize_equals_scalar_formula(kind, tol):
    dim = 200 if kind != "sjlt" else 48
    rows = range(OFFSET, OFFSET + 7)
    got = materialize(len(rows), dim, SEED, kind, OFFSET, sjlt_nonzeros=4).double()
    want = matrix_py(kind, rows, dim, SEED, 4)
    err = ((got - want).abs().max() / want.abs().max()).item()  # 1e-7: fp32 rounding of 1/sqrt(k)
    assert err <= tol, f"{kind}: max |P - P_formula| / max |P| = {err:.2e} > {tol}"


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sjlt"])
@pytest.mark.parametrize("batch, num_cols, dim", [(1, 13, 132), (3, 31, 64), (17, 7, 8)])
def test_reference_equals_x_times_materialised_matrix(kind, batch, num_cols, dim):
    gen = torch.Generator().manual_seed(batch * 100 + num_cols)
    x = torch.randn(batch, num_cols, generator=gen, dtype=torch.float64)
    want = x @ matrix_py(kind, range(OFFSET, OFFSET + num_cols), dim, SEED, 4)
    got = project_reference(x, dim, SEED, kind, OFFSET, sjlt_nonzeros=4)
    assert got.dtype == torch.float64 and got.shape == (batch, dim)
    tol = 1e-6 if kind == "gaussian" else 1e-12
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= tol, f"{kind} B={batch} P={num_cols} k={dim}: rel err {err:.2e} > {tol}"


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sjlt"])
def test_float32_reference_matches_float64_to_fp32_rounding(kind):
    x = torch.randn(5, 1009, generator=torch.Generator().manual_seed(1))
    got = project(x, 256, SEED, kind, backend="reference")
    want = project(x.double(), 256, SEED, kind, backend="reference")
    assert got.dtype == torch.float32
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-5, f"{kind}: fp32 vs fp64 rel err {err:.2e} > 1e-5"


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sjlt"])
def test_chunked_projection_with_offsets_equals_whole(kind):
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    whole = project(x, 384, SEED, kind, row_offset=OFFSET, backend="reference")
    cuts = [0, 1, 127, 128, 333, 700, 1000]  # unaligned to 128 columns and to sjlt blocks (M = 96)
    parts = sum(project(x[:, lo:hi], 384, SEED, kind, row_offset=OFFSET + lo, backend="reference")
                for lo, hi in zip(cuts[:-1], cuts[1:], strict=True))
    err = ((parts - whole).abs().max() / whole.abs().max()).item()
    assert err <= 1e-12, f"{kind}: sum of chunk projections differs from the whole by {err:.2e}"


def test_memory_bound_blocks_and_cache_do_not_change_results():
    x = torch.randn(3, 600, generator=torch.Generator().manual_seed(3))
    base = project_reference(x, 300, SEED, "rademacher", cache=False)
    tiny_blocks = project_reference(x, 300, SEED, "rademacher", block_bytes=4 * 300 * 7, cache=False)
    cached = [project_reference(x, 300, SEED, "rademacher", cache=True) for _ in range(2)]
    err = ((base - tiny_blocks).abs().max() / base.abs().max()).item()
    assert err <= 1e-6, f"7-row blocks differ from one block by {err:.1e} (only fp32 summation order may)"
    assert torch.equal(base, cached[0]) and torch.equal(base, cached[1]), "the word cache changed the result"


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sjlt"])
def test_same_seed_same_matrix_other_seed_different(kind):
    a = materialize(64, 128, 5, kind)
    assert torch.equal(a, materialize(64, 128, 5, kind)), "same seed gave a different matrix"
    b = materialize(64, 128, 6, kind)
    differ = (a != b).double().mean().item()
    # two independent matrices differ almost everywhere (sjlt: almost every non-zero moves)
    expected = {"rademacher": 0.5, "gaussian": 1.0, "sjlt": 2 * 4 / 128}[kind]
    assert differ >= 0.8 * expected, f"{kind}: seeds 5 and 6 differ in only {differ:.3f} of entries"


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sjlt"])
def test_jl_property_over_seeds(kind):
    """Over 32 seeds, ||Px||^2 / ||x||^2 has mean 1 and relative spread ~ sqrt(2/k); inner
    products <Px, Py> are unbiased with spread ~ sqrt((|x|^2 |y|^2 + <x,y>^2) / k)."""
    dim, num_seeds = 128, 32
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 1000, generator=gen, dtype=torch.float64)
    x[1] = 0.6 * x[0] + 0.8 * x[1]  # correlated pair: <x0, x1> / (|x0| |x1|) ~ 0.6
    ratios, inner = [], []
    for seed in range(num_seeds):
        y = project(x, dim, seed, kind, backend="reference")
        ratios.append((y[0].square().sum() / x[0].square().sum()).item())
        inner.append((y[0] @ y[1]).item())
    ratios_t, inner_t = torch.tensor(ratios), torch.tensor(inner)
    spread = math.sqrt(2 / dim)
    assert abs(ratios_t.mean() - 1) <= 4 * spread / math.sqrt(num_seeds), \
        f"{kind}: mean norm ratio {ratios_t.mean():.3f} not within 4 sigma of 1"
    assert 0.6 * spread <= ratios_t.std() <= 1.5 * spread, \
        f"{kind}: norm ratio spread {ratios_t.std():.3f} outside [0.6, 1.5] x sqrt(2/k) = {spread:.3f}"
    true_inner = (x[0] @ x[1]).item()
    inner_spread = math.sqrt((x[0].square().sum() * x[1].square().sum() + true_inner**2).item() / dim)
    assert abs(inner_t.mean() - true_inner) <= 4 * inner_spread / math.sqrt(num_seeds), \
        f"{kind}: mean inner product {inner_t.mean():.1f} vs true {true_inner:.1f}"
    assert 0.6 * inner_spread <= inner_t.std() <= 1.5 * inner_spread, \
        f"{kind}: inner-product spread {inner_t.std():.1f} vs expected {inner_spread:.1f}"


def test_sjlt_structure_one_nonzero_per_slice_and_blocks_cover_each_slice():
    dim, s = 64, 4
    width = dim // s
    block = materialize(3 * width, dim, SEED, "sjlt", row_offset=5 * width, sjlt_nonzeros=s)
    nonzero = block != 0
    assert (nonzero.view(-1, s, width).sum(-1) == 1).all(), "a coordinate lacks one non-zero per slice"
    assert set(block[nonzero].abs().unique().tolist()) == {0.5}, "sjlt values must be +-1/sqrt(s)"
    per_block = nonzero.view(3, width, dim).sum(1)
    assert (per_block == 1).all(), "a block must land exactly once on every column (a rotation)"


def test_identity_records_what_defines_the_matrix():
    dense = identity("rademacher", 2048, 7)
    assert dense == {"kind": "rademacher", "dim": 2048, "seed": 7, "rng": "philox4x32-10/v1"}
    assert identity("rademacher", 2048, 7, backend="triton") == dense, "backend must not change identity"
    assert identity("sjlt", 2048, 7, sjlt_nonzeros=8)["nonzeros"] == 8
    assert identity("sjlt", 2048, 7, sjlt_nonzeros=8) != identity("sjlt", 2048, 7, sjlt_nonzeros=4)


@pytest.mark.parametrize("kwargs, words", [
    (dict(kind="dense"), ["kind='dense'", "rademacher"]),
    (dict(backend="cuda"), ["backend='cuda'", "triton"]),
    (dict(dim=0), ["dim=0", ">= 1"]),
    (dict(seed=2**64), ["seed=", "2**64"]),
    (dict(kind="sjlt", dim=100, sjlt_nonzeros=3), ["dim=100", "sjlt_nonzeros=3", "dim=99"]),
    (dict(kind="sjlt", sjlt_nonzeros=0), ["sjlt_nonzeros=0", ">= 1"]),
    (dict(backend="fastjl", dim=500), ["multiple of 512", "dim=500", "triton"]),
    (dict(backend="fastjl", seed=2**33), ["seed", "2**32"]),
    (dict(backend="fastjl", kind="sjlt", dim=512), ["kind='sjlt'", "auto"]),
])
def test_bad_settings_name_setting_value_and_fix(kwargs, words):
    settings = dict(kind="rademacher", dim=512, seed=0, backend="auto", sjlt_nonzeros=4) | kwargs
    with pytest.raises(ValueError) as err:
        check_settings(**settings)
    for word in words:
        assert word in str(err.value), f"error {err.value!r} lacks {word!r}"


def test_bad_inputs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="2-D"):
        project(torch.zeros(3), 8, 0)
    with pytest.raises(ValueError, match="int64"):
        project(torch.zeros(2, 3, dtype=torch.int64), 8, 0)
    with pytest.raises(ValueError, match="needs a CUDA tensor|TRITON_INTERPRET"):
        import das_pipeline.kernels.triton_jl as triton_jl

        old = triton_jl.interpreting
        triton_jl.interpreting = lambda: False
        try:
            project(torch.zeros(2, 3), 128, 0, backend="triton")
        finally:
            triton_jl.interpreting = old
    with pytest.raises(ValueError, match="float64.*reference|reference.*float64"):
        project(torch.zeros(2, 3, dtype=torch.float64), 128, 0, backend="triton")


def test_auto_picks_reference_for_dense_and_compiled_kernel_for_sjlt_on_cpu():
    from das_pipeline.kernels import sjlt

    x = torch.zeros(2, 3)
    assert resolve_backend("auto", "rademacher", x) == "reference"
    assert resolve_backend("auto", "sjlt", x.double()) == "reference"
    assert resolve_backend("auto", "sjlt", x) == ("sjlt-cpu" if sjlt.status() == "" else "reference")


def test_fastjl_missing_gives_install_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fast_jl", None)  # import fails as when not installed
    with pytest.raises(ImportError) as err:
        project(torch.zeros(8, 16), 512, 0, backend="fastjl")
    msg = str(err.value)
    for word in ("backend='fastjl'", "CUDA toolkit", "no-build-isolation", "CPU-only torch", "triton"):
        assert word in msg, f"install error lacks {word!r}: {msg}"
    with pytest.raises(ImportError, match="no-build-isolation"):
        identity("rademacher", 512, 0, backend="fastjl")


def test_fastjl_adapter_refuses_what_fastjl_gets_wrong(monkeypatch):
    monkeypatch.setitem(sys.modules, "fast_jl", object())  # "installed", but must not be reached
    with pytest.raises(ValueError, match="row_offset=5.*chunking"):
        fastjl.project_fastjl(torch.zeros(8, 16), 512, 0, row_offset=5)
    with pytest.raises(ValueError, match="multiple of 512"):
        fastjl.project_fastjl(torch.zeros(8, 16), 1000, 0)
    with pytest.raises(ValueError, match="CUDA"):
        fastjl.project_fastjl(torch.zeros(8, 16), 512, 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            identity("rademacher", 512, 0, backend="fastjl")


def _config(**projection):
    from das_pipeline.config import from_dict

    return from_dict({"model": {"path": "m"}, "store": {"path": "s.zarr"}, "projection": projection})


def test_config_takes_sjlt_and_backends_and_fingerprints_the_projection():
    from das_pipeline.config import ConfigError, result_settings

    cfg = _config(kind="sjlt", dim=4096, sjlt_nonzeros=8, backend="triton")
    assert result_settings(cfg)["projection"] == {"kind": "sjlt", "dim": 4096, "seed": 0, "nonzeros": 8}
    dense = result_settings(_config(kind="rademacher", dim=4096, sjlt_nonzeros=8))["projection"]
    assert "nonzeros" not in dense, "sjlt_nonzeros must not enter the fingerprint of dense kinds"
    for bad, words in [(dict(kind="sjlt", dim=100, sjlt_nonzeros=3), ["sjlt_nonzeros", "divide dim = 100"]),
                       (dict(backend="cuda"), ["backend", "fastjl"]),
                       (dict(backend="fastjl", dim=1000), ["multiple of 512", "auto"])]:
        with pytest.raises(ConfigError) as err:
            _config(**bad)
        for word in words:
            assert word in str(err.value), f"config error {err.value!r} lacks {word!r}"
