"""Ambiguous framing and strictness, over raw sockets. Every input below must
be answered 400 (JSON error), the connection closed, nothing else answered,
and NOTHING may reach the upstream (its request counter stays at 0).

Many carry a second, smuggled request in what a lenient parser would take
for the body; none of it may ever be answered or forwarded."""

import time

from harness import Client, assert_gateway_error, build_request, chunked, proxied, route

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def post_head(*headers, target="/s", version="1.1"):
    lines = ["POST %s HTTP/%s" % (target, version), "Host: x"] + list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


CHUNKED_SMUGGLE = b"0\r\n\r\n" + SMUGGLED

CASES = [
    # name (a sentence), raw bytes
    ("content_length_with_transfer_encoding",
     post_head("Content-Length: %d" % len(CHUNKED_SMUGGLE), "Transfer-Encoding: chunked")
     + CHUNKED_SMUGGLE),
    ("transfer_encoding_with_content_length",
     post_head("Transfer-Encoding: chunked", "Content-Length: 4") + CHUNKED_SMUGGLE),
    ("two_different_content_length_headers",
     post_head("Content-Length: 5", "Content-Length: 6") + b"hello!" + SMUGGLED),
    ("content_length_list_with_different_values",
     post_head("Content-Length: 5, 6") + b"hello!" + SMUGGLED),
    ("transfer_encoding_gzip_then_chunked",
     post_head("Transfer-Encoding: gzip, chunked") + CHUNKED_SMUGGLE),
    ("transfer_encoding_chunked_twice_in_one_header",
     post_head("Transfer-Encoding: chunked, chunked") + CHUNKED_SMUGGLE),
    ("transfer_encoding_chunked_in_two_headers",
     post_head("Transfer-Encoding: chunked", "Transfer-Encoding: chunked") + CHUNKED_SMUGGLE),
    ("transfer_encoding_chunked_then_gzip_header",
     post_head("Transfer-Encoding: chunked", "Transfer-Encoding: gzip") + CHUNKED_SMUGGLE),
    ("transfer_encoding_identity",
     post_head("Transfer-Encoding: identity", "Content-Length: 5") + b"hello" + SMUGGLED),
    ("transfer_encoding_identity_alone",
     post_head("Transfer-Encoding: identity") + b"hello" + SMUGGLED),
    ("transfer_encoding_xchunked",
     post_head("Transfer-Encoding: xchunked") + CHUNKED_SMUGGLE),
    ("transfer_encoding_chunked_with_a_trailing_token",
     post_head("Transfer-Encoding: chunked;q=1") + CHUNKED_SMUGGLE),
    ("chunk_size_that_is_not_hex",
     post_head("Transfer-Encoding: chunked") + b"zz\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
    ("negative_chunk_size",
     post_head("Transfer-Encoding: chunked") + b"-1\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
    ("chunk_size_with_too_many_hex_digits",
     post_head("Transfer-Encoding: chunked") + b"1" * 20 + b"\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
    ("chunk_size_overflowing_64_bits",
     post_head("Transfer-Encoding: chunked") + b"10000000000000005\r\nhello\r\n0\r\n\r\n"
     + SMUGGLED),
    ("chunk_data_longer_than_its_size",
     post_head("Transfer-Encoding: chunked") + b"3\r\nabcdef\r\n0\r\n\r\n" + SMUGGLED),
    ("bare_lf_line_endings_throughout",
     b"GET /s HTTP/1.1\nHost: x\n\n" + SMUGGLED),
    ("bare_lf_after_the_request_line",
     b"GET /s HTTP/1.1\nHost: x\r\n\r\n" + SMUGGLED),
    ("bare_lf_ending_a_header_line",
     b"GET /s HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n" + SMUGGLED),
    ("bare_lf_ending_a_chunk_size_line",
     post_head("Transfer-Encoding: chunked") + b"5\nhello\r\n0\r\n\r\n" + SMUGGLED),
    ("bare_cr_inside_a_header_value",
     b"GET /s HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n" + SMUGGLED),
    ("nul_in_a_header_value",
     b"GET /s HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n" + SMUGGLED),
    ("nul_in_a_header_name",
     b"GET /s HTTP/1.1\r\nHost: x\r\nX-\x00A: b\r\n\r\n" + SMUGGLED),
    ("obs_fold_with_a_space",
     b"GET /s HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n" + SMUGGLED),
    ("obs_fold_with_a_tab",
     b"GET /s HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n" + SMUGGLED),
    ("obs_fold_continuing_transfer_encoding",
     b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-A: a\r\n"
     b" Transfer-Encoding: chunked\r\n\r\nhello" + SMUGGLED),
    ("invalid_method_token",
     b"G(T /s HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED),
    ("http_0_9_request_line",
     b"GET /s\r\n"),
    ("http_0_9_version",
     b"GET /s HTTP/0.9\r\nHost: x\r\n\r\n" + SMUGGLED),
    ("http_2_0_in_a_request_line",
     b"GET /s HTTP/2.0\r\nHost: x\r\n\r\n" + SMUGGLED),
    ("http_1_2_in_a_request_line",
     b"GET /s HTTP/1.2\r\nHost: x\r\n\r\n" + SMUGGLED),
    ("http_3_0_in_a_request_line",
     b"GET /s HTTP/3.0\r\nHost: x\r\n\r\n" + SMUGGLED),
    ("rtsp_protocol_version",
     b"GET /s RTSP/1.0\r\nHost: x\r\n\r\n" + SMUGGLED),
    ("ice_protocol_version",
     b"GET /s ICE/1.0\r\nHost: x\r\n\r\n" + SMUGGLED),
    ("content_length_with_trailing_whitespace",
     post_head("Content-Length: 5 ") + b"hello" + SMUGGLED),
    ("content_length_with_extra_leading_whitespace",
     post_head("Content-Length:  5") + b"hello" + SMUGGLED),
    ("content_length_with_a_plus_sign",
     post_head("Content-Length: +5") + b"hello" + SMUGGLED),
    ("negative_content_length",
     post_head("Content-Length: -5") + b"hello" + SMUGGLED),
    ("content_length_with_trailing_garbage",
     post_head("Content-Length: 5x") + b"hello" + SMUGGLED),
    ("header_name_with_a_space_before_the_colon",
     b"GET /s HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n" + SMUGGLED),
    ("content_length_name_with_a_space_before_the_colon",
     b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello" + SMUGGLED),
    ("missing_host_on_http_1_1",
     b"GET /s HTTP/1.1\r\nX-A: b\r\n\r\n" + SMUGGLED),
    ("two_host_headers",
     b"GET /s HTTP/1.1\r\nHost: a.example.com\r\nHost: b.example.com\r\n\r\n" + SMUGGLED),
]


def check_refused(raw):
    with proxied([route("/*")]) as (gw, up):
        with Client(gw.port, timeout=5) as c:
            c.send(raw)
            r = c.read_response()
            assert_gateway_error(r, 400)
            assert c.wait_closed(3), "the connection stayed open after the 400"
            assert c.after_close == b"", \
                "bytes after the 400 (a second response?): %r" % c.after_close[:300]
        # Let anything the gateway might still forward arrive before counting.
        time.sleep(0.05)
        st = up.stats()
        assert st["requests"] == 0, (
            "the upstream received %s (%d of them with a complete body)"
            % (st["last"], st["completed"]))


def _make(raw):
    def t():
        check_refused(raw)
    return t


for _name, _raw in CASES:
    _fn = _make(_raw)
    _fn.__name__ = "test_%s_is_refused" % _name
    _fn.__qualname__ = _fn.__name__
    _fn.__doc__ = repr(_raw)
    globals()[_fn.__name__] = _fn
del _name, _raw, _fn


# ---------------------------------------------------------------- controls
# The same shapes, well-formed, pass: the refusals above are not a gateway
# that refuses everything.


def test_well_formed_chunked_request_is_accepted():
    with proxied([route("/*")]) as (gw, up):
        with Client(gw.port) as c:
            c.send(post_head("Transfer-Encoding: chunked") + chunked(b"hello", b" world"))
            r = c.read_response()
            assert r.status == 200, r
            assert r.json()["body"] == "hello world"
            assert c.is_open(0.1)
        assert up.stats()["requests"] == 1


def test_well_formed_content_length_request_is_accepted():
    with proxied([route("/*")]) as (gw, up):
        with Client(gw.port) as c:
            c.send(post_head("Content-Length: 5") + b"hello")
            r = c.read_response()
            assert r.status == 200 and r.json()["body"] == "hello", r
            c.send(build_request("GET", "/next"))
            assert c.read_response().json()["path"] == "/next"
        assert up.stats()["requests"] == 2


def test_a_refused_request_after_a_good_one_on_the_same_connection():
    with proxied([route("/*")]) as (gw, up):
        with Client(gw.port) as c:
            c.send(build_request("GET", "/good"))
            assert c.read_response().status == 200
            c.send(post_head("Content-Length: 5", "Transfer-Encoding: chunked") + CHUNKED_SMUGGLE)
            assert_gateway_error(c.read_response(), 400)
            assert c.wait_closed(3)
            assert c.after_close == b"", c.after_close
        time.sleep(0.05)
        st = up.stats()
        assert st["requests"] == 1 and st["last"] == ["GET /good"], st


def test_pipelined_request_after_a_refused_one_is_never_answered():
    with proxied([route("/*")]) as (gw, up):
        with Client(gw.port) as c:
            c.send(b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: \x00\r\n\r\n" + build_request("GET", "/b"))
            assert_gateway_error(c.read_response(), 400)
            assert c.wait_closed(3)
            assert c.after_close == b"", c.after_close
        time.sleep(0.05)
        assert up.stats()["requests"] == 0
