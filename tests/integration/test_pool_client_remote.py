"""A pool client of a daemon on another address listens for the daemon's replies where the daemon
can reach it: the address on its route to the daemon, not loopback (the daemon connects back to
the address it saw; a loopback-only reply listener was unreachable and every get failed)."""

import socket

from tests.integration.daemon_helpers import FAST, MODEL, daemon, pieces, prompt

SECRET = b"remote-secret-1"


def _local_address() -> str:
    """This machine's address on its default route (a real, non-loopback interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routed by the default route, nothing sent
        addr = probe.getsockname()[0]
    assert not addr.startswith("127."), "the test needs a non-loopback interface"
    return addr


def test_route_address():
    from kvlink.daemon.client import route_address

    assert route_address("127.0.0.1") == "127.0.0.1"
    assert route_address(_local_address()) == _local_address()


async def test_get_from_a_daemon_on_another_address():
    addr = _local_address()
    async with daemon(SECRET, host=addr) as d:
        from kvlink.daemon import PoolClient

        async with PoolClient(MODEL, host=addr, http_port=d.http_port, data_port=d.data_port, secret=SECRET,
                              transport=FAST, timeout=10.0, reply_arena=16 << 20) as client:
            tokens = prompt(64)
            stored = pieces(tokens, [3])  # the KV blocks and the state after them (a hybrid hit)
            assert (await client.lookup(tokens)).tokens == 0
            assert (await client.put(tokens, stored)).stored == len(stored)
            hit = await client.lookup(tokens)
            assert hit.tokens == 64
            got = await client.get(hit)
            assert sorted(bytes(v) for v in got.values()) == sorted(stored.values())
