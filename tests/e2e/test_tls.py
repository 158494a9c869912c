"""TLS termination end to end: certificates made with the openssl CLI in the
test's temp dir (a CA, localhost, a.example.test, *.wild.example.test),
HTTPS/1.1 through to a real upstream with plugins on the route (curl), SNI
(openssl s_client), TLS 1.0/1.1 refused, session resumption across worker
processes, garbage on the TLS port, certificate reload, and `moongate check`
errors for bad certificate files."""

import json
import os
import re
import signal
import ssl
import subprocess
import tempfile
import time

from harness import (Client, Gateway, Upstream, free_port, moongate_bin, pattern_sha256,
                     wait_until)

OPENSSL = "openssl"
CURL = "curl"


def run(argv, timeout=20, **kw):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout, **kw)


def make_cert(d, name, cn, sans, ca="ca", org=None):
    """A P-256 leaf certificate for `sans` signed by the CA in d."""
    subj = "/CN=%s" % cn + ("/O=%s" % org if org else "")
    key, csr, crt = (os.path.join(d, name + ext) for ext in (".key", ".csr", ".pem"))
    ext = os.path.join(d, name + ".ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=%s\n" % ",".join(sans))
    r = run([OPENSSL, "req", "-new", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", csr,
             "-subj", subj])
    assert r.returncode == 0, r.stdout
    r = run([OPENSSL, "x509", "-req", "-in", csr, "-CA", os.path.join(d, ca + ".pem"),
             "-CAkey", os.path.join(d, ca + ".key"), "-CAcreateserial", "-out", crt,
             "-days", "2", "-extfile", ext])
    assert r.returncode == 0, r.stdout
    return crt, key


def make_pki(d):
    """CA + the three leaves; returns {name: (cert, key)} and the CA path."""
    r = run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", os.path.join(d, "ca.key"),
             "-out", os.path.join(d, "ca.pem"), "-days", "2", "-subj", "/CN=moongate test CA"])
    assert r.returncode == 0, r.stdout
    certs = {
        "localhost": make_cert(d, "localhost", "localhost", ["DNS:localhost", "IP:127.0.0.1"]),
        "a": make_cert(d, "a", "a.example.test", ["DNS:a.example.test"]),
        "wild": make_cert(d, "wild", "*.wild.example.test", ["DNS:*.wild.example.test"]),
    }
    return certs, os.path.join(d, "ca.pem")


def tls_config(tls_port, tls_lua, up=None, workers=1, routes=None, extra=""):
    ups = 'upstreams = { up = { targets = { "%s" } } },' % up.addr if up else ""
    routes = routes or """
    { path = "/*", upstream = "up",
      plugins = {
        ["request-id"] = {},
        inline = { access = function(conf, ctx)
            local gw = require("moongate.gw")
            gw.request.set_header(ctx, "X-Inline", gw.request.get_scheme(ctx))
        end },
      } },"""
    return """return {
  listen = { "@LISTEN@", { "127.0.0.1:%d", tls = %s } },
  workers = %d,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  %s
  routes = { %s },
  %s
}
""" % (tls_port, tls_lua, workers, ups, routes, extra)


def tls_table(certs, default="localhost", extra=("a", "wild")):
    c, k = certs[default]
    more = ", ".join('{ cert = "%s", key = "%s" }' % certs[n] for n in extra)
    return '{ cert = "%s", key = "%s", certificates = { %s } }' % (c, k, more)


class Env:
    def __init__(self, workers=1, extra=""):
        self.dir = tempfile.mkdtemp(prefix="mg-tls-")
        self.certs, self.ca = make_pki(self.dir)
        self.tls_port = free_port()
        self.workers = workers
        self.extra = extra

    def gateway(self, up):
        return Gateway(tls_config(self.tls_port, tls_table(self.certs), up=up,
                                  workers=self.workers, extra=self.extra))

    def curl(self, *args, path="/", host="localhost"):
        argv = [CURL, "-sS", "--max-time", "10", "--cacert", self.ca]
        argv += list(args)
        argv.append("https://%s:%d%s" % (host, self.tls_port, path))
        return run(argv, timeout=20)

    def s_client(self, *args, stdin_sleep=0.3):
        """openssl s_client; stdin stays open a moment so that TLS 1.3
        tickets (sent after the handshake) arrive."""
        argv = [OPENSSL, "s_client", "-connect", "127.0.0.1:%d" % self.tls_port,
                "-CAfile", self.ca] + list(args)
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        time.sleep(stdin_sleep)
        out, _ = p.communicate(b"", timeout=20)
        return p.returncode, out.decode("latin-1")

    def tls_client(self, server_hostname="localhost"):
        """A harness Client (raw HTTP/1.1) over a verified TLS connection."""
        ctx = ssl.create_default_context(cafile=self.ca)
        c = Client(self.tls_port)
        c.sock = ctx.wrap_socket(c.sock, server_hostname=server_hostname)
        return c


def subject_of(out):
    m = re.search(r"^subject=(.*)$", out, re.M)
    return m.group(1) if m else None


def test_https_requests_reach_the_upstream_with_plugins():
    env = Env()
    with Upstream() as up, env.gateway(up) as gw:
        # HTTPS/1.1 here (curl would pick h2 by ALPN: test_http2.py).
        r = env.curl("-v", "--http1.1", path="/users/1?x=y")
        out = r.stdout.decode("latin-1")
        assert r.returncode == 0, out
        assert "ALPN: server accepted http/1.1" in out, out
        body = json.loads(out[out.rindex("\n{") + 1:])
        assert body["path"] == "/users/1?x=y", body
        hdrs = {n.lower(): v for n, v in body["headers"]}
        assert hdrs["x-forwarded-proto"] == "https", hdrs
        assert hdrs["x-inline"] == "https", hdrs
        assert re.search(r"< x-request-id: \w+", out, re.I), out
        # POST with a 1 MB body, and a chunked upload.
        blob = os.path.join(env.dir, "blob")
        with open(blob, "wb") as f:
            f.write(os.urandom(1 << 20))
        r = env.curl("--data-binary", "@" + blob, path="/post?drain=1")
        d = json.loads(r.stdout)
        assert r.returncode == 0 and d["body_len"] == 1 << 20, r.stdout[:300]
        r = env.curl("-H", "Transfer-Encoding: chunked", "--data-binary", "@" + blob,
                     path="/chunked?drain=1")
        d = json.loads(r.stdout)
        assert d["body_len"] == 1 << 20, d
        # A large streamed response comes back whole.
        out_file = os.path.join(env.dir, "big")
        r = env.curl("-o", out_file, path="/big?size=3000000")
        assert r.returncode == 0, r.stdout
        with open(out_file, "rb") as f:
            got = f.read()
        assert len(got) == 3000000 and _sha(got) == pattern_sha256(3000000)
        # Keep-alive: curl reuses one TLS connection for three requests.
        argv = [CURL, "-sS", "-v", "--max-time", "10", "--cacert", env.ca]
        for i in range(3):
            argv.append("https://localhost:%d/ka/%d" % (env.tls_port, i))
        r = run(argv)
        out = r.stdout.decode("latin-1")
        assert r.returncode == 0, out
        assert out.count("Re-using existing connection") == 2, out
        assert out.count('"path": "/ka/') + out.count('"path":"/ka/') == 3, out
        # Plain HTTP on the other listener is untouched.
        with Client(gw.port) as c:
            d = c.request("GET", "/plain").json()
            hdrs = {n.lower(): v for n, v in d["headers"]}
            assert hdrs["x-forwarded-proto"] == "http", hdrs
            assert hdrs["x-inline"] == "http", hdrs


def _sha(b):
    import hashlib
    return hashlib.sha256(b).hexdigest()


def test_pipelined_requests_and_keepalive_over_tls():
    env = Env()
    with Upstream() as up, env.gateway(up):
        c = env.tls_client()
        try:
            req = "".join("GET /p/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % i for i in range(20))
            c.send(req)
            for i in range(20):
                r = c.read_response()
                assert r.status == 200 and r.json()["path"] == "/p/%d" % i, r
            r = c.request("POST", "/after", body=b"x" * 100000)
            assert r.json()["body_len"] == 100000, r
        finally:
            c.close()


def test_sni_picks_the_certificate():
    env = Env()
    with Upstream() as up, env.gateway(up):
        cases = [("a.example.test", "CN = a.example.test"),
                 ("x.wild.example.test", "CN = *.wild.example.test"),
                 ("A.Example.Test", "CN = a.example.test"),
                 ("localhost", "CN = localhost"),
                 # no match, or a wildcard one label too deep: the default
                 ("other.test", "CN = localhost"),
                 ("a.b.wild.example.test", "CN = localhost"),
                 ("wild.example.test", "CN = localhost")]
        for name, want in cases:
            rc, out = env.s_client("-servername", name, stdin_sleep=0)
            assert subject_of(out) == want, (name, subject_of(out), out[-800:])
        rc, out = env.s_client("-noservername", stdin_sleep=0)
        assert subject_of(out) == "CN = localhost", out[-800:]
        # curl verifies the SNI-chosen certificate against the name.
        r = run([CURL, "-sS", "--max-time", "10", "--cacert", env.ca, "--resolve",
                 "q.wild.example.test:%d:127.0.0.1" % env.tls_port,
                 "https://q.wild.example.test:%d/sni" % env.tls_port])
        assert r.returncode == 0 and json.loads(r.stdout)["path"] == "/sni", r.stdout


def test_tls_1_0_and_1_1_are_refused_1_2_and_1_3_work():
    env = Env()
    with Upstream() as up, env.gateway(up) as gw:
        for flag in ("-tls1", "-tls1_1"):
            since = gw.log_size()
            rc, out = env.s_client(flag, "-cipher", "DEFAULT@SECLEVEL=0", stdin_sleep=0)
            assert rc != 0, out
            assert "Cipher is (NONE)" in out or "no peer certificate" in out, out
            # Refused by the gateway (not by the client's own policy).
            gw.wait_log(r"TLS: unsupported protocol", since=since)
        for flag, proto in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
            rc, out = env.s_client(flag, stdin_sleep=0)
            assert "Protocol  : %s" % proto in out or ("New, %s" % proto) in out, out
            assert "Verify return code: 0 (ok)" in out, out
        # TLS 1.2 offers forward-secret AEAD ciphers only.
        rc, out = env.s_client("-tls1_2", "-cipher", "AES128-SHA256", stdin_sleep=0)
        assert rc != 0 and "Cipher is (NONE)" in out, out
        rc, out = env.s_client("-tls1_2", stdin_sleep=0)
        assert re.search(r"Cipher is ECDHE-ECDSA-(AES\d+-GCM|CHACHA20)", out), out


def test_sessions_resume_across_workers_and_worker_restarts():
    env = Env(workers=2)
    with Upstream() as up, env.gateway(up) as gw:
        for proto in ("-tls1_3", "-tls1_2"):
            sess = os.path.join(env.dir, "sess" + proto)
            rc, out = env.s_client(proto, "-servername", "localhost", "-sess_out", sess)
            assert out.count("New, TLSv1.") == 1, out
            for _ in range(6):
                rc, out = env.s_client(proto, "-servername", "localhost", "-sess_in", sess)
                assert "Reused, TLSv1." in out, out
        # Both workers die; their replacements never saw the session, yet
        # resume it: the ticket keys come from the master.
        sess = os.path.join(env.dir, "sess-restart")
        rc, out = env.s_client("-servername", "localhost", "-sess_out", sess)
        old = set(gw.worker_pids())
        assert len(old) == 2
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(set(gw.worker_pids()) - old) == 2, 15,
                   what="both workers replaced")
        wait_until(lambda: env.curl(path="/ready").returncode == 0, 10,
                   what="TLS served by the new workers")
        for _ in range(4):
            rc, out = env.s_client("-servername", "localhost", "-sess_in", sess)
            assert "Reused, TLSv1.3" in out, out


def test_garbage_and_silent_clients_are_closed_and_the_gateway_keeps_serving():
    env = Env(extra="limits = { header_timeout = 1 },")
    with Upstream() as up, env.gateway(up) as gw:
        since = gw.log_size()
        payloads = [b"\x00" * 10, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(5000),
                    # a TLS record header claiming a huge handshake message
                    b"\x16\x03\x01\xff\xff" + os.urandom(3000),
                    b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00"]
        for p in payloads:
            with Client(env.tls_port) as c:
                c.send(p)
                assert c.wait_closed(timeout=5), p[:20]
        gw.wait_log(r"\[info\] worker \d+: client 127\.0\.0\.1: TLS: ", since=since)
        # A client that connects and says nothing: closed after header_timeout.
        with Client(env.tls_port) as c:
            t0 = time.monotonic()
            assert c.wait_closed(timeout=5)
            assert time.monotonic() - t0 > 0.5
        # A handshake, then silence: the idle deadline closes it too.
        c = env.tls_client()
        try:
            c.sock.settimeout(5)
            assert c.sock.recv(100) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass
        finally:
            c.close()
        r = env.curl(path="/still")
        assert r.returncode == 0 and json.loads(r.stdout)["path"] == "/still", r.stdout
        assert gw.running()
        assert "[error]" not in gw.log_text()


def test_reload_brings_a_new_certificate_to_new_connections():
    env = Env()
    with Upstream() as up:
        gw = env.gateway(up)
        with gw:
            rc, out = env.s_client("-servername", "localhost", stdin_sleep=0)
            assert subject_of(out) == "CN = localhost", out
            keep = env.tls_client()
            try:
                assert keep.request("GET", "/before").status == 200
                env.certs["localhost"] = make_cert(env.dir, "localhost2", "localhost",
                                                   ["DNS:localhost"], org="gen2")
                gw.reload(tls_config(env.tls_port, tls_table(env.certs), up=up))
                rc, out = env.s_client("-servername", "localhost", stdin_sleep=0)
                assert subject_of(out) == "CN = localhost, O = gen2", out
                r = env.curl(path="/after")
                assert r.returncode == 0, r.stdout
                # The connection made before the reload goes on, on its
                # own certificate.
                r = keep.request("GET", "/kept")
                assert r.status == 200 and r.json()["path"] == "/kept"
                assert "O=gen2" not in str(keep.sock.getpeercert()["subject"])
            finally:
                keep.close()
            # A reload naming a missing file is refused; TLS keeps serving.
            missing = dict(env.certs)
            missing["localhost"] = (os.path.join(env.dir, "nope.pem"), env.certs["a"][1])
            since = gw.log_size()
            gw.write_config(tls_config(env.tls_port, tls_table(missing), up=up))
            gw.signal(signal.SIGHUP)
            gw.wait_log(r"reload refused.*nope\.pem", since=since)
            assert env.curl(path="/x").returncode == 0


def check(text):
    d = tempfile.mkdtemp(prefix="mg-tls-check-")
    path = os.path.join(d, "moongate.lua")
    with open(path, "w") as f:
        f.write(text)
    r = run([moongate_bin(), "check", "-c", path])
    return r.returncode, r.stdout.decode("latin-1")


def test_check_reports_bad_certificate_files():
    d = tempfile.mkdtemp(prefix="mg-tls-")
    certs, ca = make_pki(d)
    lc, lk = certs["localhost"]
    ac, ak = certs["a"]
    garbage = os.path.join(d, "garbage.pem")
    with open(garbage, "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")

    def conf(tls):
        return ('return { listen = { "127.0.0.1:1", { "127.0.0.1:2", tls = %s } },'
                ' routes = { { path = "/", handler = function() return 200 end } } }' % tls)

    rc, out = check(conf('{ cert = "%s", key = "%s" }' % (lc, lk)))
    assert rc == 0, out
    cases = [
        ('{ cert = "%s/missing.pem", key = "%s" }' % (d, lk),
         r'listen\[2\]\.tls: cannot read certificate file ".*/missing\.pem": No such file'),
        ('{ cert = "%s", key = "%s/missing.key" }' % (lc, d),
         r'listen\[2\]\.tls: cannot read key file ".*/missing\.key"'),
        ('{ cert = "%s", key = "%s" }' % (lc, ak),
         r'listen\[2\]\.tls: key file ".*/a\.key" does not match certificate ".*/localhost\.pem"'),
        ('{ cert = "%s", key = "%s" }' % (garbage, lk),
         r'listen\[2\]\.tls: certificate file ".*/garbage\.pem": not a valid PEM'),
        ('{ cert = "%s", key = "%s" }' % (lc, garbage),
         r'listen\[2\]\.tls: key file ".*/garbage\.pem": not an unencrypted PEM private key'),
        ('{ cert = "%s", key = "%s", certificates = { { cert = "%s", key = "%s" } } }'
         % (lc, lk, ac, lk), r'key file ".*/localhost\.key" does not match certificate ".*/a\.pem"'),
        ('{ cert = "%s" }' % lc, r"listen\[2\]\.tls\.key: required"),
        ('{ certificates = { { key = "%s" } } }' % lk,
         r"listen\[2\]\.tls\.certificates\[1\]\.cert: required"),
        ("{ }", r"listen\[2\]\.tls\.cert: required"),
        ('{ cert = "%s", key = "%s", versions = 1 }' % (lc, lk),
         r"listen\[2\]\.tls\.versions: unknown field"),
        ('{ cert = "%s", key = "%s", ciphers = "NOPE" }' % (lc, lk),
         r'listen\[2\]\.tls: ciphers: no usable cipher in "NOPE"'),
    ]
    for tls, want in cases:
        rc, out = check(conf(tls))
        assert rc != 0, (tls, out)
        assert re.search(want, out), (want, out)
    # The address is required, extra fields are reported.
    rc, out = check('return { listen = { { tls = { cert = "%s", key = "%s" } } },'
                    ' routes = {} }' % (lc, lk))
    assert rc != 0 and "listen[1]: the address is required" in out, out
    # Relative paths are taken from the config file's directory.
    rc, out = check(conf('{ cert = "c.pem", key = "k.pem" }'))
    assert rc != 0 and re.search(r'cannot read certificate file ".*/mg-tls-check-[^/]+/c\.pem"',
                                 out), out


# ------------------------------------------------------------ upstream TLS

class TlsUpstream:
    """A small HTTPS/1.1 upstream in this process (stdlib ssl + http.server):
    answers JSON with the path, the SNI it was asked for, the client
    certificate's subject (mTLS), the connection's port and the body
    length. `require_client` asks for a client certificate signed by
    `client_ca`."""

    def __init__(self, cert, key, client_ca=None):
        import http.server
        import threading
        self.seen = []
        seen = self.seen
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.sni = []
        ctx.sni_callback = lambda sock, name, c: self.sni.append(name) and None
        if client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(client_ca)

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                m = re.search(r"size=(\d+)", self.path)
                if m:
                    size = int(m.group(1))
                    self.send_response(200)
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    piece = bytes(range(256)) * 256
                    for off in range(0, size, len(piece)):
                        self.wfile.write(piece[:min(len(piece), size - off)])
                    return
                peer = self.connection.getpeercert()
                subj = dict(x[0] for x in peer["subject"]) if peer else None
                d = {"path": self.path, "method": self.command, "body_len": len(body),
                     "port": self.client_address[1], "client_cn": subj and subj.get("commonName"),
                     "xfp": self.headers.get("X-Forwarded-Proto")}
                seen.append(d)
                out = json.dumps(d).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _answer

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def https_gateway(up_port, tls_lua, target=None, extra_routes=""):
    target = target or "https://127.0.0.1:%d" % up_port
    return Gateway("""return {
  listen = { "@LISTEN@" }, workers = 1,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  upstreams = { up = { targets = { "%s" }, tls = %s } },
  routes = { { path = "/*", upstream = "up" }, %s },
}
""" % (target, tls_lua, extra_routes))


SUBREQUEST = """{ path = "/sub", handler = function(conf, ctx)
        local gw = require("moongate.gw")
        local res, err = gw.http.request({ upstream = "up", path = "/inner", timeout = 5 })
        if not res then return 502, { error = err } end
        return 200, res.body, { ["Content-Type"] = "application/json" }
    end }"""


def test_https_upstream_is_verified_and_pooled():
    d = tempfile.mkdtemp(prefix="mg-tls-")
    certs, ca = make_pki(d)
    with TlsUpstream(*certs["localhost"]) as up:
        with https_gateway(up.port, '{ ca = "%s", sni = "localhost" }' % ca,
                           extra_routes=SUBREQUEST) as gw:
            with Client(gw.port) as c:
                for i in range(5):
                    r = c.request("GET", "/g/%d" % i)
                    assert r.status == 200, r
                    assert r.json()["path"] == "/g/%d" % i
                r = c.request("POST", "/p", body=b"z" * 300000)
                assert r.status == 200 and r.json()["body_len"] == 300000, r
            assert up.sni and set(up.sni) == {"localhost"}, up.sni
            # Pooled: six requests, one TLS connection.
            assert len({s["port"] for s in up.seen}) == 1, up.seen
            assert all(s["xfp"] == "http" for s in up.seen)
            # gw.http.request to the same upstream, over TLS too.
            r = Client(gw.port).request("GET", "/sub")
            assert r.status == 200 and r.json()["path"] == "/inner", r
            # A large response to a slow reader: the TLS session holds back
            # what the read buffer cannot take and hands it over later.
            big = os.path.join(d, "big")
            r = run([CURL, "-sS", "--max-time", "30", "--limit-rate", "3M", "-o", big,
                     "http://127.0.0.1:%d/big?size=4000000" % gw.port], timeout=40)
            assert r.returncode == 0, r.stdout
            piece = bytes(range(256)) * 256
            want = (piece * (4000000 // len(piece) + 1))[:4000000]
            with open(big, "rb") as f:
                assert f.read() == want
        # No sni: the target's IP is sent nowhere and verified against the
        # certificate's IP SAN.
        up.sni.clear()
        with https_gateway(up.port, '{ ca = "%s" }' % ca) as gw:
            r = Client(gw.port).request("GET", "/ip")
            assert r.status == 200 and r.json()["path"] == "/ip", r
            assert up.sni == [None], up.sni


def test_https_upstream_with_a_wrong_ca_or_name_is_a_502():
    d = tempfile.mkdtemp(prefix="mg-tls-")
    certs, ca = make_pki(d)
    other = tempfile.mkdtemp(prefix="mg-tls-other-")
    _, other_ca = make_pki(other)
    with TlsUpstream(*certs["localhost"]) as up:
        with https_gateway(up.port, '{ ca = "%s" }' % other_ca) as gw:
            r = Client(gw.port).request("GET", "/x")
            assert r.status == 502, r
            gw.wait_log(r"TLS handshake failed: certificate verify failed: "
                        r"unable to get local issuer certificate")
        with https_gateway(up.port, '{ ca = "%s", sni = "a.example.test" }' % ca) as gw:
            r = Client(gw.port).request("GET", "/x")
            assert r.status == 502, r
            gw.wait_log(r"certificate verify failed: hostname mismatch")
        # verify = false: any certificate (for tests and private networks).
        with https_gateway(up.port, '{ verify = false }') as gw:
            r = Client(gw.port).request("GET", "/x")
            assert r.status == 200, r


def test_https_upstream_with_a_client_certificate():
    d = tempfile.mkdtemp(prefix="mg-tls-")
    certs, ca = make_pki(d)
    cc, ck = make_cert(d, "client", "gateway-client", ["DNS:gateway-client"])
    with TlsUpstream(*certs["localhost"], client_ca=ca) as up:
        with https_gateway(up.port, '{ ca = "%s", sni = "localhost" }' % ca) as gw:
            r = Client(gw.port).request("GET", "/no-cert")
            assert r.status == 502, r
        with https_gateway(up.port, '{ ca = "%s", sni = "localhost", cert = "%s", key = "%s" }'
                           % (ca, cc, ck)) as gw:
            r = Client(gw.port).request("GET", "/mtls")
            assert r.status == 200 and r.json()["client_cn"] == "gateway-client", r
        # https:// in the target alone turns TLS on (system store: our test
        # CA is not in it, so verification fails).
        with https_gateway(up.port, "true") as gw:
            r = Client(gw.port).request("GET", "/sys")
            assert r.status == 502, r


def test_check_reports_bad_upstream_tls_settings():
    d = tempfile.mkdtemp(prefix="mg-tls-")
    certs, ca = make_pki(d)
    lc, lk = certs["localhost"]

    def conf(up):
        return ('return { listen = { "127.0.0.1:1" }, upstreams = { up = %s },'
                ' routes = { { path = "/", upstream = "up" } } }' % up)

    rc, out = check(conf('{ targets = { "https://127.0.0.1:9" }, tls = { ca = "%s" } }' % ca))
    assert rc == 0, out
    # Active health checks of a TLS upstream (probed over TLS).
    rc, out = check(conf('{ targets = { "https://127.0.0.1:9" }, tls = { ca = "%s" },'
                         ' health = { path = "/h" } }' % ca))
    assert rc == 0, out
    cases = [
        ('{ targets = { "https://127.0.0.1:9", "127.0.0.1:10" } }',
         r"upstreams\.up: targets: mixes https:// and plain targets"),
        ('{ targets = { "https://127.0.0.1:9" }, tls = false }',
         r"upstreams\.up: tls: is false, but the targets are https://"),
        ('{ targets = { "127.0.0.1:9" }, tls = { ca = "%s/none.pem" } }' % d,
         r'upstreams\.up: tls: cannot read ca file ".*/none\.pem"'),
        ('{ targets = { "127.0.0.1:9" }, tls = { cert = "%s" } }' % lc,
         r"upstreams\.up: tls\.key: required with a client cert"),
        ('{ targets = { "127.0.0.1:9" }, tls = { cert = "%s", key = "%s" } }'
         % (lc, certs["a"][1]), r'upstreams\.up: tls: key file ".*a\.key" does not match'),
        ('{ targets = { "127.0.0.1:9" }, tls = { bogus = 1 } }',
         r"upstreams\.up: tls\.bogus: unknown field"),
    ]
    for up, want in cases:
        rc, out = check(conf(up))
        assert rc != 0 and re.search(want, out), (want, out)
    # Every error at once: a bad listener certificate does not hide the
    # upstream's.
    rc, out = check('return { listen = { { "127.0.0.1:1", tls = { cert = "%s/x.pem",'
                    ' key = "%s" } } }, upstreams = { up = { targets = { "127.0.0.1:9" },'
                    ' tls = { ca = "%s/y.pem" } } }, routes = { { path = "/", upstream = "up" } } }'
                    % (d, lk, d))
    assert rc != 0 and "x.pem" in out and "y.pem" in out, out
