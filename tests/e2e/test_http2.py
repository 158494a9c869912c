"""HTTP/2 downstream end to end (core/http2.c): real curl (--http2 over TLS
with ALPN, --http2-prior-knowledge for h2c) and nghttp against the real
binary and real HTTP/1.1 upstreams: bodies both ways past the flow-control
windows, HEAD/204, streaming, plugins (inline, key-auth, rate-limit),
Host/:authority, cookie crumbs, identity headers, the gateway's own
404/413/414/431 answers, `http2 = false`, 100 concurrent streams on one
connection, the demo routes over both modes, a reload under h2 streams and
clients leaving mid-stream. The hostile-client cases (rapid reset,
CONTINUATION and PING floods, HPACK bombs) live in their own file."""

import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import tempfile
import time

from harness import (ROOT, SANITIZER_MARKS, Gateway, Upstream, free_port, moongate_bin,
                     request, spawn, wait_until)
from test_tls import make_pki

CURL = "curl"
NGHTTP = "nghttp"
TOKEN = "h2-admin-token"


def run(argv, timeout=60, **kw):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout, **kw)


CONF = """local gw = require("moongate.gw")
return {
  listen = { "@LISTEN@", %(listen)s },
  workers = 1,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  shared = { limits = "1m" },
  limits = { body_timeout = 1 },
  admin = { listen = "127.0.0.1:%(admin)d", token = "%(token)s" },
  upstreams = { up = { targets = { "%(up)s" } } },
  routes = {
    { path = "/plug/*", upstream = "up", plugins = {
        inline = {
          access = function(conf, ctx)
            gw.request.set_header(ctx, "X-Inline", gw.request.get_scheme(ctx))
          end,
          header_filter = function(conf, ctx)
            gw.response.set_header(ctx, "X-Plugin", "ran")
          end,
        } } },
    { path = "/key/*", upstream = "up", plugins = {
        ["key-auth"] = { query = "apikey", keys = { k1 = { id = "svc-a" } } } } },
    { path = "/rl", upstream = "up", plugins = {
        ["rate-limit"] = { limit = 2, window = 60 } } },
    { path = "/small/*", upstream = "up", max_body = 1000 },
    { path = "/*", upstream = "up" },
  },
}
"""


class Env:
    """A gateway with a plain listener (h2c), a TLS one (h2 by ALPN) and
    the same two with `http2 = false`."""

    def __init__(self, up):
        self.dir = tempfile.mkdtemp(prefix="mg-h2-")
        self.certs, self.ca = make_pki(self.dir)
        cert, key = self.certs["localhost"]
        tls = '{ cert = "%s", key = "%s" }' % (cert, key)
        self.tls_port, self.plain_off, self.tls_off = free_port(), free_port(), free_port()
        self.admin = free_port()
        listen = ('{ "127.0.0.1:%d", tls = %s }, { "127.0.0.1:%d", http2 = false }, '
                  '{ "127.0.0.1:%d", http2 = false, tls = %s }'
                  % (self.tls_port, tls, self.plain_off, self.tls_off, tls))
        self.gw = Gateway(CONF % {"listen": listen, "admin": self.admin, "token": TOKEN,
                                  "up": up.addr})

    def url(self, path, tls=False, port=None):
        if tls:
            return "https://localhost:%d%s" % (port or self.tls_port, path)
        return "http://127.0.0.1:%d%s" % (port or self.gw.port, path)

    def curl(self, path, *args, tls=False, port=None, timeout=30):
        """curl over h2 (ALPN on TLS, prior knowledge on plain); returns
        (returncode, status, headers dict, body bytes, stderr)."""
        argv = [CURL, "-sS", "--max-time", str(timeout), "-D", "-", "--cacert", self.ca]
        argv += ["--http2"] if tls else ["--http2-prior-knowledge"]
        argv += list(args) + [self.url(path, tls, port)]
        p = run(argv, timeout=timeout + 10)
        head, _, body = p.stdout.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
        hdrs = {}
        for ln in lines[1:]:
            n, _, v = ln.partition(":")
            hdrs[n.strip().lower()] = v.strip()
        return p.returncode, status, hdrs, body, p.stderr.decode("latin-1"), lines[0]

    def metric(self, name, labels=""):
        r = request(self.admin, "GET", "/metrics",
                    headers=[("Authorization", "Bearer " + TOKEN)], host="127.0.0.1")
        assert r.status == 200, r
        m = re.search(r"^%s%s (\d+)$" % (re.escape(name), re.escape(labels)),
                      r.body.decode(), re.M)
        return int(m.group(1)) if m else None


def upstream_view(body):
    d = json.loads(body)
    d["h"] = {}
    for n, v in d["headers"]:
        d["h"].setdefault(n.lower(), v)
    return d


def both_modes(env):
    return [dict(tls=False), dict(tls=True)]


# ------------------------------------------------------------------ tests


def test_get_post_head_204_and_big_bodies_over_h2_and_h2c():
    with Upstream() as up:
        env = Env(up)
        with env.gw:
            payload = os.urandom(1 << 20)  # 16 times the stream window
            path = os.path.join(env.dir, "payload")
            with open(path, "wb") as f:
                f.write(payload)
            digest = hashlib.sha256(payload).hexdigest()
            for mode in both_modes(env):
                rc, status, h, body, err, line = env.curl("/users/1?x=y", "-v", **mode)
                assert rc == 0 and status == 200, (rc, line, err)
                assert line.startswith("HTTP/2"), line
                if mode["tls"]:
                    assert "ALPN: server accepted h2" in err, err
                v = upstream_view(body)
                assert v["path"] == "/users/1?x=y" and v["version"] == "HTTP/1.1", v
                assert v["h"]["x-forwarded-proto"] == ("https" if mode["tls"] else "http"), v
                assert h["x-request-id"] == v["h"]["x-request-id"], (h, v)
                assert "connection" not in h and "transfer-encoding" not in h, h
                # POST: the body streams through the windows intact.
                rc, status, h, body, err, _ = env.curl(
                    "/upload?drain=1", "--data-binary", "@" + path, **mode)
                assert rc == 0 and status == 200, (rc, status, err)
                v = json.loads(body)
                assert v == {"body_len": len(payload), "body_sha256": digest}, v
                # Without a Content-Length: chunked to the upstream.
                rc, status, h, body, err, _ = env.curl(
                    "/upload", "-H", "Transfer-Encoding: chunked", "--data-binary",
                    "@" + path, **mode)
                assert rc == 0 and status == 200, (rc, status, err)
                v = json.loads(body)
                assert v["framing"] == "chunked" and v["body_sha256"] == digest, v
                # A 5 MB response, with a length and chunked from the upstream.
                for q in ("size=5000000", "size=5000000&chunked=1", "size=300000&nolen=1"):
                    rc, status, h, body, err, _ = env.curl("/big?" + q, **mode)
                    n = int(q.split("&")[0].split("=")[1])
                    assert rc == 0 and status == 200 and len(body) == n, (q, rc, status,
                                                                          len(body), err)
                    ref = run([CURL, "-sS", "--http1.1", env.url("/big?" + q)]).stdout
                    assert body == ref, q
                # HEAD: the head with its length, END_STREAM on HEADERS.
                p = run([NGHTTP, "-v", "-H", ":method: HEAD", env.url("/big?size=500", **mode)])
                out = p.stdout.decode("latin-1")
                assert ":status: 200" in out and "content-length: 500" in out, out
                assert re.search(r"recv HEADERS frame <length=\d+, flags=0x05", out), out
                assert "recv DATA" not in out, out
                rc, status, h, body, err, _ = env.curl("/x?status=204", **mode)
                assert rc == 0 and status == 204 and body == b"", (rc, status, body, err)
            # 8 h2 requests per mode, each on its own connection.
            assert env.metric("moongate_http2_streams_total") == 16
            assert env.metric("moongate_http2_connections_total") == 16


def test_plugins_host_cookies_identity_headers_and_gateway_errors():
    with Upstream() as up:
        env = Env(up)
        with env.gw:
            for mode in both_modes(env):
                rc, status, h, body, err, _ = env.curl(
                    "/plug/a", "-H", "Cookie: a=1", "-H", "Cookie: b=2",
                    "-H", "X-Consumer-Id: forged", "-H", "X-Custom: yes", **mode)
                assert rc == 0 and status == 200, (rc, status, err)
                assert h["x-plugin"] == "ran", h
                v = upstream_view(body)
                assert v["h"]["x-inline"] == ("https" if mode["tls"] else "http"), v
                host = "localhost:%d" % env.tls_port if mode["tls"] else \
                    "127.0.0.1:%d" % env.gw.port
                assert v["h"]["host"] == host, v  # :authority became Host
                assert [n for n, _ in v["headers"]].count("host") == 1, v
                assert v["h"]["cookie"] == "a=1; b=2", v  # crumbs joined
                assert "x-consumer-id" not in v["h"], v  # identity header dropped
                assert v["h"]["x-custom"] == "yes", v
                # key-auth over h2.
                rc, status, h, body, err, _ = env.curl("/key/x", **mode)
                assert status == 401 and "error" in json.loads(body), (status, body)
                rc, status, h, body, err, _ = env.curl("/key/x?apikey=k1", **mode)
                assert status == 200, (status, body)
                # The gateway's own answers: JSON bodies, one stream each.
                rc, status, h, body, err, _ = env.curl("/x/%2e%2e/%2e%2e/y", **mode)
                assert status in (400, 404) and "error" in json.loads(body), (status, body)
                rc, status, h, body, err, _ = env.curl("/" + "a" * 9000, **mode)
                assert status == 414 and json.loads(body)["error"] == "uri too long", body
                rc, status, h, body, err, _ = env.curl("/big", "-H", "X-Big: " + "b" * 33000,
                                                       **mode)
                assert status == 431, (status, body, err)
                assert json.loads(body)["error"] == "request header fields too large", body
                # Content-Length over the route's max_body: 413 before the
                # body is read (nghttp shows the answer; it is followed by
                # RST_STREAM(NO_ERROR) to stop the upload, RFC 9113 8.1).
                big = os.path.join(env.dir, "big")
                with open(big, "wb") as f:
                    f.write(b"z" * 200000)
                p = run([NGHTTP, "-v", "-d", big, env.url("/small/x", **mode)], timeout=30)
                out = p.stdout.decode("latin-1")
                assert ":status: 413" in out and "request body too large" in out, out
                assert "RST_STREAM" in out and "NO_ERROR" in out, out
            # rate-limit: two per window, then 429, across both modes.
            statuses = [env.curl("/rl", **m)[1] for m in both_modes(env) for _ in range(2)]
            assert statuses == [200, 200, 429, 429], statuses
            # Still healthy after all that: a normal request on HTTP/1.1.
            r = request(env.gw.port, "GET", "/ok")
            assert r.status == 200, r


def frame(ftype, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + \
        stream.to_bytes(4, "big") + payload


def read_frames(sock, until, timeout):
    """Frames (type, flags, stream, payload) read until until(frames) or
    the timeout or the close."""
    sock.settimeout(0.2)
    data, frames = b"", []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(frames):
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            break
        data += chunk
        while len(data) >= 9 and len(data) >= 9 + int.from_bytes(data[:3], "big"):
            n = int.from_bytes(data[:3], "big")
            frames.append((data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7fffffff,
                           data[9:9 + n]))
            data = data[9 + n:]
    return frames


def test_a_stalled_request_body_gets_408_and_the_connection_goes_on():
    with Upstream() as up:
        env = Env(up)
        with env.gw:
            # h2c by hand: HEADERS (POST, content-length 100, no
            # END_STREAM), 10 bytes of DATA, then silence past
            # body_timeout (1 s).
            s = socket.create_connection(("127.0.0.1", env.gw.port), timeout=5)
            path = b"/upload"
            block = (b"\x83\x86" + b"\x04" + bytes([len(path)]) + path  # POST, http, :path
                     + b"\x01\x09127.0.0.1"  # :authority
                     + b"\x0f\x0d\x03100")  # content-length: 100 (static name 28)
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0)
                      + frame(1, 0x4, 1, block) + frame(0, 0, 1, b"0123456789"))
            start = time.monotonic()
            frames = read_frames(s, lambda fs: any(t == 0 and f & 1 and sid == 1
                                                   for t, f, sid, _ in fs), 8)
            took = time.monotonic() - start
            body = b"".join(p for t, f, sid, p in frames if t == 0 and sid == 1)
            assert body == b'{"error":"request timeout"}\n', frames
            assert took >= 0.9, took  # not before body_timeout
            # The connection goes on: a GET on stream 3.
            s.sendall(frame(1, 0x5, 3, b"\x82\x86\x84\x01\x09127.0.0.1"))
            frames = read_frames(s, lambda fs: any(t == 0 and f & 1 and sid == 3
                                                   for t, f, sid, _ in fs), 8)
            body = b"".join(p for t, f, sid, p in frames if t == 0 and sid == 3)
            assert json.loads(body)["path"] == "/", frames
            s.close()
            # A header block left unfinished (no END_HEADERS, no
            # CONTINUATION): GOAWAY and close after the same wait.
            s = socket.create_connection(("127.0.0.1", env.gw.port), timeout=5)
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0)
                      + frame(1, 0, 1, b"\x82\x86\x84"))
            frames = read_frames(s, lambda fs: any(t == 7 for t, *_ in fs), 8)
            goaway = [p for t, f, sid, p in frames if t == 7]
            assert goaway and int.from_bytes(goaway[0][4:8], "big") == 1, frames
            s.close()


def test_http2_false_keeps_http1_on_tls_and_refuses_the_preface_on_plain():
    with Upstream() as up:
        env = Env(up)
        with env.gw:
            rc, status, h, body, err, line = env.curl("/a", "-v", tls=True, port=env.tls_off)
            assert rc == 0 and status == 200 and line.startswith("HTTP/1.1"), (line, err)
            assert "ALPN: server accepted http/1.1" in err, err
            # The h2c preface on a plain listener without HTTP/2: HTTP/1
            # parsing refuses it (400) and closes.
            s = socket.create_connection(("127.0.0.1", env.plain_off), timeout=5)
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            s.close()
            assert data.startswith(b"HTTP/1.1 400"), data
            # Upgrade: h2c is not supported: answered as HTTP/1.1, never
            # passed upstream.
            p = run([CURL, "-sS", "--http2", env.url("/up")])
            v = upstream_view(p.stdout)
            assert "upgrade" not in v["h"] and "http2-settings" not in v["h"], v


def test_hundred_concurrent_streams_on_one_connection():
    with Upstream() as up:
        env = Env(up)
        with env.gw:
            for mode in both_modes(env):
                url = env.url("/slow?delay=0.2", **mode)
                # -m 100 repeats the URI: 100 streams on one connection.
                start = time.monotonic()
                p = run([NGHTTP, "-v", "-n", "-m", "100", url], timeout=60)
                took = time.monotonic() - start
                out = p.stdout.decode("latin-1")
                assert p.returncode == 0, out[-2000:]
                assert out.count(":status: 200") == 100, out[-2000:]
                # Each upstream answer waits 200 ms: one after another would
                # take 20 s; concurrently it is one wait (a behaviour check
                # with a wide margin, not a speed measurement).
                assert took < 10, took
                ids = set(re.findall(r"recv HEADERS frame <[^>]*stream_id=(\d+)>", out))
                assert len(ids) == 100, len(ids)
                # Bodies: nghttp -s lists every stream's status and size.
                p = run([NGHTTP, "-n", "-s", "-m", "100", env.url("/b?size=1000", **mode)],
                        timeout=60)
                rows = re.findall(r"\s200\s+(\d+)\s+/b\?size=1000", p.stdout.decode())
                assert len(rows) == 100 and set(rows) == {"1000"}, (p.stdout.decode()[:3000],
                                                                    p.stderr.decode())


def test_the_demo_routes_over_h2_and_h2c():
    d = tempfile.mkdtemp(prefix="mg-h2-demo-")
    certs, ca = make_pki(d)
    cert, key = certs["localhost"]
    port, tls_port = free_port(), free_port()
    env = dict(os.environ, MOONGATE_DEMO_LISTEN="127.0.0.1:%d" % port,
               MOONGATE_DEMO_TLS_LISTEN="127.0.0.1:%d" % tls_port,
               MOONGATE_DEMO_TLS_CERT=cert, MOONGATE_DEMO_TLS_KEY=key,
               MOONGATE_DEMO_PID=os.path.join(d, "moongate.pid"))
    out_path = os.path.join(d, "out")
    with open(out_path, "wb") as out:
        p = spawn([moongate_bin(), "-c", str(ROOT / "conf" / "moongate.lua")], "demo",
                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                  cwd=str(ROOT))
    try:
        def get(url, mode):
            argv = [CURL, "-sS", "-m", "10", "-D", "-", "--cacert", ca, mode, url]
            r = run(argv)
            head, _, body = r.stdout.decode().partition("\r\n\r\n")
            return head, body

        wait_until(lambda: "HTTP/2 200" in get("http://127.0.0.1:%d/users/1" % port,
                                               "--http2-prior-knowledge")[0],
                   20, interval=0.1, what="the demo to answer over h2c")
        for base, mode in (("http://127.0.0.1:%d" % port, "--http2-prior-knowledge"),
                           ("https://localhost:%d" % tls_port, "--http2")):
            head, body = get(base + "/users/1", mode)
            assert head.startswith("HTTP/2 200"), head
            assert json.loads(body)["userName"] == "Ada Lovelace", body
            assert "x-demo-route: /users/*" in head.lower(), head
            head, body = get(base + "/users/", mode)
            assert head.startswith("HTTP/2 200") and len(json.loads(body)) == 2, body
            head, body = get(base + "/orders/42?expand=items", mode)
            assert json.loads(body)["query"] == "expand=items", body
            head, body = get(base + "/products/7", mode)
            assert json.loads(body)["name"] == "desk lamp", body
            head, body = get(base + "/products/99", mode)
            assert head.startswith("HTTP/2 404"), head
            assert json.loads(body)["error"] == "product not found", body
            head, body = get(base + "/nowhere", mode)
            assert head.startswith("HTTP/2 404"), head
            head, body = get(base + "/stats", mode)
            assert head.startswith("HTTP/2 200") and json.loads(body)["requests"] >= 5, body
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
        text = open(out_path, errors="replace").read()
        for mark in SANITIZER_MARKS:
            assert mark not in text, text


def slow_streams(env, up, n, delay):
    """nghttp with n slow streams on one connection, once all reached the
    upstream."""
    up.reset()
    p = subprocess.Popen([NGHTTP, "-v", "-n", "-m", str(n), env.url("/slow?delay=%s" % delay)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until(lambda: up.stats()["requests"] >= n, 10,
               what="the %d streams to reach the upstream" % n)
    return p


def finish(p):
    try:
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return out.decode("latin-1")


def test_reload_keeps_h2_streams_and_a_stop_drains_them_with_goaway():
    with Upstream() as up:
        env = Env(up)
        with env.gw:
            # A reload swaps the config under open streams: they finish.
            p = slow_streams(env, up, 20, 1.5)
            env.gw.reload()
            out = finish(p)
            assert out.count(":status: 200") == 20, out[-3000:]
            assert "recv GOAWAY" not in out, out[-3000:]
            rc, status, *_ = env.curl("/after")
            assert rc == 0 and status == 200
            # A stop drains: GOAWAY(NO_ERROR), the open streams complete.
            p = slow_streams(env, up, 20, 1.5)
            env.gw.signal(signal.SIGTERM)
            out = finish(p)
            assert out.count(":status: 200") == 20, out[-3000:]
            assert re.search(r"recv GOAWAY frame.*\n.*error_code=NO_ERROR", out), out[-3000:]
            wait_until(lambda: not env.gw.running(), 15, what="the gateway to stop")


def test_client_leaving_mid_stream_is_cleaned_up():
    with Upstream() as up:
        env = Env(up)
        with env.gw:
            # A big response the client stops reading, then drops.
            for mode in both_modes(env):
                p = subprocess.Popen([CURL, "-sS", "--limit-rate", "100k", "--cacert", env.ca,
                                      "--http2" if mode["tls"] else "--http2-prior-knowledge",
                                      "-o", "/dev/null", env.url("/big?size=20000000", **mode)])
                time.sleep(0.5)
                p.kill()
                p.wait()
            # Streams waiting for a slow upstream, and the client goes.
            p = subprocess.Popen([NGHTTP, "-n", "-m", "10", env.url("/slow?delay=2")],
                                 stdout=subprocess.DEVNULL)
            wait_until(lambda: up.stats()["requests"] >= 10, 10, what="streams upstream")
            p.kill()
            p.wait()
            # An upload cut off half way (the upstream is reading it).
            big = os.path.join(env.dir, "upload")
            with open(big, "wb") as f:
                f.write(b"u" * 1000000)
            p = subprocess.Popen([CURL, "-sS", "--http2-prior-knowledge", "--limit-rate",
                                  "100k", "--data-binary", "@" + big, "-o", "/dev/null",
                                  env.url("/upload")])
            time.sleep(0.5)
            p.kill()
            p.wait()
            # Healthy: both modes still answer.
            for mode in both_modes(env):
                rc, status, *_ = env.curl("/ok", **mode)
                assert rc == 0 and status == 200, status
