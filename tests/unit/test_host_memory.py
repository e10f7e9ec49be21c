"""Host staging buffers ask for transparent huge pages (kvlink/ops/host_memory.py)."""

import sys
from pathlib import Path

import pytest

from kvlink.daemon.arena import FreeListArena
from kvlink.ops.host_memory import host_bytes
from kvlink.serde.staging import StagingArena

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not THP.exists() or "[never]" in THP.read_text(),
    reason="transparent huge pages unavailable")


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("make", [
    lambda n: host_bytes(n),
    lambda n: StagingArena(n, pin=False).buffer,
    lambda n: FreeListArena(n, pin=False).buffer,
])
def test_large_host_buffers_are_advised_huge_pages_and_faulted_in(make):
    buf = make(64 << 20)
    middle = buf.data_ptr() + (32 << 20)
    assert "hg" in vm_flags(middle)  # madvise(MADV_HUGEPAGE) over the buffer's 2 MiB-aligned interior
    assert buf.numel() == 64 << 20 and not buf[::4096].any()

