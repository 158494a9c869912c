"""Every limit has a number and a status: 414, 431, 413, 408, idle
keep-alive timeout. Limits are set small in the config so that the tests
are quick; each limit is also checked from the accepting side (just under
the limit passes), so a gateway refusing everything cannot pass."""

import time

from harness import Client, ProtocolError, assert_gateway_error, build_request, chunked, proxied, request, route, \
    upstream_saw

LIMITS = {"max_uri": "1k", "max_header_bytes": "4k", "max_header_fields": 20,
          "max_body": "2k", "header_timeout": 1, "body_timeout": 1,
          "keepalive_timeout": 1}


def limited(routes=None, **limits):
    lim = dict(LIMITS)
    lim.update(limits)
    routes = routes or [route("/small/*", max_body="1k"), route("/big/*", max_body="10k"),
                        route("/*")]
    return proxied(routes, limits=lim)


def test_uri_longer_than_max_uri_gets_414():
    with limited() as (gw, up):
        with Client(gw.port) as c:
            ok = "/u/" + "a" * 900
            assert upstream_saw(c.request("GET", ok))["path"] == ok
        with Client(gw.port) as c:
            r = c.request("GET", "/u/" + "a" * 1100)
            assert_gateway_error(r, 414)
        with Client(gw.port) as c:
            # The query counts: it is part of the URI.
            r = c.request("GET", "/u?" + "q=1&" * 300)
            assert_gateway_error(r, 414)
        assert up.stats()["requests"] == 1


def test_more_header_fields_than_max_gets_431():
    with limited() as (gw, up):
        few = [("X-H%d" % i, "v") for i in range(15)]
        with Client(gw.port) as c:
            assert c.request("GET", "/h", headers=few).status == 200
        many = [("X-H%d" % i, "v") for i in range(30)]
        with Client(gw.port) as c:
            assert_gateway_error(c.request("GET", "/h", headers=many), 431)
        assert up.stats()["requests"] == 1


def test_header_block_over_max_header_bytes_gets_431():
    with limited() as (gw, up):
        with Client(gw.port) as c:
            assert c.request("GET", "/h", headers=[("X-Big", "b" * 3000)]).status == 200
        with Client(gw.port) as c:
            assert_gateway_error(c.request("GET", "/h", headers=[("X-Big", "b" * 5000)]), 431)
        with Client(gw.port) as c:
            # Many medium headers adding up over the limit, each under it.
            hdrs = [("X-M%d" % i, "m" * 400) for i in range(12)]
            assert_gateway_error(c.request("GET", "/h", headers=hdrs), 431)
        assert up.stats()["requests"] == 1


def test_header_block_sent_slowly_is_still_limited():
    with limited(header_timeout=10) as (gw, up):
        with Client(gw.port) as c:
            c.send(b"GET /h HTTP/1.1\r\nHost: x\r\n")
            sent = 0
            r = None
            # Stream header lines until the gateway answers (or 64 KiB).
            while sent < 64 * 1024:
                try:
                    c.send(b"X-Pad-%d: %s\r\n" % (sent, b"p" * 500))
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += 512
                if c.has_input(0.001):
                    break
            r = c.read_response()
            assert_gateway_error(r, 431)
        assert up.stats()["requests"] == 0


def test_content_length_over_max_body_gets_413_without_100_continue():
    with limited() as (gw, up):
        with Client(gw.port) as c:
            c.send(build_request("POST", "/small/x", headers=[
                ("Expect", "100-continue"), ("Content-Length", "2000")]))
            r = c.read_response(interim=True)
            assert r.status != 100, "100 Continue for a body over the limit"
            assert_gateway_error(r, 413)
        st = up.stats()
        assert st["requests"] == 0, "a request refused with 413 reached the upstream: %r" % st


def test_content_length_over_max_body_gets_413_before_the_body_is_sent():
    with limited() as (gw, up):
        with Client(gw.port) as c:
            # Headers only: the 413 must come without waiting for the body.
            c.send(build_request("POST", "/small/x", headers=[("Content-Length", "5000")]))
            assert_gateway_error(c.read_response(), 413)
        st = up.stats()
        assert st["requests"] == 0, "a request refused with 413 reached the upstream: %r" % st


def test_chunked_body_over_max_body_gets_413_once_exceeded():
    with limited() as (gw, up):
        with Client(gw.port) as c:
            c.send(build_request("POST", "/small/x", headers=[("Transfer-Encoding", "chunked")]))
            r = None
            for i in range(40):
                try:
                    c.send(b"200\r\n" + b"z" * 512 + b"\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break
                if c.has_input(0.02):
                    break
            # Never sent the last chunk: the 413 cannot wait for the end.
            r = c.read_response()
            assert_gateway_error(r, 413)
        st = up.stats()
        assert st["completed"] == 0, st


def test_bodies_at_the_limit_are_accepted():
    with limited() as (gw, up):
        with Client(gw.port) as c:
            d = upstream_saw(c.request("POST", "/small/x", body=b"a" * 1024))
            assert d["body_len"] == 1024
            c.send(build_request("POST", "/small/y", headers=[("Transfer-Encoding", "chunked")])
                   + chunked(b"b" * 1000, b"c" * 24))
            assert upstream_saw(c.read_response())["body_len"] == 1024


def test_global_max_body_applies_unless_the_route_sets_its_own():
    with limited() as (gw, up):
        with Client(gw.port) as c:
            assert c.request("POST", "/other", body=b"x" * 2048).status == 200
        with Client(gw.port) as c:
            assert_gateway_error(c.request("POST", "/other", body=b"x" * 3000), 413)
        with Client(gw.port) as c:
            assert upstream_saw(c.request("POST", "/big/x", body=b"x" * 9000))["body_len"] == 9000
        with Client(gw.port) as c:
            assert_gateway_error(c.request("POST", "/big/x", body=b"x" * 11000), 413)


def test_incomplete_request_head_gets_408_after_header_timeout_then_close():
    with limited() as (gw, up):
        with Client(gw.port, timeout=8) as c:
            c.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
            r = c.read_response()
            assert_gateway_error(r, 408)
            assert c.wait_closed(3), "connection still open 3 s after the 408"
        assert up.stats()["requests"] == 0


def test_slowloris_trickling_header_bytes_gets_408():
    with limited() as (gw, up):
        with Client(gw.port, timeout=8) as c:
            head = b"GET /slow HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"s" * 200
            answered = False
            # One byte every 0.1 s for up to 6 s: far beyond header_timeout
            # (1 s). The gateway must cut this off.
            for i in range(60):
                try:
                    c.send(head[i:i + 1])
                except (BrokenPipeError, ConnectionResetError):
                    answered = True
                    break
                if c.has_input(0.1):
                    answered = True
                    break
            assert answered, "the gateway still waited for the head after 6 s"
            r = c.read_response()
            assert_gateway_error(r, 408)
        assert up.stats()["requests"] == 0


def test_idle_connection_that_never_sends_is_closed():
    with limited() as (gw, up):
        with Client(gw.port, timeout=8) as c:
            assert c.wait_closed(6), "a silent connection stayed open past the timeouts"


def test_incomplete_body_gets_408_after_body_timeout_then_close():
    with limited() as (gw, up):
        with Client(gw.port, timeout=8) as c:
            c.send(build_request("POST", "/b", headers=[("Content-Length", "10")]) + b"12345")
            r = c.read_response()
            assert_gateway_error(r, 408)
            assert c.wait_closed(3)
        st = up.stats()
        assert st["completed"] == 0, st


def test_idle_keep_alive_connection_is_closed_after_keepalive_timeout():
    with limited() as (gw, up):
        with Client(gw.port, timeout=8) as c:
            assert c.request("GET", "/k").status == 200
            time.sleep(0.2)
            # Still open well before the timeout: it is a keep-alive connection.
            assert c.request("GET", "/k").status == 200
            t0 = time.monotonic()
            assert c.wait_closed(6), "idle keep-alive connection still open after 6 s"
            assert c.after_close == b"", c.after_close
            assert time.monotonic() - t0 > 0.3, "closed immediately, not after the idle timeout"


def test_keepalive_timeout_does_not_cut_a_slow_response():
    with limited() as (gw, up):
        with Client(gw.port, timeout=8) as c:
            r = c.request("GET", "/slow?delay=2")
            assert upstream_saw(r)["path"] == "/slow?delay=2"


def test_a_client_that_reads_nothing_is_closed_after_send_timeout():
    # 64 MiB asked for, not a byte read: once the socket buffers are full
    # nothing moves, and limits.send_timeout (here 2 s) closes the
    # connection (and its upstream exchange); a slow reader that does read
    # keeps going past it.
    import socket
    with limited(send_timeout=2) as (gw, up):
        s = socket.create_connection(("127.0.0.1", gw.port))
        try:
            s.sendall(build_request("GET", "/big?size=67108864"))
            time.sleep(4)
            # Now read everything: a closed connection ends well short of
            # 64 MiB.
            s.settimeout(10)
            got = 0
            while True:
                try:
                    chunk = s.recv(1 << 20)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += len(chunk)
            assert got < 32 << 20, "the gateway kept the connection: %d bytes" % got
        finally:
            s.close()
        # A reader that reads, slowly but steadily, gets everything.
        with Client(gw.port, timeout=20) as c:
            r = c.request("GET", "/big?size=3000000")
            assert r.status == 200 and len(r.body) == 3000000


def test_limits_are_not_applied_across_pipelined_requests():
    # 15 requests of 10 headers each: more than 20 fields in the buffer, but
    # each request alone is within the limit.
    with limited() as (gw, up):
        with Client(gw.port) as c:
            hdrs = [("X-H%d" % i, "v") for i in range(9)]
            c.send(b"".join(build_request("GET", "/p%d" % i, headers=hdrs) for i in range(15)))
            for i in range(15):
                assert upstream_saw(c.read_response())["path"] == "/p%d" % i


def test_connections_beyond_max_connections_are_refused_and_the_rest_keep_working():
    with limited(max_connections=3, keepalive_timeout=30, header_timeout=30) as (gw, up):
        # The start-up probe's connection may not be closed on the worker's
        # side yet: until it is, it counts. Try again until three fit.
        for _ in range(50):
            held = [Client(gw.port) for _ in range(3)]
            try:
                if all(c.request("GET", "/held").status == 200 for c in held):
                    break
            except ProtocolError:
                pass
            for c in held:
                c.close()
            time.sleep(0.05)
        else:
            raise AssertionError("three connections were never served at once")
        try:
            with Client(gw.port) as extra:
                try:
                    r = extra.request("GET", "/extra")
                    assert r.status != 200, "a 4th connection was served with max_connections = 3"
                except Exception:  # noqa: BLE001 - closed without an answer
                    assert extra.eof, "the 4th connection was neither answered nor closed"
            for c in held:
                assert c.request("GET", "/still").status == 200
            held.pop().close()
            time.sleep(0.2)
            assert upstream_saw(request(gw.port, "GET", "/room"))["path"] == "/room"
        finally:
            for c in held:
                c.close()
