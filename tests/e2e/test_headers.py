"""Header handling toward the upstream and back: hop-by-hop removal both
ways, identity and underscore headers, X-Forwarded-*, X-Request-Id."""

import re

from harness import Client, build_request, chunked, hdr_values, proxied, request, route, \
    upstream_saw

HOP_BY_HOP = ["keep-alive", "te", "trailer", "upgrade", "proxy-connection",
              "proxy-authorization", "proxy-authenticate", "transfer-encoding"]
IDENTITY = ["X-User-ID", "X-User-Roles", "X-Consumer-ID", "X-Consumer-Username",
            "X-Consumer-Roles", "X-Consumer-Custom-ID"]
HEX32 = re.compile(r"^[0-9a-f]{32}$")


def names(desc):
    return [n.lower() for n, _ in desc["headers"]]


def assert_own_connection_header_only(values, what):
    """Only the gateway's own keep-alive/close may appear in Connection."""
    for v in values:
        toks = {t.strip().lower() for t in v.split(",")}
        assert toks <= {"keep-alive", "close"}, "%s Connection header %r" % (what, v)


def test_hop_by_hop_request_headers_are_not_forwarded():
    hdrs = [("Connection", "keep-alive, X-Foo, x-bar"), ("X-Foo", "1"), ("X-Bar", "2"),
            ("Keep-Alive", "timeout=300"), ("TE", "trailers"), ("Trailer", "X-T"),
            ("Upgrade", "websocket"), ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic c2VjcmV0"), ("X-Kept", "yes")]
    with proxied() as (gw, up):
        d = upstream_saw(request(gw.port, "GET", "/hop", headers=hdrs))
    got = names(d)
    for h in HOP_BY_HOP + ["x-foo", "x-bar"]:
        assert h not in got, "%s forwarded: %r" % (h, d["headers"])
    assert_own_connection_header_only(hdr_values(d, "connection"), "forwarded")
    assert hdr_values(d, "x-kept") == ["yes"], d["headers"]


def test_connection_named_headers_are_matched_case_insensitively_in_lists():
    hdrs = [("Connection", "X-ONE ,x-two"), ("Connection", "X-Three"), ("x-one", "1"),
            ("X-Two", "2"), ("X-THREE", "3"), ("X-Four", "4")]
    with proxied() as (gw, up):
        d = upstream_saw(request(gw.port, "GET", "/hop2", headers=hdrs))
    got = names(d)
    for h in ("x-one", "x-two", "x-three"):
        assert h not in got, "%s forwarded: %r" % (h, d["headers"])
    assert hdr_values(d, "x-four") == ["4"]


def test_hop_by_hop_response_headers_are_not_returned():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            r = c.request("GET", "/hop?hop=1&hdr=X-Kept:1")
            assert r.status == 200, r
            got = [n.lower() for n, _ in r.headers]
            for h in ("x-hop", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
                assert h not in got, "%s returned to the client: %r" % (h, r.headers)
            assert_own_connection_header_only(r.header_all("connection"), "returned")
            assert r.header("x-kept") == "1", r.headers
            # The connection is still a good keep-alive connection.
            assert upstream_saw(c.request("GET", "/next"))["path"] == "/next"


def test_identity_headers_from_the_client_are_removed():
    hdrs = [(h if i % 2 else h.lower(), "spoofed") for i, h in enumerate(IDENTITY)]
    hdrs += [("X-Tenant", "spoofed"), ("X-Userx", "kept"), ("X-Consumer", "kept")]
    with proxied(identity_headers=["X-Tenant"]) as (gw, up):
        d = upstream_saw(request(gw.port, "GET", "/id", headers=hdrs))
    got = names(d)
    for h in IDENTITY + ["X-Tenant"]:
        assert h.lower() not in got, "%s forwarded: %r" % (h, d["headers"])
    assert hdr_values(d, "x-userx") == ["kept"], d["headers"]
    assert hdr_values(d, "x-consumer") == ["kept"], d["headers"]
    assert "spoofed" not in str(d["headers"])


def test_header_names_with_underscores_are_dropped():
    hdrs = [("X_User_ID", "1"), ("Foo_Bar", "2"), ("Foo-Bar", "3"), ("_", "4")]
    with proxied() as (gw, up):
        d = upstream_saw(request(gw.port, "GET", "/u", headers=hdrs))
    assert not [n for n in names(d) if "_" in n], d["headers"]
    assert hdr_values(d, "foo-bar") == ["3"], d["headers"]


def test_x_forwarded_for_from_an_untrusted_peer_is_replaced():
    with proxied() as (gw, up):
        d = upstream_saw(request(gw.port, "GET", "/xff", headers=[
            ("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-For", "5.6.7.8")]))
        assert hdr_values(d, "x-forwarded-for") == ["127.0.0.1"], d["headers"]
        d = upstream_saw(request(gw.port, "GET", "/xff"))
        assert hdr_values(d, "x-forwarded-for") == ["127.0.0.1"], d["headers"]


def test_x_forwarded_for_from_a_trusted_peer_is_appended_to():
    with proxied(trusted_proxies=["127.0.0.1/32"]) as (gw, up):
        d = upstream_saw(request(gw.port, "GET", "/xff", headers=[
            ("X-Forwarded-For", "1.2.3.4")]))
        assert ", ".join(hdr_values(d, "x-forwarded-for")) == "1.2.3.4, 127.0.0.1", d["headers"]
        d = upstream_saw(request(gw.port, "GET", "/xff", headers=[
            ("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2, 3.3.3.3")]))
        assert ", ".join(hdr_values(d, "x-forwarded-for")) == \
            "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1", d["headers"]
        d = upstream_saw(request(gw.port, "GET", "/xff"))
        assert hdr_values(d, "x-forwarded-for") == ["127.0.0.1"], d["headers"]


def test_a_trusted_range_that_does_not_contain_the_peer_is_not_trusted():
    with proxied(trusted_proxies=["10.0.0.0/8", "127.0.0.2/32", "::1/128"]) as (gw, up):
        d = upstream_saw(request(gw.port, "GET", "/xff", headers=[
            ("X-Forwarded-For", "1.2.3.4"), ("X-Request-Id", "client-chosen")]))
        assert hdr_values(d, "x-forwarded-for") == ["127.0.0.1"], d["headers"]
        rid = hdr_values(d, "x-request-id")
        assert len(rid) == 1 and HEX32.match(rid[0]), d["headers"]


def test_x_forwarded_proto_and_host_are_set():
    with proxied() as (gw, up):
        d = upstream_saw(request(gw.port, "GET", "/xf", host="api.example.com:8080", headers=[
            ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil.example.com")]))
        assert hdr_values(d, "x-forwarded-proto") == ["http"], d["headers"]
        assert hdr_values(d, "x-forwarded-host") == ["api.example.com:8080"], d["headers"]


def test_x_request_id_is_generated_forwarded_and_returned():
    with proxied() as (gw, up):
        seen = set()
        for _ in range(3):
            r = request(gw.port, "GET", "/rid", headers=[("X-Request-Id", "client-chosen")])
            d = upstream_saw(r)
            ids = hdr_values(d, "x-request-id")
            assert len(ids) == 1 and HEX32.match(ids[0]), d["headers"]
            assert r.header("x-request-id") == ids[0], (r.headers, ids)
            seen.add(ids[0])
        assert len(seen) == 3, "request ids repeat: %r" % seen


def test_x_request_id_from_a_trusted_peer_is_kept():
    with proxied(trusted_proxies=["127.0.0.1/32"]) as (gw, up):
        r = request(gw.port, "GET", "/rid", headers=[("X-Request-Id", "abc-123")])
        d = upstream_saw(r)
        assert hdr_values(d, "x-request-id") == ["abc-123"], d["headers"]
        assert r.header("x-request-id") == "abc-123", r.headers
        r = request(gw.port, "GET", "/rid")
        ids = hdr_values(upstream_saw(r), "x-request-id")
        assert len(ids) == 1 and HEX32.match(ids[0]), ids


def test_client_cannot_remove_gateway_headers_by_naming_them_in_connection():
    own = "X-Forwarded-For, X-Request-Id, X-Forwarded-Proto, X-Forwarded-Host"
    for trusted in ([], ["127.0.0.1/32"]):
        with proxied(trusted_proxies=trusted) as (gw, up):
            r = request(gw.port, "GET", "/conn", host="h.example.com",
                        headers=[("Connection", own)])
            d = upstream_saw(r)
            assert hdr_values(d, "x-forwarded-for") == ["127.0.0.1"], (trusted, d["headers"])
            assert hdr_values(d, "x-forwarded-proto") == ["http"], (trusted, d["headers"])
            assert hdr_values(d, "x-forwarded-host") == ["h.example.com"], (trusted, d["headers"])
            ids = hdr_values(d, "x-request-id")
            assert len(ids) == 1 and HEX32.match(ids[0]), (trusted, d["headers"])
            assert r.header("x-request-id") == ids[0], r.headers


def test_identity_header_named_in_connection_is_still_removed():
    with proxied() as (gw, up):
        d = upstream_saw(request(gw.port, "GET", "/c", headers=[
            ("Connection", "X-Other"), ("X-User-ID", "admin"), ("X-Other", "o")]))
        assert "x-user-id" not in names(d) and "x-other" not in names(d), d["headers"]


def test_expect_is_not_forwarded():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            c.send(build_request("POST", "/e", headers=[("Expect", "100-continue"),
                                                        ("Content-Length", "3")]))
            assert c.read_response(interim=True).status == 100
            c.send(b"abc")
            d = upstream_saw(c.read_response())
            assert "expect" not in names(d), d["headers"]


def test_client_transfer_encoding_and_chunk_framing_never_reach_the_upstream():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            c.send(build_request("POST", "/te", headers=[("Transfer-Encoding", "chunked"),
                                                         ("TE", "trailers")]))
            c.send(chunked(b"hello", b"world", ext="evil=1",
                           trailers=["X-Smuggled: 1", "X-Also: 2"]))
            d = upstream_saw(c.read_response())
    assert d["body"] == "helloworld", d
    assert hdr_values(d, "transfer-encoding") in ([], ["chunked"]), d["headers"]
    assert not hdr_values(d, "te") and not hdr_values(d, "x-smuggled"), d["headers"]
    assert not hdr_values(d, "x-also"), "trailer folded into headers: %r" % d["headers"]
    assert hdr_values(d, "content-length") in ([], ["10"]), d["headers"]
    assert not any("evil" in l for l in d["chunk_lines"]), d["chunk_lines"]


def test_other_request_headers_are_forwarded_in_order_with_values_intact():
    hdrs = [("Accept", "application/json"), ("X-Multi", "1"), ("Authorization", "Bearer t"),
            ("X-Multi", "2"), ("Cookie", "a=1; b=2"), ("User-Agent", "e2e/1.0 (x; y)"),
            ("X-Empty", "")]
    with proxied() as (gw, up):
        d = upstream_saw(request(gw.port, "GET", "/fw", headers=hdrs))
    assert ", ".join(hdr_values(d, "x-multi")) == "1, 2", d["headers"]
    for n, v in hdrs:
        if n != "X-Multi":
            assert hdr_values(d, n) == [v], (n, d["headers"])
    order = [n.lower() for n, _ in d["headers"] if n.lower() in ("accept", "authorization",
                                                                   "cookie", "user-agent")]
    assert order == ["accept", "authorization", "cookie", "user-agent"], d["headers"]


def test_hop_by_hop_stripping_applies_on_every_route_shape():
    routes = [route("/a/{id}", rewrite="/b/{id}"), route("/s/*", strip_prefix="/s")]
    with proxied(routes) as (gw, up):
        for path in ("/a/1", "/s/x"):
            d = upstream_saw(request(gw.port, "GET", path, headers=[
                ("Connection", "X-H"), ("X-H", "1"), ("Keep-Alive", "1"), ("X-User-ID", "u")]))
            assert not {"x-h", "keep-alive", "x-user-id"} & set(names(d)), d["headers"]
