"""The ``kvlink`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from kvlink.errors import ConfigError, KvlinkError, SpecError


def _tokens(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("token counts must be non-negative")
    return values


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def cmd_spec(args) -> int:
    from kvlink.presets import PRESETS, get_preset

    if args.name == "list":
        print("\n".join(sorted(PRESETS)))
        return 0
    if (args.name is None) == (args.hf_config is None):
        raise SpecError("name a preset or give --hf-config, not both")
    summary = (_hf_spec(args.hf_config) if args.hf_config else get_preset(args.name)).summary(args.tokens)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['name']}: {summary['layers']} layers {summary['layer_kinds']}")
    print(f"  KV bytes per token   {summary['kv_bytes_per_token']:,}")
    print(f"  fixed state/request  {summary['fixed_state_bytes']:,} ({_human(summary['fixed_state_bytes'])})")
    for tokens, total in summary["totals"].items():
        print(f"  total @ {int(tokens):>7} tokens  {total:>15,} ({_human(total)})")
    print(f"  fingerprint          {summary['fingerprint']}")
    if summary["notes"]:
        print(f"  notes                {summary['notes']}")
    return 0


def _hf_spec(path: str):
    """The spec of a transformers model from its local config (a directory or a config.json), as
    ``spec_from_config`` traces it: what a transformers-based prefill or decode side will use."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise SpecError("--hf-config needs the transformers package") from None
    from kvlink.engine.hf import spec_from_config

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SpecError(f"cannot read a transformers config at {path}: {exc}") from exc
    return spec_from_config(config)


def cmd_bench_serde(args) -> int:
    from kvlink.bench import serde

    result = serde.run(args.model, args.tokens, args.block_size, args.repeat)
    print(json.dumps(result, indent=2) if args.json else serde.render(result))
    return 0


def _transport_config(args):
    from kvlink.config import TransportConfig, parse_rate

    chunk = args.chunk << 10 if args.chunk else TransportConfig.chunk_bytes
    return TransportConfig(connections=args.streams, chunk_bytes=chunk, rate_cap=parse_rate(args.rate),
                           adaptive=not args.no_adaptive, chunk_checksums=True if args.chunk_checksums else None)


def _add_tls_args(parser, server: bool) -> None:
    """--tls-cert/--tls-key/--tls-ca (PEM files, e.g. from ``kvlink tls-cert``)."""
    if server:
        parser.add_argument("--tls-cert", default=None, help="serve TLS with this certificate (PEM, e.g. server.pem)")
        parser.add_argument("--tls-key", default=None, help="its private key (PEM, e.g. server-key.pem)")
        parser.add_argument("--tls-ca", default=None, help="require client certificates signed by this CA (ca.pem)")
    else:
        parser.add_argument("--tls-ca", default=None, help="connect with TLS, trusting this CA (PEM, e.g. ca.pem)")
        parser.add_argument("--tls-cert", default=None, help="client certificate for mutual TLS (client.pem)")
        parser.add_argument("--tls-key", default=None, help="its private key (client-key.pem)")


def _server_tls(args):
    from kvlink.errors import ConfigError
    from kvlink.transport.tls import server_context

    if args.tls_cert is None and args.tls_key is None and args.tls_ca is None:
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ConfigError("--tls-cert and --tls-key go together (--tls-ca adds client certificates)")
    return server_context(args.tls_cert, args.tls_key, args.tls_ca)


def _client_tls(args):
    from kvlink.errors import ConfigError
    from kvlink.transport.tls import client_context

    if args.tls_ca is None and args.tls_cert is None and args.tls_key is None:
        return None
    if args.tls_ca is None or (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("TLS needs --tls-ca; --tls-cert and --tls-key go together")
    return client_context(args.tls_ca, args.tls_cert, args.tls_key)


def cmd_transfer_serve(args) -> int:
    from kvlink.bench import sink
    from kvlink.config import TransportConfig
    from kvlink.transport.loop import run

    run(sink.serve(args.host, args.port, args.raw_port, args.arena << 20, TransportConfig(),
                   TransportConfig.secret_from_env(), args.max_transfers, verify=not args.no_verify,
                   ssl=_server_tls(args)))
    return 0


def cmd_bench_transfer(args) -> int:
    from kvlink.bench import harness, transfer
    from kvlink.config import TransportConfig, parse_rate

    weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * args.transfers
    config = _transport_config(args)
    if args.connect:
        host, port = harness.parse_connect(args.connect)
        result = transfer.run(host, port, args.raw_port, args.model, args.tokens, config, weights,
                              TransportConfig.secret_from_env(), sys.stderr.isatty() or args.progress,
                              announce=args.announce_start, repeat=args.repeat, codec=args.codec,
                              ssl=_client_tls(args))
        print(json.dumps(result, indent=2) if args.json else transfer.render(result))
        return 0
    if args.tls_ca or args.tls_cert or args.tls_key:
        print("kvlink: error: --tls-* needs --connect (the spawned receiver is plain TCP)", file=sys.stderr)
        return 2
    # Run the receiver ourselves: a loopback subprocess, or inside the link lab.
    forward = [sys.executable, "-m", "kvlink.cli", "bench", "transfer", "--model", args.model,
               "--tokens", str(args.tokens), "--streams", str(args.streams), "--chunk", str(args.chunk or 0),
               "--rate", args.rate or "0", "--weights", ",".join(str(w) for w in weights), "--repeat", str(args.repeat), "--codec", args.codec, "--json"]
    if args.no_adaptive:
        forward.append("--no-adaptive")
    if args.chunk_checksums:
        forward.append("--chunk-checksums")
    if args.lab:
        change = None
        if args.lab_change:
            rate_text, _, after = args.lab_change.partition("@")
            change = (float(after or 2.0), parse_rate(rate_text))
        changed: list[float] = []
        rc, out, events = harness.run_lab(forward, str(args.arena), parse_rate(args.lab_rate), change, changed.append,
                                          not args.no_baseline)
    else:
        rc, out, events = harness.run_local(forward, str(args.arena), not args.no_baseline)
    if rc != 0:
        return rc
    result = json.loads(out)
    result["receiver_events"] = events
    if args.lab:
        result["lab"] = {"rate_bps": parse_rate(args.lab_rate), "change": args.lab_change}
        if changed:
            # Seconds from the start of the (median) kvlink round's clock to the rate change.
            result["lab"]["changed_at_t"] = round(changed[0] - result["kvlink"]["t0_monotonic"], 3)
    print(json.dumps(result, indent=2) if args.json else transfer.render(result))
    return 0


def _spec_files(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--spec: expected NAME=FILE, got {item!r}")
        out[name] = path
    return out


def cmd_pool_serve(args) -> int:
    from kvlink.config import ClusterConfig, DaemonConfig, TransportConfig
    from kvlink.daemon.server import serve_forever
    from kvlink.transport.loop import run

    overrides = {"host": args.host, "http_port": args.http_port, "data_port": args.data_port, "root": args.root,
                 "models": tuple(args.model) if args.model else None,
                 "spec_files": _spec_files(args.spec) if args.spec else None,
                 "allow_insecure": True if args.allow_insecure else None,
                 "tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_ca": args.tls_ca}
    cluster = {"index_nodes": tuple(a for a in args.index.split(",") if a) if args.index else None,
               "cluster": args.cluster, "node": args.node, "advertise_host": args.advertise,
               "password": ClusterConfig.password_from_env()}
    overrides["cluster"] = {k: v for k, v in cluster.items() if v is not None}
    if args.config:
        config = DaemonConfig.from_toml(args.config, **overrides)
    else:
        fields = {k: v for k, v in overrides.items() if v is not None and k != "cluster"}
        config = DaemonConfig(cluster=ClusterConfig(**overrides["cluster"]), **fields)
    run(serve_forever(config, TransportConfig.secret_from_env()))
    return 0


def cmd_tls_cert(args) -> int:
    from kvlink.transport.tls import make_dev_certs

    paths = make_dev_certs(args.out, tuple(args.host or ("localhost", "127.0.0.1")), args.days, args.force)
    print(json.dumps({name: str(path) for name, path in paths.items()}, indent=2))
    return 0


def cmd_demo(args) -> int:
    from kvlink import demo

    lab = {"auto": None, "on": True, "off": False}[args.lab]
    return 0 if demo.run(args.family, args.tokens, args.extra, args.steps, args.rate, args.link, lab) else 1


def cmd_sim(args) -> int:
    from pathlib import Path

    from kvlink.route import plan, report

    if args.trace:
        from kvlink.route import trace

        result = trace.run_trace(args.trace, args.pool_blocks, args.speedup, args.inputs)
        if args.plots:
            print("--plots is for --case runs", file=sys.stderr)
        print(json.dumps(result, indent=2) if args.json else trace.render_trace(result))
        return 0
    if args.config:
        result = plan.run_plan(args.config, args.duration, args.load, args.seed)
        if args.plots:
            print("--plots is for --case runs", file=sys.stderr)
        print(report.to_json(result) if args.json else plan.render_plan(result))
        return 0
    result = report.run_case(args.duration, args.load, args.seed, args.inputs)
    if args.plots:
        try:
            for path in report.write_plots(result, Path(args.plots)):
                print(f"wrote {path}", file=sys.stderr)
        except ImportError:
            print("plots need matplotlib (pip install 'kvlink[sim]')", file=sys.stderr)
            return 2
    print(report.to_json(result) if args.json else report.render(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvlink", description="Move and store LLM KV caches over Ethernet.")
    sub = parser.add_subparsers(dest="command", required=True)

    spec = sub.add_parser("spec", help="print a preset's (or a transformers model's) cache layout figures")
    spec.add_argument("name", nargs="?", help="preset name, or 'list'")
    spec.add_argument("--hf-config", metavar="PATH", help="a transformers model directory or config.json (local) "
                      "instead of a preset: the layout kvlink's transformers adapter carries")
    spec.add_argument("--tokens", type=_tokens, default=[1024, 32768, 131072])
    spec.add_argument("--json", action="store_true")
    spec.set_defaults(func=cmd_spec)

    bench = sub.add_parser("bench", help="benchmarks (each with its same-run baseline)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    serde = bench_sub.add_parser("serde", help="pack/unpack vs memcpy, codec table")
    serde.add_argument("--model", default="kimi-linear-48b-a3b")
    serde.add_argument("--tokens", type=int, default=32768)
    serde.add_argument("--block-size", type=int, default=16)
    serde.add_argument("--repeat", type=int, default=5)
    serde.add_argument("--json", action="store_true")
    serde.set_defaults(func=cmd_bench_serde)

    bt = bench_sub.add_parser("transfer", help="model-shaped transfer vs a raw sendall/recv_into baseline")
    bt.add_argument("--model", default="kimi-linear-48b-a3b")
    bt.add_argument("--tokens", type=int, default=32768)
    bt.add_argument("--streams", type=int, default=4, help="TCP connections")
    bt.add_argument("--chunk", type=int, default=0, help="largest frame in KiB (default: TransportConfig's, 64 MiB)")
    bt.add_argument("--codec", default="none",
                    help="segment codec (none, shuffle-lz4, shuffle-zstd, ...) or 'adaptive' (chosen for --rate)")
    bt.add_argument("--chunk-checksums", action="store_true",
                    help="hash every chunk (xxh3) even though the receiver verifies whole payload parts")
    bt.add_argument("--rate", default=None, help="rate cap, e.g. 10gbit (default: none)")
    bt.add_argument("--no-adaptive", action="store_true", help="pace at the cap only, no congestion control")
    bt.add_argument("--repeat", type=int, default=3, help="rounds of each (median reported)")
    bt.add_argument("--transfers", type=int, default=1, help="concurrent transfers of the payload")
    bt.add_argument("--weights", default=None, help="per-transfer weights, e.g. 1,1,2,4")
    bt.add_argument("--connect", default=None, help="HOST:PORT of a 'kvlink transfer serve' (default: spawn one)")
    bt.add_argument("--raw-port", type=int, default=None, help="the receiver's raw sink port (baseline)")
    bt.add_argument("--no-baseline", action="store_true", help="skip the raw-socket baseline")
    bt.add_argument("--lab", action="store_true", help="run both ends over the link lab (root)")
    bt.add_argument("--lab-rate", default="1gbit")
    bt.add_argument("--lab-change", default=None, help="change the lab rate mid-run: RATE@SECONDS")
    bt.add_argument("--arena", type=int, default=2048, help="receiver arena in MiB")
    bt.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")
    bt.add_argument("--announce-start", action="store_true", help=argparse.SUPPRESS)
    bt.add_argument("--json", action="store_true")
    _add_tls_args(bt, server=False)
    bt.set_defaults(func=cmd_bench_transfer)

    tr = sub.add_parser("transfer", help="transfer endpoints")
    tr_sub = tr.add_subparsers(dest="transfer", required=True)
    serve = tr_sub.add_parser("serve", help="receive transfers (benchmarks, link tests); JSON event lines")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7471)
    serve.add_argument("--raw-port", type=int, default=None, help="also run the raw recv_into baseline sink")
    serve.add_argument("--arena", type=int, default=2048, help="receive arena in MiB")
    serve.add_argument("--max-transfers", type=int, default=None)
    serve.add_argument("--no-verify", action="store_true", help="skip payload checksum verification")
    _add_tls_args(serve, server=True)
    serve.set_defaults(func=cmd_transfer_serve)

    pool = sub.add_parser("pool", help="the prefix cache pool daemon")
    pool_sub = pool.add_subparsers(dest="pool", required=True)
    ps = pool_sub.add_parser("serve", help="run the pool as a process (HTTP control API + kvlink data path)")
    ps.add_argument("--config", default=None, help="TOML file with [daemon] and [pool] tables")
    ps.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    ps.add_argument("--http-port", type=int, default=None, help="control API port (default 7480)")
    ps.add_argument("--data-port", type=int, default=None, help="transport port (default 7481)")
    ps.add_argument("--root", default=None, help="directory for the SSD tiers (default: memory only)")
    ps.add_argument("--model", action="append", default=None, help="preset to serve (repeatable)")
    ps.add_argument("--spec", action="append", default=None, metavar="NAME=FILE",
                    help="also serve model NAME with the layout in a spec JSON file, e.g. the one a vLLM "
                         "KvlinkConnector writes (spec_file) (repeatable)")
    ps.add_argument("--allow-insecure", action="store_true",
                    help="listen on a non-loopback address without any secret (tenants or KVLINK_SECRET)")
    ps.add_argument("--tls-cert", default=None, help="serve HTTP and data over TLS with this certificate (PEM)")
    ps.add_argument("--tls-key", default=None, help="its private key (PEM)")
    ps.add_argument("--tls-ca", default=None,
                    help="CA that signs clients' reply-listener certificates (default: the system's trust store)")
    ps.add_argument("--index", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                    help="publish this daemon's entries to the global index on this Valkey/Redis Cluster "
                         "(password: KVLINK_INDEX_PASSWORD)")
    ps.add_argument("--cluster", default=None, help="this daemon's cluster (datacenter) name in the index")
    ps.add_argument("--node", default=None, help="this daemon's stable name in the index (default host:data-port)")
    ps.add_argument("--advertise", default=None, help="the address other hosts reach this daemon at")
    ps.set_defaults(func=cmd_pool_serve)

    px = sub.add_parser("proxy", help="P/D proxy for vLLM servers running KvlinkConnector "
                                      "(KVLINK_PROXY_KEY: the API key it requires from clients)")
    px.add_argument("--prefill", action="append", required=True, help="prefill server API URL (repeatable)")
    px.add_argument("--decode", action="append", required=True,
                    help="decode server as URL=HOST:PORT (its API, then its connector's kvlink listen address)")
    px.add_argument("--host", default="127.0.0.1")
    px.add_argument("--port", type=int, default=8000)
    px.add_argument("--prefill-timeout", type=float, default=600.0,
                    help="seconds to wait for a prefill server before the decode server computes the prompt")
    px.set_defaults(func=cmd_proxy)

    tls = sub.add_parser("tls-cert", help="write a self-signed dev CA, server and client certificates for TLS")
    tls.add_argument("--out", required=True, help="directory for ca.pem, server(-key).pem, client(-key).pem")
    tls.add_argument("--host", action="append", default=None,
                     help="DNS name or IP address the server certificate is valid for (repeatable; "
                          "default: localhost and 127.0.0.1)")
    tls.add_argument("--days", type=int, default=30, help="validity in days (1..3650)")
    tls.add_argument("--force", action="store_true", help="replace existing files")
    tls.set_defaults(func=cmd_tls_cert)

    sim = sub.add_parser("sim", help="throughput model and discrete-event simulation of a PD deployment")
    sim.add_argument("--case", default="prfaas-1t", choices=["prfaas-1t"], help="published case to reproduce")
    sim.add_argument("--config", default=None, help="a plan TOML with profile tables (see examples/plan-prfaas.toml)")
    sim.add_argument("--duration", type=float, default=3000.0, help="simulated seconds of arrivals")
    sim.add_argument("--load", type=float, default=0.5, help="TTFT runs at this share of each Lambda_max")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--plots", default=None, help="directory for PNG plots (needs matplotlib)")
    sim.add_argument("--inputs", default="independent", choices=["independent", "fitted"],
                     help="8xH20 profile and decode batch: from published hardware/model figures (default) or "
                          "solved from the paper's own results (old behaviour; matches some figures by construction)")
    sim.add_argument("--trace", default=None, metavar="PATH",
                     help="drive the PrfaaS-PD deployment with a Mooncake-format JSONL trace, without and with "
                          "per-cluster prefix pools")
    sim.add_argument("--pool-blocks", type=int, default=65536, help="prefix pool capacity per cluster, in blocks")
    sim.add_argument("--speedup", type=float, default=1.0, help="divide the trace's arrival times by this")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(func=cmd_sim)

    cl = sub.add_parser("cluster", help="the cluster-wide pool")
    cl_sub = cl.add_subparsers(dest="cluster_cmd", required=True)
    up = cl_sub.add_parser("up", help="a whole PrfaaS deployment on this machine (network namespaces when root), "
                                      "replaying a trace through the cache-affine router, without and with the pool")
    up.add_argument("--trace", default=None, help="Mooncake-format JSONL (default ../shared/traces/...)")
    up.add_argument("--conversations", type=int, default=8, help="whole conversations of the trace to replay")
    up.add_argument("--max-input", type=int, default=16384, help="cut prompts to this many tokens")
    up.add_argument("--model", default="kimi-linear-48b-a3b", help="preset whose entry sizes the payloads take")
    up.add_argument("--size-scale", type=float, default=1.0, help="entry bytes as a share of the model's real size")
    up.add_argument("--hosts", default="2,2", help="hosts in the PrfaaS and in the local cluster")
    up.add_argument("--link", default="5gbit", help="inter-cluster link rate (tbf)")
    up.add_argument("--threshold", type=int, default=4096, help="incremental tokens above which prefill goes remote")
    up.add_argument("--abundant", action="store_true", help="bandwidth-abundant routing (cross-cluster transfers)")
    up.add_argument("--lab", choices=["auto", "on", "off"], default="auto", help="network namespaces (auto: root)")
    up.add_argument("--out", default=None, help="also write the JSON report here")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=lambda a: __import__("kvlink.cluster.deploy", fromlist=["main"]).main(a))

    demo = sub.add_parser("demo", help="run the main job end to end: prefill -> transfer -> decode, two processes")
    demo.add_argument("--family", default="kimi_linear", choices=["kimi_linear", "qwen3_next", "llama"])
    demo.add_argument("--tokens", type=int, default=2048, help="first prompt (a multiple of 64)")
    demo.add_argument("--extra", type=int, default=256, help="tokens the follow-up request adds")
    demo.add_argument("--steps", type=int, default=16, help="greedy decode steps per request")
    demo.add_argument("--rate", default="800mbit", help="pacing cap of the prefill side")
    demo.add_argument("--link", default="1gbit", help="lab link rate (as root)")
    demo.add_argument("--lab", choices=["auto", "on", "off"], default="auto",
                      help="run over the link lab (auto: when root)")
    demo.set_defaults(func=cmd_demo)
    return parser


def cmd_proxy(args) -> int:
    from kvlink.engine.vllm.proxy import serve

    from kvlink.config import TransportConfig

    serve(args.prefill, args.decode, args.host, args.port, args.prefill_timeout, TransportConfig.proxy_key_from_env())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KvlinkError as exc:
        print(f"kvlink: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
