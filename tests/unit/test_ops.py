"""Every gather/scatter backend agrees bit for bit with the torch reference."""

import pytest
import torch

from kvlink import ops
from kvlink.config import triton_interpret_enabled
from kvlink.errors import BackendUnavailable, ConfigError
from kvlink.ops import reference

CPU_BACKENDS = [b for b in ("reference", "native", "triton") if b in ops.available_backends("cpu")]


def _planes(dtype):
    base = torch.randn(12, 2, 4, 3, 8).to(dtype)  # [num_blocks, 2, block, heads, dim]: strided K plane
    return base, base[:, 0].flatten(1)


def test_cpu_backends_present():
    assert "native" in CPU_BACKENDS, "the C row copier should build wherever a C compiler exists"
    if triton_interpret_enabled():
        assert "triton" in CPU_BACKENDS, "triton runs on CPU tensors under TRITON_INTERPRET=1"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_gather_scatter_match_reference(backend, dtype):
    torch.manual_seed(0)
    if dtype == torch.float8_e4m3fn:
        base = torch.randn(12, 2, 4, 3, 8).to(dtype)
        rows = base[:, 1].flatten(1)
    else:
        base, rows = _planes(dtype)
    ids = torch.tensor([7, 2, 11, 0, 5], dtype=torch.int64)
    want = torch.empty(5, rows.shape[1], dtype=dtype)
    reference.gather_rows(rows, ids, want)
    got = torch.full_like(want.view(torch.uint8), 0xAB).view(dtype)
    ops.gather_rows(rows, ids, got, backend=backend)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))

    dst_ref = torch.zeros_like(base)
    dst = torch.zeros_like(base)
    reference.scatter_rows(want, ids, dst_ref[:, 1].flatten(1))
    ops.scatter_rows(want, ids, dst[:, 1].flatten(1), backend=backend)
    assert torch.equal(dst.view(torch.uint8), dst_ref.view(torch.uint8))
    assert not dst[:, 0].view(torch.uint8).any(), "scatter touched the other plane"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_row_widths(backend):
    rows = torch.arange(7 * 5, dtype=torch.uint8).view(7, 5)
    ids = torch.tensor([6, 0, 3])
    out = torch.empty(3, 5, dtype=torch.uint8)
    ops.gather_rows(rows, ids, out, backend=backend)
    assert torch.equal(out, rows[ids])


def test_launcher_checks():
    rows = torch.zeros(4, 8)
    with pytest.raises(ConfigError, match="out of range"):
        ops.gather_rows(rows, torch.tensor([0, 4]), torch.empty(2, 8))
    with pytest.raises(ConfigError, match="dtype"):
        ops.gather_rows(rows, torch.tensor([0]), torch.empty(1, 8, dtype=torch.float16))
    with pytest.raises(ConfigError, match="row length"):
        ops.gather_rows(rows, torch.tensor([0]), torch.empty(1, 4))
    with pytest.raises(ConfigError, match="int64"):
        ops.gather_rows(rows, torch.tensor([0], dtype=torch.int32), torch.empty(1, 8))
    with pytest.raises(ConfigError, match="contiguous"):
        ops.gather_rows(rows, torch.tensor([0, 1]), torch.empty(8, 2).t())


def test_unavailable_backend_is_typed():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the cuda backend is available here")
    with pytest.raises(BackendUnavailable):
        ops.select_backend("cpu", "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (CI has none)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_backends_match_reference(backend):
    torch.manual_seed(0)
    base = torch.randn(64, 2, 16, 4, 128, device="cuda").to(torch.bfloat16)
    rows = base[:, 0].flatten(1)
    ids = torch.randperm(64, device="cuda")[:40]
    want = torch.empty(40, rows.shape[1], dtype=torch.bfloat16, device="cuda")
    reference.gather_rows(rows, ids, want)
    for out in (torch.empty_like(want), torch.empty(want.shape, dtype=want.dtype, pin_memory=True)):
        ops.gather_rows(rows, ids, out, backend=backend)
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), want.cpu())
    dst = torch.zeros_like(base)
    dst_ref = torch.zeros_like(base)
    reference.scatter_rows(want, ids, dst_ref[:, 0].flatten(1))
    ops.scatter_rows(want, ids, dst[:, 0].flatten(1), backend=backend)
    torch.cuda.synchronize()
    assert torch.equal(dst, dst_ref)
