"""Clients that go away at awkward moments, half-closes, and bursts: the
gateway must clean up (no crash, no sanitizer report, upstream connections
released) and go on serving. These matter most in the ASan run."""

import socket
import threading
import time

from harness import Client, build_request, chunked, pattern_bytes, proxied, request, route, \
    upstream_saw, wait_until


def healthy(gw, path="/health-check"):
    d = upstream_saw(request(gw.port, "GET", path))
    assert d["path"] == path
    return d


def test_client_closing_while_the_upstream_is_still_thinking_is_cleaned_up():
    with proxied() as (gw, up):
        for i in range(5):
            c = Client(gw.port)
            c.send(build_request("GET", "/slow%d?delay=0.3" % i))
            time.sleep(0.05)
            c.close()
        time.sleep(0.6)  # the upstream answers to clients that are gone
        healthy(gw)
        assert gw.worker_pids() and len(gw.worker_pids()) == 1


def test_client_closing_in_the_middle_of_a_download_is_cleaned_up():
    with proxied() as (gw, up):
        for i in range(3):
            c = Client(gw.port)
            c.send(build_request("GET", "/big%d?size=%d" % (i, 50 << 20)))
            got = 0
            while got < (1 << 20):
                data = c.sock.recv(65536)
                assert data, "connection closed early"
                got += len(data)
            c.close()
        healthy(gw)
        # The upstream connections of the abandoned downloads are not kept
        # half-read in the pool: they get closed.
        wait_until(lambda: up.stats()["open"] <= 1, 5, what="abandoned upstream connections closed")


def test_client_closing_in_the_middle_of_an_upload_is_cleaned_up():
    with proxied([route("/*", max_body="100m")]) as (gw, up):
        for i in range(3):
            c = Client(gw.port)
            c.send(build_request("POST", "/up%d?drain=1" % i,
                                 headers=[("Content-Length", str(10 << 20))]))
            c.send(b"u" * (1 << 20))
            c.close()
        time.sleep(0.2)
        healthy(gw)
        assert up.stats()["completed"] == 1  # only the health check


def test_client_reset_in_the_middle_of_a_response_is_cleaned_up():
    with proxied() as (gw, up):
        for i in range(3):
            c = Client(gw.port)
            c.send(build_request("GET", "/rst%d?size=%d&chunked=1" % (i, 20 << 20)))
            c.sock.recv(65536)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            c.close()  # RST
        healthy(gw)


def test_half_closed_client_still_gets_its_response():
    with proxied() as (gw, up):
        with Client(gw.port) as c:
            c.send(build_request("GET", "/half?delay=0.2"))
            c.sock.shutdown(socket.SHUT_WR)
            r = c.read_response()
            assert upstream_saw(r)["path"] == "/half?delay=0.2"
            assert c.wait_closed(3), "connection left open after the client's half-close"


def test_half_closed_client_with_a_body_still_gets_its_response():
    # close=1: the upstream closes after each answer, so every request needs
    # a fresh upstream connection (the slow path, where the FIN arrives
    # while the gateway is still connecting).
    bodies = [("chunked", [("Transfer-Encoding", "chunked")], chunked(b"abc", b"defgh"), 8),
              ("chunked with trailer", [("Transfer-Encoding", "chunked")],
               chunked(b"abc", trailers=["X-T: 1"]), 3),
              ("content-length", [], b"hello", 5)]
    with proxied() as (gw, up):
        for name, hdrs, body, length in bodies:
            for i in range(3):
                with Client(gw.port) as c:
                    c.send(build_request("POST", "/half-%d?close=1" % i, headers=hdrs, body=body))
                    c.sock.shutdown(socket.SHUT_WR)
                    try:
                        r = c.read_response()
                    except Exception as e:  # noqa: BLE001
                        raise AssertionError("%s body, try %d: no response after the client's "
                                             "half-close (%s)" % (name, i, e))
                    assert r.status == 200, (name, r)
                    assert r.json()["body_len"] == length, (name, r)


def test_many_pipelined_requests_in_one_write_are_all_answered():
    with proxied() as (gw, up):
        with Client(gw.port, timeout=20) as c:
            reqs = []
            for i in range(200):
                if i % 3 == 0:
                    reqs.append(build_request("POST", "/pp/%d" % i, body=b"b%d" % i))
                else:
                    reqs.append(build_request("GET", "/pp/%d?size=%d" % (i, i * 37)))
            c.send(b"".join(reqs))
            for i in range(200):
                r = c.read_response()
                assert r.status == 200, (i, r)
                if i % 3 == 0:
                    d = r.json()
                    assert (d["path"], d["body"]) == ("/pp/%d" % i, "b%d" % i), (i, d)
                else:
                    assert r.body == pattern_bytes(i * 37), i
        assert up.stats()["requests"] == 200


def test_burst_of_concurrent_connections_is_served():
    with proxied() as (gw, up):
        errors = []

        def one(i):
            try:
                r = request(gw.port, "POST", "/burst/%d" % i, body=b"x" * (i * 10), timeout=15)
                d = upstream_saw(r)
                if d["body_len"] != i * 10:
                    errors.append((i, d["body_len"]))
            except Exception as e:  # noqa: BLE001
                errors.append((i, repr(e)))

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors[:5]
        assert up.stats()["requests"] == 200


def test_reload_during_an_upload_lets_the_upload_finish():
    with proxied([route("/*", max_body="1g")]) as (gw, up):
        with Client(gw.port, timeout=20) as c:
            total = 8 << 20
            c.send(build_request("POST", "/reload-up?drain=1",
                                 headers=[("Content-Length", str(total))]))
            sent = 0
            chunk = b"r" * (1 << 20)
            c.sock.sendall(chunk)
            sent += len(chunk)
            gw.reload({"upstreams": {"up": {"targets": [up.addr]}},
                       "routes": [route("/other", max_body="1g")]})
            while sent < total:
                c.sock.sendall(chunk)
                sent += len(chunk)
            r = c.read_response()
            assert r.status == 200 and r.json()["body_len"] == total, r
