"""plugins/rate-limit.lua end to end: the real binary with the built-in
plugin on handler routes (and one proxied route), real concurrent clients,
a real redis-server.

Exactness across two workers in the shared dict (1500 requests, 64
connections, limit 1000), exactness across two gateway processes sharing
one redis-server, the sliding window against the fixed window at a window
boundary, Redis killed and hung under each failure policy and coming back,
GCRA bursts on both storages, client-IP keys that a spoofed
X-Forwarded-For cannot change (unless the peer is a trusted proxy), and the
RateLimit-* headers on 200 and 429."""

import collections
import threading
import time

from harness import Client, Gateway, Upstream, request, wait_until
from test_redis import RedisServer

# ------------------------------------------------------------------ helpers

CONF = """local gw = require("moongate.gw")
local ffi = require("ffi")
pcall(ffi.cdef, "int getpid(void);")
return {
  listen = { "@LISTEN@" }, workers = %(workers)d,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  shared = { limits = "16m" },
  %(extra)s
  routes = {
%(routes)s
  },
}
"""

# A handler answering 200 with the worker's pid, behind rate-limit `rl`.
ROUTE = """    { path = "%s", plugins = { ["rate-limit"] = %s },
      handler = function(ctx) return 200, tostring(ffi.C.getpid()) end },"""


def conf(routes, workers=1, extra=""):
    """routes: [(path, rate-limit conf as Lua text)] or raw Lua text."""
    if not isinstance(routes, str):
        routes = "\n".join(ROUTE % r for r in routes)
    return CONF % {"workers": workers, "extra": extra, "routes": routes}


def redis_extra(rs, timeout=0.5):
    return 'redis = { url = "redis://127.0.0.1:%d", timeout = %s, connect_timeout = %s },' \
        % (rs.port, timeout, timeout)


def hammer(ports, path, total, conns=64):
    """`total` GETs over `conns` keep-alive connections spread over `ports`.
    Returns (Counter of statuses, set of bodies of the 200s)."""
    lock = threading.Lock()
    left = [total]
    statuses = collections.Counter()
    bodies = set()
    errors = []

    def worker(i):
        try:
            with Client(ports[i % len(ports)], timeout=10) as c:
                while True:
                    with lock:
                        if left[0] == 0:
                            return
                        left[0] -= 1
                    r = c.request("GET", path)
                    with lock:
                        statuses[r.status] += 1
                        if r.status == 200:
                            bodies.add(r.body)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    return statuses, bodies


def get(port, path, headers=None, client=None):
    if client:
        return client.request("GET", path, headers=headers)
    return request(port, "GET", path, headers=headers)


def assert_limited(r):
    assert r.status == 429, r
    assert r.json() == {"error": "rate limit exceeded"}, r.body
    assert int(r.header("retry-after")) >= 1, r
    assert r.header("ratelimit-remaining") == "0", r


# ------------------------------------------------------------------ tests


def test_local_limit_admits_exactly_1000_of_1500_across_two_workers():
    rl = "{ limit = 1000, window = 3600 }"
    with Gateway(conf([("/x", rl)], workers=2)) as gw:
        t0 = time.monotonic()
        statuses, pids = hammer([gw.port], "/x", 1500, conns=64)
        took = time.monotonic() - t0
        assert statuses == {200: 1000, 429: 500}, statuses
        assert len(pids) == 2, "expected both workers to admit requests: %r" % pids
        print("local: 1500 requests over 64 connections in %.2fs: %r" % (took, dict(statuses)))


def test_redis_limit_admits_exactly_1000_of_1500_across_two_gateways():
    rl = '{ limit = 1000, window = 3600, storage = "redis", on_redis_error = "fail_closed" }'
    with RedisServer() as rs:
        text = conf([("/x", rl)], workers=2, extra=redis_extra(rs, timeout=2))
        with Gateway(text) as a, Gateway(text) as b:
            t0 = time.monotonic()
            statuses, pids = hammer([a.port, b.port], "/x", 1500, conns=64)
            took = time.monotonic() - t0
            assert statuses == {200: 1000, 429: 500}, statuses
            assert len(pids) >= 3, "expected workers of both gateways to admit: %r" % pids
            keys = rs.cmd("KEYS", "rl:*")
            assert len(keys) == 1 and keys[0].startswith("rl:{"), keys
            # The key's per-slice counts of the sliding window (fields "0"
            # to "10"; "last" is the newest slice) add up to 1000.
            fields = rs.cmd("HGETALL", keys[0])
            counts = dict(zip(fields[::2], fields[1::2]))
            assert "last" in counts, fields
            assert sum(int(v) for k, v in counts.items() if k != "last") == 1000, fields
            print("redis: 1500 requests over 2 gateways in %.2fs: %r" % (took, dict(statuses)))


def max_in_interval(times, length):
    """The most timestamps inside any half-open interval of `length`."""
    times = sorted(times)
    best, j = 0, 0
    for i in range(len(times)):
        while times[i] - times[j] >= length:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_sliding_window_holds_the_limit_across_a_boundary_where_fixed_lets_2x_through():
    window, limit = 2, 20
    routes = [("/fixed", '{ limit = %d, window = %d, algorithm = "fixed" }' % (limit, window)),
              ("/sliding", '{ limit = %d, window = %d }' % (limit, window))]
    with Gateway(conf(routes)) as gw, Client(gw.port) as c:
        # Windows are aligned to the epoch: wait until 0.3 s before a boundary.
        wait_until(lambda: abs(time.time() % window - (window - 0.3)) < 0.02, 5,
                   interval=0.002, what="the end of a window")
        admitted = {"/fixed": [], "/sliding": []}

        def burst():
            for _ in range(limit):
                for path in admitted:
                    r = c.request("GET", path)
                    assert r.status in (200, 429), r
                    if r.status == 200:
                        admitted[path].append(time.time())
        burst()                                   # the end of window N
        wait_until(lambda: 0.05 < time.time() % window < 0.5, 2, interval=0.002,
                   what="the next window")
        burst()                                   # the start of window N+1
        fixed = max_in_interval(admitted["/fixed"], window)
        sliding = max_in_interval(admitted["/sliding"], window)
        print("within %ds: fixed admitted %d, sliding %d (limit %d)"
              % (window, fixed, sliding, limit))
        assert sliding <= limit, sliding
        assert len(admitted["/sliding"]) == limit, admitted["/sliding"]
        assert fixed == 2 * limit, fixed


test_sliding_window_holds_the_limit_across_a_boundary_where_fixed_lets_2x_through.timeout = 30


def test_redis_failure_policies_fail_open_closed_or_local_and_redis_use_resumes():
    routes = conf([
        ("/open", '{ limit = 5, window = 60, storage = "redis", namespace = "o" }'),
        ("/closed", '{ limit = 5, window = 60, storage = "redis", namespace = "c", '
                    'on_redis_error = "fail_closed" }'),
        ("/local", '{ limit = 5, window = 60, storage = "redis", namespace = "l", '
                   'on_redis_error = "local" }'),
    ]).replace("  routes = {\n", """  routes = {
    { path = "/errors", handler = function(ctx)
        return 200, tostring(gw.shared.limits:get("rate-limit:redis-errors") or 0)
    end },
""")
    with RedisServer() as rs:
        text = routes.replace("  shared =", redis_extra(rs, timeout=0.5) + "\n  shared =")
        with Gateway(text) as gw, Client(gw.port) as c:
            for path in ("/open", "/closed", "/local"):
                assert get(gw.port, path, client=c).status == 200
            assert len(rs.cmd("KEYS", "rl:*")) == 3

            # Hung (SIGSTOP): the first call of each waits out the 0.5 s
            # timeout, then the client is down and calls fail at once.
            rs.pause()
            t0 = time.monotonic()
            r = get(gw.port, "/closed", client=c)
            took = time.monotonic() - t0
            assert r.status == 503 and r.json() == {"error": "rate limit unavailable"}, r
            assert took < 0.5 + 0.3, took
            rs.resume()
            rs.kill()

            # Killed: fail_open serves, fail_closed answers 503, local
            # counts in the dict (5 more, then 429), each at once.
            worst = 0
            for _ in range(10):
                t0 = time.monotonic()
                assert get(gw.port, "/open", client=c).status == 200
                assert get(gw.port, "/closed", client=c).status == 503
                worst = max(worst, time.monotonic() - t0)
            local = [get(gw.port, "/local", client=c) for _ in range(7)]
            assert [r.status for r in local] == [200] * 5 + [429] * 2, local
            assert_limited(local[-1])
            assert worst < 0.5, worst
            errors = int(get(gw.port, "/errors", client=c).body)
            assert errors >= 27, errors
            gw.wait_log(r"\[warn\].*rate-limit: redis failed \((connection refused|timeout|closed)")

            # Redis comes back (the client's backoff is at most 5 s).
            rs.start()
            wait_until(lambda: get(gw.port, "/closed").status == 200, 10, interval=0.1,
                       what="the rate limit to use redis again")
            # The redis counter started afresh (the server lost its data).
            r = get(gw.port, "/local", client=c)
            assert r.status == 200 and r.header("ratelimit-remaining") == "4", r
            print("fail_closed on a hung redis: %.3fs; %d failures counted" % (took, errors))


test_redis_failure_policies_fail_open_closed_or_local_and_redis_use_resumes.timeout = 60


def test_gcra_lets_a_burst_through_then_one_request_per_interval_on_both_storages():
    gcra = '{ limit = 10, window = 1, burst = 3, algorithm = "gcra"%s }'
    with RedisServer() as rs:
        text = conf([("/local", gcra % ""), ("/redis", gcra % ', storage = "redis"')],
                    extra=redis_extra(rs))
        with Gateway(text) as gw, Client(gw.port) as c:
            for path in ("/local", "/redis"):
                got = [c.request("GET", path) for _ in range(4)]
                assert [r.status for r in got] == [200, 200, 200, 429], (path, got)
                assert [r.header("ratelimit-remaining") for r in got[:3]] == ["2", "1", "0"]
                assert got[0].header("ratelimit-limit") == "3"
                assert_limited(got[3])
                time.sleep(0.12)                  # one interval (0.1 s) refills one token
                assert c.request("GET", path).status == 200, path
                assert c.request("GET", path).status == 429, path


def test_spoofed_x_forwarded_for_cannot_mint_keys_and_headers_are_on_200_and_429():
    rl = "{ limit = 3, window = 60 }"
    with Upstream() as up:
        routes = [("/h", rl)]
        proxied = """    { path = "/p", upstream = "up", plugins = { ["rate-limit"] = %s } },""" % rl
        ups = 'upstreams = { up = { targets = { "%s" } } },' % up.addr
        text = conf("\n".join(ROUTE % r for r in routes) + "\n" + proxied, extra=ups)
        with Gateway(text) as gw, Client(gw.port) as c:
            got = [c.request("GET", "/p", headers=[("X-Forwarded-For", "203.0.113.%d" % i)])
                   for i in range(4)]
            assert [r.status for r in got] == [200, 200, 200, 429], got
            for i, r in enumerate(got[:3]):
                assert r.header("ratelimit-limit") == "3", r
                assert r.header("ratelimit-remaining") == str(2 - i), r
                assert 0 < int(r.header("ratelimit-reset")) <= 60, r
            assert_limited(got[3])
            assert got[3].header("ratelimit-limit") == "3"
        # Behind a trusted proxy each forwarded address is its own client.
        trusted = text.replace("shared =", 'trusted_proxies = { "127.0.0.1/32" },\n  shared =')
        with Gateway(trusted) as gw, Client(gw.port) as c:
            for i in range(5):
                r = c.request("GET", "/h", headers=[("X-Forwarded-For", "203.0.113.%d" % i)])
                assert r.status == 200 and r.header("ratelimit-remaining") == "2", r
            same = [c.request("GET", "/h", headers=[("X-Forwarded-For", "198.51.100.1")])
                    for _ in range(4)]
            assert [r.status for r in same] == [200, 200, 200, 429], same


def test_several_limits_are_all_checked_and_the_tightest_is_reported():
    rl = "{ limits = { { limit = 100, window = 3600 }, { limit = 2, window = 60 } }, " \
         "by = { \"ip\", \"route\" } }"
    with Gateway(conf([("/a", rl), ("/b", rl)])) as gw, Client(gw.port) as c:
        got = [c.request("GET", "/a") for _ in range(3)]
        assert [r.status for r in got] == [200, 200, 429], got
        assert got[0].header("ratelimit-limit") == "2" and got[0].header("ratelimit-remaining") == "1"
        # by route: /b has counters of its own.
        assert c.request("GET", "/b").status == 200


def test_a_missing_shared_dict_is_a_clear_error():
    text = conf([("/x", '{ limit = 1, dict = "nope" }')])
    with Gateway(text) as gw:
        r = request(gw.port, "GET", "/x")
        assert r.status == 500, r
        gw.wait_log(r'rate-limit: shared dict "nope" is not declared')


def test_consumer_and_header_keys_count_per_consumer_and_per_header_value():
    # An inline stand-in for an auth plugin (priority above rate-limit's
    # 910): ctx.consumer from a test header.
    routes = """    { path = "/c", handler = function(ctx) return 200, "ok" end, plugins = {
        auth = { priority = 1000, access = function(conf, ctx)
            local id = gw.request.get_header(ctx, "x-test-consumer")
            if id then ctx.consumer = { id = id } end
        end },
        ["rate-limit"] = { limit = 2, window = 60, by = "consumer" } } },
""" + ROUTE % ("/k", '{ limit = 2, window = 60, by = "header", header = "X-Api-Key" }')
    with Gateway(conf(routes)) as gw, Client(gw.port) as c:
        def statuses(path, headers):
            return [c.request("GET", path, headers=headers).status for _ in range(3)]
        assert statuses("/c", [("X-Test-Consumer", "alice")]) == [200, 200, 429]
        assert statuses("/c", [("X-Test-Consumer", "bob")]) == [200, 200, 429]
        assert statuses("/c", []) == [200, 200, 429]          # no consumer: by ip
        assert statuses("/k", [("X-Api-Key", "k1")]) == [200, 200, 429]
        assert statuses("/k", [("X-Api-Key", "k2")]) == [200, 200, 429]
