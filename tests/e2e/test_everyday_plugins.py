"""The everyday plugins end to end: ip-restriction, cors,
request-size-limit and request-id (W3C trace context), the built-in
plugins/ files on the real binary, with the real upstream echoing what it
received and counting what reached it (/__stats).

ip-restriction refuses by CIDR (IPv4 and IPv6) on the client IP as decided by
trusted_proxies, so an untrusted peer's X-Forwarded-For changes nothing; cors
answers preflights itself and never pairs credentials with an origin it does
not trust; request-size-limit refuses Content-Length and chunked bodies over
its limit before the upstream sees a complete request; request-id keeps an
incoming trace id with a new parent id and replaces a malformed traceparent.
The parsing and matching logic is covered in depth by spec/*_spec.lua."""

import re
import socket

from harness import Client, build_request, chunked, hdr_values, lua, request, upstream_saw
from harness import Upstream
from test_lua import conf_text, make_gateway


def gateway(up, routes, extra=""):
    text = ",\n".join(lua(r, 1) for r in routes) + ","
    return make_gateway(conf_text(up, text, extra=extra))


def request_from(addr, port, method="GET", path="/", headers=None, body=None):
    """One request from source address `addr` (another loopback address)."""
    c = Client(port)
    c.sock.close()
    c.sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(addr, 0))
    with c:
        return c.request(method, path, headers, body)


# ------------------------------------------------------------ ip-restriction

IP_ROUTES = [
    {"path": "/local", "upstream": "up",
     "plugins": {"ip-restriction": {"allow": ["127.0.0.0/8"]}}},
    {"path": "/no-local", "upstream": "up",
     "plugins": {"ip-restriction": {"deny": ["127.0.0.1"]}}},
    {"path": "/doc-v4", "upstream": "up",
     "plugins": {"ip-restriction": {"allow": ["203.0.113.0/24"]}}},
    {"path": "/doc-v6", "upstream": "up",
     "plugins": {"ip-restriction": {"allow": ["2001:db8::/32"], "deny": ["2001:db8:bad::/48"]}}},
]
IP_EXTRA = 'trusted_proxies = { "127.0.0.2/32" },'


def test_ip_restriction_allows_and_denies_by_cidr_with_403_json():
    with Upstream() as up, gateway(up, IP_ROUTES, IP_EXTRA) as gw:
        upstream_saw(request(gw.port, "GET", "/local"))
        for path in ("/no-local", "/doc-v4", "/doc-v6"):
            r = request(gw.port, "GET", path)
            assert r.status == 403, (path, r)
            assert r.header("content-type", "").startswith("application/json"), r
            assert r.json() == {"error": "forbidden"}, r
        assert up.stats()["requests"] == 1


def test_ip_restriction_ignores_a_spoofed_x_forwarded_for_from_an_untrusted_peer():
    spoof = [("X-Forwarded-For", "203.0.113.7")]
    with Upstream() as up, gateway(up, IP_ROUTES, IP_EXTRA) as gw:
        # 127.0.0.1 is not a trusted proxy: its X-Forwarded-For is not believed
        assert request(gw.port, "GET", "/doc-v4", headers=spoof).status == 403
        assert request(gw.port, "GET", "/no-local", headers=spoof).status == 403
        # the same header from the trusted proxy 127.0.0.2 decides the client IP
        upstream_saw(request_from("127.0.0.2", gw.port, "GET", "/doc-v4", headers=spoof))
        assert request_from("127.0.0.2", gw.port, "GET", "/local", headers=spoof).status == 403


def test_ip_restriction_matches_ipv6_clients_behind_a_trusted_proxy():
    with Upstream() as up, gateway(up, IP_ROUTES, IP_EXTRA) as gw:
        def via(ip, path="/doc-v6"):
            return request_from("127.0.0.2", gw.port, "GET", path, headers=[("X-Forwarded-For", ip)])
        upstream_saw(via("2001:db8::5"))
        upstream_saw(via("2001:DB8:ffff::1"))
        assert via("2001:db8:bad::1").status == 403   # deny wins
        assert via("2001:db9::1").status == 403
        assert via("::ffff:203.0.113.9", "/doc-v6").status == 403
        upstream_saw(via("::ffff:203.0.113.9", "/doc-v4"))  # IPv4-mapped matches the v4 CIDR


# ------------------------------------------------------------------- cors

CORS_ROUTES = [
    {"path": "/cred", "upstream": "up", "plugins": {"cors": {
        "origins": ["https://app.example.com", "*.example.org"],
        "credentials": True, "expose_headers": ["X-Total"], "max_age": 120,
        "headers": ["Authorization", "Content-Type"]}}},
    {"path": "/any", "upstream": "up", "plugins": {"cors": {"origins": ["*"]}}},
    {"path": "/pat", "upstream": "up", "plugins": {"cors": {
        "origin_patterns": [r"https://[%w-]+%.preview%.example%.net"]}}},
]


def preflight(origin, method="PUT", extra=()):
    return [("Origin", origin), ("Access-Control-Request-Method", method)] + list(extra)


def test_cors_preflight_is_answered_without_reaching_the_upstream():
    with Upstream() as up, gateway(up, CORS_ROUTES) as gw:
        before = up.stats()["requests"]
        r = request(gw.port, "OPTIONS", "/cred", headers=preflight("https://app.example.com"))
        assert r.status == 204, r
        assert r.header("access-control-allow-origin") == "https://app.example.com", r
        assert r.header("access-control-allow-credentials") == "true", r
        assert "PUT" in r.header("access-control-allow-methods", ""), r
        assert r.header("access-control-allow-headers") == "Authorization,Content-Type", r
        assert r.header("access-control-max-age") == "120", r
        assert "Origin" in r.header("vary", ""), r
        r = request(gw.port, "OPTIONS", "/cred", headers=preflight("https://x.example.org"))
        assert r.status == 204 and r.header("access-control-allow-origin") == "https://x.example.org"
        # an untrusted origin's preflight: answered, but with no CORS grant
        r = request(gw.port, "OPTIONS", "/cred", headers=preflight("https://evil.test"))
        assert r.status == 204, r
        assert r.header("access-control-allow-origin") is None, r
        assert r.header("access-control-allow-credentials") is None, r
        assert up.stats()["requests"] == before, "a preflight reached the upstream"
        # a plain OPTIONS (no Access-Control-Request-Method) is proxied
        upstream_saw(request(gw.port, "OPTIONS", "/cred", headers=[("Origin", "https://evil.test")]))


def test_cors_never_pairs_credentials_with_an_untrusted_origin():
    with Upstream() as up, gateway(up, CORS_ROUTES) as gw:
        for origin in ("https://evil.test", "null", "https://app.example.com.evil.test",
                       "https://example.org", "https://app.example.comx"):
            r = request(gw.port, "GET", "/cred", headers=[("Origin", origin)])
            assert r.status == 200, r
            assert r.header("access-control-allow-origin") is None, (origin, r)
            assert r.header("access-control-allow-credentials") is None, (origin, r)
            assert "Origin" in r.header("vary", ""), (origin, r)
        r = request(gw.port, "GET", "/cred", headers=[("Origin", "https://app.example.com")])
        assert r.header("access-control-allow-origin") == "https://app.example.com", r
        assert r.header("access-control-allow-credentials") == "true", r
        assert r.header("access-control-expose-headers") == "X-Total", r
        assert "Origin" in r.header("vary", ""), r


def test_cors_star_and_patterns():
    with Upstream() as up, gateway(up, CORS_ROUTES) as gw:
        r = request(gw.port, "GET", "/any", headers=[("Origin", "https://whoever.test")])
        assert r.header("access-control-allow-origin") == "*", r
        assert r.header("access-control-allow-credentials") is None, r
        r = request(gw.port, "GET", "/pat", headers=[("Origin", "https://pr-12.preview.example.net")])
        assert r.header("access-control-allow-origin") == "https://pr-12.preview.example.net", r
        r = request(gw.port, "GET", "/pat", headers=[("Origin", "https://a.b.preview.example.net")])
        assert r.header("access-control-allow-origin") is None, r
        r = request(gw.port, "GET", "/pat")          # no Origin: no CORS headers, Vary still
        assert r.header("access-control-allow-origin") is None and "Origin" in r.header("vary", "")


def test_cors_refuses_star_origins_with_credentials_at_load():
    routes = [{"path": "/x", "upstream": "up", "plugins": {"cors": {
        "origins": ["*"], "credentials": True}}}]
    with Upstream() as up:
        gw = gateway(up, routes)
        try:
            gw.start()
        except Exception:
            pass
        else:
            gw.stop(expect_code=None)
            raise AssertionError("a cors config with origins * and credentials was accepted")
        assert "credentials" in gw.log_text(), gw.log_text()[-2000:]


# ------------------------------------------------------- request-size-limit

SIZE_ROUTES = [
    {"path": "/small", "upstream": "up", "max_body": "64k",
     "plugins": {"request-size-limit": {"limit": "1k"}}},
]


def test_request_size_limit_refuses_a_content_length_over_the_limit():
    with Upstream() as up, gateway(up, SIZE_ROUTES) as gw:
        desc = upstream_saw(request(gw.port, "POST", "/small", body=b"a" * 1024))
        assert desc["body_len"] == 1024, desc
        before = up.stats()["requests"]
        r = request(gw.port, "POST", "/small", body=b"a" * 1025)
        assert r.status == 413 and r.json() == {"error": "request body too large"}, r
        assert up.stats()["requests"] == before
        # Refused from the declared length alone: the head is enough.
        with Client(gw.port, timeout=5) as c:
            c.send(b"POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
            r = c.read_response()
            assert r.status == 413, r
        assert up.stats()["requests"] == before


def test_request_size_limit_refuses_a_chunked_body_over_the_limit():
    with Upstream() as up, gateway(up, SIZE_ROUTES) as gw:
        body = chunked(b"a" * 600, b"b" * 424)
        upstream_saw(request(gw.port, "POST", "/small",
                             headers=[("Transfer-Encoding", "chunked")], body=body))
        st0 = up.stats()
        body = chunked(b"a" * 600, b"b" * 600)
        r = request(gw.port, "POST", "/small", headers=[("Transfer-Encoding", "chunked")], body=body)
        assert r.status == 413 and r.json() == {"error": "request body too large"}, r
        st = up.stats()
        assert st["requests"] == st0["requests"], "an over-limit chunked body reached the upstream"
        assert st["completed"] == st0["completed"], st
        # past the route's max_body the core cuts it while streaming
        with Client(gw.port) as c:
            c.send(build_request("POST", "/small", headers=[("Transfer-Encoding", "chunked")]))
            for _ in range(200):
                try:
                    c.send(b"400\r\n" + b"z" * 1024 + b"\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break
                if c.has_input(0.005):
                    break
            r = c.read_response()
        assert r.status == 413, r
        assert up.stats()["completed"] == st0["completed"]


# ---------------------------------------------------------------- request-id

TP_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
ID_ROUTES = [
    {"path": "/t", "upstream": "up", "plugins": {"request-id": {}}},
    {"path": "/echo", "upstream": "up", "plugins": {"request-id": {"response_header": "traceparent"}}},
]
VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_keeps_its_trace_id_with_a_new_parent_id():
    with Upstream() as up, gateway(up, ID_ROUTES) as gw:
        r = request(gw.port, "GET", "/t", headers=[("traceparent", VALID), ("tracestate", "k=v")])
        desc = upstream_saw(r)
        [tp] = hdr_values(desc, "traceparent")
        m = TP_RE.match(tp)
        assert m, tp
        assert m.group(1) == "4bf92f3577b34da6a3ce929d0e0e4736", tp
        assert m.group(2) != "00f067aa0ba902b7" and m.group(2) != "0" * 16, tp
        assert m.group(3) == "01", tp
        assert hdr_values(desc, "tracestate") == ["k=v"], desc
        assert r.header("x-trace-id") == "4bf92f3577b34da6a3ce929d0e0e4736", r
        assert r.header("x-request-id"), r
        assert hdr_values(desc, "x-request-id") == [r.header("x-request-id")], desc
        r = request(gw.port, "GET", "/echo", headers=[("traceparent", VALID)])
        sent = hdr_values(upstream_saw(r), "traceparent")
        assert r.header("traceparent") == sent[0], (r, sent)


def test_a_malformed_or_missing_traceparent_starts_a_fresh_trace():
    bad = ["garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
           "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
           "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
           VALID.upper(), VALID + "-x", None]
    with Upstream() as up, gateway(up, ID_ROUTES) as gw:
        seen = set()
        for tp in bad:
            h = [("tracestate", "k=v")] + ([("traceparent", tp)] if tp else [])
            r = request(gw.port, "GET", "/t", headers=h)
            desc = upstream_saw(r)
            [sent] = hdr_values(desc, "traceparent")
            m = TP_RE.match(sent)
            assert m, (tp, sent)
            assert m.group(1) not in ("4bf92f3577b34da6a3ce929d0e0e4736", "0" * 32), (tp, sent)
            assert hdr_values(desc, "tracestate") == [], (tp, desc)
            assert r.header("x-trace-id") == m.group(1), (tp, r)
            seen.add(m.group(1))
        assert len(seen) == len(bad), "fresh trace ids repeat"
