"""Worker processes for fault tests, killed with SIGKILL mid-load by the test.

``prefill PORT``: sends layer 0 of request ``worker``, says "ready", then waits on stdin.
``decode``: listens, loads request ``victim``, says "port N" and then "landed 0" once layer 0 is in.
"""

import asyncio
import sys

from kvlink.engine import DecodeSide, PrefillSide
from kvlink.serde import CacheRef
from tests.integration.test_engine_faults import DST_BLOCKS, SPEC, TOKENS, make_cache, src_ref


async def main(port: int) -> None:
    side = PrefillSide(make_cache(seed=2))
    await side.begin("worker", src_ref(), ("127.0.0.1", port))
    side.save_layer("worker", 0)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    for layer in range(1, SPEC.num_layers):
        side.save_layer("worker", layer)


async def decode() -> None:
    side = DecodeSide(make_cache(seed=9))
    _, port = await side.start()
    side.start_load("victim", CacheRef(DST_BLOCKS, TOKENS, 0))
    print(f"port {port}", flush=True)
    await side.wait_layer("victim", 0)
    print("landed 0", flush=True)
    await asyncio.to_thread(sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(decode() if sys.argv[1] == "decode" else main(int(sys.argv[1])))
