"""A small WebSocket (RFC 6455) implementation for the tests, standard
library only, shared by the client side (cdp.py's DevTools client,
test_websocket.py) and the echo upstream (ws_upstream.py): the handshake
key, frames (masked or not, any length, text/binary/control), and a
client over any connected socket (plain or TLS). No extensions, no
fragmented sends (fragmented frames are reassembled on receipt).
"""

import base64
import hashlib
import os
import socket
import struct
import time
import urllib.parse

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class WSError(Exception):
    pass


def accept_key(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def apply_mask(payload, mask):
    """XOR with the 4-byte mask, fast for large payloads (big-int XOR)."""
    n = len(payload)
    if n == 0:
        return b""
    reps = (n + 3) // 4
    m = int.from_bytes((mask * reps)[:n], "big")
    return (int.from_bytes(payload, "big") ^ m).to_bytes(n, "big")


def encode_frame(opcode, payload, masked, fin=True):
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    mbit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if masked:
        mask = os.urandom(4)
        return head + mask + apply_mask(payload, mask)
    return head + payload


class FrameReader:
    """Frames from a byte source: read(n) returns exactly n bytes or
    raises."""

    def __init__(self, read):
        self.read = read

    def frame(self):
        """(fin, opcode, payload, was_masked)."""
        b0, b1 = self.read(2)
        fin, opcode, n = bool(b0 & 0x80), b0 & 0x0F, b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.read(8))[0]
        mask = self.read(4) if b1 & 0x80 else None
        payload = self.read(n) if n else b""
        if mask:
            payload = apply_mask(payload, mask)
        return fin, opcode, payload, mask is not None


class WebSocket:
    """A client WebSocket over a connected socket `sock` (plain or TLS).

    WebSocket(sock, host, path, headers) sends the handshake; a refused
    one raises WSError with .status and .head. WebSocket.connect(url) opens
    the socket itself (ws:// only)."""

    def __init__(self, sock, host, path="/", headers=None, timeout=10):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buf = b""
        self.key = base64.b64encode(os.urandom(16)).decode()
        lines = ["GET %s HTTP/1.1" % path, "Host: %s" % host, "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Key: %s" % self.key,
                 "Sec-WebSocket-Version: 13"]
        for k, v in (headers or {}).items():
            lines.append("%s: %s" % (k, v))
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise WSError("connection closed during the WebSocket handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        if not lines[0].startswith("HTTP/1.1 101"):
            e = WSError("WebSocket handshake refused: %s" % lines[0])
            e.status = int(lines[0].split()[1])
            e.head = head
            e.rest = self.buf
            raise e
        if self.headers.get("sec-websocket-accept") != accept_key(self.key):
            raise WSError("bad Sec-WebSocket-Accept %r" % self.headers.get("sec-websocket-accept"))
        self.reader = FrameReader(self._read)
        self.deadline = None

    @classmethod
    def connect(cls, url, timeout=10, headers=None):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "ws":
            raise ValueError("only ws:// URLs: %r" % url)
        sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
        path = (u.path or "/") + ("?" + u.query if u.query else "")
        try:
            return cls(sock, "%s:%d" % (u.hostname, u.port or 80), path, headers, timeout)
        except BaseException:
            sock.close()
            raise

    def _read(self, n):
        while len(self.buf) < n:
            left = self.deadline - time.monotonic() if self.deadline else None
            if left is not None and left <= 0:
                raise TimeoutError("WebSocket read timed out")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(max(65536, n - len(self.buf)))
            except socket.timeout:
                raise TimeoutError("WebSocket read timed out") from None
            if not chunk:
                raise WSError("WebSocket closed by the peer")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, opcode, payload):
        self.sock.sendall(encode_frame(opcode, payload, masked=True))

    def send_text(self, text):
        self.send(TEXT, text.encode("utf-8"))

    def recv_message(self, timeout=10):
        """(opcode, payload) of the next data message, reassembled; pings
        are answered, pongs skipped; a close frame raises WSError with
        .close_code."""
        self.deadline = time.monotonic() + timeout
        parts, first = [], None
        while True:
            fin, opcode, payload, masked = self.reader.frame()
            if masked:
                raise WSError("masked frame from the server")
            if opcode == PING:
                self.send(PONG, payload)
                continue
            if opcode == PONG:
                continue
            if opcode == CLOSE:
                e = WSError("WebSocket closed by the peer")
                e.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise e
            if opcode not in (0x0, TEXT, BINARY):
                raise WSError("unexpected WebSocket opcode %d" % opcode)
            if first is None:
                first = opcode
            parts.append(payload)
            if fin:
                return first, b"".join(parts)

    def recv_frame(self, timeout=10):
        """The next frame as is: (fin, opcode, payload)."""
        self.deadline = time.monotonic() + timeout
        fin, opcode, payload, _ = self.reader.frame()
        return fin, opcode, payload

    def recv_text(self, timeout):
        opcode, payload = self.recv_message(timeout)
        if opcode != TEXT:
            raise WSError("expected a text message, got opcode %d" % opcode)
        return payload.decode("utf-8")

    def close(self, code=1000):
        try:
            self.send(CLOSE, struct.pack("!H", code))
        except OSError:
            pass
        self.sock.close()
