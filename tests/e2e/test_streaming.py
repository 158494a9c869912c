"""Streaming with bounded buffers: 1 GB each way through the proxy with the
worker's resident memory growing by less than RSS_BOUND, and backpressure
(a slow reader on either side must stop the gateway reading from the other
side, not make it buffer)."""

import hashlib
import threading
import time

from harness import Client, build_request, pattern_chunks, pattern_sha256, proc_status_kb, \
    proxied, route

GIB = 1 << 30
RSS_BOUND_KB = 50 * 1024


class RssSampler:
    """Samples VmRSS of the given pids every 50 ms; .growth_kb() is the
    largest increase over the first sample, also counting VmHWM (the
    kernel's own peak) so a short spike between samples shows too."""

    def __init__(self, pids):
        self.pids = pids
        self.base = {p: proc_status_kb(p, "VmRSS") for p in pids}
        self.hwm0 = {p: proc_status_kb(p, "VmHWM") for p in pids}
        self.peak = dict(self.base)
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop_ev.wait(0.05):
            for p in self.pids:
                try:
                    self.peak[p] = max(self.peak[p], proc_status_kb(p, "VmRSS"))
                except OSError:
                    pass

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop_ev.set()
        self.t.join(5)
        self.hwm1 = {}
        for p in self.pids:
            try:
                self.hwm1[p] = proc_status_kb(p, "VmHWM")
            except OSError:
                self.hwm1[p] = self.hwm0[p]
        return False

    def growth_kb(self):
        return max(max(self.peak[p] - self.base[p], self.hwm1[p] - max(self.hwm0[p], self.base[p]))
                   for p in self.pids)

    def report(self):
        return ", ".join("pid %d: base %d kB, peak %d kB, HWM %d -> %d kB" % (
            p, self.base[p], self.peak[p], self.hwm0[p], self.hwm1[p]) for p in self.pids)


def warm_up(gw):
    """A few requests so the worker's steady-state memory is in the base."""
    with Client(gw.port) as c:
        for _ in range(3):
            c.request("POST", "/warm?drain=1", body=b"w" * 100000)
            c.request("GET", "/warm?size=100000")


def upload(port, path, total, piece_cb=None, timeout=120):
    """POSTs `total` pattern bytes with Content-Length; returns the response."""
    with Client(port, timeout=timeout) as c:
        c.send(build_request("POST", path, headers=[("Content-Length", str(total))]))
        for piece in pattern_chunks(total, 256 * 1024):
            c.sock.sendall(piece)
            if piece_cb:
                piece_cb(piece)
        return c.read_response()


def download(port, path, timeout=120, pause=0.0):
    """GETs `path`; returns (response without body, length, sha256)."""
    h = hashlib.sha256()
    n = [0]

    def sink(data):
        h.update(data)
        n[0] += len(data)

    with Client(port, timeout=timeout) as c:
        c.send(build_request("GET", path))
        if pause:
            time.sleep(pause)
        r = c.read_response(sink=sink)
    return r, n[0], h.hexdigest()


def one_worker(gw):
    pids = gw.worker_pids()
    assert len(pids) == 1, pids
    return pids


def test_one_gigabyte_upload_streams_through_with_bounded_worker_memory():
    with proxied([route("/*", max_body="2g")]) as (gw, up):
        warm_up(gw)
        with RssSampler(one_worker(gw)) as rss:
            r = upload(gw.port, "/up?drain=1", GIB)
        assert r.status == 200, r
        d = r.json()
        assert d["body_len"] == GIB, d
        assert d["body_sha256"] == pattern_sha256(GIB), "upload corrupted on the way"
        assert rss.growth_kb() < RSS_BOUND_KB, "worker RSS grew by %d kB (%s)" % (
            rss.growth_kb(), rss.report())


test_one_gigabyte_upload_streams_through_with_bounded_worker_memory.timeout = 150


def test_one_gigabyte_download_streams_through_with_bounded_worker_memory():
    with proxied([route("/*")]) as (gw, up):
        warm_up(gw)
        with RssSampler(one_worker(gw)) as rss:
            r, n, sha = download(gw.port, "/down?size=%d" % GIB)
        assert r.status == 200, r
        assert n == GIB, "received %d bytes" % n
        assert sha == pattern_sha256(GIB), "download corrupted on the way"
        assert rss.growth_kb() < RSS_BOUND_KB, "worker RSS grew by %d kB (%s)" % (
            rss.growth_kb(), rss.report())


test_one_gigabyte_download_streams_through_with_bounded_worker_memory.timeout = 150


def test_slow_client_download_does_not_make_the_gateway_buffer_the_body():
    size = 256 << 20
    with proxied([route("/*")]) as (gw, up):
        warm_up(gw)
        with RssSampler(one_worker(gw)) as rss:
            # The client reads nothing for 2 s while the upstream could send
            # all 256 MB in well under that: only backpressure keeps it out
            # of the worker's memory.
            r, n, sha = download(gw.port, "/slowclient?size=%d" % size, pause=2.0)
        assert r.status == 200 and n == size, (r, n)
        assert sha == pattern_sha256(size)
        assert rss.growth_kb() < RSS_BOUND_KB, "worker RSS grew by %d kB (%s)" % (
            rss.growth_kb(), rss.report())


test_slow_client_download_does_not_make_the_gateway_buffer_the_body.timeout = 90


def test_slow_upstream_upload_does_not_make_the_gateway_buffer_the_body():
    size = 256 << 20
    with proxied([route("/*", max_body="1g")]) as (gw, up):
        warm_up(gw)
        with RssSampler(one_worker(gw)) as rss:
            # The upstream reads nothing for 2 s after the head.
            r = upload(gw.port, "/slowup?drain=1&stall=2", size)
        assert r.status == 200, r
        assert r.json()["body_len"] == size
        assert rss.growth_kb() < RSS_BOUND_KB, "worker RSS grew by %d kB (%s)" % (
            rss.growth_kb(), rss.report())


test_slow_upstream_upload_does_not_make_the_gateway_buffer_the_body.timeout = 90


def test_chunked_upload_of_many_megabytes_is_rechunked_intact():
    size = 64 << 20
    with proxied([route("/*", max_body="1g")]) as (gw, up):
        with Client(gw.port, timeout=60) as c:
            c.send(build_request("POST", "/cu?drain=1", headers=[("Transfer-Encoding", "chunked")]))
            for piece in pattern_chunks(size, 100003):
                c.sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            c.send(b"0\r\n\r\n")
            r = c.read_response()
        assert r.status == 200, r
        d = r.json()
        assert d["body_len"] == size and d["body_sha256"] == pattern_sha256(size), d


def test_chunked_download_of_many_megabytes_arrives_intact():
    size = 64 << 20
    with proxied([route("/*")]) as (gw, up):
        r, n, sha = download(gw.port, "/cd?chunked=1&size=%d" % size)
        assert r.status == 200 and r.chunked, r
        assert n == size and sha == pattern_sha256(size)
