"""`kvlink cluster up`, short: two clusters of pool daemons (network namespaces behind a tbf link
when root, loopback otherwise), a real Valkey Cluster as the global index, the Mooncake trace
replayed through the cache-affine router without and with the pool."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake-conversation.jsonl"

pytestmark = pytest.mark.skipif(not TRACE.is_file(), reason=f"no trace at {TRACE}")


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_cluster_up_replays_the_trace_and_the_pool_cuts_link_bytes(tmp_path):
    before = _netns()
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "kvlink.cli", "cluster", "up", "--trace", str(TRACE),
                           "--conversations", "3", "--size-scale", "0.02", "--link", "2gbit", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cache bytes shipped across the link with the pool" in proc.stdout
    report = json.loads(out.read_text())
    nopool, pool = report["runs"]["nopool"], report["runs"]["pool"]
    assert nopool["verified"] and pool["verified"]  # every fetched byte was the stored one
    assert report["settings"]["requests"] >= 6
    # Later turns of a conversation find their earlier turns in the local cluster's pool...
    assert pool["clusters"]["local"]["hit_tokens"] > 0
    assert pool["fetched_bytes"] > 0
    assert nopool["clusters"]["local"]["hit_tokens"] == 0 and nopool["fetched_bytes"] == 0
    # ... so less crosses the inter-cluster link than without the pool.
    assert 0 < pool["shipped_bytes"] < nopool["shipped_bytes"]
    assert pool["router"]["requests"] == report["settings"]["requests"]
    assert pool["router"]["prefix_tokens_reused"] > 0
    if report["settings"]["lab"]:
        # The tbf qdiscs' own counters saw at least the shipped caches cross.
        assert nopool["link_bytes"] >= nopool["shipped_bytes"]
        assert pool["link_bytes"] >= pool["shipped_bytes"]
        assert pool["link_bytes"] < nopool["link_bytes"]
    # Stops cleanly: no namespace left behind, no daemon or Valkey process left running.
    assert _netns() <= before
    left = subprocess.run(["pgrep", "-f", "kvlink-cluster-"], capture_output=True, text=True).stdout.split()
    assert not left, left
