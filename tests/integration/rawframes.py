"""A hostile or hand-driven peer's side of the transport: raw frames over a plain socket."""

from kvlink.transport.frame import HEADER_SIZE, make_frame, parse_header


def send_frame(sock, ftype, tid=0, stream=0, offset=0, body=b""):
    head, view = make_frame(ftype, tid, stream, offset, body)
    sock.sendall(head + bytes(view))


def read_frame(sock):
    """The next frame as (header, body), or (None, b"") at EOF or reset."""
    head = b""
    while len(head) < HEADER_SIZE:
        try:
            chunk = sock.recv(HEADER_SIZE - len(head))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None, b""
        head += chunk
    header = parse_header(head, 1 << 30)
    body = b""
    while len(body) < header.length:
        body += sock.recv(header.length - len(body))
    return header, body
