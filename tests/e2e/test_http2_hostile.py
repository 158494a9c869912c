"""HTTP/2 hostile clients (issue 10, SECURITY.md item 5), with the raw client
of h2raw.py against the real binary, on cleartext h2c (prior knowledge) and
on TLS (ALPN h2). Each test sends a bounded attack, asserts the concrete
frames that come back (GOAWAY and its error code, RST_STREAM codes,
:status), that the GOAWAY is counted in moongate_http2_goaways_total on the
admin listener, and that other clients are served meanwhile and after.

- settings: the server's SETTINGS carry MAX_CONCURRENT_STREAMS 100,
  INITIAL_WINDOW_SIZE 65535 and MAX_HEADER_LIST_SIZE 32768, and a
  connection WINDOW_UPDATE raises the connection window to 1 MiB.
- rapid reset (CVE-2023-44487): HEADERS + RST_STREAM pairs in a loop (at
  most 20,000) on h2c and on TLS -> GOAWAY ENHANCE_YOUR_CALM whose last
  stream id is within the token bucket (1000 + 33/s), the gateway closes
  the connection; curl over h2c and an HTTP/1.1 client get 200s all
  along; at most that many requests reach the upstream (printed: 1).
- CONTINUATION flood: a block in HEADERS + 8 CONTINUATIONs is served;
  HEADERS then a 9th 1-byte CONTINUATION (h2c), or up to 10,000 of them
  (TLS), never END_HEADERS -> GOAWAY ENHANCE_YOUR_CALM, closed.
- HPACK bomb: a 4,000-byte field inserted into the dynamic table, then
  referenced 16,000 times (a 20 KB block decoding to 61 MiB) -> that
  stream gets 431, the same connection then answers a normal request 200;
  the worker's RSS grows by less than 16 MiB over five bombs.
- oversized header lists: one 40 KB header, and 101 header fields -> 431
  with a JSON body, the connection goes on; 8 KB and 90 fields pass (200).
- PING and SETTINGS floods (up to 3,000,000 frames, the ACKs never read)
  -> GOAWAY ENHANCE_YOUR_CALM, closed, counted.
- more than 100 concurrent streams (the upstream holds each answer 2 s):
  sent before the client acknowledged the SETTINGS, the 101st gets
  RST_STREAM REFUSED_STREAM and the 100 others 200; sent after, nghttp2
  ends the connection with GOAWAY PROTOCOL_ERROR (last stream: the 100th).
- idle connections: GOAWAY NO_ERROR after limits.header_timeout (no
  request yet) or limits.keepalive_timeout (after one).
- a stream that never sends its announced body -> 408 after
  limits.body_timeout, as on HTTP/1.1; a client that advertises a zero
  window and never opens it (64 MiB response) -> the gateway buffers
  none of it (RSS) and cancels the stream (RST_STREAM CANCEL) after
  limits.send_timeout, the connection going on.
- a wrong preface (HTTP/1.1 400), garbage after the preface (GOAWAY
  PROTOCOL_ERROR), HTTP/1.1 after ALPN h2 (closed); nothing crashes.

Upstream request counts come from tests/e2e/upstream.py's /__stats
"paths"; worker RSS from /proc (harness.rss_kb).
"""

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

import h2raw
from h2raw import (ENHANCE_YOUR_CALM, INITIAL_WINDOW_SIZE, PROTOCOL_ERROR,
                   REFUSED_STREAM, Conn, Encoder, error_name)
from harness import Gateway, Upstream, free_port, request, rss_kb, wait_until

TOKEN = "h2-hostile-token"
CURL = "curl"
SAMPLE = re.compile(r'^moongate_http2_goaways_total\{code="([a-z_0-9]+)"\} (\d+)$', re.M)


def make_cert(d):
    """A self-signed P-256 certificate for localhost / 127.0.0.1."""
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "2", "-subj", "/CN=localhost", "-addext",
                        "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20)
    assert r.returncode == 0, r.stdout
    return cert, key


class Env:
    """An upstream (tests/e2e/upstream.py), and a gateway with one worker,
    a plain listener (h2c by prior knowledge, HTTP/1.1 otherwise), a TLS
    listener (ALPN h2) and an admin listener for /metrics. `limits` is Lua
    text spliced into the limits table."""

    def __init__(self, limits=""):
        self.dir = tempfile.mkdtemp(prefix="mg-h2-")
        self.cert, self.key = make_cert(self.dir)
        self.tls_port = free_port()
        self.admin_port = free_port()
        self.limits = limits
        self.up = None
        self.gw = None

    def __enter__(self):
        self.up = Upstream().__enter__()
        try:
            self.gw = Gateway("""return {
  listen = { "@LISTEN@", { "127.0.0.1:%d", tls = { cert = "%s", key = "%s" } } },
  workers = 1, pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  admin = { listen = "127.0.0.1:%d", token = "%s" },
  limits = { %s },
  upstreams = { up = { targets = { "%s" } } },
  routes = { { path = "/*", upstream = "up" } },
}
""" % (self.tls_port, self.cert, self.key, self.admin_port, TOKEN, self.limits,
                self.up.addr)).__enter__()
        except BaseException:
            self.up.__exit__(None, None, None)
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.gw.__exit__(*exc)
        finally:
            self.up.__exit__(None, None, None)
            shutil.rmtree(self.dir, ignore_errors=True)
        return False

    @property
    def port(self):
        return self.gw.port

    def conn(self, tls=False, settings=None, **kw):
        """A started h2raw connection (SETTINGS exchanged); `settings`:
        the client's SETTINGS (default: push off)."""
        c = Conn(self.tls_port, tls=self.cert, **kw) if tls else Conn(self.port, **kw)
        c.start(settings)
        return c

    def goaways(self):
        """{code name: count} of moongate_http2_goaways_total."""
        r = request(self.admin_port, "GET", "/metrics",
                    headers=[("Authorization", "Bearer " + TOKEN)], host="127.0.0.1")
        assert r.status == 200, r
        return {k: int(v) for k, v in SAMPLE.findall(r.body.decode())}

    def wait_goaway_counted(self, before, code):
        """Waits until the GOAWAY count for `code` rose above `before`'s."""
        name = error_name(code).lower()
        return wait_until(lambda: self.goaways().get(name, 0) > before.get(name, 0), 5,
                          what="moongate_http2_goaways_total{code=%r} to increase" % name)

    def worker_rss(self):
        return rss_kb(self.gw.worker_pids()[0])

    def curl_h2c(self, path="/ok"):
        """(status, HTTP version) of one curl request by h2c prior knowledge."""
        r = subprocess.run([CURL, "-s", "-o", "/dev/null", "--max-time", "5",
                            "--http2-prior-knowledge", "-w", "%{http_code} %{http_version}",
                            "http://127.0.0.1:%d%s" % (self.port, path)],
                           stdout=subprocess.PIPE, timeout=20)
        return r.stdout.decode()

    def assert_serves(self):
        """Other clients are served: curl over h2c and TLS h2, and HTTP/1.1."""
        assert self.curl_h2c() == "200 2", self.curl_h2c()
        r = subprocess.run([CURL, "-s", "-o", "/dev/null", "--max-time", "5", "--cacert",
                            self.cert, "--http2", "-w", "%{http_code} %{http_version}",
                            "https://localhost:%d/ok" % self.tls_port],
                           stdout=subprocess.PIPE, timeout=20)
        assert r.stdout == b"200 2", r.stdout
        r = request(self.port, "GET", "/ok")
        assert r.status == 200, r


class Bystander:
    """A client that keeps making requests (curl over h2c, then HTTP/1.1,
    alternately) while an attack runs; .results gets (kind, outcome)."""

    def __init__(self, env):
        self.env = env
        self.results = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            try:
                self.results.append(("h2c", self.env.curl_h2c("/bystander")))
                r = request(self.env.port, "GET", "/bystander")
                self.results.append(("http/1.1", r.status))
            except Exception as e:  # noqa: BLE001 - recorded, asserted below
                self.results.append(("error", repr(e)))
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)
        return False

    def check(self):
        bad = [r for r in self.results if r not in (("h2c", "200 2"), ("http/1.1", 200))]
        assert self.results and not bad, "bystander: %d requests, failures %r" % (
            len(self.results), bad[:5])
        return len(self.results)


def expect_goaway_and_close(c, codes, timeout=10):
    """The gateway sent GOAWAY with one of `codes` (one or a tuple) and
    closed the connection."""
    codes = codes if isinstance(codes, tuple) else (codes,)
    closed = c.drain(timeout)
    assert c.goaway is not None, "no GOAWAY; last frames %r (closed: %s)" % (c.frames[-5:], closed)
    assert c.goaway.error_code in codes, "GOAWAY %s, expected %s (%r)" % (
        error_name(c.goaway.error_code), "/".join(map(error_name, codes)), c.goaway)
    assert closed, "the connection stayed open %ss after GOAWAY %r" % (timeout, c.goaway)


# ------------------------------------------------------------------ tests


def test_settings_advertise_the_limits():
    with Env() as env:
        for tls in (False, True):
            c = env.conn(tls=tls)
            with c:
                s = c.server_settings
                assert s.get(h2raw.MAX_CONCURRENT_STREAMS) == 100, s
                assert s.get(INITIAL_WINDOW_SIZE, 65535) == 65535, s
                assert s.get(h2raw.MAX_HEADER_LIST_SIZE) == 32768, s
                # The connection window: 65535 by default, raised to 1 MiB.
                c.read_until(lambda: any(f.type == h2raw.WINDOW_UPDATE and f.stream == 0
                                         for f in c.frames), what="connection WINDOW_UPDATE")
                inc = sum(f.increment for f in c.frames
                          if f.type == h2raw.WINDOW_UPDATE and f.stream == 0)
                assert 65535 + inc == 1 << 20, inc
                st = c.get("/hello")
                assert st.status == 200 and st.ended, st
                assert b'"path": "/hello"' in st.body, st


def rapid_reset_attack(tls):
    with Env() as env:
        before = env.goaways()
        env.up.reset()
        with Bystander(env) as by:
            time.sleep(0.2)
            c = env.conn(tls=tls)
            with c:
                t0 = time.monotonic()
                pairs = h2raw.rapid_reset(c, pairs=20000, batch=100)
                # ENHANCE_YOUR_CALM: the gateway's own token bucket (the
                # same as nghttp2's, whose GOAWAY would say INTERNAL_ERROR).
                expect_goaway_and_close(c, ENHANCE_YOUR_CALM)
                took = time.monotonic() - t0
            time.sleep(0.3)
        served = by.check()
        env.wait_goaway_counted(before, ENHANCE_YOUR_CALM)
        env.assert_serves()
        # The upstream requests are the bystander's plus those of the reset
        # streams that reached the upstream before their reset was read.
        stats = env.up.stats()
        attack = stats["paths"].get("/rapid-reset", 0)
        print("rapid reset (%s): %d pairs sent in %.2fs (the client reads between "
              "writes of 100), GOAWAY %r; %d of the streams reached the upstream; "
              "bystander: %d requests, all 200"
              % ("TLS" if tls else "h2c", pairs, took, c.goaway, attack, served))
        # The token bucket: 1000 resets at once, then 33 a second. The
        # GOAWAY's last stream id says how many streams the gateway took.
        budget = 1000 + 33 * (took + 1)
        assert c.goaway.last_stream <= 2 * budget + 1, (c.goaway, took)
        assert attack <= budget, attack


def test_rapid_reset_gets_goaway_on_h2c_and_others_are_served():
    rapid_reset_attack(tls=False)


test_rapid_reset_gets_goaway_on_h2c_and_others_are_served.timeout = 90


def test_rapid_reset_gets_goaway_over_tls():
    rapid_reset_attack(tls=True)


test_rapid_reset_gets_goaway_over_tls.timeout = 90


def test_continuation_flood_gets_goaway():
    with Env() as env:
        before = env.goaways()
        # The limit is exact: a header block in HEADERS + 8 CONTINUATIONs
        # is a request like any other...
        c = env.conn()
        with c:
            sid = c.new_stream()
            block = Encoder.request("/eight", headers=[("x-pad", "p" * 90)])
            piece = -(-len(block) // 9)
            assert h2raw.send_header_block(c, sid, block, max_frame=piece)
            assert len(block) > 8 * piece
            st = c.response(sid)
            assert st.status == 200 and st.ended, st
            # ... and a 9th CONTINUATION of the next block ends the connection.
            sent = h2raw.continuation_flood(c, frames=9)
            assert sent == 9, sent
            expect_goaway_and_close(c, ENHANCE_YOUR_CALM)
        env.wait_goaway_counted(before, ENHANCE_YOUR_CALM)
        # A flood, over TLS: the same, whenever the gateway reads the 9th.
        before = env.goaways()
        c = env.conn(tls=True)
        with c:
            sent = h2raw.continuation_flood(c, frames=10000, batch=100)
            expect_goaway_and_close(c, ENHANCE_YOUR_CALM)
        print("CONTINUATION flood over TLS: %d frames sent before the GOAWAY was read" % sent)
        env.wait_goaway_counted(before, ENHANCE_YOUR_CALM)
        env.assert_serves()
        assert env.up.stats()["paths"].get("/continuation", 0) == 0


def test_hpack_bomb_gets_431_and_memory_stays_bounded():
    with Env() as env:
        c = env.conn()
        with c:
            # Warm the worker's allocator with normal requests first.
            for _ in range(5):
                assert c.get("/warm").status == 200
            rss0 = env.worker_rss()
            for i in range(5):
                sid = c.new_stream()
                block = h2raw.hpack_bomb_block("/bomb", value_len=4000, refs=16000)
                assert len(block) < 21000, len(block)
                assert h2raw.send_header_block(c, sid, block)
                st = c.response(sid, timeout=10)
                if st.reset is None:
                    assert st.status == 431 and st.ended, st
                    assert st.header("content-type") == "application/json", st.headers
                else:
                    raise AssertionError("bomb %d: stream reset %s, expected 431"
                                         % (i, error_name(st.reset)))
                # The same connection goes on.
                ok = c.get("/after-bomb-%d" % i)
                assert ok.status == 200 and ok.ended, ok
            rss1 = env.worker_rss()
            assert c.goaway is None and not c.closed, c.goaway
        print("HPACK bomb: 5 blocks of %d bytes decoding to %d MB each; worker RSS %d -> %d KiB"
              % (len(block), 4000 * 16000 >> 20, rss0, rss1))
        assert rss1 - rss0 < 16 << 10, (rss0, rss1)
        assert env.up.stats()["paths"].get("/bomb", 0) == 0
        env.assert_serves()


def test_oversized_header_lists_get_431_and_the_connection_goes_on():
    with Env() as env:
        for tls in (False, True):
            c = env.conn(tls=tls)
            with c:
                cases = [
                    ("/big-40k", [("x-big", "a" * 40000)], 431),
                    ("/big-8k", [("x-big", "a" * 8000)], 200),
                    ("/fields-101", [("x-f-%d" % i, "v") for i in range(101)], 431),
                    ("/fields-90", [("x-f-%d" % i, "v") for i in range(90)], 200),
                ]
                for path, headers, want in cases:
                    sid = c.new_stream()
                    block = Encoder.request(path, headers=headers)
                    assert h2raw.send_header_block(c, sid, block)
                    st = c.response(sid, timeout=10)
                    assert st.reset is None and st.status == want and st.ended, (path, st)
                    if want == 431:
                        assert st.header("content-type") == "application/json", st.headers
                        assert b"error" in st.body, st
                assert c.goaway is None and not c.closed, c.goaway
                assert c.get("/after").status == 200
        paths = env.up.stats()["paths"]
        assert paths.get("/big-40k", 0) == 0 and paths.get("/fields-101", 0) == 0, paths
        assert paths.get("/big-8k") == 2 and paths.get("/fields-90") == 2, paths


def flood_attack(frame_bytes, kind):
    with Env() as env:
        before = env.goaways()
        # A small receive buffer, never read during the flood: the ACKs
        # pile up on the gateway's side. nghttp2 refuses to queue more than
        # 1000 of them; the gateway writes what it can between reads (16
        # KiB of frames at a time), so the queue only grows once the
        # socket buffers are full (4 MiB of send buffer here: about 250,000
        # PINGs); up to 3,000,000 frames (51 MB) are sent, so larger
        # buffers elsewhere still end in the same place.
        c = env.conn(auto=False, rcvbuf=4096)
        with c:
            sent = h2raw.flood(c, frame_bytes, count=3000000, batch=2000)
            expect_goaway_and_close(c, ENHANCE_YOUR_CALM, timeout=15)
        print("%s flood: %d frames written (not all read by the gateway); GOAWAY %r"
              % (kind, sent, c.goaway))
        env.wait_goaway_counted(before, ENHANCE_YOUR_CALM)
        env.assert_serves()


def test_ping_flood_gets_goaway():
    flood_attack(h2raw.ping_frame(b"12345678"), "PING")


def test_settings_flood_gets_goaway():
    flood_attack(h2raw.settings_frame({INITIAL_WINDOW_SIZE: 65535}), "SETTINGS")


def open_streams(c, n, path):
    """n streams with a GET each, in one write; returns their ids."""
    sids = [c.new_stream() for _ in range(n)]
    c.send(b"".join(h2raw.headers_frame(sid, Encoder.request(path)) for sid in sids))
    return sids


def test_streams_over_the_limit_are_refused_or_end_the_connection():
    with Env() as env:
        # A client that sends its requests before it has seen (and
        # acknowledged) the gateway's SETTINGS: the limit is pending, and
        # the extra streams are refused one by one.
        c = Conn(env.port, timeout=15)
        with c:
            c.start(wait=False)
            sids = open_streams(c, 101, "/slow-a?delay=2")
            for sid in sids:
                c.response(sid, timeout=20)
            refused = [c.streams[s] for s in sids if c.streams[s].reset is not None]
            ok = [c.streams[s] for s in sids if c.streams[s].status == 200]
            assert [s.id for s in refused] == [sids[-1]], refused[:5]
            assert refused[0].reset == REFUSED_STREAM, refused
            assert len(ok) == 100, [c.streams[s] for s in sids if c.streams[s].status != 200][:3]
            # Once they are done, the connection takes new streams.
            assert c.get("/next").status == 200 and c.goaway is None
        # A client that acknowledged the limit of 100 and still opens a
        # 101st stream breaks the protocol: nghttp2 ends the connection
        # with GOAWAY PROTOCOL_ERROR naming the reason; the streams up to
        # the GOAWAY's last stream id had reached the upstream.
        c = env.conn(timeout=15)
        with c:
            sids = open_streams(c, 101, "/slow-b?delay=2")
            expect_goaway_and_close(c, PROTOCOL_ERROR)
            assert c.goaway.last_stream == sids[-2], c.goaway
            assert b"concurrent streams" in c.goaway.debug, c.goaway
        paths = env.up.stats()["paths"]
        assert paths.get("/slow-a") == 100 and paths.get("/slow-b", 0) <= 100, paths
        env.assert_serves()


test_streams_over_the_limit_are_refused_or_end_the_connection.timeout = 90


STALL_LIMITS = "body_timeout = 2, header_timeout = 2, keepalive_timeout = 4"


def test_idle_connections_get_goaway_after_the_header_and_keepalive_timeouts():
    with Env(limits=STALL_LIMITS) as env:
        # The preface and SETTINGS, then nothing: limits.header_timeout.
        c = env.conn(timeout=15)
        with c:
            t0 = time.monotonic()
            assert c.drain(10), c.frames[-5:]
            took = time.monotonic() - t0
            assert c.goaway is not None and c.goaway.error_code == h2raw.NO_ERROR, c.goaway
            assert c.goaway.last_stream == 0, c.goaway
            assert 1.5 < took < 6, took
        # One request, then nothing: limits.keepalive_timeout.
        c = env.conn(timeout=15)
        with c:
            assert c.get("/once").status == 200
            t0 = time.monotonic()
            assert c.drain(12), c.frames[-5:]
            took = time.monotonic() - t0
            assert c.goaway is not None and c.goaway.error_code == h2raw.NO_ERROR, c.goaway
            assert c.goaway.last_stream == 1, c.goaway
            assert 3.5 < took < 8, took
        print("idle: GOAWAY NO_ERROR after the header timeout (2 s) and, after a request, "
              "the keep-alive timeout (4 s)")


def test_a_stream_that_never_sends_its_body_gets_408():
    # HTTP/1.1's rule: 10 s (here 2 s) between body reads, then 408.
    with Env(limits=STALL_LIMITS) as env:
        c = env.conn(timeout=15)
        with c:
            sid = c.new_stream()
            block = Encoder.request("/post", method="POST", headers=[("content-length", "10")])
            c.send(h2raw.headers_frame(sid, block, end_stream=False))
            t0 = time.monotonic()
            st = c.response(sid, timeout=12)
            took = time.monotonic() - t0
            print("stalled body: %r after %.1fs" % (st, took))
            assert st.status == 408 and st.ended, st
            assert 1.5 < took < 6, took
            # The connection then has no stream: closed after the
            # keep-alive timeout with GOAWAY NO_ERROR.
            assert c.drain(10), c.frames[-5:]
            assert c.goaway is not None and c.goaway.error_code == h2raw.NO_ERROR, c.goaway
        env.assert_serves()


def test_a_client_that_never_opens_its_window_is_bounded():
    # The client's stream window is 0 and never grows: not one byte of the
    # 64 MiB response can be sent. The gateway must not buffer it (RSS) and
    # must not hold the stream (and its upstream connection) forever:
    # after limits.send_timeout (here 3 s) without a byte taken the stream
    # is cancelled, as HTTP/1.1 closes a client that reads nothing.
    with Env(limits=STALL_LIMITS + ", send_timeout = 3") as env:
        c = env.conn(settings={h2raw.ENABLE_PUSH: 0, INITIAL_WINDOW_SIZE: 0}, timeout=15)
        with c:
            rss0 = env.worker_rss()
            sid = c.request("/stuck?size=67108864")
            st = c.streams[sid]
            c.read_until(lambda: st.headers is not None, timeout=10, what="response HEADERS")
            assert st.status == 200 and not st.body, st
            time.sleep(1.5)
            rss1 = env.worker_rss()
            t0 = time.monotonic()
            c.read_until(lambda: st.reset is not None or c.closed, timeout=10,
                         what="the stream or connection to end")
            took = time.monotonic() - t0
            print("zero window: worker RSS %d -> %d KiB; %r, connection closed %s after "
                  "%.1fs, GOAWAY %r" % (rss0, rss1, st, c.closed, took, c.goaway))
            assert rss1 - rss0 < 8 << 10, (rss0, rss1)
            assert not st.body, st
            assert st.reset == h2raw.CANCEL, st
            # The connection itself goes on: a second stream gets its head
            # (its body waits for a window like the first one's).
            sid2 = c.request("/")
            c.read_until(lambda: c.streams[sid2].headers is not None, timeout=10,
                         what="the second stream's HEADERS")
            assert c.streams[sid2].status == 200 and not c.closed
        assert "flow-control window shut); cancelled" in env.gw.log_text()
        env.assert_serves()


def test_a_wrong_preface_and_garbage_after_the_preface_are_closed():
    with Env() as env:
        # The preface with its last line wrong: not HTTP/2; the HTTP/1.1
        # parser sees a PRI request and refuses it.
        for data in (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
                     b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"hello, this is not a frame" * 4):
            c = Conn(env.port)
            with c:
                c.send(data)
                raw = bytearray()
                # Read raw bytes (the answer may be HTTP/1.1 or frames)
                # until the gateway closes.
                c.sock.settimeout(5)
                closed = False
                while not closed:
                    try:
                        chunk = c.sock.recv(65536)
                    except ConnectionResetError:
                        chunk = b""
                    except (TimeoutError, OSError):
                        break
                    closed = not chunk
                    raw += chunk
                print("%r -> %r" % (data[:30], bytes(raw[:120])))
                assert closed, "still open 5 s after %r" % data
                if data.endswith(b"XX\r\n\r\n"):
                    assert raw.startswith(b"HTTP/1.1 400 "), raw
                else:
                    frames = h2raw.parse_frames(raw)
                    goaways = [f for f in frames if f.type == h2raw.GOAWAY]
                    assert goaways and goaways[-1].error_code == PROTOCOL_ERROR, frames
        # Over TLS with ALPN h2: a wrong preface is closed.
        c = Conn(env.tls_port, tls=env.cert)
        with c:
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.drain(5), c.frames
        env.assert_serves()
        assert env.gw.running()
