"""The soak benchmark's checks (benchmarks/soak.py, soak_measure.py): bit-exact comparison,
growth after warm-up, the daemon log."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def soak():
    """benchmarks/soak.py, loaded as its script runs (next to its soak_measure module)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("soak_bench", ROOT / "benchmarks" / "soak.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _sampler(soak, rss):
    sampler = soak.Sampler({"p": os.getpid()}, 0.0)
    sampler.samples["p"] = [(float(t), {"rss_mib": r, "fds": 10, "threads": 5, "cpu_s": t * 0.5})
                            for t, r in enumerate(rss)]
    return sampler.summary(float(len(rss) - 1))["p"]


def test_flat_after_warm_up_passes(soak):
    # Steep growth in the first half (warm-up), then flat: judged on the second half only.
    rss = [100 + 10 * t for t in range(30)] + [400.0] * 30
    got = _sampler(soak, rss)
    assert got["rss_mib"]["flat"] and got["fds"]["flat"] and got["threads"]["flat"]
    assert got["rss_mib"]["slope_per_min"] == 0
    assert got["cpu_s"] == pytest.approx(29.5)


def test_steady_growth_is_caught(soak):
    rss = [100 + 0.5 * t for t in range(60)]  # 0.5 MiB/s: 15 MiB over the second half
    got = _sampler(soak, rss)["rss_mib"]
    assert not got["flat"]
    assert got["slope_per_min"] == pytest.approx(30.0)


def test_daemon_log_exceptions_are_counted(soak, tmp_path):
    log = tmp_path / "daemon.log"
    log.write_text("Error handling request\nTraceback (most recent call last):\n  File \"x\", line 1\n"
                   "aiohttp.http_exceptions.LineTooLong: 400, message\n"
                   "Traceback (most recent call last):\n  File \"y\"\nConnectionResetError: Connection lost\n")
    got = soak.log_summary(str(log))
    assert got["tracebacks"] == 2
    assert got["top_errors"] == {"aiohttp.http_exceptions.LineTooLong: 400, message": 1,
                                 "ConnectionResetError: Connection lost": 1}


def test_compare_is_bit_exact(soak):
    """The soak's check passes a real pack -> unpack and catches one flipped byte or a missed load."""
    from types import SimpleNamespace

    from kvlink.serde import CacheRef, Packer, Unpacker

    run = soak.Soak(SimpleNamespace(tokens=32, concurrency=1), soak.tiny_spec())
    src, dst = CacheRef([5, 9], 32, 3), CacheRef([0, 1], 32, 0)
    run._compare(src, dst, zero=True)
    good, bad = run._compare(src, dst)
    assert bad > good  # nothing loaded yet: the zeroed blocks differ from the random source
    Unpacker(run.dst).unpack(b"".join(bytes(b) for b in Packer(run.src).pack(src).buffers()), dst)
    good, bad = run._compare(src, dst)
    assert bad == 0 and good == run.spec.bytes_at(32)
    mla = run.dst.planes(3)[0][1]
    mla[1, 7] = -mla[1, 7] if float(mla[1, 7]) else 1.0  # one element of the second block changes
    good2, bad2 = run._compare(src, dst)
    assert 0 < bad2 <= 2 and good2 + bad2 == good
