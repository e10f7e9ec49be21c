"""Acceptance over the link lab: two namespaces, a veth pair shaped by tbf (needs root).

Each test runs the real CLI (``kvlink bench transfer --lab``): a receiver process in one
namespace, a sender process in the other, model-shaped payloads verified by the receiver.
"""

import json
import subprocess
import sys

import pytest

from kvlink.transport.lab import unavailable_reason

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def lab_bench(*args, arena=400, timeout=240):
    argv = [sys.executable, "-m", "kvlink.cli", "bench", "transfer", "--lab", "--repeat", "1", "--arena", str(arena), "--no-baseline",
            "--json", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for event in result["receiver_events"]:
        if event["event"] == "transfer":
            assert "error" not in event, event
            assert event["verified"] is True  # the lab receiver checks every payload part
    return result


def test_paced_transfer_holds_its_rate_on_a_1gbit_link():
    result = lab_bench("--lab-rate", "1gbit", "--rate", "500mbit", "--no-adaptive", "--tokens", "16384")
    goodput = result["kvlink"]["goodput_gbps"]
    assert 0.475 <= goodput <= 0.525, goodput


def test_adaptive_transfer_fills_a_1gbit_link():
    result = lab_bench("--lab-rate", "1gbit", "--tokens", "16384")
    assert result["kvlink"]["goodput_gbps"] >= 0.9, result["kvlink"]["goodput_gbps"]
    # The estimate it publishes is the link's (goodput tops out at ~95.6% of the tbf rate).
    assert 0.85e9 <= result["kvlink"]["snapshot"]["available_bps"] <= 1.1e9


def test_weighted_transfers_share_the_link_by_weight():
    result = lab_bench("--lab-rate", "1gbit", "--weights", "1,1,2,4", "--tokens", "4096")
    acked = result["kvlink"]["shares_at_first_completion"]["acked"]
    weights = [1, 1, 2, 4]
    for got, w in zip(acked, weights):
        share, want = got / sum(acked), w / sum(weights)
        assert abs(share - want) <= 0.1 * want + 0.005, (acked, weights)


def test_estimate_follows_a_rate_drop_and_the_transfer_completes():
    result = lab_bench("--lab-rate", "2gbit", "--lab-change", "500mbit@1.5", "--tokens", "65536", arena=700)
    changed = result["lab"]["changed_at_t"]
    timeline = result["kvlink"]["timeline"]
    before = [p for p in timeline if p["t"] < changed - 0.2 and p["available_bps"]]
    assert before and before[-1]["available_bps"] >= 1.6e9
    followed = [p["t"] for p in timeline if p["t"] > changed and p["available_bps"] <= 0.6e9]
    assert followed and followed[0] - changed <= 2.0, (changed, followed[:1])
    after = [p["available_bps"] for p in timeline if p["t"] >= followed[0]]
    assert max(after) <= 0.65e9  # and it stays there
    assert result["kvlink"]["bytes"] == result["payload_bytes"]


def test_multi_gigabyte_transfer_over_the_lab_link_is_verified():
    from tests.conftest import require_free_memory

    require_free_memory(6)
    # Two concurrent 1.05 GB model-shaped transfers (2.2 GB) over a 10 Gbit/s shaped link.
    result = lab_bench("--lab-rate", "10gbit", "--tokens", "131072", "--transfers", "2", arena=2300, timeout=400)
    events = [e for e in result["receiver_events"] if e["event"] == "transfer"]
    assert len(events) == 2 and all(e["verified"] for e in events)
    assert sum(e["bytes"] for e in events) > 2e9


def test_lab_cleans_up():
    from kvlink.transport.lab import LinkLab

    with LinkLab(1e9) as lab:
        names = (lab.ns_a, lab.ns_b)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(n in listed for n in names)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
