"""Socket framing: how messages and blobs travel on a worker's control socket.

A message is an 8-byte little-endian length, then a pickle; file descriptors
(SCM_RIGHTS) ride on its first byte. A blob (a record too large for the
result ring) is the same length prefix, then raw bytes.
"""
import array
import pickle
import socket
import struct

_LEN = struct.Struct("<Q")


def frame(obj):
    """One message as bytes (for a queue that sends it later, without blocking)."""
    body = pickle.dumps(obj, 5)
    return _LEN.pack(len(body)) + body


def send_nowait(sock, data, fds=()):
    """Send what the socket takes now, without blocking; returns bytes sent
    (the fds go with the first byte). Raises BlockingIOError if nothing fits."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    return sock.sendmsg([data], anc, socket.MSG_DONTWAIT)


def send_msg(sock, obj, fds=()):
    """Send one message (blocking), with `fds` riding on its first byte."""
    body = pickle.dumps(obj, 5)
    data = _LEN.pack(len(body)) + body
    if fds:
        n = socket.send_fds(sock, [data], list(fds))
        if n < len(data):
            sock.sendall(data[n:])
    else:
        sock.sendall(data)


def recv_exact(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("pmaprt: control socket closed")
        got += k
    return buf


def recv_msg(sock):
    """(obj, fds) from a peer's send_msg."""
    data, fds, _flags, _addr = socket.recv_fds(sock, _LEN.size, 16)
    if not data:
        raise EOFError("pmaprt: control socket closed")
    if len(data) < _LEN.size:
        data = bytes(data) + bytes(recv_exact(sock, _LEN.size - len(data)))
    (n,) = _LEN.unpack(data)
    return pickle.loads(recv_exact(sock, n)), fds


def send_blob(sock, data):
    sock.sendall(_LEN.pack(len(data)))
    sock.sendall(data)


def recv_blob(sock):
    (n,) = _LEN.unpack(recv_exact(sock, _LEN.size))
    return recv_exact(sock, n)
