import pytest


@pytest.fixture(scope="session")
def tls_pair(tmp_path_factory):
    """(server, client) SSL contexts from a dev CA made by ``kvlink.transport.tls`` (localhost, 127.0.0.1)."""
    from kvlink.transport.tls import client_context, make_dev_certs, server_context

    paths = make_dev_certs(tmp_path_factory.mktemp("tls"), ("localhost", "127.0.0.1"), days=1)
    return server_context(paths["server.pem"], paths["server-key.pem"]), client_context(paths["ca.pem"])
