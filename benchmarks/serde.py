"""Serde benchmark: pack/unpack of a model-shaped request vs a same-run memcpy, plus the codec table.

    python benchmarks/serde.py [--json] [--model kimi-linear-48b-a3b] [--tokens 32768]
"""

import sys

from kvlink.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "serde", *sys.argv[1:]]))
