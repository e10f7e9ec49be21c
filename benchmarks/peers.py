"""kvlink against its peers on the same bytes, interleaved round by round, with same-run baselines.

    bash benchmarks/peers/setup.sh          # once: the peers' venvs under .peers/ (LMCache, Mooncake)
    python benchmarks/peers.py [--quick] [--json] [--only host,ssd,transport,daemon] [--rounds N]

- host tier: kvlink ``DecodeSide.store`` / ``lookup`` + ``load_from_pool`` on an in-process Pool
  vs LMCache 0.5.6's engine on its LocalCPUBackend (our CPU connector) vs memcpy (torch copy_);
- SSD tier: the same Pool with a durable write-through SSD tier, cold fetch (page cache dropped)
  vs LMCache's LocalDiskBackend vs plain write+fsync and plain cold read;
- transport: kvlink's loopback transfer of a model's payloads vs Mooncake Transfer Engine (TCP)
  vs raw sockets, same payload bytes;
- daemon: ``kvlink pool serve`` put/get vs Mooncake Store (master + client), same entries.

Each peer runs in its own venv as a subprocess speaking JSON lines (benchmarks/peers/*_runner.py).
As root the whole run moves into a private network namespace (``unshare -n``, loopback up):
Mooncake binds every interface. A peer that fails is skipped with the reason; a missing setup
is an error (exit 2); a section whose kvlink side fails is reported and the others still run
(exit 1). Ratios are per round (a's speed / b's speed: > 1 means a is faster), median and range.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

from proc import PEERS_DIR, PeerSetupMissing, python_of  # noqa: E402
import stats  # noqa: E402

SECTIONS = ("host", "ssd", "transport", "daemon")
_NETNS_ENV = "KVLINK_PEERS_NETNS"


def _enter_netns(argv: list[str]) -> int | None:
    """Re-run this script in a private network namespace with loopback up (root only). Returns
    its exit code, or None when no namespace can be made here (run on the host loopback)."""
    if os.environ.get(_NETNS_ENV) or os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return None
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True)
    if probe.returncode != 0:
        return None
    env = {**os.environ, _NETNS_ENV: "1"}
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *argv]
    return subprocess.call(cmd, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 rounds (< 2 minutes)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--json-out", default=None, help="also write the JSON results to this file")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    parser.add_argument("--rounds", type=int, default=None, help="recorded rounds (default 5; 2 with --quick)")
    parser.add_argument("--gib", type=float, default=None, help="KV bytes for host/SSD (default 1; 0.0625 with --quick)")
    parser.add_argument("--model", default="qwen3-next-80b-a3b", help="preset whose full-attention layers make the KV")
    parser.add_argument("--transfer-model", default="kimi-linear-48b-a3b")
    parser.add_argument("--transfer-tokens", type=int, default=None, help="default 32768 (4096 with --quick)")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per pool entry / LMCache chunk")
    parser.add_argument("--lmcache-threads", type=int, default=1,
                        help="torch threads of LMCache's CPU connector (1: steadiest on 2 shared cores)")
    parser.add_argument("--dir", default=None, help="where the SSD sides write (default: a temp dir)")
    parser.add_argument("--no-netns", action="store_true", help="stay on the host loopback even as root")
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    try:
        for peer in ("lmcache", "mooncake"):
            python_of(peer)
    except PeerSetupMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_netns:
        code = _enter_netns(sys.argv)
        if code is not None:
            return code
    rounds = args.rounds or (2 if args.quick else 5)
    gib = args.gib or (0.0625 if args.quick else 1.0)
    tokens = args.transfer_tokens or (4096 if args.quick else 32768)
    logs = PEERS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"peers-{time.strftime('%Y%m%d-%H%M%S')}.log"
    where = "private network namespace" if os.environ.get(_NETNS_ENV) else "host loopback"
    load0 = os.getloadavg()[0]
    header = (f"kvlink peers benchmark: {rounds} interleaved rounds (+1 warm-up), {os.cpu_count()} cores, "
              f"{where}; peers' logs in {log_path}")
    results = []
    with open(log_path, "a") as log:  # O_APPEND: every peer process writes to it
        import local  # kvlink and torch load here, after the namespace switch
        import net

        from kvlink.errors import KvlinkError

        try:
            shape = local.Shape(args.model, int(gib * 2**30), args.chunk, args.lmcache_threads)
        except KvlinkError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        runs = {"host": lambda: local.host_tier(shape, rounds, log),
                "ssd": lambda: local.ssd_tier(shape, rounds, log, args.dir),
                "transport": lambda: net.transport(args.transfer_model, tokens, rounds, log),
                "daemon": lambda: net.daemon(args.transfer_model, tokens, rounds, log)}
        failed = []
        for section in only:
            t0 = time.perf_counter()
            try:
                cmp = runs[section]()
            except Exception as exc:  # kvlink's own side failed: report it, run the other sections
                failed.append(f"{section}: {type(exc).__name__}: {exc}")
                print(f"== {section}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                traceback.print_exc(file=log)
                continue
            results.append(cmp)
            if not args.json:
                print(stats.render(cmp) + f"\n  ({time.perf_counter() - t0:.0f} s)", flush=True)
    header += (f"; load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
               "ratios are a / b = a's speed over b's (b's seconds / a's seconds) per round")
    doc = {"header": header, "results": [c.to_dict() for c in results], "failed": failed}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(header)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
