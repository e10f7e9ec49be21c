"""Transfer benchmark: a ~1 GiB model-shaped transfer over loopback vs raw sendall/recv_into.

    python benchmarks/transfer.py [--tokens 131072] [--streams 4] [--repeat 7] [--json]

One receiver process (``kvlink transfer serve``) serves both kvlink and the raw-socket sink;
rounds alternate kvlink / raw with the same connection count, so the ratio compares like with
like in the same run. Measured twice, both verified: the default (the receiver checks each part, a
kvlink payload, against its own checksums; no per-chunk hashes) and with per-chunk xxh3 forced
(``chunk_checksums=True``). ``--modes unverified`` adds, for scale, a run with no integrity
check at all (a ``--no-verify`` receiver, ``chunk_checksums=False``): what the hash pass costs.
For the verified modes a second baseline runs too: raw sockets whose receiver hashes every byte
as it lands (xxh3), the physical cost of verification by itself. The goal (>= 0.9x) is against
the plain baseline; ``ratio_vs_raw_hashed`` says how much of the gap is the hash.
iperf3 is reported too when installed.
"""

import argparse
import json
import shutil
import subprocess
import sys

from kvlink.bench import harness, transfer
from kvlink.config import TransportConfig


# Both verified end to end: the default skips per-chunk hashes because the receiver verifies
# each part (a kvlink payload) against its own checksums; chunk-xxh3 hashes every chunk instead.
MODES = (("part-verified", None), ("chunk-xxh3", True), ("unverified", False))
DEFAULT_MODES = "part-verified,chunk-xxh3"


def iperf3(streams: int) -> dict:
    if shutil.which("iperf3") is None:
        return {"skipped": "iperf3 is not installed"}
    server = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", "5299"], stdout=subprocess.DEVNULL)
    try:
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", "5299", "-P", str(streams), "-t", "3", "-J"],
                             capture_output=True, text=True, timeout=30)
        bps = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
        return {"goodput_gbps": round(bps / 1e9, 3)}
    finally:
        server.kill()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="kimi-linear-48b-a3b")
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--chunk-mib", type=int, default=None, help="largest frame (default: TransportConfig's)")
    parser.add_argument("--modes", default=DEFAULT_MODES, help="which of " + ", ".join(m for m, _ in MODES) + " to run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {}
    for name, checked in MODES:
        if name not in args.modes.split(","):
            continue
        argv = harness.serve_argv("127.0.0.1", "1400") + (["--no-verify"] if checked is False else [])
        sink = harness.SinkProcess(argv)
        try:
            port, raw = sink.listening["port"], sink.listening["raw_port"]
            extra = {} if args.chunk_mib is None else {"chunk_bytes": args.chunk_mib << 20}
            config = TransportConfig(connections=args.streams, chunk_checksums=checked, **extra)
            results[name] = transfer.run("127.0.0.1", port, raw, args.model, args.tokens, config, [1.0], None,
                                         False, repeat=args.repeat, receiver_pid=sink.proc.pid,
                                         hashed_baseline=checked is not False)
            results[name]["kvlink"].pop("timeline")
        finally:
            sink.stop()
    results["iperf3"] = iperf3(args.streams)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name in results:
            if name == "iperf3":
                continue
            print(f"== integrity: {name}")
            print(transfer.render(results[name]))
        print("iperf3:", results["iperf3"])
        print(json.dumps({name: {"ratio_vs_raw": results[name]["ratio_vs_raw"],
                                 "ratio_vs_raw_hashed": results[name].get("ratio_vs_raw_hashed"),
                                 "kvlink_gbps": results[name]["kvlink"]["goodput_gbps"],
                                 "raw_gbps": results[name]["raw_baseline"]["goodput_gbps"],
                                 "raw_hashed_gbps": results[name].get("raw_hashed_baseline", {}).get("goodput_gbps"),
                                 "cpu_s_per_gib": {"kvlink": results[name]["kvlink"]["cpu_s_per_gib"],
                                                   "raw": results[name]["raw_baseline"]["cpu_s_per_gib"],
                                                   "raw_hashed": results[name].get("raw_hashed_baseline", {}).get("cpu_s_per_gib")}}
                          for name in results if name != "iperf3"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
