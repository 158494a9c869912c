"""Proxying basics: methods, statuses, query, HEAD, keep-alive, pipelining,
chunked bodies both ways, 100-continue, close-delimited responses."""

import hashlib

from harness import (Client, assert_gateway_error, build_request, chunked, hdr_values,
                     pattern_bytes, proxied, request, route, upstream_saw)


def test_get_is_proxied_with_its_path_and_query():
    with proxied([route("/users/*")]) as (gw, up):
        r = request(gw.port, "GET", "/users/1?a=b&c=d")
        d = upstream_saw(r)
        assert d["method"] == "GET"
        assert d["path"] == "/users/1?a=b&c=d", d["path"]
        assert d["body_len"] == 0
        st = up.stats()
        assert st["requests"] == 1, st


def test_each_method_and_its_body_reach_the_upstream():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            for method in ("GET", "DELETE", "OPTIONS", "POST", "PUT", "PATCH"):
                body = None
                if method in ("POST", "PUT", "PATCH"):
                    body = ("%s body \x00\xff" % method).encode("latin-1")
                r = c.request(method, "/m/" + method.lower(), body=body)
                d = upstream_saw(r)
                assert d["method"] == method, d
                assert d["path"] == "/m/" + method.lower()
                if body is not None:
                    assert d["body_len"] == len(body)
                    assert d["body"].encode("latin-1") == body
                    assert hdr_values(d, "content-length") == [str(len(body))], d["headers"]
        st = up.stats()
        assert st["requests"] == 6, st


def test_upstream_statuses_and_bodies_are_passed_through():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            for status in (201, 202, 301, 400, 401, 403, 404, 418, 429, 500, 502, 503):
                r = c.request("GET", "/s?status=%d" % status)
                assert r.status == status, (status, r)
                # The body is the upstream's JSON description, not a gateway error.
                assert r.json()["path"] == "/s?status=%d" % status, r
            r = c.request("GET", "/s?status=204")
            assert r.status == 204 and r.body == b"", r
            assert not r.has_header("transfer-encoding"), r
            # The connection is still usable after a 204 (no phantom body).
            r = c.request("GET", "/after-204")
            assert upstream_saw(r)["path"] == "/after-204"


def test_query_string_is_passed_through_unchanged():
    query = "?q=%2F%2e%2e%2F&x=a+b&y=&z=%00%5C&w=/../..&sp=%20&utf=%E2%9C%93"
    with proxied([route("/users/*")]) as (gw, up):
        r = request(gw.port, "GET", "/users/1" + query)
        assert upstream_saw(r)["path"] == "/users/1" + query


def test_head_gets_the_upstream_content_length_and_no_body():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            r = c.request("HEAD", "/h?size=12345")
            assert r.status == 200, r
            assert r.header("content-length") == "12345", r
            # If the gateway sent a body after the HEAD response, the next
            # response on the connection would not parse.
            r2 = c.request("GET", "/after-head")
            assert upstream_saw(r2)["path"] == "/after-head"
        st = up.stats()
        assert st["requests"] == 2, st


def test_http11_connection_is_kept_alive_across_requests():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            for i in range(20):
                r = c.request("GET", "/k/%d" % i)
                assert upstream_saw(r)["path"] == "/k/%d" % i
                assert "close" not in (r.header("connection") or "").lower(), r
            assert c.is_open(0.2), "the gateway closed a keep-alive connection"
        st = up.stats()
        assert st["requests"] == 20
        # The gateway's own upstream connection was reused as well.
        assert st["connections"] <= 2, st


def test_http10_request_is_answered_and_then_the_connection_closes():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            r = c.request("GET", "/ten", version="1.0")
            assert upstream_saw(r)["path"] == "/ten"
            assert not r.chunked, "HTTP/1.0 clients cannot receive chunked: %r" % r
            assert c.wait_closed(3), "HTTP/1.0 connection without keep-alive stayed open"


def test_http10_with_connection_keep_alive_stays_open():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            for i in range(3):
                r = c.request("GET", "/ten/%d" % i, headers=[("Connection", "keep-alive")],
                              version="1.0")
                assert upstream_saw(r)["path"] == "/ten/%d" % i
                assert not r.chunked, r
            assert c.is_open(0.2)


def test_http10_request_without_host_is_accepted():
    with proxied() as (gw, up):
        r = request(gw.port, "GET", "/nohost", version="1.0", host=None)
        assert upstream_saw(r)["path"] == "/nohost"


def test_connection_close_from_the_client_closes_after_the_response():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            r = c.request("GET", "/bye", headers=[("Connection", "close")])
            assert upstream_saw(r)["path"] == "/bye"
            assert c.wait_closed(3), "connection stayed open after Connection: close"


def test_pipelined_requests_are_answered_in_order():
    with proxied() as (gw, up):
        with Client(gw.port, timeout=10) as c:
            # The first is slow at the upstream: order must still hold.
            paths = ["/p/0?delay=0.3", "/p/1", "/p/2?size=10", "/p/3", "/p/4"]
            data = b"".join(build_request("GET", p) for p in paths)
            data += build_request("POST", "/p/5", body=b"hello")
            data += build_request("GET", "/p/6", headers=[("Connection", "close")])
            c.send(data)
            for i, p in enumerate(paths):
                r = c.read_response()
                assert r.status == 200, (i, r)
                if "size=" in p:
                    assert r.body == pattern_bytes(10), r
                else:
                    assert r.json()["path"] == p, (i, r)
            r = c.read_response()
            d = upstream_saw(r)
            assert (d["path"], d["body"]) == ("/p/5", "hello"), d
            assert upstream_saw(c.read_response())["path"] == "/p/6"
            assert c.wait_closed(3), "still open after the pipelined Connection: close"
            assert c.after_close == b"", "bytes after the last response: %r" % c.after_close


def test_pipelined_requests_sent_byte_by_byte_are_answered():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            data = build_request("GET", "/b/1") + build_request("POST", "/b/2", body=b"xyz")
            for i in range(len(data)):
                c.send(data[i:i + 1])
            assert upstream_saw(c.read_response())["path"] == "/b/1"
            d = upstream_saw(c.read_response())
            assert (d["path"], d["body"]) == ("/b/2", "xyz")


def test_content_length_body_arrives_with_the_same_content_length():
    body = bytes(range(256)) * 100
    with proxied() as (gw, up):
        r = request(gw.port, "POST", "/cl", body=body)
        d = upstream_saw(r)
        assert d["framing"] == "length", d
        assert hdr_values(d, "content-length") == [str(len(body))], d["headers"]
        assert not hdr_values(d, "transfer-encoding"), d["headers"]
        assert d["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_request_body_is_reframed_for_the_upstream():
    pieces = [b"a" * 10, b"b" * 3000, b"c", b"d" * 70000]
    body = b"".join(pieces)
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            c.send(build_request("POST", "/chunked-in",
                                 headers=[("Transfer-Encoding", "chunked")]))
            c.send(chunked(*pieces, ext='name="v"', trailers=["X-Trailer: evil"]))
            d = upstream_saw(c.read_response())
        assert d["body_len"] == len(body)
        assert d["body_sha256"] == hashlib.sha256(body).hexdigest()
        te = hdr_values(d, "transfer-encoding")
        cl = hdr_values(d, "content-length")
        assert (te == ["chunked"] and not cl) or (cl == [str(len(body))] and not te), d["headers"]
        # Fresh framing: none of the client's chunk extensions or trailers.
        for line in d["chunk_lines"]:
            assert ";" not in line, "client chunk extension forwarded: %r" % line
        assert not hdr_values(d, "x-trailer"), "trailer folded into headers: %r" % d["headers"]
        assert not any("evil" in t for t in d["trailers"]), d["trailers"]


def test_chunked_response_from_the_upstream_reaches_the_client_intact():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            r = c.request("GET", "/cr?size=300000&chunked=1")
            assert r.status == 200, r
            assert r.body == pattern_bytes(300000)
            # Unknown length at the start: an HTTP/1.1 client gets chunks.
            assert r.chunked, "expected a chunked response, got %r" % (r.headers,)
            # And the connection is still good.
            assert upstream_saw(c.request("GET", "/after"))["path"] == "/after"


def test_close_delimited_upstream_response_is_chunked_for_http11_clients():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            r = c.request("GET", "/nolen?size=70000&nolen=1")
            assert r.status == 200, r
            assert r.body == pattern_bytes(70000)
            assert r.chunked, "unknown-length body to an HTTP/1.1 client: %r" % (r.headers,)
            # Chunking keeps the client connection reusable.
            assert upstream_saw(c.request("GET", "/after"))["path"] == "/after"


def test_close_delimited_upstream_response_is_close_delimited_for_http10_clients():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            r = c.request("GET", "/nolen?size=70000&nolen=1", version="1.0")
            assert r.status == 200, r
            assert not r.chunked, r
            assert r.body == pattern_bytes(70000)
            assert r.framing in ("close", "length"), r.framing
            assert c.wait_closed(3)


def test_expect_100_continue_gets_an_interim_response_before_the_body():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            c.send(build_request("POST", "/e", headers=[("Expect", "100-continue"),
                                                        ("Content-Length", "11")]))
            first = c.read_response(interim=True)
            assert first.status == 100, "expected 100 Continue before sending the body: %r" % first
            assert up.stats()["requests"] in (0, 1)
            c.send(b"hello world")
            r = c.read_response()
            d = upstream_saw(r)
            assert d["body"] == "hello world"
            assert not hdr_values(d, "expect"), "Expect forwarded: %r" % d["headers"]


def test_expect_100_continue_with_chunked_body():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            c.send(build_request("PUT", "/ec", headers=[("Expect", "100-continue"),
                                                        ("Transfer-Encoding", "chunked")]))
            assert c.read_response(interim=True).status == 100
            c.send(chunked(b"abc", b"defg"))
            d = upstream_saw(c.read_response())
            assert d["body"] == "abcdefg"
            assert not hdr_values(d, "expect")


def test_large_response_body_arrives_intact():
    n = 5 * 1024 * 1024 + 17
    with proxied() as (gw, up):
        r = request(gw.port, "GET", "/big?size=%d" % n, timeout=20)
        assert r.status == 200
        assert r.header("content-length") == str(n), r.headers
        assert len(r.body) == n
        assert r.body == pattern_bytes(n)


def test_response_headers_from_the_upstream_reach_the_client():
    with proxied() as (gw, up):
        r = request(gw.port, "GET", "/rh?hdr=X-Custom:abc&hdr=Cache-Control:no-store"
                                    "&hdr=Set-Cookie:a=1&hdr=Set-Cookie:b=2")
        assert r.status == 200
        assert r.header("x-custom") == "abc", r.headers
        assert r.header("cache-control") == "no-store", r.headers
        # Set-Cookie must never be folded into one line.
        assert r.header_all("set-cookie") == ["a=1", "b=2"], r.headers


def test_connection_close_from_the_upstream_does_not_close_the_client_connection():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            r = c.request("GET", "/uc?close=1")
            assert upstream_saw(r)["path"] == "/uc?close=1"
            assert "close" not in (r.header("connection") or "").lower(), \
                "the upstream's Connection: close leaked to the client: %r" % r.headers
            r = c.request("GET", "/uc2")
            assert upstream_saw(r)["path"] == "/uc2"


def test_request_without_a_route_gets_a_404_json_error():
    with proxied([route("/users/*")]) as (gw, up):
        with Client(gw.port) as c:
            r = c.request("GET", "/nowhere")
            assert_gateway_error(r, 404)
            # A 404 does not cost the connection.
            assert upstream_saw(c.request("GET", "/users/1"))["path"] == "/users/1"
        st = up.stats()
        assert st["requests"] == 1, st


def test_many_sequential_requests_on_fresh_connections():
    with proxied() as (gw, up):
        for i in range(200):
            r = request(gw.port, "GET", "/seq/%d" % i, headers=[("Connection", "close")])
            assert r.status == 200, (i, r)
        st = up.stats()
        assert st["requests"] == 200, st


def test_head_answered_by_the_gateway_itself_has_no_body():
    with proxied([route("/users/*")]) as (gw, up):
        with Client(gw.port) as c:
            r = c.request("HEAD", "/nowhere")
            assert r.status == 404, r
            # A body after the 404 head would break the next response.
            assert upstream_saw(c.request("GET", "/users/1"))["path"] == "/users/1"


def test_head_of_a_chunked_upstream_response_has_no_body():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            r = c.request("HEAD", "/hc?chunked=1&size=5000")
            assert r.status == 200, r
            assert upstream_saw(c.request("GET", "/after"))["path"] == "/after"


def test_pipelined_mix_of_gateway_errors_heads_and_proxied_requests():
    with proxied([route("/users/*")]) as (gw, up):
        with Client(gw.port, timeout=10) as c:
            c.send(build_request("GET", "/users/1") + build_request("GET", "/nowhere")
                   + build_request("HEAD", "/users/2?size=99")
                   + build_request("POST", "/users/3", body=b"body")
                   + build_request("GET", "/users/4?chunked=1&size=1000"))
            assert upstream_saw(c.read_response())["path"] == "/users/1"
            assert c.read_response().status == 404
            r = c.read_response(head=True)
            assert (r.status, r.header("content-length"), r.body) == (200, "99", b""), r
            d = upstream_saw(c.read_response())
            assert (d["path"], d["body"]) == ("/users/3", "body"), d
            r = c.read_response()
            assert r.status == 200 and r.body == pattern_bytes(1000), r


def test_chunked_upstream_response_is_dechunked_for_http10_clients():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            r = c.request("GET", "/c10?chunked=1&size=100000", version="1.0")
            assert r.status == 200, r
            assert not r.chunked, "chunked response to an HTTP/1.0 client: %r" % (r.headers,)
            assert r.body == pattern_bytes(100000)


def test_upstream_304_passes_without_a_body():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            r = c.request("GET", "/nm?status=304", headers=[("If-None-Match", '"x"')])
            assert (r.status, r.body) == (304, b""), r
            assert upstream_saw(c.request("GET", "/after"))["path"] == "/after"
