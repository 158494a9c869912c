"""The compression plugin end to end: the real binary, the real upstream,
curl (--compressed, which decodes gzip and br itself) and the brotli CLI
as independent decoders. Every compressed body must decompress to exactly
the upstream's bytes (sha256) whatever the upstream's framing; q=0 is
honoured; small bodies, images, already-encoded bodies, ranges, HEAD and
204/304 pass untouched; handler and early-exit bodies are compressed too;
a 50 MB body streams through in bounded memory."""

import gzip
import hashlib
import json
import subprocess
import zlib

from harness import Client, Upstream, pattern_bytes, pattern_sha256, request, rss_kb
from test_lua import conf_text, make_gateway

ROUTES = r"""
    { path = "/c/*", upstream = "up" },
    { path = "/gz9/*", upstream = "up", plugins = { compression = {
        encodings = { "gzip" }, gzip_level = 9, min_length = 0 } } },
    { path = "/off/*", upstream = "up", plugins = { compression = false } },
    { path = "/handler", handler = function(ctx)
        return 200, string.rep("handler text, ", 2000), { ["Content-Type"] = "text/plain" }
    end },
    { path = "/exit", upstream = "up", plugins = { early = { access = function(conf, ctx)
        local items = {}
        for i = 1, 300 do items[i] = { id = i, name = "item " .. i } end
        return 200, { items = items }
    end } } },
    { path = "/exit-small", upstream = "up", plugins = { early = { access = function(conf, ctx)
        return 403, { error = "forbidden" }
    end } } },
"""

TEXT = "ctype=text/plain;%20charset=utf-8"


def gateway(up, workers=1):
    return make_gateway(conf_text(up, ROUTES, plugins="compression = {},", workers=workers))


def get(port, path, ae=None, method="GET", headers=None, timeout=10):
    h = dict(headers or {})
    if ae is not None:
        h["Accept-Encoding"] = ae
    return request(port, method, path, headers=h, timeout=timeout)


def unbrotli(data):
    p = subprocess.run(["brotli", "-d", "-c"], input=data, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout


def curl(port, path, *args):
    """curl -s --compressed: (headers text, decoded body bytes)."""
    p = subprocess.run(["curl", "-s", "-m", "20", "--compressed", "-D", "-", *args,
                        "http://127.0.0.1:%d%s" % (port, path)], capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    head, _, body = p.stdout.partition(b"\r\n\r\n")
    return head.decode("latin-1").lower(), body


def sha(b):
    return hashlib.sha256(b).hexdigest()


def test_gzip_and_br_bodies_decompress_to_the_upstream_bytes_for_every_framing():
    with Upstream() as up, gateway(up) as gw:
        for framing in ("", "&chunked=1", "&nolen=1"):
            for n in (300, 65536, 1000003):
                q = "/c/x?size=%d&%s%s" % (n, TEXT, framing)
                r = get(gw.port, q, "gzip")
                assert r.status == 200, r
                assert r.header("content-encoding") == "gzip", (q, r)
                assert not r.has_header("content-length") and r.chunked, (q, r)
                assert "accept-encoding" in r.header("vary", "").lower(), r
                plain = gzip.decompress(r.body)
                assert sha(plain) == pattern_sha256(n), q
                if n >= 65536:
                    assert len(r.body) < n / 5, (q, len(r.body))

                r = get(gw.port, q, "br")
                assert r.header("content-encoding") == "br", (q, r)
                assert sha(unbrotli(r.body)) == pattern_sha256(n), q


def test_curl_compressed_and_curl_br_get_the_upstream_bytes():
    with Upstream() as up, gateway(up) as gw:
        n = 200000
        head, body = curl(gw.port, "/c/x?size=%d&%s" % (n, TEXT))
        assert "content-encoding: br" in head, head  # curl offers br too; ours first
        assert sha(body) == pattern_sha256(n)
        head, body = curl(gw.port, "/c/x?size=%d&%s" % (n, TEXT), "-H", "Accept-Encoding: br")
        assert "content-encoding: br" in head, head
        assert sha(body) == pattern_sha256(n)
        head, body = curl(gw.port, "/c/x?size=%d&%s" % (n, TEXT), "-H", "Accept-Encoding: gzip")
        assert "content-encoding: gzip" in head, head
        assert sha(body) == pattern_sha256(n)
        # JSON from the upstream (its request description) round-trips too
        head, body = curl(gw.port, "/c/json?pad=" + "p" * 400)
        assert "content-encoding: br" in head, head
        assert json.loads(body)["path"].startswith("/c/json?pad=ppp")


def test_q_values_pick_the_encoding_and_q0_refuses_it():
    with Upstream() as up, gateway(up) as gw:
        q = "/c/x?size=5000&" + TEXT
        cases = [
            ("gzip;q=0, br;q=0", None), ("br;q=0, gzip", "gzip"), ("gzip;q=0", None),
            ("*;q=0", None), ("identity", None), ("br;q=0.5, gzip;q=0.9", "gzip"),
            ("gzip, br", "br"), ("*", "br"), ("gzip;q=0, *", "br"), ("deflate", None),
        ]
        for ae, want in cases:
            r = get(gw.port, q, ae)
            assert r.status == 200, r
            assert r.header("content-encoding") == want, (ae, r)
            if want is None:
                assert r.body == pattern_bytes(5000), ae
                assert r.header("content-length") == "5000", (ae, r)
                assert "accept-encoding" in r.header("vary", "").lower(), (ae, r)
        # several header lines are one list
        r = request(gw.port, "GET", q, headers=[("Accept-Encoding", "br;q=0"),
                                                ("Accept-Encoding", "gzip")])
        assert r.header("content-encoding") == "gzip", r
        r = get(gw.port, q)  # no Accept-Encoding at all: identity
        assert r.header("content-encoding") is None and r.body == pattern_bytes(5000)


def test_small_bodies_images_and_other_types_pass_untouched():
    with Upstream() as up, gateway(up) as gw:
        for q, why in (("/c/x?size=100&" + TEXT, "short"),
                       ("/c/x?size=50000&ctype=image/png", "image"),
                       ("/c/x?size=50000&ctype=image/jpeg", "image"),
                       ("/c/x?size=50000", "octet-stream")):
            r = get(gw.port, q, "gzip, br")
            assert r.status == 200 and r.header("content-encoding") is None, (why, r)
            n = int(q.split("size=")[1].split("&")[0])
            assert r.body == pattern_bytes(n) and r.header("content-length") == str(n), why
        # a short body of unknown length is compressed (the length is unknown)
        r = get(gw.port, "/c/x?size=100&chunked=1&" + TEXT, "gzip")
        assert r.header("content-encoding") == "gzip", r
        assert gzip.decompress(r.body) == pattern_bytes(100)
        # min_length = 0 on this route: even a short known length
        r = get(gw.port, "/gz9/x?size=10&" + TEXT, "gzip, br")
        assert r.header("content-encoding") == "gzip", r
        assert gzip.decompress(r.body) == pattern_bytes(10)


def test_already_encoded_ranges_no_transform_head_204_304_are_left_alone():
    with Upstream() as up, gateway(up) as gw:
        # the upstream's own gzip: passed through byte for byte, not re-compressed
        r = get(gw.port, "/c/x?size=20000&encode=gzip&" + TEXT, "gzip, br")
        assert r.header("content-encoding") == "gzip", r
        assert gzip.decompress(r.body) == pattern_bytes(20000)
        assert r.header("content-length") == str(len(r.body)), r
        r = get(gw.port, "/c/x?size=20000&encode=br&" + TEXT, "gzip, br")
        assert r.header("content-encoding") == "br", r
        assert unbrotli(r.body) == pattern_bytes(20000)
        # a range
        r = get(gw.port, "/c/x?size=2000&status=206&hdr=Content-Range:bytes%200-1999/9999&"
                + TEXT, "gzip")
        assert r.status == 206 and r.header("content-encoding") is None, r
        assert r.body == pattern_bytes(2000)
        r = get(gw.port, "/c/x?size=2000&hdr=Content-Range:bytes%200-1999/9999&" + TEXT, "gzip")
        assert r.header("content-encoding") is None and r.body == pattern_bytes(2000), r
        # Cache-Control: no-transform
        r = get(gw.port, "/c/x?size=2000&hdr=Cache-Control:no-transform&" + TEXT, "gzip")
        assert r.header("content-encoding") is None and r.body == pattern_bytes(2000), r
        # HEAD: the head as the upstream sent it
        r = get(gw.port, "/c/x?size=2000&" + TEXT, "gzip", method="HEAD")
        assert r.status == 200 and r.header("content-encoding") is None, r
        assert r.header("content-length") == "2000" and r.body == b"", r
        for status in (204, 304):
            r = get(gw.port, "/c/x?status=%d&%s" % (status, TEXT), "gzip")
            assert r.status == status and r.header("content-encoding") is None, r
            assert r.body == b""
        # the route that turns the global plugin off
        r = get(gw.port, "/off/x?size=20000&" + TEXT, "gzip")
        assert r.header("content-encoding") is None and r.body == pattern_bytes(20000), r
        assert r.header("vary") is None, r


def test_etag_is_weakened_vary_merged_and_accept_ranges_dropped():
    with Upstream() as up, gateway(up) as gw:
        q = ("/c/x?size=3000&hdr=ETag:%22v1%22&hdr=Vary:Origin&hdr=Accept-Ranges:bytes&"
             + TEXT)
        r = get(gw.port, q, "gzip")
        assert r.header("content-encoding") == "gzip", r
        assert r.header("etag") == 'W/"v1"', r
        assert r.header_all("vary") == ["Origin, Accept-Encoding"], r
        assert not r.has_header("accept-ranges"), r
        r = get(gw.port, q, "identity")
        assert r.header("etag") == '"v1"' and r.header("accept-ranges") == "bytes", r
        assert r.header_all("vary") == ["Origin, Accept-Encoding"], r


def test_the_request_content_encoding_reaches_the_upstream_untouched():
    with Upstream() as up, gateway(up) as gw:
        body = gzip.compress(b'{"hello":"world"}' * 100)
        r = request(gw.port, "POST", "/c/post", headers={
            "Content-Encoding": "gzip", "Content-Type": "application/json",
            "Accept-Encoding": "identity"}, body=body)
        desc = r.json()
        assert desc["body_sha256"] == sha(body), desc
        assert ["Content-Encoding", "gzip"] in desc["headers"], desc["headers"]


def test_handler_and_early_exit_bodies_are_compressed():
    with Upstream() as up, gateway(up) as gw:
        r = get(gw.port, "/handler", "gzip")
        assert r.status == 200 and r.header("content-encoding") == "gzip", r
        assert gzip.decompress(r.body) == b"handler text, " * 2000
        r = get(gw.port, "/handler", "br")
        assert unbrotli(r.body) == b"handler text, " * 2000
        r = get(gw.port, "/exit", "gzip")
        assert r.header("content-encoding") == "gzip", r
        doc = json.loads(gzip.decompress(r.body))
        assert len(doc["items"]) == 300 and doc["items"][299]["name"] == "item 300"
        # A short early-exit body: header_filter sees its Content-Length,
        # so min_length applies and it goes out as it is.
        r = get(gw.port, "/exit-small", "gzip")
        assert r.status == 403 and r.header("content-encoding") is None, r
        assert r.json() == {"error": "forbidden"}
        assert r.header("content-length") == str(len(r.body)), r
        r = get(gw.port, "/exit-small", "identity")
        assert r.status == 403 and r.json() == {"error": "forbidden"}, r
        r = get(gw.port, "/handler", "gzip", method="HEAD")
        assert r.status == 200 and r.body == b"" and r.header("content-encoding") is None, r


def test_compressed_responses_keep_the_connection_alive():
    with Upstream() as up, gateway(up) as gw:
        with Client(gw.port, timeout=10) as c:
            for i in range(6):
                n = 1000 + 7919 * i
                ae = ("gzip", "br", "identity")[i % 3]
                r = c.request("GET", "/c/k%d?size=%d&%s" % (i, n, TEXT),
                              headers={"Accept-Encoding": ae})
                assert r.status == 200, r
                body = r.body
                if ae == "gzip":
                    body = gzip.decompress(body)
                elif ae == "br":
                    body = unbrotli(body)
                assert body == pattern_bytes(n), (i, ae)


def test_a_50mb_body_is_compressed_as_it_streams_in_bounded_memory():
    size = 50 * 1024 * 1024
    with Upstream() as up, gateway(up) as gw:
        pid = gw.worker_pids()[0]
        get(gw.port, "/c/warm?size=100000&" + TEXT, "gzip")
        get(gw.port, "/c/warm?size=100000&" + TEXT, "br")
        before = rss_kb(pid)
        for ae in ("gzip", "br"):
            with Client(gw.port, timeout=60) as c:
                c.send(b"GET /c/big?size=%d&%s HTTP/1.1\r\nHost: a\r\nAccept-Encoding: %s\r\n\r\n"
                       % (size, TEXT.encode(), ae.encode()))
                h = hashlib.sha256()
                state = {"plain": 0, "wire": 0, "sampled": 0}
                peaks = []
                if ae == "gzip":
                    d = zlib.decompressobj(31)
                    dec = d.decompress
                else:
                    wire = bytearray()

                    def dec(piece):
                        wire.extend(piece)
                        return b""

                def sink(piece):
                    state["wire"] += len(piece)
                    out = dec(piece)
                    h.update(out)
                    state["plain"] += len(out)
                    if state["wire"] - state["sampled"] > 64 * 1024:
                        state["sampled"] = state["wire"]
                        peaks.append(rss_kb(pid))
                r = c.read_response(sink=sink)
            assert r.status == 200 and r.header("content-encoding") == ae, r
            if ae == "br":
                plain = unbrotli(bytes(wire))
                h.update(plain)
                state["plain"] = len(plain)
            assert state["plain"] == size and h.hexdigest() == pattern_sha256(size), state
            grown = max(peaks + [rss_kb(pid)]) - before
            print("%s: %d MB -> %d kB on the wire; worker RSS growth %d kB"
                  % (ae, size >> 20, state["wire"] >> 10, grown))
            assert grown < 30 * 1024, (ae, grown)


test_a_50mb_body_is_compressed_as_it_streams_in_bounded_memory.timeout = 180


def test_an_http10_client_gets_a_compressed_body_delimited_by_the_close():
    with Upstream() as up, gateway(up) as gw:
        r = request(gw.port, "GET", "/c/x?size=30000&" + TEXT, version="1.0",
                    headers={"Accept-Encoding": "gzip"})
        assert r.status == 200 and r.header("content-encoding") == "gzip", r
        assert not r.chunked and not r.has_header("content-length"), r
        assert gzip.decompress(r.body) == pattern_bytes(30000)


def test_an_upstream_cut_mid_body_cuts_the_compressed_response_and_the_gateway_goes_on():
    with Upstream() as up, gateway(up) as gw:
        with Client(gw.port, timeout=10) as c:
            c.send(b"GET /c/x?size=2000000&truncate=700000&%s HTTP/1.1\r\nHost: a\r\n"
                   b"Accept-Encoding: gzip\r\n\r\n" % TEXT.encode())
            try:
                r = c.read_response()
                complete = True
            except Exception:  # noqa: BLE001 - the cut is what we expect
                complete = False
        assert not complete, "a truncated upstream body must not look complete: %r" % r
        for ae in ("gzip", "br"):
            r = get(gw.port, "/c/after?size=5000&" + TEXT, ae)
            assert r.status == 200 and r.header("content-encoding") == ae, r


def test_event_streams_are_flushed_piece_by_piece():
    # A tiny server sending two events 1 s apart: the first must reach the
    # client, decodable, before the second is even sent.
    import socket
    import threading
    import time
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    done = threading.Event()

    def serve():
        s, _ = srv.accept()
        s.recv(65536)
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        ev = b"data: first event\n\n"
        s.sendall(b"%x\r\n%s\r\n" % (len(ev), ev))
        done.wait(5)
        ev = b"data: second event\n\n"
        s.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(ev), ev))
        time.sleep(0.2)
        s.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    class Fixed:
        addr = "127.0.0.1:%d" % port
    try:
        with make_gateway(conf_text(Fixed, '{ path = "/events", upstream = "up", plugins = '
                                    '{ compression = { min_length = 0 } } },')) as gw:
            with Client(gw.port, timeout=5) as c:
                c.send(b"GET /events HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n")
                head = c.read_head()
                assert head[1] == 200 and ("Content-Encoding", "gzip") in head[3], head
                d = zlib.decompressobj(31)
                got = b""
                deadline = time.monotonic() + 3
                while b"first event" not in got and time.monotonic() < deadline:
                    if not c.buf:
                        c._fill(3)
                    # strip chunk framing: decode what arrived so far
                    data = bytes(c.buf)
                    pieces = []
                    while True:
                        i = data.find(b"\r\n")
                        if i < 0:
                            break
                        n = int(data[:i], 16)
                        if len(data) < i + 2 + n + 2:
                            break
                        pieces.append(data[i + 2:i + 2 + n])
                        data = data[i + 2 + n + 2:]
                    del c.buf[:len(c.buf) - len(data)]
                    got += d.decompress(b"".join(pieces))
                    if not pieces and b"first event" not in got:
                        c._fill(3)
                assert b"data: first event\n\n" == got, got
                done.set()
    finally:
        done.set()
        srv.close()
        t.join(5)
