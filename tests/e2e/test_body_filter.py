"""body_filter end to end: plugins that read and rewrite response bodies as
they stream from a real upstream (Content-Length, chunked and
close-delimited), early exits, framing when a plugin changes the length,
plugin errors mid-body, and memory while a large body streams through a
filter."""

import hashlib
import json

from harness import Client, Upstream, pattern_sha256, request, rss_kb, wait_until
from test_lua import conf_text, make_gateway

# An inline plugin per route; ctx.var keeps what the filter saw.
UPPER = """upper = {
        body_filter = function(conf, ctx, chunk, eof) return chunk:upper() end,
    }"""

SUFFIX = """suffix = {
        header_filter = function(conf, ctx)
            require("moongate.gw").response.clear_header(ctx, "Content-Length")
        end,
        body_filter = function(conf, ctx, chunk, eof)
            if eof then return chunk .. "<end>" end
        end,
    }"""

# Holds every piece back and answers with the whole body's length and hash
# at the end: what transform and cache plugins do.
WHOLE = """whole = {
        header_filter = function(conf, ctx)
            require("moongate.gw").response.clear_header(ctx, "Content-Length")
        end,
        body_filter = function(conf, ctx, chunk, eof)
            local parts = ctx.var.parts or {}
            ctx.var.parts = parts
            parts[#parts + 1] = chunk
            if not eof then return "" end
            local body = table.concat(parts)
            return string.format('{"len":%d,"pieces":%d}', #body, #parts)
        end,
    }"""

# Passes every piece through unchanged and logs how much it saw.
COUNT = """count = {
        body_filter = function(conf, ctx, chunk, eof)
            ctx.var.seen = (ctx.var.seen or 0) + #chunk
            if eof then require("moongate.gw").log("info", "count-saw ", ctx.var.seen) end
        end,
    }"""

ROUTES = """
    { path = "/upper/*", upstream = "up", plugins = { %s } },
    { path = "/suffix/*", upstream = "up", plugins = { %s } },
    { path = "/whole/*", upstream = "up", plugins = { %s } },
    { path = "/count/*", upstream = "up", plugins = { %s } },
    { path = "/exit", upstream = "up", plugins = { %s, early = {
        access = function(conf, ctx) return 200, "hello from access" end } } },
    { path = "/broken/*", upstream = "up", plugins = { bad = {
        body_filter = function(conf, ctx, chunk, eof) error("filter exploded") end } } },
    { path = "/midfail/*", upstream = "up", plugins = { midfail = {
        body_filter = function(conf, ctx, chunk, eof)
            ctx.var.n = (ctx.var.n or 0) + 1
            if ctx.var.n == 2 then error("second piece refused") end
        end } } },
    { path = "/liar/*", upstream = "up", plugins = { liar = {
        body_filter = function(conf, ctx, chunk, eof) return chunk .. "x" end } } },
""" % (UPPER, SUFFIX, WHOLE, COUNT, UPPER)


def read_until_close(c, timeout=5):
    """Every byte the gateway sends until it closes the connection."""
    while c._fill(timeout):
        pass
    return bytes(c.buf)


def gateway(up, workers=1):
    return make_gateway(conf_text(up, ROUTES, workers=workers))


def test_a_same_length_filter_keeps_content_length():
    with Upstream() as up, gateway(up) as gw:
        r = request(gw.port, "GET", "/upper/a?hdr=X-Keep:yes")
        assert r.status == 200, r
        assert r.header("content-length") == str(len(r.body)), r
        assert not r.has_header("transfer-encoding"), r
        desc = json.loads(r.body.lower())
        assert desc["path"] == "/upper/a?hdr=x-keep:yes"
        assert r.body == r.body.upper()


def test_a_length_changing_filter_is_sent_chunked_for_every_upstream_framing():
    with Upstream() as up, gateway(up) as gw:
        for q in ("size=5000", "size=5000&chunked=1", "size=5000&nolen=1",
                  "size=300000", "size=300000&chunked=1"):
            n = int(q.split("&")[0].split("=")[1])
            r = request(gw.port, "GET", "/suffix/x?" + q)
            assert r.status == 200, (q, r)
            assert r.chunked and not r.has_header("content-length"), (q, r)
            assert r.body.endswith(b"<end>"), q
            body = r.body[:-len("<end>")]
            assert len(body) == n and hashlib.sha256(body).hexdigest() == pattern_sha256(n), q


def test_an_http10_client_gets_a_filtered_body_delimited_by_the_close():
    with Upstream() as up, gateway(up) as gw:
        r = request(gw.port, "GET", "/suffix/x?size=10000", version="1.0")
        assert r.status == 200 and not r.chunked, r
        assert not r.has_header("content-length"), r
        assert len(r.body) == 10000 + 5 and r.body.endswith(b"<end>")


def test_a_filter_can_hold_the_body_back_and_answer_at_the_end():
    with Upstream() as up, gateway(up) as gw:
        r = request(gw.port, "GET", "/whole/x?size=1000000&chunked=1", timeout=20)
        assert r.status == 200, r
        got = json.loads(r.body)
        assert got["len"] == 1000000 and got["pieces"] >= 2, got


def test_filtered_responses_keep_the_connection_alive():
    with Upstream() as up, gateway(up) as gw:
        with Client(gw.port) as c:
            for i in range(5):
                r = c.request("GET", "/suffix/k%d?size=%d" % (i, 100 + i))
                assert r.status == 200 and r.body.endswith(b"<end>"), r
                assert len(r.body) == 100 + i + 5
                r = c.request("GET", "/upper/k%d" % i)
                assert r.status == 200 and r.body == r.body.upper(), r


def test_an_early_exit_body_goes_through_the_filter():
    with Upstream() as up, gateway(up) as gw:
        r = request(gw.port, "GET", "/exit")
        assert r.status == 200 and r.body == b"HELLO FROM ACCESS", r
        assert r.header("content-length") == str(len(r.body))
        r = request(gw.port, "HEAD", "/exit")
        assert r.status == 200 and r.body == b"", r


def test_head_and_bodiless_responses_skip_the_filter():
    with Upstream() as up, gateway(up) as gw:
        r = request(gw.port, "HEAD", "/suffix/h?size=77")
        assert r.status == 200 and r.body == b"", r
        r = request(gw.port, "GET", "/suffix/h?status=204")
        assert r.status == 204 and r.body == b"", r
        r = request(gw.port, "GET", "/suffix/h?size=7")  # the connection still works
        assert r.body.endswith(b"<end>")


def test_a_failing_filter_gives_a_500_before_the_head_went_out_and_the_gateway_goes_on():
    with Upstream() as up, gateway(up) as gw:
        r = request(gw.port, "GET", "/broken/x?size=20000")
        assert r.status == 500 and r.json() == {"error": "internal error"}, r
        gw.wait_log("filter exploded")
        assert "traceback" in gw.log_text()
        r = request(gw.port, "GET", "/upper/after")
        assert r.status == 200, r


def test_a_filter_failing_mid_body_cuts_that_response_only():
    with Upstream() as up, gateway(up) as gw:
        # Fails on its second piece, after the head and some bytes went out.
        with Client(gw.port, timeout=10) as c:
            c.send(b"GET /midfail/x?size=2000000 HTTP/1.1\r\nHost: a\r\n\r\n")
            data = read_until_close(c, timeout=10)  # the gateway closes: no hang
            assert data.startswith(b"HTTP/1.1 200"), data[:100]
            assert len(data) < 2000000
        gw.wait_log("second piece refused")
        assert request(gw.port, "GET", "/upper/after").status == 200


def test_a_filter_that_changes_the_length_but_keeps_content_length_closes_the_connection():
    with Upstream() as up, gateway(up) as gw:
        with Client(gw.port) as c:
            c.send(b"GET /liar/x?size=1000 HTTP/1.1\r\nHost: a\r\n\r\n")
            data = read_until_close(c)  # the gateway closes: no hang
            assert data.startswith(b"HTTP/1.1 200"), data[:100]
        gw.wait_log("body_filter changed the body's length")
        assert request(gw.port, "GET", "/upper/after").status == 200


def test_a_large_body_streams_through_a_filter_in_bounded_memory():
    size = 200 * 1024 * 1024
    with Upstream() as up, gateway(up) as gw:
        pid = gw.worker_pids()[0]
        request(gw.port, "GET", "/count/warm?size=100000")
        before = rss_kb(pid)
        with Client(gw.port, timeout=60) as c:
            c.send(b"GET /count/big?size=%d HTTP/1.1\r\nHost: a\r\n\r\n" % size)
            seen = [0, 0]

            def sink(piece):
                seen[0] += len(piece)
                if seen[0] - seen[1] > (16 << 20):  # sample the RSS as it streams
                    seen[1] = seen[0]
                    peaks.append(rss_kb(pid))
            peaks = []
            r = c.read_response(sink=sink)
        assert r.status == 200 and seen[0] == size, (r, seen)
        gw.wait_log("count-saw %d" % size)
        grown = max(peaks + [rss_kb(pid)]) - before
        print("rss growth after a %d MB filtered body: %d kB" % (size >> 20, grown))
        assert grown < 50 * 1024, grown


test_a_large_body_streams_through_a_filter_in_bounded_memory.timeout = 120
