"""TLS end to end: `kvlink tls-cert` certificates, a `kvlink pool serve --tls-*` subprocess, TLS
clients (HTTP, data and the daemon's reply connections), and typed errors for unverifiable peers."""

import json
import os
import subprocess
import sys
import time

import aiohttp
import pytest

from kvlink.cli import main as cli_main
from kvlink.config import DaemonConfig, TransportConfig
from kvlink.daemon import PoolClient, PoolDaemon
from kvlink.errors import ConfigError, HandshakeError, TransferTimeout
from kvlink.pool.index import FULL
from kvlink.transport import TransferClient, TransferServer
from kvlink.transport.tls import client_context, server_context

from .daemon_helpers import FAST, MODEL, pieces, prompt
from .daemon_helpers import config as daemon_config

SECRET = "alpha-tls-secret"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    assert cli_main(["tls-cert", "--out", str(out), "--days", "1"]) == 0  # localhost and 127.0.0.1
    other = tmp_path_factory.mktemp("other-ca")
    assert cli_main(["tls-cert", "--out", str(other), "--days", "1"]) == 0
    return out, other


def tls_client(certs, http_port, data_port, ca=None, **kwargs) -> PoolClient:
    """A client trusting ``ca`` (default: the dev CA), its reply listener showing the dev server
    certificate (valid for 127.0.0.1, where the daemon connects back to)."""
    return PoolClient(MODEL, http_port=http_port, data_port=data_port, secret=SECRET.encode(), tenant="alpha",
                      transport=FAST, timeout=10.0, reply_arena=16 << 20,
                      ssl=client_context(ca or certs / "ca.pem"),
                      reply_ssl=server_context(certs / "server.pem", certs / "server-key.pem"), **kwargs)


async def test_daemon_subprocess_over_tls(certs, tmp_path):
    certs, other = certs
    config = tmp_path / "pool.toml"
    config.write_text(f'[daemon]\nmodels = ["{MODEL}"]\n[pool]\nblock_size = 16\nhost_bytes = 1048576\n'
                      f'page_bytes = 4096\n[tenants]\nalpha = "{SECRET}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "kvlink.cli", "pool", "serve", "--config", str(config),
                             "--http-port", "0", "--data-port", "0", "--tls-cert", str(certs / "server.pem"),
                             "--tls-key", str(certs / "server-key.pem"), "--tls-ca", str(certs / "ca.pem")],
                            stdout=subprocess.PIPE, text=True)
    try:
        event = json.loads(proc.stdout.readline())
        http_port, data_port = event["http_port"], event["data_port"]
        tokens = prompt(64)
        stored = pieces(tokens, [3])
        async with tls_client(certs, http_port, data_port) as c:
            assert (await c.health())["ok"]
            assert (await c.put(tokens, stored)).stored == len(stored)  # data out, reply back: both TLS
            hit = await c.lookup(tokens)
            assert hit.tokens == 64
            with await c.get(hit) as got:
                assert sorted(bytes(v) for v in got.values()) == sorted(stored.values())
        # A client that does not trust the daemon's CA fails at once with a typed error.
        started = time.monotonic()
        with pytest.raises(HandshakeError):
            await tls_client(certs, http_port, data_port, ca=other / "ca.pem").connect()
        assert time.monotonic() - started < 5
        # Plain HTTP to the TLS port gets no answer.
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{http_port}/health",
                                    timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    await resp.read()
    finally:
        proc.kill()
        proc.wait()


async def test_daemon_verifies_the_reply_listener(certs):
    """Replies go only to a reply listener whose certificate the daemon's CA signed: one from
    another CA gets no reply (the daemon's TLS connection to it fails), never a plain one."""
    certs, other = certs
    d = PoolDaemon(daemon_config(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server-key.pem"),
                                 tls_ca=str(other / "ca.pem")), SECRET.encode(), transport=FAST)
    await d.start()
    try:
        c = PoolClient(MODEL, http_port=d.http_port, data_port=d.data_port, secret=SECRET.encode(),
                       transport=FAST, timeout=2.0, reply_arena=16 << 20, ssl=client_context(certs / "ca.pem"),
                       reply_ssl=server_context(certs / "server.pem", certs / "server-key.pem"))
        async with c:
            assert (await c.health())["ok"]  # HTTPS to the daemon works
            with pytest.raises(TransferTimeout):  # the reply could not be delivered
                await c.put(prompt(16), {(FULL, 0): os.urandom(100)})
    finally:
        await d.close()


async def test_unverifiable_server_certificate_is_a_handshake_error_at_once(certs):
    certs, _ = certs
    fp = bytes(range(16))
    server = TransferServer(TransportConfig(), [fp], secret=b"s3cret-tls",
                            ssl=server_context(certs / "server.pem", certs / "server-key.pem"))
    _, port = await server.start("127.0.0.1", 0)
    try:
        # Retries configured, but retrying cannot make an untrusted certificate trusted.
        config = TransportConfig(connections=2, reconnect_attempts=5, connect_timeout=5.0)
        started = time.monotonic()
        with pytest.raises(HandshakeError, match="TLS"):
            async with TransferClient("127.0.0.1", port, fp, config, secret=b"s3cret-tls", ssl=client_context(None)):
                pass
        assert time.monotonic() - started < 5
    finally:
        await server.close()


def test_tls_settings_are_checked(certs, tmp_path):
    certs, _ = certs
    path = tmp_path / "pool.toml"
    path.write_text(f'[daemon]\ntls_cert = "{certs / "server.pem"}"\ntls_key = "{certs / "server-key.pem"}"\n'
                    f'tls_ca = "{certs / "ca.pem"}"\n')
    config = DaemonConfig.from_toml(path)
    assert (config.tls_cert, config.tls_ca) == (str(certs / "server.pem"), str(certs / "ca.pem"))
    with pytest.raises(ConfigError):
        DaemonConfig(tls_cert=str(certs / "server.pem"))  # no key
    with pytest.raises(ConfigError):
        DaemonConfig(tls_ca=str(certs / "ca.pem"))  # a CA for a daemon without TLS
    with pytest.raises(ConfigError):  # TLS out but a plain reply listener: replies would fail
        PoolClient(MODEL, ssl=client_context(certs / "ca.pem"))
    with pytest.raises(ConfigError):  # a key that is not the certificate's
        PoolDaemon(DaemonConfig(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "client-key.pem")))
    # CLI: --tls-cert without --tls-key is refused before anything listens.
    assert cli_main(["transfer", "serve", "--port", "0", "--tls-cert", str(certs / "server.pem")]) == 2


def test_transfer_serve_and_bench_transfer_over_mutual_tls(certs, capsys):
    certs, other = certs
    serve = subprocess.Popen([sys.executable, "-m", "kvlink.cli", "transfer", "serve", "--port", "0", "--arena", "64",
                              "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server-key.pem"),
                              "--tls-ca", str(certs / "ca.pem")], stdout=subprocess.PIPE, text=True)
    try:
        port = json.loads(serve.stdout.readline())["port"]
        bench = ["bench", "transfer", "--connect", f"127.0.0.1:{port}", "--tokens", "256", "--streams", "1",
                 "--repeat", "1", "--json"]
        capsys.readouterr()
        assert cli_main([*bench, "--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "client.pem"),
                         "--tls-key", str(certs / "client-key.pem")]) == 0
        assert json.loads(capsys.readouterr().out)["kvlink"]["goodput_gbps"] > 0
        event = json.loads(serve.stdout.readline())
        assert event["event"] == "transfer" and event["verified"] and "error" not in event
        # Trusting another CA, the benchmark stops at once with a typed error (exit 2), not a traceback.
        assert cli_main([*bench, "--tls-ca", str(other / "ca.pem")]) == 2
        assert "kvlink: error: TLS" in capsys.readouterr().err
    finally:
        serve.kill()
        serve.wait()
