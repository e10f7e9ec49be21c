"""`kvlink tls-cert` certificates, used by a real TLS TransferServer and TransferClient on loopback."""

import asyncio
import os
import stat
import subprocess
import sys

import pytest

from kvlink.cli import main as cli_main
from kvlink.config import TransportConfig
from kvlink.errors import ConfigError, TransportError
from kvlink.transport import TransferClient, TransferServer
from kvlink.transport.tls import client_context, make_dev_certs, server_context

FP = bytes(range(16))
SECRET = b"tls-test-secret"
CONFIG = TransportConfig(connections=2, grid_bytes=16 << 10, chunk_bytes=256 << 10, window_bytes=1 << 20)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    proc = subprocess.run([sys.executable, "-m", "kvlink.cli", "tls-cert", "--out", str(out), "--host", "localhost",
                           "--host", "127.0.0.1", "--days", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem"):
        assert (out / name).stat().st_size > 0
    for key in ("server-key.pem", "client-key.pem"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600
    return out


def test_tls_cert_does_not_replace_existing_keys(certs, capsys):
    before = (certs / "server-key.pem").read_bytes()
    assert cli_main(["tls-cert", "--out", str(certs)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (certs / "server-key.pem").read_bytes() == before


async def send(port: int, ctx, data: list[bytes], server: TransferServer, **client_kwargs) -> list[bytes]:
    async with TransferClient("127.0.0.1", port, FP, CONFIG, secret=SECRET, ssl=ctx, **client_kwargs) as client:
        t = client.open(len(data), meta={"request": "tls"})
        for i, part in enumerate(data):
            t.add_part(i, part)
        incoming = await asyncio.wait_for(server.accept(), 30)
        parts = [bytes(p) for p in await asyncio.wait_for(incoming.done(), 30)]
        await asyncio.wait_for(t.done(), 30)
        incoming.release()
    return parts


async def test_tls_transfer_bit_exact_and_unverified_client_refused(certs):
    server = TransferServer(CONFIG, [FP], secret=SECRET, ssl=server_context(certs / "server.pem",
                                                                            certs / "server-key.pem"))
    _, port = await server.start("127.0.0.1", 0)
    try:
        data = [os.urandom(3 << 20), os.urandom((1 << 20) + 17), b"", os.urandom(5)]
        # By address: the certificate's IP SAN is checked; by name: its DNS SAN.
        assert await send(port, client_context(certs / "ca.pem"), data, server) == data
        assert await send(port, client_context(certs / "ca.pem"), data[:2], server,
                          server_hostname="localhost") == data[:2]
        # A client that does not trust the dev CA (system store only), or checks another name,
        # fails with a typed transport error and never reaches the receiver.
        for ctx, kwargs in ((client_context(None), {}), (client_context(certs / "ca.pem"),
                                                          {"server_hostname": "elsewhere.example"})):
            with pytest.raises(TransportError):
                async with TransferClient("127.0.0.1", port, FP, CONFIG, secret=SECRET, ssl=ctx, **kwargs):
                    pass
        # Plain TCP against the TLS port is refused too.
        with pytest.raises(TransportError):
            async with TransferClient("127.0.0.1", port, FP, TransportConfig(connections=1, handshake_timeout=5),
                                      secret=SECRET):
                pass
    finally:
        await server.close()


async def test_mutual_tls_with_the_dev_client_certificate(certs):
    ctx = server_context(certs / "server.pem", certs / "server-key.pem", ca=certs / "ca.pem")
    server = TransferServer(CONFIG, [FP], secret=SECRET, ssl=ctx)
    _, port = await server.start("127.0.0.1", 0)
    try:
        client_ctx = client_context(certs / "ca.pem", certs / "client.pem", certs / "client-key.pem")
        data = [os.urandom(2 << 20)]
        assert await send(port, client_ctx, data, server) == data
        with pytest.raises(TransportError):  # trusts the server, but shows no client certificate
            async with TransferClient("127.0.0.1", port, FP, TransportConfig(connections=1, handshake_timeout=5),
                                      secret=SECRET, ssl=client_context(certs / "ca.pem")):
                pass
    finally:
        await server.close()


def test_bad_files_and_arguments_are_config_errors(certs, tmp_path):
    with pytest.raises(ConfigError):
        server_context(tmp_path / "missing.pem", certs / "server-key.pem")
    with pytest.raises(ConfigError):
        server_context(certs / "server.pem", certs / "client-key.pem")  # key of another certificate
    with pytest.raises(ConfigError):
        client_context(certs / "server-key.pem")  # not a certificate
    with pytest.raises(ConfigError):
        make_dev_certs(tmp_path / "x", days=0)
    with pytest.raises(ConfigError):
        make_dev_certs(tmp_path / "y", hosts=["bad host"])
