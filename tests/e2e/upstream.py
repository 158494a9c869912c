#!/usr/bin/python3
"""The programmable upstream server of moongate's end-to-end tests.

A small threaded HTTP/1.1 server (standard library only) that tests put behind
the gateway. It is deliberately strict about what it receives, so that it can
also tell when the gateway forwards something it should not have: every
request line and header line must end in CRLF, a body is framed either by one
Content-Length or by exactly "Transfer-Encoding: chunked" (re-decoded here),
never both. Anything else is answered 400, the connection is closed and the
problem is recorded in the error counters of /__stats.

Behaviour is chosen by query parameters on any path:
  status=N        response status (default 200)
  delay=S         sleep S seconds after reading the request, before answering
  stall=S         sleep S seconds after the headers, before reading the body
  size=N          body of N bytes of a repeating pattern, streamed in 64 KiB
                  pieces, instead of the JSON description
  chunked=1       chunked response
  nolen=1         neither Content-Length nor chunking: close-delimited
  close=1         "Connection: close", then close
  hdr=Name:Value  extra response header (repeatable)
  hop=1           adds hop-by-hop response headers (Connection: X-Hop,
                  X-Hop, Keep-Alive, Proxy-Authenticate, Trailer, Upgrade)
  drain=1         the JSON carries only the body's length and sha256
  reset=1         read the request, then reset the connection (no answer)
  garbage=1       answer with bytes that are not HTTP, then close
  truncate=K      with size=N: announce N bytes, send K, close
  idle_close=S    after answering, close the connection if no next request
                  arrives within S seconds (an upstream idle timeout)
  kill_next=1     the next request on this connection is read and dropped:
                  the connection closes without an answer (an upstream that
                  closed a pooled connection just as it was reused)
  extra=1         after the response, sends a whole second, unrequested
                  response ("HTTP/1.1 200 OK ... evil") on the connection,
                  in the same send as the end of the body
  resp_cl_te=1    the response has both Content-Length and
                  Transfer-Encoding: chunked (response smuggling)
  resp_two_cl=1   the response has two different Content-Length headers
  resp_fold=1     the response has an obs-folded header line
  bighdr=N        adds a response header X-Big with N bytes of value
  early=1         answers (with Connection: close) right after the request
                  head, before reading the body; then reads and discards
                  the body and closes
  headbody=1      sends the body even for HEAD (a broken upstream)
  interim=1       sends "103 Early Hints" and "100 Continue" interim
                  responses before the final one
  ctype=TYPE      the response's Content-Type instead of the default
                  (application/octet-stream for size=, else application/json)
  legacy=N        body: a JSON array of N legacy user records ({"userId",
                  "userName", "userEmail", "profile": {...}}); legacy=one: a
                  single record
  encode=CODING   the body (JSON, legacy= or size= up to 64 MiB) is sent
                  encoded with gzip (stdlib) or br (the brotli CLI), with
                  Content-Encoding: CODING

By default the answer is JSON describing the request:
  {"method", "path" (raw request target), "version", "headers": [[name,
  value], ...] in received order, "body_len", "body_sha256", "body" (latin-1
  text, only when at most 64 KiB), "framing" ("none", "length", "chunked"),
  "chunk_lines" (the first raw chunk-size lines), "trailers", "conn_id",
  "req_on_conn", "port", "service"}

Control paths (not counted as requests):
  GET  /__stats   {"connections", "requests", "open", "errors", "error_list",
                   "dropped", "completed", "accepted", "ports": {port: requests},
                   "last"}
                  "requests" counts request heads received, "completed" those
                  whose body was read in full too.
                  "connections" counts connections that carried at least one
                  counted request (so stats probes do not count themselves);
                  "open" is how many of those are open now.
  POST /__reset   zeroes the counters ("open" stays: connections still open;
                  an open connection is counted again in "connections" when
                  it carries its next request)
  POST /__mode?hang=1|0
                  hang=1: every counted request is read and counted, then
                  never answered (the connection is held open, silent, until
                  hang=0, then closed without an answer): a hung upstream
                  that still counts what reaches it
  POST /__mode?health=N
                  requests for /health answer status N (default 200)
  "/__stats" also has "paths": {path: requests} (query left out).

Usage: upstream.py [--port P]... [--ports N] [--name NAME]
Binds 127.0.0.1 on each --port (0 = any free port; default one free port)
and on N more free ports with --ports, then prints "ready P1 P2 ..." on
stdout. Bodies are never held in memory (1 GB uploads and downloads are
fine): they are hashed as they stream.
"""

import argparse
import hashlib
import json
import re
import socket
import struct
import sys
import threading
import time
from urllib.parse import parse_qsl

PIECE = 64 * 1024
# The response-body pattern: a 61-byte unit (prime length, so a shifted or
# dropped piece shows) repeated. pattern_piece(offset, n) gives the n bytes
# of the infinite pattern that start at `offset`.
PATTERN_UNIT = b"moongate e2e body pattern: 0123456789 abcdefghijklmnopqrstuv\n"
assert len(PATTERN_UNIT) == 61
_BIG = PATTERN_UNIT * ((4 * PIECE) // len(PATTERN_UNIT) + 2)


def pattern_piece(offset, n):
    """Bytes [offset, offset + n) of the body pattern, n <= 4 * PIECE."""
    start = offset % len(PATTERN_UNIT)
    return _BIG[start:start + n]


def pattern_chunks(total, piece=PIECE):
    """Yields the pattern's first `total` bytes in pieces (never all of it)."""
    off = 0
    while off < total:
        n = min(piece, total - off)
        yield pattern_piece(off, n)
        off += n


TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
MAX_LINE = 128 * 1024
BODY_KEEP = 64 * 1024


class BadRequest(Exception):
    pass


class Closed(Exception):
    pass


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.open = 0
        self.epoch = 0   # bumped by reset: connections are counted anew
        self._zero()

    def _zero(self):
        self.connections = 0
        self.requests = 0
        self.errors = 0
        self.error_list = []
        self.dropped = 0
        self.completed = 0
        self.accepted = 0
        self.ports = {}
        self.last = []
        self.paths = {}

    def reset(self):
        with self.lock:
            self._zero()
            self.epoch += 1

    def snapshot(self):
        with self.lock:
            return {
                "connections": self.connections,
                "requests": self.requests,
                "open": self.open,
                "errors": self.errors,
                "error_list": list(self.error_list),
                "dropped": self.dropped,
                "completed": self.completed,
                "accepted": self.accepted,
                "ports": {str(k): v for k, v in self.ports.items()},
                "last": list(self.last),
                "paths": dict(self.paths),
            }

    def error(self, why):
        with self.lock:
            self.errors += 1
            self.error_list.append(why)
            del self.error_list[:-20]


STATS = Stats()
SERVICE = ""
# /__mode: the hang switch and the /health status.
MODE = {"hang": threading.Event(), "health": 200}
_conn_ids = iter(range(1, 1 << 62))
_conn_ids_lock = threading.Lock()


class Connection:
    def __init__(self, sock, port):
        self.sock = sock
        self.port = port
        self.rfile = sock.makefile("rb", buffering=256 * 1024)
        with _conn_ids_lock:
            self.id = next(_conn_ids)
        self.nreq = 0
        self.counted = False      # counted in STATS.open
        self.epoch = None         # STATS.epoch when counted in connections
        self.idle_close = None
        self.kill_next = False

    # ------------------------------------------------------------ reading

    def readline(self, what):
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            raise Closed()
        if len(line) > MAX_LINE:
            raise BadRequest("%s line too long" % what)
        if not line.endswith(b"\r\n"):
            if line.endswith(b"\n"):
                raise BadRequest("bare LF ending a %s line: %r" % (what, line[:80]))
            raise Closed()  # EOF in the middle of a line
        body = line[:-2]
        if b"\r" in body or b"\n" in body or b"\0" in body:
            raise BadRequest("CR, LF or NUL inside a %s line: %r" % (what, line[:80]))
        return body

    def read_head(self):
        if self.idle_close is not None:
            self.sock.settimeout(self.idle_close)
        try:
            first = self.rfile.readline(MAX_LINE + 1)
        except (socket.timeout, TimeoutError):
            raise Closed()
        finally:
            self.sock.settimeout(None)
        if not first:
            raise Closed()
        # Re-run the checks of readline on the first line.
        if not first.endswith(b"\r\n"):
            if first.endswith(b"\n"):
                raise BadRequest("bare LF ending the request line: %r" % first[:80])
            raise Closed()
        line = first[:-2]
        parts = line.split(b" ")
        if len(parts) != 3 or not TOKEN.match(parts[0]) or not parts[1]:
            raise BadRequest("bad request line: %r" % line[:200])
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise BadRequest("bad version: %r" % version)
        headers = []
        while True:
            h = self.readline("header")
            if h == b"":
                break
            if h[:1] in (b" ", b"\t"):
                raise BadRequest("obs-fold header line: %r" % h[:80])
            name, sep, value = h.partition(b":")
            if not sep or not TOKEN.match(name):
                raise BadRequest("bad header line: %r" % h[:80])
            headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
            if len(headers) > 1000:
                raise BadRequest("too many header fields")
        return method.decode(), target.decode("latin-1"), version.decode(), headers

    def read_body(self, headers, sink):
        """Reads the body per its framing, feeding `sink`; returns info."""
        te = [v for n, v in headers if n.lower() == "transfer-encoding"]
        cl = [v for n, v in headers if n.lower() == "content-length"]
        info = {"framing": "none", "chunk_lines": [], "trailers": []}
        if te and cl:
            raise BadRequest("both Transfer-Encoding and Content-Length")
        if te:
            if len(te) != 1 or te[0].lower() != "chunked":
                raise BadRequest("Transfer-Encoding other than chunked: %r" % te)
            info["framing"] = "chunked"
            while True:
                line = self.readline("chunk-size")
                if len(info["chunk_lines"]) < 16:
                    info["chunk_lines"].append(line.decode("latin-1"))
                size_txt = line.split(b";", 1)[0]
                if not re.match(rb"^[0-9A-Fa-f]{1,16}$", size_txt):
                    raise BadRequest("bad chunk size line: %r" % line[:80])
                size = int(size_txt, 16)
                if size == 0:
                    break
                self.read_exact(size, sink)
                if self.rfile.read(2) != b"\r\n":
                    raise BadRequest("chunk data not followed by CRLF")
            while True:
                t = self.readline("trailer")
                if t == b"":
                    break
                info["trailers"].append(t.decode("latin-1"))
            return info
        if cl:
            if len(set(cl)) != 1 or not re.match(r"^[0-9]{1,18}$", cl[0]):
                raise BadRequest("bad Content-Length: %r" % cl)
            info["framing"] = "length"
            self.read_exact(int(cl[0]), sink)
        return info

    def read_exact(self, n, sink):
        while n > 0:
            data = self.rfile.read1(min(n, 1 << 20))
            if not data:
                raise Closed()
            sink(data)
            n -= len(data)

    # ------------------------------------------------------------ writing

    @staticmethod
    def head_bytes(status, headers):
        lines = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Unknown"))]
        lines += ["%s: %s" % (n, v) for n, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send_head(self, status, headers):
        self.sock.sendall(self.head_bytes(status, headers))

    def send_json(self, status, obj, close=False):
        body = json.dumps(obj).encode()
        hdrs = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if close:
            hdrs.append(("Connection", "close"))
        self.send_head(status, hdrs)
        self.sock.sendall(body)

    # ------------------------------------------------------------ serving

    def serve(self):
        try:
            while True:
                try:
                    if not self.serve_one():
                        break
                except BadRequest as e:
                    STATS.error(str(e))
                    try:
                        self.send_json(400, {"error": "upstream: " + str(e)}, close=True)
                    except OSError:
                        pass
                    break
        except (Closed, OSError, ValueError):
            pass
        finally:
            if self.counted:
                with STATS.lock:
                    STATS.open -= 1
            try:
                self.sock.close()
            except OSError:
                pass

    def serve_one(self):
        method, target, version, headers = self.read_head()
        path, _, query = target.partition("?")
        q = parse_qsl(query, keep_blank_values=True)
        params = {}
        for k, v in q:
            params.setdefault(k, []).append(v)

        def p(name, default=None):
            return params.get(name, [default])[-1]

        if path == "/__mode":
            self.read_body(headers, lambda d: None)
            if p("hang") is not None:
                if p("hang") == "1":
                    MODE["hang"].set()
                else:
                    MODE["hang"].clear()
            if p("health") is not None:
                MODE["health"] = int(p("health"))
            self.send_json(200, {"hang": MODE["hang"].is_set(), "health": MODE["health"]})
            return True
        if path == "/__stats" or path == "/__reset":
            self.read_body(headers, lambda d: None)
            if path == "/__reset":
                STATS.reset()
                self.send_json(200, {"reset": True})
            else:
                self.send_json(200, STATS.snapshot())
            return True

        self.nreq += 1
        with STATS.lock:
            STATS.requests += 1
            STATS.ports[self.port] = STATS.ports.get(self.port, 0) + 1
            STATS.last.append("%s %s" % (method, target[:200]))
            del STATS.last[:-20]
            STATS.paths[path] = STATS.paths.get(path, 0) + 1
            if not self.counted:
                self.counted = True
                STATS.open += 1
            if self.epoch != STATS.epoch:
                self.epoch = STATS.epoch
                STATS.connections += 1

        if self.kill_next:
            with STATS.lock:
                STATS.dropped += 1
            self.read_body(headers, lambda d: None)
            raise Closed()

        if MODE["hang"].is_set():
            # Hung: silent until the switch is turned off, then closed.
            while MODE["hang"].is_set():
                time.sleep(0.05)
            raise Closed()
        if path == "/health" and MODE["health"] != 200:
            self.read_body(headers, lambda d: None)
            self.send_json(MODE["health"], {"health": MODE["health"]})
            return True
        if p("stall"):
            time.sleep(float(p("stall")))
        if p("early"):
            self.send_json(int(p("status", "200")), {"early": True, "path": target}, close=True)
            try:
                self.sock.settimeout(5)
                self.read_body(headers, lambda d: None)
            except (BadRequest, Closed, OSError):
                pass
            raise Closed()

        sha = hashlib.sha256()
        kept = bytearray()
        count = [0]

        def sink(data):
            sha.update(data)
            count[0] += len(data)
            if len(kept) < BODY_KEEP + 1:
                kept.extend(data[:BODY_KEEP + 1 - len(kept)])

        info = self.read_body(headers, sink)
        with STATS.lock:
            STATS.completed += 1

        conn_hdr = ",".join(v for n, v in headers if n.lower() == "connection").lower()
        tokens = {t.strip() for t in conn_hdr.split(",")}
        keep = ("close" not in tokens) if version == "HTTP/1.1" else ("keep-alive" in tokens)

        if p("delay"):
            time.sleep(float(p("delay")))
        if p("reset"):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise Closed()
        if p("garbage"):
            self.sock.sendall(b"THIS IS NOT HTTP AT ALL\r\n\r\n")
            raise Closed()
        if p("kill_next"):
            self.kill_next = True
        if p("idle_close"):
            self.idle_close = float(p("idle_close"))

        status = int(p("status", "200"))
        close = not keep or bool(p("close")) or bool(p("nolen"))
        extra = []
        for h in params.get("hdr", []):
            n, _, v = h.partition(":")
            extra.append((n, v))
        if p("hop"):
            extra += [("Connection", "X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "timeout=5"),
                      ("Proxy-Authenticate", "x"), ("Trailer", "X"), ("Upgrade", "foo")]
        if p("bighdr"):
            extra.append(("X-Big", "b" * int(p("bighdr"))))
        if close:
            extra.append(("Connection", "close"))

        if p("size") is not None:
            total = int(p("size"))
            ctype = "application/octet-stream"
            body_iter = pattern_chunks
        elif p("legacy") is not None:
            payload = legacy_users(p("legacy"))
            total = len(payload)
            ctype = "application/json"

            def body_iter(n, _payload=payload):
                yield _payload
        else:
            if p("drain"):
                desc = {"body_len": count[0], "body_sha256": sha.hexdigest()}
            else:
                desc = {
                    "method": method, "path": target, "version": version,
                    "headers": headers, "body_len": count[0],
                    "body_sha256": sha.hexdigest(),
                    "framing": info["framing"], "chunk_lines": info["chunk_lines"],
                    "trailers": info["trailers"], "conn_id": self.id,
                    "req_on_conn": self.nreq, "port": self.port, "service": SERVICE,
                }
                if count[0] <= BODY_KEEP:
                    desc["body"] = bytes(kept).decode("latin-1")
            payload = json.dumps(desc).encode()
            total = len(payload)
            ctype = "application/json"

            def body_iter(n, _payload=payload):
                yield _payload

        if p("ctype") is not None:
            ctype = p("ctype")
        if p("encode"):
            payload = encode_body(b"".join(body_iter(total)), p("encode"))
            total = len(payload)

            def body_iter(n, _payload=payload):
                for i in range(0, len(_payload), PIECE):
                    yield _payload[i:i + PIECE]
            extra.append(("Content-Encoding", p("encode")))
        no_body_status = status < 200 or status in (204, 304)
        hdrs = [("Content-Type", ctype)]
        framing = "length"
        if p("resp_cl_te") or p("resp_two_cl") or p("resp_fold"):
            # Deliberately broken framing: the body is sent chunked after a
            # head that makes its length ambiguous.
            if p("resp_cl_te"):
                hdrs += [("Content-Length", str(total)), ("Transfer-Encoding", "chunked")]
            elif p("resp_two_cl"):
                hdrs += [("Content-Length", str(total)), ("Content-Length", str(total + 5))]
            else:
                hdrs += [("Content-Length", str(total)), ("X-Folded", "a\r\n b")]
            self.send_head(status, hdrs + extra)
            if p("resp_cl_te"):
                for piece in body_iter(total):
                    self.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.sock.sendall(b"0\r\n\r\n")
            else:
                for piece in body_iter(total):
                    self.sock.sendall(piece)
            raise Closed()
        if no_body_status:
            framing = "none"
        elif p("chunked"):
            framing = "chunked"
            hdrs.append(("Transfer-Encoding", "chunked"))
        elif p("nolen"):
            framing = "close"
        else:
            hdrs.append(("Content-Length", str(total)))
        if p("interim"):
            self.sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                              b"HTTP/1.1 100 Continue\r\n\r\n")
        if (p("extra") or p("headbody")) and framing == "length":
            # A broken upstream's stray bytes go out in the same write as
            # the response they follow, so they reach the gateway with it:
            # that is what a proxy can detect and must refuse to reuse.
            # (Stray bytes sent later, after the gateway reused the
            # connection, look exactly like the next response: no HTTP/1.1
            # proxy can tell them apart, so the test does not pretend to.)
            data = self.head_bytes(status, hdrs + extra) + b"".join(body_iter(total))
            if p("extra"):
                data += (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: 4\r\n\r\nevil")
            self.sock.sendall(data)
            return not close
        self.send_head(status, hdrs + extra)
        if (method == "HEAD" and not p("headbody")) or no_body_status:
            return not close
        limit = int(p("truncate")) if p("truncate") is not None else None
        # extra=1: the unrequested response goes out in the same send as the
        # end of the body, so it is in the peer's socket buffer together
        # with it (no scheduling gap between the two).
        tail = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 4\r\n\r\nevil") if p("extra") else b""
        if framing == "chunked":
            tail = b"0\r\n\r\n" + tail
        sent = 0
        pieces = body_iter(total)
        piece = next(pieces, None)
        while piece is not None:
            following = next(pieces, None)
            if limit is not None and sent + len(piece) > limit:
                self.sock.sendall(piece[:limit - sent])
                raise Closed()
            if framing == "chunked":
                data = b"%x\r\n%s\r\n" % (len(piece), piece)
            else:
                data = piece
            self.sock.sendall(data + tail if following is None else data)
            sent += len(piece)
            piece = following
        if sent == 0 and tail:
            self.sock.sendall(tail)
        return not close


def legacy_users(which):
    """The seed's legacy user records, as JSON bytes (legacy=N or one)."""
    def user(i):
        return {"userId": i, "userName": "User %d" % i, "userEmail": "u%d@example.com" % i,
                "profile": {"userId": i, "tags": ["t%d" % i], "empty": []}}
    if which == "one":
        return json.dumps(user(1)).encode()
    return json.dumps([user(i) for i in range(1, int(which) + 1)]).encode()


def encode_body(data, coding):
    """`data` compressed with gzip (stdlib) or br (the brotli CLI)."""
    if coding == "gzip":
        import gzip
        return gzip.compress(data)
    if coding == "br":
        import subprocess
        return subprocess.run(["brotli", "-c", "-q", "5"], input=data, check=True,
                              capture_output=True, timeout=60).stdout
    raise BadRequest("unknown encode=%s" % coding)


REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
    301: "Moved Permanently", 302: "Found", 304: "Not Modified", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 418: "I'm a teapot",
    429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


def accept_loop(lsock, port):
    while True:
        try:
            sock, _ = lsock.accept()
        except OSError:
            continue
        with STATS.lock:
            STATS.accepted += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = threading.Thread(target=Connection(sock, port).serve, daemon=True)
        t.start()


def main():
    global SERVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, action="append", default=[])
    ap.add_argument("--ports", type=int, default=0, help="this many more free ports")
    ap.add_argument("--name", default="", help="reported as \"service\" in the JSON")
    args = ap.parse_args()
    SERVICE = args.name
    ports = args.port + [0] * args.ports
    if not ports:
        ports = [0]
    socks = []
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1024)
        socks.append(s)
    bound = [s.getsockname()[1] for s in socks]
    for s, port in zip(socks, bound):
        threading.Thread(target=accept_loop, args=(s, port), daemon=True).start()
    sys.stdout.write("ready %s\n" % " ".join(map(str, bound)))
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
