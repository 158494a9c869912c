"""jwt-auth with JWK Sets from a URL, an upstream and a file, end to end:
the real binary (two workers sharing the fetched set through a shared dict),
a real JWK Set server process (tests/e2e/jwks_server.py) that counts the
gateway's fetches, and the echoing upstream behind the routes.

Fetched once for many requests on both workers; a rotated set is picked up
for the new kid after one refresh and the old kid is refused after; with
the JWK Set server answering errors, killed or hung, the last good keys
keep working, an unknown kid gets 401 without hanging, and refresh attempts
stay within one per jwks_refresh_interval (counted at the server). A
jwks_file is read at load (relative to the config), re-read by a reload,
and a bad one is a config error naming the field."""

import base64
import json
import os
import signal
import subprocess
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from harness import (HERE, PYTHON, ROOT, Gateway, Upstream, _kill_group, _readline_timeout,
                     request, spawn, upstream_saw, hdr_values)
from test_lua import run_cli

FIXTURES = os.path.join(ROOT, "spec", "fixtures", "jwt")
ALGS = '{ "RS256", "ES256" }'


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _key(name):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return serialization.load_pem_private_key(f.read(), None)


KEYS = {"rsa-1": _key("rsa.pem"), "rsa-2": _key("rsa_other.pem"), "ec-1": _key("ec256.pem")}


def jwk(kid):
    """The public JWK of one of KEYS."""
    pub = KEYS[kid].public_key().public_numbers()
    if kid.startswith("rsa"):
        n = pub.n.to_bytes((pub.n.bit_length() + 7) // 8, "big")
        return {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64u(n), "e": "AQAB"}
    return {"kty": "EC", "kid": kid, "crv": "P-256",
            "x": b64u(pub.x.to_bytes(32, "big")), "y": b64u(pub.y.to_bytes(32, "big"))}


def token(kid, sub="alice"):
    h = {"alg": "RS256" if kid.startswith("rsa") else "ES256", "typ": "JWT", "kid": kid}
    c = {"sub": sub, "roles": ["user"], "exp": int(time.time()) + 600}
    inp = (b64u(json.dumps(h).encode()) + "." + b64u(json.dumps(c).encode())).encode()
    key = KEYS[kid]
    if kid.startswith("rsa"):
        sig = key.sign(inp, padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = utils.decode_dss_signature(key.sign(inp, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return inp.decode() + "." + b64u(sig)


def bearer(t):
    return [("Authorization", "Bearer " + t)]


class JwksServer:
    """tests/e2e/jwks_server.py as a subprocess (optionally on a fixed port)."""

    def __init__(self, port=0):
        self.port = port
        self.proc = None

    def __enter__(self):
        self.proc = spawn([PYTHON, str(HERE / "jwks_server.py"), "--port", str(self.port)],
                          "jwks_server", stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        line = _readline_timeout(self.proc.stdout, 10)
        if not line.startswith(b"ready "):
            self.kill()
            raise AssertionError("jwks_server did not start: %r" % line)
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc):
        self.kill()
        return False

    def kill(self):
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            _kill_group(self.proc)
            self.proc.wait()

    def pause(self):
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def serve(self, *kids):
        r = request(self.port, "POST", "/__set", body=json.dumps({"keys": [jwk(k) for k in kids]}))
        assert r.status == 200, r

    def status(self, n):
        r = request(self.port, "POST", "/__status", body=json.dumps({"status": n}))
        assert r.status == 200, r

    def fetches(self, path="/jwks.json"):
        r = request(self.port, "GET", "/__count")
        assert r.status == 200, r
        return r.json()["fetches"].get(path, 0)


def config(up, jw, routes, workers=2, shared='jwks = "1m"'):
    return """return {
  listen = { "@LISTEN@" }, workers = %d,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  shared = { %s },
  upstreams = { up = { targets = { "%s" } }, idp = { targets = { "127.0.0.1:%d" } } },
  routes = {
%s
  },
}
""" % (workers, shared, up.addr, jw.port, routes)


def url_route(jw, path="/api/*", **opts):
    extra = "".join(", %s = %s" % (k, v) for k, v in opts.items())
    return ('    { path = "%s", upstream = "up", plugins = { ["jwt-auth"] = {\n'
            '        jwks_url = "http://127.0.0.1:%d/jwks.json", jwks_algorithms = %s%s } } },'
            % (path, jw.port, ALGS, extra))


def get(gw, t, path="/api/x"):
    return request(gw.port, "GET", path, headers=bearer(t), timeout=15)


def status_of(gw, t, path="/api/x"):
    return get(gw, t, path).status


def test_jwks_url_is_fetched_once_for_many_requests_on_two_workers():
    with JwksServer() as jw, Upstream() as up:
        jw.serve("rsa-1", "ec-1")
        routes = url_route(jw, jwks_refresh_interval=30) + "\n" + (
            '    { path = "/idp/*", upstream = "up", plugins = { ["jwt-auth"] = {\n'
            '        jwks_upstream = "idp", jwks_path = "/idp/jwks.json", jwks_algorithms = %s } } },'
            % ALGS)
        with Gateway(config(up, jw, routes)) as gw:
            assert len(gw.worker_pids()) == 2
            for i in range(30):
                kid = "rsa-1" if i % 2 else "ec-1"
                desc = upstream_saw(get(gw, token(kid, sub="u%d" % i)))
                assert hdr_values(desc, "x-user-id") == ["u%d" % i], desc
            # Unknown kids on fresh connections, until both workers have
            # answered one (which worker accepts is the kernel's choice):
            # each has the keys (the reason is "unknown kid", not "signing
            # keys unavailable") and refuses without a fetch of its own (the
            # shared rate limit holds for 30 s).
            other = token("rsa-2")

            def refusing():
                return {line.split(" worker ")[1].split(":")[0]
                        for line in gw.log_text().splitlines() if "jwt-auth: unknown kid" in line}
            for _ in range(300):
                r = get(gw, other)
                assert r.status == 401, r
                assert "unknown kid" in r.header("www-authenticate"), r
                if len(refusing()) == 2:
                    break
                time.sleep(0.01)
            assert len(refusing()) == 2, "expected both workers to answer:\n" + gw.log_tail()
            assert jw.fetches() == 1
            # jwks_upstream: the named upstream, the configured path
            desc = upstream_saw(get(gw, token("rsa-1"), "/idp/x"))
            assert hdr_values(desc, "x-user-id") == ["alice"], desc
            for _ in range(10):
                assert status_of(gw, token("ec-1"), "/idp/y") == 200
            assert jw.fetches("/idp/jwks.json") == 1
            assert jw.fetches() == 1


def test_a_rotated_jwks_is_picked_up_for_the_new_kid_and_the_old_kid_is_refused_after():
    with JwksServer() as jw, Upstream() as up:
        jw.serve("rsa-1")
        with Gateway(config(up, jw, url_route(jw, jwks_refresh_interval=1))) as gw:
            old = token("rsa-1")
            for _ in range(6):
                assert status_of(gw, old) == 200   # fills the verified-token caches too
            assert jw.fetches() == 1
            jw.serve("rsa-2")
            time.sleep(1.2)                         # past the refresh interval
            new = token("rsa-2", sub="bob")
            desc = upstream_saw(get(gw, new))
            assert hdr_values(desc, "x-user-id") == ["bob"], desc
            assert jw.fetches() == 2                # one refresh, for both workers
            for _ in range(10):
                assert status_of(gw, new) == 200
            assert jw.fetches() == 2
            # The old kid: refused on every worker once each has looked at
            # the shared copy again (at most a second), cached token or not.
            time.sleep(1.2)
            for _ in range(10):
                r = get(gw, old)
                assert r.status == 401, r
                assert "unknown kid" in r.header("www-authenticate"), r
            assert jw.fetches() <= 3, jw.fetches()


def test_with_the_jwks_server_failing_the_last_good_keys_work_and_refreshes_are_rate_limited():
    with JwksServer() as jw, Upstream() as up:
        jw.serve("rsa-1")
        route = url_route(jw, jwks_refresh_interval=1, jwks_timeout=1)
        with Gateway(config(up, jw, route)) as gw:
            good, unknown = token("rsa-1"), token("ec-1")
            assert status_of(gw, good) == 200
            assert jw.fetches() == 1

            # Answering errors: unknown kids are refused, each refresh
            # attempt reaches the server, at most one per interval.
            jw.status(503)
            t0 = time.monotonic()
            n = 0
            while time.monotonic() - t0 < 3.0:
                r = get(gw, unknown)
                assert r.status == 401, r
                assert "unknown kid" in r.header("www-authenticate"), r
                assert status_of(gw, good) == 200
                n += 1
            elapsed = time.monotonic() - t0
            attempts = jw.fetches() - 1
            assert n >= 10, n
            assert 1 <= attempts <= int(elapsed) + 2, (attempts, elapsed)
            gw.wait_log(r"fetching the JWK Set from .* failed: status 503 \(keeping the last good keys\)")

            # Killed (connection refused): the same.
            jw.kill()
            time.sleep(1.1)
            for _ in range(5):
                r = get(gw, unknown)
                assert r.status == 401, r
                assert status_of(gw, good) == 200
            gw.wait_log(r"fetching the JWK Set from .* failed: connection refused")


def test_a_hung_jwks_server_delays_an_unknown_kid_by_the_fetch_timeout_only():
    with JwksServer() as jw, Upstream() as up:
        jw.serve("rsa-1")
        route = url_route(jw, jwks_refresh_interval=1, jwks_timeout=1)
        with Gateway(config(up, jw, route)) as gw:
            good, unknown = token("rsa-1"), token("ec-1")
            assert status_of(gw, good) == 200
            jw.pause()                              # accepts, never answers
            time.sleep(1.1)
            t0 = time.monotonic()
            r = get(gw, unknown)                    # waits for the fetch: 1 s timeout
            assert r.status == 401, r
            took = time.monotonic() - t0
            assert took < 10, took                  # not a hang (the client allows 15 s)
            for _ in range(5):
                assert status_of(gw, good) == 200
            gw.wait_log(r"fetching the JWK Set from .* failed: timeout")


def test_without_the_shared_dict_each_worker_fetches_for_itself():
    with JwksServer() as jw, Upstream() as up:
        jw.serve("rsa-1")
        cfg = config(up, jw, url_route(jw, jwks_refresh_interval=30), shared="")
        with Gateway(cfg) as gw:
            for _ in range(30):
                assert status_of(gw, token("rsa-1")) == 200
            assert 1 <= jw.fetches() <= 2, jw.fetches()
            gw.wait_log(r'no shared dict "jwks" \(declare it')


def file_route(path):
    return ('    { path = "/api/*", upstream = "up", plugins = { ["jwt-auth"] = {\n'
            '        jwks_file = "%s", jwks_algorithms = %s } } },' % (path, ALGS))


def test_jwks_file_is_read_at_load_relative_to_the_config_and_again_on_reload():
    with JwksServer() as jw, Upstream() as up:
        gw = Gateway(config(up, jw, file_route("keys/jwks.json")))
        os.makedirs(os.path.join(gw.dir, "keys"))
        path = os.path.join(gw.dir, "keys", "jwks.json")
        with open(path, "w") as f:
            json.dump({"keys": [jwk("rsa-1"), jwk("ec-1")]}, f)
        with gw:
            desc = upstream_saw(get(gw, token("ec-1", sub="carol")))
            assert hdr_values(desc, "x-user-id") == ["carol"], desc
            assert status_of(gw, token("rsa-1")) == 200
            assert status_of(gw, token("rsa-2")) == 401
            # A bad file is refused by check and by a reload, naming the field;
            # the running generation keeps its keys.
            with open(path, "w") as f:
                json.dump({"keys": [dict(jwk("rsa-2"), d="AAAA")]}, f)
            code, out, err = run_cli("check", "-c", gw.conf_path)
            assert code == 1, (code, out, err)
            assert "plugins.jwt-auth: jwks_file " in out + err, out + err
            assert "private or symmetric key material" in out + err, out + err
            since = gw.log_size()
            gw.signal(signal.SIGHUP)
            gw.wait_log(r"jwks_file .*keys/jwks.json: keys\[1\]: private", since=since)
            assert status_of(gw, token("rsa-1")) == 200
            # A good new file: a reload reads it.
            with open(path, "w") as f:
                json.dump({"keys": [jwk("rsa-2")]}, f)
            gw.reload()
            assert status_of(gw, token("rsa-2")) == 200
            assert status_of(gw, token("rsa-1")) == 401
            os.remove(path)
            code, out, err = run_cli("check", "-c", gw.conf_path)
            assert code == 1 and "jwks_file: cannot read" in out + err, out + err


def test_a_misnamed_jwks_upstream_answers_401_and_logs_the_failed_fetch():
    with JwksServer() as jw, Upstream() as up:
        jw.serve("rsa-1")
        route = ('    { path = "/api/*", upstream = "up", plugins = { ["jwt-auth"] = {\n'
                 '        jwks_upstream = "nope", jwks_algorithms = %s } } },' % ALGS)
        with Gateway(config(up, jw, route, workers=1)) as gw:
            r = get(gw, token("rsa-1"))
            assert r.status == 401, r
            assert "signing keys unavailable" in r.header("www-authenticate"), r
            assert r.json() == {"error": "signing keys unavailable"}, r
            gw.wait_log(r"fetching the JWK Set from upstream nope/.well-known/jwks.json failed: "
                        r"no such upstream \(no keys yet\)")
            assert jw.fetches() == 0
