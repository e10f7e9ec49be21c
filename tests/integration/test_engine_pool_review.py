"""Review findings on the engine API and the pool (issue 15 review: 7, 8, 9 HostBudget, 10)."""

import socket
import threading

import pytest

from kvlink.engine.decode import SyncDecodeSide
from kvlink.engine.prefill import SyncPrefillSide
from kvlink.errors import TransportError
from tests.integration.test_transfer_lifecycle import TINY, paged


def _loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("kvlink-decode", "kvlink-prefill")]


# -- finding 7: a sync wrapper whose construction fails leaves no thread behind -------------------
def test_failed_sync_starts_leave_no_loop_thread():
    before = _loop_threads()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for _ in range(5):
            with pytest.raises(TransportError, match="cannot listen"):
                SyncDecodeSide(paged(TINY, 4, 0), port=port)
    for _ in range(5):
        with pytest.raises(TypeError):
            SyncPrefillSide(paged(TINY, 4, 0), no_such_option=1)
    assert _loop_threads() == before
    # and a working one still starts and closes cleanly
    side = SyncDecodeSide(paged(TINY, 4, 0))
    side.close()
    assert _loop_threads() == before
