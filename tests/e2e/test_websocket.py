"""WebSocket and other Upgrade pass-through on HTTP/1.1, end to end: the
real binary between real clients (mgws.py's WebSocket client, raw sockets)
and a real WebSocket echo upstream (ws_upstream.py, its own process).

Echo of 1,000 messages of varied sizes, plain and over TLS (listener and
upstream), plugins on the handshake (jwt-auth 401, rate-limit 429), the
idle timeout, refused upgrades, h2c never passed on, closes on either side,
bytes sent with the handshake on either side, a raw non-WebSocket upgrade
with a half-close, a reload under an open tunnel, the log phase, access log
and metrics of a tunnel."""

import json
import signal
import os
import random
import socket
import ssl
import struct
import subprocess
import tempfile
import time

from harness import (PYTHON, Client, Gateway, Raw, _readline_timeout, free_port, request,
                     moongate_bin, route, rss_kb, spawn, upstream_conf, wait_until)
from mgws import BINARY, TEXT, WebSocket, WSError, encode_frame
from test_auth import JWT_CONF, bearer, claims, jwt
from test_tls import make_pki

HERE = os.path.dirname(os.path.abspath(__file__))


class WsUpstream:
    """tests/e2e/ws_upstream.py as a subprocess (TLS with cert/key)."""

    def __init__(self, cert=None, key=None):
        self.tls = (cert, key) if cert else None
        self.proc = None

    def __enter__(self):
        argv = [PYTHON, os.path.join(HERE, "ws_upstream.py")]
        if self.tls:
            argv += ["--tls", self.tls[0], self.tls[1]]
        self.proc = spawn(argv, "ws upstream", stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        line = _readline_timeout(self.proc.stdout, 10)
        assert line.startswith(b"ready "), line
        self.port = int(line.split()[1])
        self.addr = "127.0.0.1:%d" % self.port
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        return False

    def stats(self):
        r = request(self.port, "GET", "/__stats", timeout=10)
        assert r.status == 200, r
        return r.json()


def config(up, routes=None, **extra):
    conf = {"upstreams": {"ws": upstream_conf(up.addr)},
            "routes": routes or [route("/ws/*", upstream="ws")]}
    conf.update(extra)
    return conf


def ws(gw, path="/ws/echo", headers=None, sock=None, timeout=10):
    sock = sock or socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    try:
        return WebSocket(sock, "127.0.0.1:%d" % gw.port, path, headers, timeout)
    except BaseException:
        sock.close()
        raise


def refused(gw, path, headers=None):
    try:
        w = ws(gw, path, headers)
    except WSError as e:
        return e
    w.close()
    raise AssertionError("handshake on %s was not refused" % path)


def sizes(n=1000, seed=7):
    """1,000 sizes from 1 B to 64 KiB, small ones most often, a few at the
    top: more than 1 MiB in all."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        r = rnd.random()
        out.append(rnd.randint(1, 125) if r < 0.6 else rnd.randint(126, 4096) if r < 0.9
                   else rnd.randint(4097, 65536))
    out[:4] = [1, 125, 126, 65536]
    assert sum(out) > 1 << 20
    return out


def echo_many(w, n=1000, window=8):
    """Sends n messages (text and binary alternately, varied sizes) with up
    to `window` in flight, checks each echo; returns the bytes sent."""
    rnd = random.Random(11)
    msgs = []
    for i, size in enumerate(sizes(n)):
        if i % 2:
            msgs.append((BINARY, rnd.randbytes(size)))
        else:
            msgs.append((TEXT, ("%d:" % i + "x" * size)[:size].encode()))
    sent = got = 0
    while got < n:
        while sent < n and sent - got < window:
            w.send(*msgs[sent])
            sent += 1
        opcode, payload = w.recv_message(timeout=20)
        assert (opcode, payload) == msgs[got], \
            "message %d: got opcode %d, %d bytes" % (got, opcode, len(payload))
        got += 1
    return sum(len(m[1]) for m in msgs)


def test_websocket_echo_1000_messages():
    admin = free_port()
    with WsUpstream() as up, Gateway(config(up, admin={"listen": "127.0.0.1:%d" % admin},
                                            access_log="@DIR@/access.log")) as gw:
        w = ws(gw, headers={"Sec-WebSocket-Protocol": "chat", "X-Mine": "1"})
        assert w.status_line.startswith("HTTP/1.1 101"), w.status_line
        assert w.headers.get("x-request-id"), w.headers
        assert w.headers["upgrade"].lower() == "websocket"
        total = echo_many(w)
        # The handshake reached the upstream with its WebSocket headers
        # untouched and the hop-by-hop pair rebuilt.
        hs = {k.lower(): v for k, v in up.stats()["last_headers"]}
        assert hs["upgrade"] == "websocket" and hs["connection"] == "upgrade", hs
        assert hs["sec-websocket-protocol"] == "chat" and hs["sec-websocket-version"] == "13"
        assert hs["sec-websocket-key"] == w.key and hs["x-mine"] == "1"
        assert hs["x-request-id"] == w.headers["x-request-id"]
        # Ping answered through the tunnel.
        w.sock.sendall(encode_frame(0x9, b"are you there", masked=True))
        fin, opcode, payload = w.recv_frame()
        assert (opcode, payload) == (0xA, b"are you there")
        text = request(admin, "GET", "/metrics").body.decode()
        assert "moongate_active_tunnels 1" in text, text
        w.close()
        w.sock.close()
        wait_until(lambda: up.stats()["closed"] == 1, 10, what="the upstream side to close")
        # One access log line for the whole tunnel: 101, bytes both ways.
        log = os.path.join(gw.dir, "access.log")
        line = wait_until(lambda: open(log).read().strip() or None, 10, what="an access log line")
        rec = json.loads(line.splitlines()[-1])
        assert rec["status"] == 101, rec
        assert rec["bytes_in"] > total and rec["bytes_out"] > total, rec
        m = request(admin, "GET", "/metrics")
        text = m.body.decode()
        assert "moongate_upgrades_total 1" in text, text
        assert "moongate_active_tunnels 0" in text, text


test_websocket_echo_1000_messages.timeout = 120


def test_websocket_over_tls_listener_and_tls_upstream():
    d = tempfile.mkdtemp(prefix="mg-ws-tls-")
    certs, ca = make_pki(d)
    cert, key = certs["localhost"]
    tls_port = free_port()
    with WsUpstream(cert, key) as up:
        text = """return {
  listen = { "@LISTEN@", { "127.0.0.1:%d", tls = { cert = "%s", key = "%s" } } },
  workers = 1, pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  upstreams = { ws = { targets = { "https://127.0.0.1:%d" },
                       tls = { ca = "%s", sni = "localhost" } } },
  routes = { { path = "/ws/*", upstream = "ws" } },
}
""" % (tls_port, cert, key, up.port, ca)
        with Gateway(text) as gw:
            ctx = ssl.create_default_context(cafile=ca)
            raw = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
            sock = ctx.wrap_socket(raw, server_hostname="localhost")
            w = WebSocket(sock, "localhost:%d" % tls_port, "/ws/tls")
            echo_many(w)
            # The plain listener reaches the same TLS upstream.
            w2 = ws(gw)
            w2.send(TEXT, b"plain to tls")
            assert w2.recv_message() == (TEXT, b"plain to tls")
            w2.close()
            w.close()


test_websocket_over_tls_listener_and_tls_upstream.timeout = 150


def test_jwt_route_refuses_handshake_without_token():
    with WsUpstream() as up, Gateway(config(up, routes=[
            route("/ws/*", upstream="ws", plugins={"jwt-auth": JWT_CONF})])) as gw:
        e = refused(gw, "/ws/private")
        assert e.status == 401, e.head
        body = e.rest.decode()
        assert json.loads(body[body.index("{"):])["error"], body
        assert b"connection: close" in e.head.lower()
        st = up.stats()
        assert st["handshakes"] == 0 and st["last_headers"] == [], st
        token = jwt(claims(), kid="hs-1")
        w = ws(gw, "/ws/private", headers=dict(bearer(token)))
        for i in range(20):
            w.send_text("msg %d" % i)
            assert w.recv_text(10) == "msg %d" % i
        w.close()
        assert up.stats()["handshakes"] == 1


def test_rate_limit_applies_to_handshakes():
    with WsUpstream() as up, Gateway(config(up, shared={"limits": "1m"}, routes=[
            route("/ws/*", upstream="ws",
                  plugins={"rate-limit": {"limit": 3, "window": 60}})])) as gw:
        open_ = [ws(gw) for _ in range(3)]
        e = refused(gw, "/ws/x")
        assert e.status == 429, e.head
        for w in open_:  # the admitted ones keep working
            w.send_text("still here")
            assert w.recv_text(10) == "still here"
            w.close()
        assert up.stats()["handshakes"] == 3


def test_idle_timeout_closes_silent_tunnel_only():
    with WsUpstream() as up, Gateway(config(up, routes=[
            route("/ws/*", upstream="ws", timeouts={"tunnel_idle": 1})])) as gw:
        silent = ws(gw)
        busy = ws(gw)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:
            busy.send_text("tick")
            assert busy.recv_text(10) == "tick"
            time.sleep(0.3)
        # The silent one was cut after about a second of nothing.
        silent.sock.settimeout(5)
        assert silent.sock.recv(100) == b""
        gw.wait_log(r"tunnel GET /ws/echo: idle for 1000 ms, closed")
        busy.send_text("after")
        assert busy.recv_text(10) == "after"
        busy.close()
        wait_until(lambda: up.stats()["open"] == 0, 10, what="upstream sides closed")


def test_upstream_refusal_reaches_client_and_connection_closes():
    with WsUpstream() as up, Gateway(config(up)) as gw:
        with Client(gw.port) as c:
            # The bytes after the refused handshake must not be taken as a
            # second request.
            c.send(b"GET /ws/x?refuse=403 HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                   b"Upgrade: websocket\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"
                   b"Sec-WebSocket-Version: 13\r\n\r\n"
                   b"GET /ws/smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
            r = c.read_response()
            assert r.status == 403 and r.json() == {"refused": True}, r
            assert r.header("connection") == "close"
            c.wait_closed()
        st = up.stats()
        assert st["requests"] == 1, st  # the /__stats itself: no smuggled request


def test_upgrade_with_body_is_refused():
    with WsUpstream() as up, Gateway(config(up)) as gw:
        r = request(gw.port, "GET", "/ws/x", headers=[("Connection", "Upgrade"),
                                                     ("Upgrade", "websocket")], body=b"abc")
        assert r.status == 400 and r.json()["error"] == "upgrade request with a body", r
        assert up.stats()["handshakes"] == 0


def test_h2c_upgrade_is_not_passed_on():
    with WsUpstream() as up, Gateway(config(up)) as gw:
        with Client(gw.port) as c:
            c.send(b"GET /ws/h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                   b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
            r = c.read_response()
            assert r.status == 200, r
            seen = {k.lower(): v for k, v in r.json()["headers"]}
            assert "upgrade" not in seen and "http2-settings" not in seen, seen
            assert "upgrade" not in seen.get("connection", "").lower(), seen
            assert r.header("connection") == "close"
            c.wait_closed()
        # HTTP/1.0 has no protocol switch: a plain request too.
        with Client(gw.port) as c:
            c.send(b"GET /ws/old HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            r = c.read_response()
            assert r.status == 200, r
            seen = {k.lower(): v for k, v in r.json()["headers"]}
            assert "upgrade" not in seen, seen
            c.wait_closed()
        assert up.stats()["handshakes"] == 0


def test_raw_upgrade_tunnels_bytes_and_half_close():
    with WsUpstream() as up, Gateway(config(up)) as gw:
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        # Bytes of the new protocol in the same send as the request head.
        s.sendall(b"POST /ws/raw HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n"
                  b"Upgrade: foo/1\r\nContent-Length: 0\r\n\r\nearly bytes|")
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        head, rest = buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"\r\nUpgrade: foo/1" in head and b"\r\nConnection: upgrade" in head, head
        data = bytes(random.Random(3).randbytes(3 << 20))
        want = b"early bytes|" + data
        got = bytearray(rest)

        def reader():
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    return
                got.extend(chunk)

        import threading
        t = threading.Thread(target=reader)
        t.start()
        for i in range(0, len(data), 100000):
            s.sendall(data[i:i + 100000])
        s.shutdown(socket.SHUT_WR)  # half-close: the echo still comes back
        t.join(30)
        assert not t.is_alive()
        assert bytes(got) == want, (len(got), len(want))
        s.close()
        wait_until(lambda: up.stats()["open"] == 0, 10, what="the upstream side to close")


def test_upstream_bytes_after_101_and_upstream_close():
    with WsUpstream() as up, Gateway(config(up)) as gw:
        w = ws(gw, "/ws/x?greet=1&close_after=2")
        assert w.recv_message() == (TEXT, b"hello")  # sent with the 101 head
        w.send_text("one")
        assert w.recv_text(10) == "one"
        w.send_text("two")
        assert w.recv_text(10) == "two"
        try:
            w.recv_message()
            raise AssertionError("no close frame")
        except WSError as e:
            assert e.close_code == 1001
        w.sock.settimeout(5)
        assert w.sock.recv(10) == b""  # and the connection closes
        w.sock.close()


def test_client_vanishing_closes_upstream():
    with WsUpstream() as up, Gateway(config(up)) as gw:
        for i in range(5):
            w = ws(gw, "/ws/x?silent=1")
            w.send(BINARY, os.urandom(1000))
            if i % 2:
                # A reset rather than a FIN.
                w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.sock.close()
        wait_until(lambda: up.stats()["closed"] == 5 and up.stats()["open"] == 0, 10,
                   what="every upstream side closed")
        assert request(gw.port, "GET", "/ws/__stats").status == 200


def test_tunnel_survives_reload():
    with WsUpstream() as up:
        conf = config(up)
        with Gateway(conf, workers=2) as gw:
            w = ws(gw)
            w.send_text("before")
            assert w.recv_text(10) == "before"
            conf["routes"] = [route("/ws/*", upstream="ws"), route("/new", upstream="ws")]
            gw.reload(conf)
            assert request(gw.port, "GET", "/new").status == 200
            for i in range(5):
                w.send_text("after %d" % i)
                assert w.recv_text(10) == "after %d" % i
            w.close()


def test_header_filter_and_log_phase_run_on_a_tunnel():
    gwreq = 'local gw = require("moongate.gw")\n'
    inline = {
        "header_filter": Raw("function(conf, ctx) " + gwreq
                             + ' gw.response.set_header(ctx, "X-Filtered", "yes") end'),
        "log": Raw("function(conf, ctx) " + gwreq
                   + ' gw.log("warn", "ws-log status=" .. gw.response.get_status(ctx)) end'),
    }
    with WsUpstream() as up, Gateway(config(up, routes=[
            route("/ws/*", upstream="ws", plugins={"inline": inline})])) as gw:
        w = ws(gw)
        assert w.headers.get("x-filtered") == "yes", w.headers
        w.send_text("x")
        assert w.recv_text(10) == "x"
        time.sleep(0.3)
        assert "ws-log" not in gw.error_log_text()  # not before the end
        w.close()
        gw.wait_log(r"ws-log status=101")
        # A tunnel cut by the client's reset logs once too.
        w = ws(gw)
        w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.sock.close()
        wait_until(lambda: gw.error_log_text().count("ws-log status=101") == 2, 10,
                   what="a second log line")
        time.sleep(0.3)
        assert gw.error_log_text().count("ws-log") == 2


def raw_upgrade(gw, path="/ws/raw"):
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n"
              % path.encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, buf
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101") and rest == b"", buf
    return s


def test_backpressure_bounds_memory_with_a_client_that_does_not_read():
    with WsUpstream() as up, Gateway(config(up)) as gw:
        s = raw_upgrade(gw)
        pid = gw.worker_pids()[0]
        base = rss_kb(pid)
        chunk = bytes(range(256)) * 256
        s.setblocking(False)
        sent, stop = 0, time.monotonic() + 3
        # Push for 3 s without reading a byte: the echo cannot go anywhere,
        # so the gateway must stop taking the client's bytes.
        while time.monotonic() < stop:
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
        grown = rss_kb(pid) - base
        assert sent < 64 << 20, "the gateway took %d bytes from a stalled tunnel" % sent
        assert grown < 16 << 10, "worker RSS grew by %d KiB" % grown
        # Everything comes back once the client reads.
        s.setblocking(True)
        s.settimeout(20)
        s.shutdown(socket.SHUT_WR)
        got = 0
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            got += len(data)
        assert got == sent, (got, sent)
        s.close()


test_backpressure_bounds_memory_with_a_client_that_does_not_read.timeout = 60


def test_draining_worker_keeps_its_tunnels_until_drain_timeout():
    with WsUpstream() as up:
        conf = config(up, limits={"drain_timeout": 30})
        with Gateway(conf, workers=1) as gw:
            old = gw.worker_pids()
            w = ws(gw)
            conf["workers"] = 2
            gw.write_config(conf)
            gw.signal(signal.SIGHUP)
            wait_until(lambda: len(set(gw.worker_pids()) - set(old)) == 2, 10,
                       what="two new workers")
            time.sleep(0.5)
            assert set(old) <= set(gw.worker_pids()), "the draining worker exited"
            for i in range(5):  # the old worker still serves its tunnel
                w.send_text("drain %d" % i)
                assert w.recv_text(10) == "drain %d" % i
            w.close()
            wait_until(lambda: not set(old) & set(gw.worker_pids()), 10,
                       what="the drained worker to exit once its tunnel closed")
        # A drain_timeout cuts what is still open.
        conf = config(up, limits={"drain_timeout": 1})
        with Gateway(conf, workers=1) as gw:
            w = ws(gw)
            gw.signal(signal.SIGTERM)
            w.sock.settimeout(8)
            try:
                assert w.sock.recv(100) == b""
            except ConnectionResetError:
                pass
            gw.proc.wait(timeout=8)
            gw.wait_log(r"drain timeout: closing 1 connections")


def test_check_refuses_a_zero_tunnel_idle():
    d = tempfile.mkdtemp(prefix="mg-ws-check-")
    path = os.path.join(d, "moongate.lua")
    with open(path, "w") as f:
        f.write('return { listen = { "127.0.0.1:1" }, upstreams = { ws = { targets = '
                '{ "127.0.0.1:2" }, timeouts = { tunnel_idle = 0 } } }, routes = { '
                '{ path = "/ws/*", upstream = "ws", timeouts = { tunnel_idle = "x" } } } }\n')
    r = subprocess.run([moongate_bin(), "check", "-c", path], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=20)
    out = r.stdout.decode("latin-1")
    assert r.returncode != 0, out
    assert "timeouts.tunnel_idle" in out and "must be more than 0" in out, out
    assert "routes[1]" in out and "expected a number of seconds" in out, out


def test_tls_close_notify_half_closes_both_ways():
    d = tempfile.mkdtemp(prefix="mg-ws-tls-")
    certs, ca = make_pki(d)
    cert, key = certs["localhost"]
    tls_port = free_port()
    with WsUpstream() as up:
        text = """return {
  listen = { "@LISTEN@", { "127.0.0.1:%d", tls = { cert = "%s", key = "%s" } } },
  workers = 1, pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  upstreams = { ws = { targets = { "%s" } } },
  routes = { { path = "/ws/*", upstream = "ws" } },
}
""" % (tls_port, cert, key, up.addr)
        with Gateway(text) as gw:
            ctx = ssl.create_default_context(cafile=ca)
            raw = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
            s = ctx.wrap_socket(raw, server_hostname="localhost")
            s.sendall(b"GET /ws/raw HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n"
                      b"Upgrade: foo\r\n\r\nhello over tls")
            buf = b""
            while not buf.endswith(b"hello over tls"):
                chunk = s.recv(65536)
                assert chunk, buf
                buf += chunk
            assert buf.startswith(b"HTTP/1.1 101"), buf
            # close_notify from the client: the upstream gets an EOF, shuts
            # down its side, and the gateway answers with its close_notify
            # and a FIN (unwrap returns only once it has the close_notify).
            plain = s.unwrap()
            assert plain.recv(100) == b""
            plain.close()
            wait_until(lambda: up.stats()["closed"] == 1, 10, what="the upstream side to close")
