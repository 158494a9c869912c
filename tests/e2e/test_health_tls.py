"""Active health checks of https:// upstreams: the probe runs over TLS with
the upstream's own context (CA, verification, SNI name), so a killed TLS
target is marked down and comes back when it answers again, a target whose
certificate fails verification is marked down with the TLS reason in the
log, and a target that accepts TCP but never finishes the handshake fails
the check within its timeout (and each probe's connection is closed).
Targets are tests/e2e/tls_upstream.py processes."""

import json
import os
import re
import ssl
import subprocess
import tempfile
import time

from harness import (HERE, PYTHON, Client, Gateway, _kill_group, _readline_timeout, spawn,
                     wait_until)
from test_tls import make_cert, make_pki


class TlsTarget:
    """tests/e2e/tls_upstream.py as a subprocess (optionally on a fixed
    port; silent=True: accepts TCP, never answers)."""

    def __init__(self, cert=None, key=None, port=0, silent=False, client_ca=None):
        self.cert, self.key, self.port, self.silent = cert, key, port, silent
        self.client_ca = client_ca
        self.proc = None

    def __enter__(self):
        argv = [PYTHON, str(HERE / "tls_upstream.py"), "--port", str(self.port)]
        argv += ["--silent"] if self.silent else ["--cert", self.cert, "--key", self.key]
        argv += ["--client-ca", self.client_ca] if self.client_ca else []
        self.proc = spawn(argv, "tls_upstream", stdout=subprocess.PIPE,
                          stdin=subprocess.DEVNULL)
        line = _readline_timeout(self.proc.stdout, 10)
        if not line.startswith(b"ready "):
            self.kill()
            raise AssertionError("tls_upstream did not start: %r" % line)
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc):
        self.kill()
        return False

    @property
    def addr(self):
        return "https://127.0.0.1:%d" % self.port

    def kill(self):
        if self.proc:
            _kill_group(self.proc)
            self.proc.wait()
            self.proc = None

    def count(self, ca, path, client=None):
        """How many requests for `path` arrived (asked over verified TLS,
        with the client certificate (cert, key) `client` if given)."""
        ctx = ssl.create_default_context(cafile=ca)
        if client:
            ctx.load_cert_chain(*client)
        c = Client(self.port)
        c.sock = ctx.wrap_socket(c.sock, server_hostname="127.0.0.1")
        with c:
            r = c.request("GET", "/__count")
        assert r.status == 200, r
        return r.json()["paths"].get(path, 0)

    def closed_line(self, timeout):
        """The next "closed SECONDS" of a silent target, as seconds."""
        line = _readline_timeout(self.proc.stdout, timeout)
        assert line.startswith(b"closed "), line
        return float(line.split()[1])


def config(upstreams, routes=None):
    ups = ",\n    ".join("%s = %s" % kv for kv in upstreams.items())
    routes = routes or ['{ path = "/*", upstream = "%s" }' % next(iter(upstreams))]
    return """return {
  listen = { "@LISTEN@" }, workers = 2,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  upstreams = {
    %s
  },
  routes = { %s },
}
""" % (ups, ", ".join(routes))


def upstream(targets, tls, health):
    return '{ targets = { %s }, tls = %s, retries = { count = 0 }, health = %s }' % (
        ", ".join('"%s"' % t for t in targets), tls, health)


def ports_seen(gw, n):
    ports = set()
    with Client(gw.port) as c:
        for i in range(n):
            r = c.request("GET", "/r/%d" % i)
            assert r.status == 200, r
            ports.add(json.loads(r.body)["port"])
    return ports


def test_a_killed_tls_target_is_marked_down_by_checks_over_tls_and_comes_back():
    d = tempfile.mkdtemp(prefix="mg-hc-tls-")
    certs, ca = make_pki(d)
    a = TlsTarget(*certs["localhost"]).__enter__()
    b = TlsTarget(*certs["localhost"]).__enter__()
    try:
        conf = config({"h": upstream(
            [a.addr, b.addr], '{ ca = "%s" }' % ca,
            '{ path = "/hc", interval = 0.1, timeout = 1, healthy = 2, unhealthy = 2 }')})
        with Gateway(conf) as gw:
            # The checks arrive over TLS (the targets speak nothing else).
            wait_until(lambda: a.count(ca, "/hc") >= 2 and b.count(ca, "/hc") >= 2, 5,
                       what="checks over TLS at both targets")
            assert ports_seen(gw, 10) == {a.port, b.port}
            since = gw.log_size()
            b_port = b.port
            b.kill()
            gw.wait_log(r"upstream h: target 127\.0\.0\.1:%d marked down by health checks "
                        r"\(2 failed: connection refused\)" % b_port, since=since, timeout=5)
            assert ports_seen(gw, 10) == {a.port}
            # A reload while probes run: the new checker takes over.
            gw.reload(conf)
            assert ports_seen(gw, 6) == {a.port}, "the reload lost the down mark"
            since = gw.log_size()
            b = TlsTarget(*certs["localhost"], port=b_port).__enter__()
            gw.wait_log(r"upstream h: target 127\.0\.0\.1:%d healthy again" % b_port,
                        since=since, timeout=5)
            assert ports_seen(gw, 10) == {a.port, b.port}
    finally:
        a.kill()
        b.kill()


def test_tls_targets_failing_verification_are_marked_down_with_the_tls_reason():
    d = tempfile.mkdtemp(prefix="mg-hc-tls-")
    certs, ca = make_pki(d)
    other = tempfile.mkdtemp(prefix="mg-hc-tls-other-")
    _, other_ca = make_pki(other)
    health = '{ path = "/hc", interval = 0.1, timeout = 1, unhealthy = 2 }'
    with TlsTarget(*certs["localhost"]) as t:
        conf = config({
            "wrongca": upstream([t.addr], '{ ca = "%s" }' % other_ca, health),
            "wrongname": upstream([t.addr], '{ ca = "%s", sni = "a.example.test" }' % ca,
                                  health),
            "good": upstream([t.addr], '{ ca = "%s", sni = "localhost" }' % ca, health),
        }, routes=['{ path = "/ca/*", upstream = "wrongca" }',
                   '{ path = "/name/*", upstream = "wrongname" }',
                   '{ path = "/*", upstream = "good" }'])
        with Gateway(conf) as gw:
            gw.wait_log(r"upstream wrongca: target 127\.0\.0\.1:%d marked down by health "
                        r"checks \(2 failed: TLS handshake failed: certificate verify failed: "
                        r"unable to get local issuer certificate\)" % t.port, timeout=5)
            gw.wait_log(r"upstream wrongname: target 127\.0\.0\.1:%d marked down by "
                        r"health checks \(2 failed: TLS handshake failed: certificate verify "
                        r"failed: hostname mismatch\)" % t.port, timeout=5)
            # The checker made them unusable: 503 without trying them.
            with Client(gw.port) as c:
                for path in ("/ca/x", "/name/x"):
                    r = c.request("GET", path)
                    assert r.status == 503, r
                    assert b"no healthy upstream target" in r.body, r
                r = c.request("GET", "/ok")
                assert r.status == 200 and json.loads(r.body)["path"] == "/ok", r
            # The good upstream's checks went through; the failing ones
            # never got a request to the target, and the log said it once.
            wait_until(lambda: t.count(ca, "/hc") >= 3, 5, what="good checks")
            time.sleep(0.5)  # several more failed checks
            text = gw.log_text()
            assert len(re.findall(r"upstream wrongca: .* marked down", text)) == 1, text
            assert len(re.findall(r"upstream wrongname: .* marked down", text)) == 1, text
            assert "healthy again" not in text


def test_checks_present_the_upstreams_client_certificate():
    d = tempfile.mkdtemp(prefix="mg-hc-tls-")
    certs, ca = make_pki(d)
    client = make_cert(d, "client", "gateway-client", ["DNS:gateway-client"])
    health = '{ path = "/hc", interval = 0.1, timeout = 1, unhealthy = 2 }'
    with TlsTarget(*certs["localhost"], client_ca=ca) as t:
        conf = config({
            "mtls": upstream([t.addr], '{ ca = "%s", cert = "%s", key = "%s" }'
                             % ((ca,) + client), health),
            "nocert": upstream([t.addr], '{ ca = "%s" }' % ca, health),
        }, routes=['{ path = "/n/*", upstream = "nocert" }',
                   '{ path = "/*", upstream = "mtls" }'])
        with Gateway(conf) as gw:
            # Without the certificate the target refuses the session (TLS
            # 1.3: after the client's Finished, so it shows on the read).
            gw.wait_log(r"upstream nocert: target 127\.0\.0\.1:%d marked down by health "
                        r"checks \(2 failed: TLS [a-z ]+: .*certificate required\)" % t.port,
                        timeout=5)
            wait_until(lambda: t.count(ca, "/hc", client) >= 3, 5, what="mTLS checks")
            text = gw.log_text()
            print(re.search(r"upstream nocert: .*", text).group(0))
            assert "upstream mtls: target" not in text
            r = Client(gw.port).request("GET", "/m")
            assert r.status == 200 and json.loads(r.body)["path"] == "/m", r


def test_a_target_that_never_finishes_the_handshake_fails_within_the_timeout():
    with TlsTarget(silent=True) as t:
        conf = config({"stuck": upstream(
            [t.addr], "{ verify = false }",
            '{ interval = 0.2, timeout = 0.4, unhealthy = 1 }')},
            # Only /x: the harness's readiness request must not wait on the
            # stuck target before the checks have marked it down.
            routes=['{ path = "/x", upstream = "stuck" }'])
        with Gateway(conf) as gw:
            gw.wait_log(r"upstream stuck: target 127\.0\.0\.1:%d marked down by health "
                        r"checks \(1 failed: timeout in the TLS handshake\)" % t.port, timeout=5)
            # Each probe's connection is closed at the check's timeout (0.4
            # s): held about that long as the target measures it (from its
            # accept, a little after the connect began), not for many
            # seconds. The bounds are for correctness, not speed: a probe
            # left open would show up as far longer, one closed before the
            # timeout as far shorter.
            held = [t.closed_line(5) for _ in range(3)]
            print("silent target: probe connections held %s s" % held)
            assert all(0.2 <= s < 2.0 for s in held), held
            r = Client(gw.port).request("GET", "/x")
            assert r.status == 503, r
            # A reload and a stop with a probe mid-handshake free the
            # session and the handle (the ASan build checks).
            gw.reload(conf)
            assert t.closed_line(5) >= 0
