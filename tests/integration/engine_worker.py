"""A prefill worker process for fault tests: sends layer 0 of request ``worker``, says "ready",
then waits on stdin for ever (the test kills it with SIGKILL mid-load)."""

import asyncio
import sys

from kvlink.engine import PrefillSide
from tests.integration.test_engine_faults import SPEC, make_cache, src_ref


async def main(port: int) -> None:
    side = PrefillSide(make_cache(seed=2))
    await side.begin("worker", src_ref(), ("127.0.0.1", port))
    side.save_layer("worker", 0)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    for layer in range(1, SPEC.num_layers):
        side.save_layer("worker", layer)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
