"""Sparse JL: the compiled CPU kernel (kernels/sjlt.py) against its plain-torch twin.

The kernel and ``project_sjlt_reference`` add the same values in the same order, so they must
agree bit for bit (torch.equal), on awkward shapes: 1, 3, 17 rows; prime coordinate counts;
offsets that cut blocks and cross 2**32; s = 1, 3, 4, 16; float32, bfloat16 and float16 input;
one or two threads; strided rows. The reference itself is checked against x @ P in
tests/test_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from das_pipeline.kernels import project
from das_pipeline.kernels import sjlt as sjlt_cpu
from das_pipeline.kernels.reference import project_sjlt_reference

pytestmark = pytest.mark.skipif(sjlt_cpu.status() != "", reason=f"no sjlt CPU kernel: {sjlt_cpu.status()}")


@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("num_cols, dim, nonzeros, offset", [
    (101, 64, 4, 0),
    (1009, 48, 3, 77),  # blocks of 16 cut at both ends
    (37, 8, 1, 2**40 + 3),  # plain CountSketch, coordinates past 2**32
    (3001, 256, 16, 2**32 - 1000),  # coordinates cross 2**32 (counter high word) mid-call
    (7919, 4096, 4, 123_456),  # blocks of 1024: each wraps once per slice
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_equals_reference_bit_for_bit(batch, num_cols, dim, nonzeros, offset, dtype):
    gen = torch.Generator().manual_seed(batch + num_cols)
    x = (torch.randn(batch, num_cols, generator=gen) * 1e3).to(dtype)
    got = sjlt_cpu.project_sjlt_cpu(x, dim, 99, nonzeros, offset, num_threads=2)
    want = project_sjlt_reference(x, dim, 99, nonzeros, offset)
    assert got.dtype == torch.float32 and got.shape == (batch, dim)
    assert torch.equal(got, want), (f"kernel != reference (max |diff| {(got - want).abs().max():.3g}); "
                                    f"they must add in the same order")


def test_float16_strided_rows_and_thread_counts():
    x = torch.randn(6, 2 * 997, generator=torch.Generator().manual_seed(5)).to(torch.float16)[:, ::2]
    want = project_sjlt_reference(x, 128, 1, 4, 5)
    for threads in (1, 2, 6):
        got = project(x, 128, 1, "sjlt", row_offset=5)
        assert torch.equal(got, want), "strided float16 input differs from the reference"
        assert torch.equal(sjlt_cpu.project_sjlt_cpu(x, 128, 1, 4, 5, num_threads=threads), want), \
            f"num_threads={threads} changed the result"


def test_chunks_sum_to_whole_and_empty_chunk_is_zero():
    x = torch.randn(4, 5000, generator=torch.Generator().manual_seed(6))
    whole = project(x, 512, 3, "sjlt")
    parts = project(x[:, :1234], 512, 3, "sjlt") + project(x[:, 1234:], 512, 3, "sjlt", row_offset=1234)
    err = ((parts - whole).abs().max() / whole.abs().max()).item()
    assert err <= 1e-6, f"chunked sjlt differs from whole by {err:.1e} (fp32 rounding only)"
    assert project(x[:, :0], 512, 3, "sjlt").abs().sum() == 0


def test_kernel_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="dim=100 is not a multiple of sjlt_nonzeros=3"):
        sjlt_cpu.project_sjlt_cpu(torch.zeros(2, 5), 100, 0, 3)
    with pytest.raises(ValueError, match="seed"):
        sjlt_cpu.project_sjlt_cpu(torch.zeros(2, 5), 64, 2**64, 4)


def test_internal_chunking_keeps_bit_equality(monkeypatch):
    """Long rows are processed in chunks (bounded table memory); chunks end on block edges, so the
    order of the adds, and hence every bit of the result, is unchanged."""
    monkeypatch.setattr(sjlt_cpu, "CHUNK_COORDS", 200)
    x = torch.randn(5, 7919, generator=torch.Generator().manual_seed(7))
    got = sjlt_cpu.project_sjlt_cpu(x, 256, 9, 4, 123_456, num_threads=2)
    assert torch.equal(got, project_sjlt_reference(x, 256, 9, 4, 123_456)), "chunked kernel != reference"
