#!/usr/bin/python3
"""A WebSocket echo upstream for moongate's end-to-end tests (stdlib only,
one thread per connection).

  ws_upstream.py [--tls CERT KEY]     prints "ready PORT" once listening

An upgrade request (Connection: upgrade + Upgrade) is answered by protocol:
  Upgrade: websocket  RFC 6455 handshake (Sec-WebSocket-Accept), then echoes
                      text and binary messages (reassembled), answers pings
                      with pongs, and answers a close frame with a close
                      frame and a close of the connection
  Upgrade: <other>    "101 Switching Protocols" with the same Upgrade, then
                      echoes raw bytes until the client's EOF, then shuts
                      down its own side (a half-close, echoed)

Query parameters of an upgrade request:
  refuse=N        answer N (a small JSON body, Connection: close) instead
  greet=1         send a text frame "hello" in the same send as the 101 head
  close_after=N   after echoing N messages, send a close frame (1001) and
                  close the connection
  silent=1        after the 101, read and discard, never answer

Any other request (no upgrade):
  GET /__stats    {"handshakes", "open", "closed", "last_headers",
                   "messages", "requests"}: connections still open, closed
                  (the client's EOF or a reset seen), the last upgrade
                  request's headers as [name, value] pairs
  anything else   200 with {"upgrade": null, "headers": [...]} (the
                  request's headers) and Connection: close
"""

import json
import socket
import ssl
import struct
import sys
import threading
import urllib.parse

sys.path.insert(0, __import__("os").path.dirname(__file__))
from mgws import BINARY, CLOSE, PING, PONG, TEXT, FrameReader, accept_key, encode_frame  # noqa

lock = threading.Lock()
stats = {"handshakes": 0, "open": 0, "closed": 0, "last_headers": [], "messages": 0,
         "requests": 0}


def bump(k, n=1):
    with lock:
        stats[k] += n


class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def fill(self):
        chunk = self.sock.recv(262144)
        if not chunk:
            raise EOFError()
        self.buf += chunk

    def read(self, n):
        while len(self.buf) < n:
            self.fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self):
        while b"\r\n\r\n" not in self.buf:
            self.fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append([k.strip(), v.strip()])
        return method, target, headers


def hget(headers, name):
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def answer(c, status, obj):
    body = json.dumps(obj).encode()
    c.sock.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (status, len(body)) + body)


def websocket(c, key, q):
    head = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept_key(key)).encode()
    if q.get("greet"):
        head += encode_frame(TEXT, b"hello", masked=False)
    c.sock.sendall(head)
    if q.get("silent"):
        while True:
            c.buf = b""
            c.fill()
    limit = int(q.get("close_after", 0))
    reader = FrameReader(c.read)
    parts, first, echoed = [], None, 0
    while True:
        fin, opcode, payload, masked = reader.frame()
        if not masked:
            raise ValueError("unmasked client frame")
        if opcode == PING:
            c.sock.sendall(encode_frame(PONG, payload, masked=False))
            continue
        if opcode == PONG:
            continue
        if opcode == CLOSE:
            c.sock.sendall(encode_frame(CLOSE, payload[:2], masked=False))
            return
        if first is None:
            first = opcode
        parts.append(payload)
        if not fin:
            continue
        c.sock.sendall(encode_frame(first, b"".join(parts), masked=False))
        parts, first = [], None
        echoed += 1
        bump("messages")
        if limit and echoed >= limit:
            c.sock.sendall(encode_frame(CLOSE, struct.pack("!H", 1001), masked=False))
            return


def raw_echo(c, proto):
    c.sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\n"
                    "Connection: Upgrade\r\n\r\n" % proto).encode())
    if c.buf:
        c.sock.sendall(c.buf)
        c.buf = b""
    while True:
        try:
            chunk = c.sock.recv(65536)
        except ssl.SSLZeroReturnError:
            chunk = b""
        if not chunk:
            break
        c.sock.sendall(chunk)
    try:
        if isinstance(c.sock, ssl.SSLSocket):
            c.sock = c.sock.unwrap()
        c.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    # Wait for the gateway to close its side.
    try:
        while c.sock.recv(65536):
            pass
    except OSError:
        pass


def serve(sock, ctx):
    try:
        if ctx:
            sock = ctx.wrap_socket(sock, server_side=True)
        c = Conn(sock)
        method, target, headers = c.read_head()
        q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(target).query))
        up = hget(headers, "upgrade")
        conn_hdr = (hget(headers, "connection") or "").lower()
        if not up or "upgrade" not in conn_hdr:
            bump("requests")
            if target.startswith("/__stats"):
                with lock:
                    answer(c, 200, dict(stats))
            else:
                answer(c, 200, {"upgrade": None, "headers": headers})
            return
        with lock:
            stats["last_headers"] = headers
        if q.get("refuse"):
            answer(c, int(q["refuse"]), {"refused": True})
            return
        bump("handshakes")
        bump("open")
        try:
            if up.lower() == "websocket":
                websocket(c, hget(headers, "sec-websocket-key"), q)
            else:
                raw_echo(c, up)
        except (EOFError, OSError):
            pass
        finally:
            bump("open", -1)
            bump("closed")
    except (EOFError, OSError, ValueError):
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


def main():
    ctx = None
    if len(sys.argv) == 4 and sys.argv[1] == "--tls":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    print("ready %d" % srv.getsockname()[1], flush=True)
    while True:
        s, _ = srv.accept()
        threading.Thread(target=serve, args=(s, ctx), daemon=True).start()


if __name__ == "__main__":
    main()
