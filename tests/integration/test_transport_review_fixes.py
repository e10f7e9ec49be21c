"""Receiver fixes from the review of issue 15's hardening, over real loopback sockets: connections
in the handshake have their own limits, limits and shares follow the proven key id, live
transfers are capped, transfers belong to (key id, session), key ids cannot be enumerated, and
dev certificates are written without following planted files."""

import asyncio
import os
import stat

import pytest

from kvlink.errors import TransferRejected
from kvlink.transport import TransferClient, TransferServer
from kvlink.transport import handshake as hs
from kvlink.transport.frame import FrameType
from kvlink.transport.receiver import PART_OVERHEAD, TRANSFER_OVERHEAD
from kvlink.transport.tls import make_dev_certs

from tests.integration.rawframes import read_frame
from tests.integration.test_transport_limits import FP, begin, cfg, connect, expect_error, hello, part, send

SECRETS = {"alpha": b"alpha-secret-1", "beta": b"beta-secret-22"}


async def start(config, **kwargs):
    server = TransferServer(config, [FP], **kwargs)
    _, port = await server.start()
    return server, port


def keyed_hello(sock, key, secret, session, fp=FP):
    """HELLO naming ``key``, then AUTH with ``secret``: the receiver's answer to AUTH."""
    nonce = os.urandom(16)
    send(sock, FrameType.HELLO, body=hs.encode({"v": 1, "session": session.hex(), "conn": 0, "key": key,
                                                "fingerprint": fp.hex(), "nonce": nonce.hex()}))
    header, body = read_frame(sock)
    assert header.type is FrameType.CHALLENGE, (header, body)
    server_nonce = bytes.fromhex(hs.decode(body, {"nonce": str})["nonce"])
    send(sock, FrameType.AUTH, body=hs.encode({"mac": hs.mac(secret, "client", nonce, server_nonce, session, fp)}))
    return read_frame(sock)


async def roundtrip(port, config, key, nbytes):
    async with TransferClient("127.0.0.1", port, FP, config, secret=SECRETS[key], key_id=key) as client:
        await asyncio.wait_for(client.send([os.urandom(nbytes)]), 10)


# -- finding 5: handshakes apart; peers are key ids once proven ------------------------------------
async def test_silent_connections_do_not_keep_an_authenticated_sender_out():
    config = cfg()
    server, port = await start(config, secrets=SECRETS)
    # More silent connections from the sender's own address than it may hold connections at all.
    socks = await asyncio.to_thread(lambda: [connect(port) for _ in range(200)])
    try:
        await roundtrip(port, config, "alpha", 64 << 10)
        assert len(server._handshaking) <= config.max_handshakes_per_peer
        assert server.stats["handshakes_dropped"] >= 200 - config.max_handshakes_per_peer
        assert server.stats["connections_refused"] == 0
    finally:
        for s in socks:
            s.close()
        await server.close()


async def test_two_key_ids_from_one_address_each_get_their_own_share():
    share = (1 << 20) + TRANSFER_OVERHEAD + PART_OVERHEAD
    config = cfg(receive_budget_bytes=4 * share, peer_share_bytes=share)
    server, port = await start(config, secrets=SECRETS)
    try:
        await roundtrip(port, config, "alpha", 1 << 20)  # unclaimed: its bytes stay reserved
        assert server.reserved_by("key:alpha") == share and server.reserved_by("127.0.0.1") == 0
        await roundtrip(port, config, "beta", 1 << 20)  # same address, its own share
        assert server.reserved_by("key:beta") == share
        with pytest.raises(TransferRejected, match="peer_share_bytes"):
            await roundtrip(port, config, "alpha", 4096)  # alpha's share is still full
    finally:
        await server.close()


# -- finding 1: live transfers are capped, per peer and in total ------------------------------------
async def test_live_transfers_are_capped_per_peer_and_in_total():
    config = cfg(max_live_transfers=3, max_live_transfers_per_peer=2)
    server, port = await start(config)

    def attack():
        a, b = connect(port, source="127.0.0.2"), connect(port, source="127.0.0.3")
        assert hello(a)[0].type is FrameType.ACCEPT and hello(b)[0].type is FrameType.ACCEPT
        for tid in (1, 2, 3):
            begin(a, tid, 4)
        assert "max_live_transfers_per_peer" in str(expect_error(a, 3))
        begin(b, 4, 4)
        begin(b, 5, 4)
        assert "max_live_transfers)" in str(expect_error(b, 5))
        send(a, FrameType.CANCEL, 1)  # a transfer that ends frees its slot
        begin(a, 3, 4)
        begin(a, 99, 0)
        expect_error(a, 99)  # the only ERROR: BEGIN 3 was taken this time
        a.close()
        b.close()

    try:
        await asyncio.to_thread(attack)
        assert sorted(server._transfers) == [2, 3, 4] and dict(server._live) == {"127.0.0.2": 2, "127.0.0.3": 1}
        assert server.reserved_bytes == 3 * TRANSFER_OVERHEAD  # empty transfers are not free
    finally:
        await server.close()
    assert server.reserved_bytes == 0


async def test_a_tenant_flooding_begins_at_the_daemon_holds_only_its_live_cap():
    # The review's repro: an authenticated tenant sends BEGINs of max_parts parts the daemon
    # claims at once; before, each stayed live (1 MiB of part table and a serving task each).
    from kvlink.presets import get_preset
    from tests.integration.daemon_helpers import MODEL, client, daemon, pieces, prompt

    fp, begins = get_preset(MODEL).fingerprint, 300
    tenants = {k: v.decode() for k, v in SECRETS.items()}
    async with daemon(tenants=tenants) as d:
        cap = d._server.config.max_live_transfers_per_peer

        def attack():
            sock = connect(d.data_port)
            assert keyed_hello(sock, "beta", SECRETS["beta"], os.urandom(16), fp)[0].type is FrameType.ACCEPT
            meta = {"op": "get", "model": MODEL}
            for tid in range(10, 10 + begins):
                send(sock, FrameType.BEGIN, tid, body=hs.encode({"parts": 131072, "chunk": 4096, "meta": meta}))
            begin(sock, 3, 0)  # refused: its ERROR comes after every answer to the BEGINs before it
            refused = set()
            while (header := read_frame(sock)[0]).transfer_id != 3:
                if header.type is FrameType.ERROR:
                    refused.add(header.transfer_id)
            return sock, refused

        sock, refused = await asyncio.to_thread(attack)
        try:
            assert len(refused) >= begins - cap and len(d._server._transfers) <= cap
            assert d._server.reserved_by("key:beta") <= cap * TRANSFER_OVERHEAD
            async with client(d, "alpha") as a:  # another tenant, same address: unaffected
                tokens = prompt(64)
                await asyncio.wait_for(a.put(tokens, pieces(tokens)), 10)
        finally:
            sock.close()


# -- finding 10: ownership by (key id, session); key ids cannot be enumerated ------------------------
async def test_a_transfer_belongs_to_its_key_id_and_session():
    server, port = await start(cfg(), secrets=SECRETS)
    session = os.urandom(16)

    def attack():
        a, b = connect(port), connect(port)
        assert keyed_hello(a, "alpha", SECRETS["alpha"], session)[0].type is FrameType.ACCEPT
        begin(a, 7, 1)
        # beta presents alpha's session id (it could learn or guess it): still not the owner
        assert keyed_hello(b, "beta", SECRETS["beta"], session)[0].type is FrameType.ACCEPT
        part(b, 7, 0, 4096)
        begin(b, 99, 0)
        assert "unknown transfer" in str(expect_error(b, 7))
        expect_error(b, 99)
        part(a, 7, 0, 4096)  # the owner carries on
        begin(a, 98, 0)
        expect_error(a, 98)
        a.close()
        b.close()

    try:
        await asyncio.to_thread(attack)
        t = server._transfers[7]
        assert t.error is None and t.announced(0) and t.owner == ("alpha", session)
    finally:
        await server.close()


async def test_an_unknown_key_id_fails_exactly_like_a_wrong_secret():
    server, port = await start(cfg(), secrets=SECRETS)

    def answers():
        out = []
        for key in ("nobody", "alpha"):  # the unknown key id is challenged too, and fails at AUTH
            sock = connect(port)
            header, body = keyed_hello(sock, key, b"a-guess", os.urandom(16))
            out.append((header.type, body))
            assert read_frame(sock)[0] is None
            sock.close()
        return out

    try:
        unknown, wrong = await asyncio.to_thread(answers)
        assert unknown == wrong and unknown[0] is FrameType.ERROR
        assert type(hs.error_from_body(unknown[1])).__name__ == "AuthenticationError"
    finally:
        await server.close()


# -- tls._write: planted files are never followed or reused ------------------------------------------
def test_dev_cert_writer_does_not_follow_planted_symlinks_or_reuse_leftovers(tmp_path):
    out, victim = tmp_path / "certs", tmp_path / "victim"
    out.mkdir()
    victim.write_bytes(b"precious")
    (out / "server-key.pem.tmp").symlink_to(victim)  # where the old writer put its temporary file
    (out / "ca.pem").symlink_to(tmp_path / "elsewhere")  # a target path that is a symlink
    leftover = out / "client-key.pem.tmp"
    leftover.write_bytes(b"")
    leftover.chmod(0o666)  # the old writer reused it, and its mode, for a private key
    paths = make_dev_certs(out, force=True)
    assert victim.read_bytes() == b"precious" and not (tmp_path / "elsewhere").exists()
    assert not paths["ca.pem"].is_symlink() and paths["ca.pem"].read_bytes().startswith(b"-----BEGIN")
    for key in ("server-key.pem", "client-key.pem"):
        assert stat.S_IMODE(paths[key].stat().st_mode) == 0o600 and not paths[key].is_symlink()
    assert stat.S_IMODE(paths["server.pem"].stat().st_mode) == 0o644
    assert leftover.read_bytes() == b""  # untouched, not a copy of a key
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == [
        "client-key.pem.tmp", "server-key.pem.tmp"]  # only the planted ones: ours were renamed


async def test_a_sender_bound_to_its_own_address_is_its_own_peer():
    # local_addr picks the address a sender connects from (a multi-homed host's inter-DC NIC); the
    # receiver's per-peer limits then count it apart from other senders on the same machine.
    config = cfg(max_live_transfers_per_peer=1)
    server, port = await start(config)
    try:
        async with TransferClient("127.0.0.1", port, FP, config, local_addr=("127.0.0.2", 0)) as far, \
                TransferClient("127.0.0.1", port, FP, config) as near:
            held = far.open(2, transfer_id=1)  # left unfinished: holds 127.0.0.2's only live slot
            held.add_part(0, b"x" * 100)
            first = await asyncio.wait_for(server.transfer(1), 10)
            assert first.peer[0] == "127.0.0.2"
            await asyncio.wait_for(near.send([b"y" * 100], transfer_id=2), 10)  # 127.0.0.1 has its own
            with pytest.raises(TransferRejected, match="max_live_transfers_per_peer"):
                await asyncio.wait_for(far.send([b"z" * 100], transfer_id=3), 10)
    finally:
        await server.close()
