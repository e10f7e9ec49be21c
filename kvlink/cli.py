"""The ``kvlink`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from kvlink.errors import KvlinkError


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
    summary = get_preset(args.name).summary(args.tokens)
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


def cmd_bench_serde(args) -> int:
    from kvlink.bench import serde

    result = serde.run(args.model, args.tokens, args.block_size, args.repeat)
    print(json.dumps(result, indent=2) if args.json else serde.render(result))
    return 0


def cmd_demo(args) -> int:
    from kvlink import demo

    return 0 if demo.run(args.model, args.tokens, args.block_size) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvlink", description="Move and store LLM KV caches over Ethernet.")
    sub = parser.add_subparsers(dest="command", required=True)

    spec = sub.add_parser("spec", help="print a preset's cache layout figures")
    spec.add_argument("name", help="preset name, or 'list'")
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

    demo = sub.add_parser("demo", help="run the main job end to end")
    demo.add_argument("--model", default="kimi-linear-48b-a3b")
    demo.add_argument("--tokens", type=int, default=32768)
    demo.add_argument("--block-size", type=int, default=16)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KvlinkError as exc:
        print(f"kvlink: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
