"""Fuzzing the transport's parsers (Hypothesis, bounded by the profile in tests/conftest.py).

Frame headers and bodies, handshake bodies, and a real receiver fed mutated handshakes and
control frames over real sockets: only typed :class:`KvlinkError` subclasses may come out, the
receiver answers with a typed ERROR or disconnects (never hangs, never loses a thread), and a
legitimate sender still gets through afterwards.
"""

import asyncio
import json
import os
import socket
import struct
import threading

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvlink.codec import checksum  # noqa: E402
from kvlink.config import TransportConfig  # noqa: E402
from kvlink.errors import AuthenticationError, HandshakeError, KvlinkError, LengthError  # noqa: E402
from kvlink.transport import TransferClient, TransferServer  # noqa: E402
from kvlink.transport import handshake as hs  # noqa: E402
from kvlink.transport.frame import (ACK_ENTRY, DEFINED_FLAGS, HEADER, HEADER_SIZE, MAGIC, MAX_CONTROL_BODY,  # noqa: E402
                                    VERSION,
                                    FrameHeader, FrameType, check_body, make_frame, pack_acks, parse_header,
                                    unpack_acks)

FP = bytes(range(16))
MAX_DATA = 1 << 20

u8, u16, u32, u64 = (st.integers(0, 2**n - 1) for n in (8, 16, 32, 64))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                      st.text(max_size=40), st.sampled_from([0, -1, 1, 2**20, 2**31, 2**63, 2**64, "\u00e9" * 64]))
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                               kids, max_size=4),
                          max_leaves=12)


def header_bytes(magic, version, ftype, flags, tid, stream, length, offset, body_sum, reserved, fix_checksum=True):
    buf = bytearray(HEADER_SIZE)
    HEADER.pack_into(buf, 0, magic, version, ftype, flags, tid, stream, length, offset, body_sum, reserved, 0)
    if fix_checksum:
        struct.pack_into("<I", buf, 44, checksum(buf[:44]) & 0xFFFFFFFF)
    return bytes(buf)


# -- frame.py -----------------------------------------------------------------------------------
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_random_headers_raise_only_typed_errors(raw):
    try:
        header = parse_header(raw, MAX_DATA)
    except KvlinkError:
        return
    assert header.length <= (MAX_DATA if header.type is FrameType.DATA else MAX_CONTROL_BODY)


@given(st.binary(max_size=2 * HEADER_SIZE).filter(lambda b: len(b) != HEADER_SIZE))
def test_wrong_sized_headers_are_length_errors(raw):
    with pytest.raises(LengthError):
        parse_header(raw, MAX_DATA)


@given(magic=st.sampled_from([MAGIC, b"KVLG", b"\0\0\0\0"]), version=st.sampled_from([VERSION, 0, 2, 255]),
       ftype=u8, flags=u16, tid=u64, stream=u32, length=st.one_of(u32, st.integers(0, 2 * MAX_DATA)), offset=u64,
       body_sum=u64, reserved=u32, flip=st.one_of(st.none(), st.integers(0, HEADER_SIZE * 8 - 1)))
@example(MAGIC, VERSION, int(FrameType.HELLO), 1, 1, 0, 10, 0, 0, 0, None)  # a flag HELLO does not define
@example(MAGIC, VERSION, int(FrameType.DATA), 1, 1, 0, 10, 0, 0, 0, None)  # DATA's FLAG_UNCHECKED
@example(MAGIC, VERSION, int(FrameType.DATA), 0, 1, 0, 10, 0, 0, 1, None)  # a reserved bit set
def test_structured_headers_parse_exactly_when_valid(magic, version, ftype, flags, tid, stream, length, offset,
                                                    body_sum, reserved, flip):
    raw = bytearray(header_bytes(magic, version, ftype, flags, tid, stream, length, offset, body_sum, reserved))
    if flip is not None:
        raw[flip // 8] ^= 1 << (flip % 8)
    valid_type = ftype in {int(t) for t in FrameType}
    limit = MAX_DATA if ftype == FrameType.DATA else MAX_CONTROL_BODY
    # Reserved bits must be zero, and a flag bit counts only where version 1 defines it for the
    # type (the predicate once left both out, and failed in the runs that drew such a header).
    valid = magic == MAGIC and version == VERSION and valid_type and length <= limit and not reserved \
        and not flags & ~DEFINED_FLAGS.get(ftype, 0)
    try:
        header = parse_header(bytes(raw), MAX_DATA)
    except KvlinkError:
        assert flip is not None or not valid
        return
    if flip is None:
        assert valid
        assert (header.type, header.transfer_id, header.stream, header.length, header.offset, header.flags) == \
            (ftype, tid, stream, length, offset, flags)
    assert header.length <= (MAX_DATA if header.type is FrameType.DATA else MAX_CONTROL_BODY)


@given(st.binary(max_size=4 * ACK_ENTRY.size + 7))
def test_ack_bodies_parse_or_raise_length_error(body):
    try:
        entries = unpack_acks(body)
    except LengthError:
        assert len(body) % ACK_ENTRY.size
        return
    assert pack_acks(entries) == body


@given(st.binary(max_size=256), st.integers(0, 300), u64)
def test_check_body_is_typed(body, length, body_sum):
    header = FrameHeader(FrameType.DATA, 1, 0, 0, length, body_sum)
    try:
        check_body(header, body)
    except KvlinkError:
        return
    assert len(body) == length and checksum(body) == body_sum


# -- handshake.py -------------------------------------------------------------------------------
@given(st.one_of(st.binary(max_size=512), json_value.map(lambda v: json.dumps(v).encode()),
                 st.integers(1, MAX_CONTROL_BODY // 2).map(lambda n: b"[" * n + b"]" * (n % 3)),
                 st.integers(1, 5000).map(lambda n: b'{"a":' * n)))
@example(b"[" * 50000)  # nested past the recursion limit: was a RecursionError
def test_control_bodies_decode_or_raise_handshake_error(body):
    try:
        obj = hs.decode(body, {"v": int, "session": str})
    except HandshakeError:
        return
    assert isinstance(obj["v"], int) and isinstance(obj["session"], str)
    hs.error_from_body(body)


@given(st.one_of(st.binary(max_size=256), json_value.map(lambda v: json.dumps(v).encode())))
def test_error_bodies_always_become_typed_errors(body):
    assert isinstance(hs.error_from_body(body), KvlinkError)


@given(json_value)
def test_mac_and_hex_fields_are_typed(value):
    expected = hs.mac(b"k", "client", b"a" * 16, b"b" * 16, b"c" * 16, FP)
    with pytest.raises(AuthenticationError):
        hs.check_mac(expected, value if value != expected else None)
    try:
        got = hs.hex_bytes({"nonce": value}, "nonce", 16)
    except HandshakeError:
        return
    assert len(got) == 16


# -- a real receiver fed mutated handshakes and control frames ------------------------------------
class LoopThread:
    """A TransferServer on its own event loop thread, recording every unhandled error."""

    def __init__(self, **kwargs):
        self.errors: list = []
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, ctx: self.errors.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = TransportConfig(connections=1, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=256 << 10,
                                 max_chunk_bytes=MAX_DATA, receive_budget_bytes=64 << 20, idle_timeout=1.0,
                                 handshake_timeout=2.0)
        self.config = config

        async def make():
            server = TransferServer(config, [FP], **kwargs)
            await server.start()
            return server

        self.server = self.run(make())
        self.port = self.server.address[1]

    def run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def thread_errors():
    errors = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args)
    yield errors
    threading.excepthook = previous


def _serve(thread_errors, secret):
    lt = LoopThread(secret=secret)
    yield lt
    lt.close()
    assert not lt.errors and not thread_errors  # no error escaped to the loop or killed a thread


@pytest.fixture(scope="module")
def secret_receiver(thread_errors):
    yield from _serve(thread_errors, b"s3cret")


@pytest.fixture(scope="module")
def open_receiver(thread_errors):
    yield from _serve(thread_errors, None)


@pytest.fixture(params=["secret", "open"])
def receiver(request):
    return request.getfixturevalue(f"{request.param}_receiver")


def _frame(ftype, tid=0, stream=0, offset=0, body=b""):
    head, view = make_frame(ftype, tid, stream, offset, body)
    return head + bytes(view)


def _exchange(port, payload: bytes, marker: int | None = None):
    """Send ``payload`` (then a marker BEGIN, if given), half-close, and read every reply frame."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    replies, buf = [], b""
    try:
        try:
            sock.sendall(payload + (_frame(FrameType.BEGIN, marker, body=hs.encode({"parts": 0, "chunk": 4096,
                                                                                   "meta": {}}))
                                    if marker is not None else b""))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # closed by the receiver already: still read what it said
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
    finally:
        sock.close()
    while len(buf) >= HEADER_SIZE:
        header = parse_header(buf[:HEADER_SIZE], MAX_CONTROL_BODY)  # receivers send only well-formed frames
        body = buf[HEADER_SIZE: HEADER_SIZE + header.length]
        replies.append((header, body))
        buf = buf[HEADER_SIZE + header.length:]
    assert not buf, "a truncated frame from the receiver"
    return replies


valid_hello = {"v": 1, "session": "ab" * 16, "conn": 0, "fingerprint": FP.hex(), "nonce": "cd" * 16}
hello_bodies = st.one_of(
    st.fixed_dictionaries({k: st.one_of(st.just(v), json_value) for k, v in valid_hello.items()},
                          optional={"key": json_value, "extra": json_value}).map(hs.encode),
    json_value.map(hs.encode), st.binary(max_size=200))
mac_texts = st.text(max_size=80).map(lambda t: {"mac": t})
auth_bodies = st.one_of(mac_texts.map(hs.encode), mac_texts.map(hs.encode),
                        st.fixed_dictionaries({"mac": json_value}).map(hs.encode), st.binary(max_size=100))
random_steps = st.lists(st.one_of(
    st.tuples(st.just(FrameType.HELLO), hello_bodies),
    st.tuples(st.just(FrameType.AUTH), auth_bodies),
    st.tuples(st.sampled_from(list(FrameType)), st.binary(max_size=64)),
    st.binary(min_size=1, max_size=80)), min_size=1, max_size=4)


@st.composite
def mostly_valid_handshakes(draw):
    """A HELLO with at most two fields dropped or replaced, an AUTH with a mutated MAC, and maybe
    more frames: reaches the receiver's deeper handshake paths far more often than random frames."""
    hello = dict(valid_hello)
    keys = st.lists(st.sampled_from([*valid_hello, "key", "extra"]), min_size=1, max_size=2, unique=True)
    for key in draw(st.one_of(st.just([]), keys)):
        if draw(st.booleans()):
            hello.pop(key, None)
        else:
            hello[key] = draw(json_value)
    return [(FrameType.HELLO, hs.encode(hello)), (FrameType.AUTH, draw(auth_bodies)),
            *draw(st.lists(st.one_of(st.tuples(st.sampled_from(list(FrameType)), st.binary(max_size=64)),
                                     st.binary(min_size=1, max_size=80)), max_size=2))]


handshake_steps = st.one_of(mostly_valid_handshakes(), mostly_valid_handshakes(), random_steps)


def _check_replies(replies):
    for header, body in replies:
        assert header.type in (FrameType.CHALLENGE, FrameType.ACCEPT, FrameType.ERROR, FrameType.END,
                               FrameType.ACK, FrameType.NACK, FrameType.CANCEL), header
        if header.type is FrameType.ERROR:
            obj = json.loads(body)
            assert obj["code"] in hs.ERROR_TYPES, obj
            assert isinstance(hs.error_from_body(body), KvlinkError)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=handshake_steps)
@example(steps=[(FrameType.HELLO, hs.encode(valid_hello)), (FrameType.AUTH, hs.encode({"mac": "\u00e9" * 64}))])
def test_mutated_handshakes_get_a_typed_answer_or_a_disconnect(receiver, steps):
    payload = b"".join(s if isinstance(s, bytes) else _frame(s[0], body=s[1]) for s in steps)
    _check_replies(_exchange(receiver.port, payload))
    assert not receiver.errors


tids = st.sampled_from([1, 2, 3, 2**64 - 1])
control_bodies = st.one_of(
    st.fixed_dictionaries({}, optional={"parts": json_value, "chunk": st.one_of(st.just(16384), json_value),
                                        "meta": json_value, "length": json_value}).map(hs.encode),
    st.fixed_dictionaries({"parts": st.lists(st.lists(st.integers(-2, 2**40), max_size=3), max_size=8)}).map(hs.encode),
    st.binary(max_size=64))
after_handshake = st.lists(st.one_of(
    st.tuples(st.sampled_from(list(FrameType)), tids, u32, st.just(0), control_bodies),
    st.tuples(st.just(FrameType.DATA), tids, st.integers(0, 3), st.integers(0, 4).map(lambda k: k * 16384),
              st.binary(max_size=300))), min_size=1, max_size=8)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(frames=after_handshake)
def test_mutated_control_frames_refuse_only_their_transfer(open_receiver, frames):
    receiver = open_receiver
    hello = _frame(FrameType.HELLO, body=hs.encode({**valid_hello, "session": os.urandom(16).hex()}))
    payload = hello + b"".join(_frame(t, tid, stream, offset, body) for t, tid, stream, offset, body in frames)
    marker = 2**63 + 12345
    replies = _exchange(receiver.port, payload, marker)
    _check_replies(replies)
    # Every frame was well formed: the connection (and its reader thread) carried on to the marker.
    assert any(h.type is FrameType.ERROR and h.transfer_id == marker for h, _ in replies), replies
    assert not receiver.errors


def test_a_legitimate_sender_gets_through_after_fuzzing(receiver):
    secret = receiver.server.secret
    data = os.urandom(200_000)

    async def send():
        async with TransferClient("127.0.0.1", receiver.port, FP, receiver.config, secret=secret) as client:
            await asyncio.wait_for(client.send([data]), 10)

    asyncio.run(send())
