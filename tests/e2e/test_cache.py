"""The cache plugin end to end: a real upstream that counts its requests
behind the real binary. Hits, misses and expiry; Vary; responses and
requests that must never be cached; consumers kept apart; PURGE;
conditional requests; request collapsing across two workers; two gateways
sharing one real redis-server; a 50 MB response streaming through
uncached; stale-while-revalidate and stale-if-error; timers started from
the response phases."""

import json
import threading
import time
from urllib.parse import quote

from harness import Client, Gateway, Upstream, request, rss_kb, wait_until
from test_redis import RedisServer

CONF = """local gw = require("moongate.gw")
return {
  listen = { "@LISTEN@" }, workers = %(workers)d,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  shared = { cache = "64m" },
  %(extra)s
  upstreams = { up = { targets = { "127.0.0.1:%(port)d" } } },
  routes = {
%(routes)s
  },
}
"""


def conf(up, routes, workers=1, extra=""):
    """routes: [(path, cache conf as Lua text)] or raw Lua text."""
    if not isinstance(routes, str):
        routes = "\n".join('    { path = "%s", upstream = "up", plugins = { cache = %s } },'
                           % r for r in routes)
    return CONF % {"workers": workers, "extra": extra, "routes": routes, "port": up.port}


def hdr(name, value):
    return "hdr=" + quote("%s:%s" % (name, value), safe="")


def get(gw, path, headers=None, method="GET"):
    return request(gw.port, method, path, headers=headers)


def xc(r):
    return r.header("x-cache")


def upstream_requests(up):
    return up.stats()["requests"]


# ------------------------------------------------------------------ basics


def test_miss_then_hit_until_the_ttl_ends_and_the_upstream_ttl_wins():
    with Upstream() as up, Gateway(conf(up, [("/c/*", "{ ttl = 1 }")])) as gw:
        up.reset()
        a = get(gw, "/c/a?x=1&y=2")
        assert a.status == 200 and xc(a) == "MISS", a
        b = get(gw, "/c/a?y=2&x=1")  # the same query, other order: same key
        assert b.status == 200 and xc(b) == "HIT", b
        assert b.body == a.body
        assert b.header("age") in ("0", "1"), b.header("age")
        assert b.header("content-type") == a.header("content-type")
        assert upstream_requests(up) == 1
        h = get(gw, "/c/a?x=1&y=2", method="HEAD")  # HEAD from the GET entry
        assert h.status == 200 and xc(h) == "HIT" and h.body == b""
        assert xc(get(gw, "/c/a?x=1")) == "MISS"  # another query: another key
        assert upstream_requests(up) == 2
        # The upstream's max-age (3 s) beats the config's ttl (1 s).
        long = "/c/long?" + hdr("Cache-Control", "max-age=3")
        assert xc(get(gw, long)) == "MISS"
        time.sleep(1.3)
        again = get(gw, "/c/a?x=1&y=2")
        assert xc(again) == "MISS" and again.body != a.body  # expired, fetched again
        still = get(gw, long)
        assert xc(still) == "HIT" and int(still.header("age")) >= 1, still
        assert upstream_requests(up) == 4


def test_vary_keeps_one_entry_per_variant():
    with Upstream() as up, Gateway(conf(up, [("/c/*", "{ ttl = 30 }")])) as gw:
        up.reset()
        path = "/c/v?" + hdr("Vary", "Accept-Language")
        de = get(gw, path, {"Accept-Language": "de"})
        en = get(gw, path, {"Accept-Language": "en"})
        assert xc(de) == "MISS" and xc(en) == "MISS"
        assert de.body != en.body
        de2 = get(gw, path, {"Accept-Language": "de"})
        en2 = get(gw, path, {"Accept-Language": "en"})
        none = get(gw, path)
        assert xc(de2) == "HIT" and de2.body == de.body
        assert xc(en2) == "HIT" and en2.body == en.body
        assert xc(none) == "MISS"
        assert json.loads(de2.body)["headers"].count(["Accept-Language", "de"]) == 1
        assert upstream_requests(up) == 3


def test_set_cookie_private_no_store_and_credentials_are_never_cached():
    with Upstream() as up, Gateway(conf(up, [("/c/*", "{ ttl = 30 }")])) as gw:
        up.reset()
        for q in (hdr("Set-Cookie", "sid=1; Path=/"), hdr("Cache-Control", "private, max-age=60"),
                  hdr("Cache-Control", "no-store"), hdr("Cache-Control", "no-cache"),
                  "status=500", "status=302"):
            for _ in range(2):
                r = get(gw, "/c/never?" + q)
                assert xc(r) == "MISS", (q, r)
        assert upstream_requests(up) == 12
        # Requests with credentials: not served from the cache, not stored.
        assert xc(get(gw, "/c/public")) == "MISS"
        for h in ({"Cookie": "sid=1"}, {"Authorization": "Bearer x"}):
            for _ in range(2):
                r = get(gw, "/c/public", h)
                assert xc(r) == "BYPASS", (h, r)
                assert "Bearer" in r.body.decode() or "sid=1" in r.body.decode()
        assert xc(get(gw, "/c/public")) == "HIT"
        assert upstream_requests(up) == 13 + 4


KEYAUTH = """{ keys = { ["k-alice"] = { id = "alice" }, ["k-bob"] = { id = "bob" } } }"""


def test_two_consumers_never_see_each_others_entries():
    routes = """
    { path = "/mine/*", upstream = "up", plugins = { ["key-auth"] = %s,
        cache = { ttl = 30, vary_by_consumer = true, allow_purge = true } } },
    { path = "/shared/*", upstream = "up", plugins = { ["key-auth"] = %s, cache = { ttl = 30 } } },
""" % (KEYAUTH, KEYAUTH)
    with Upstream() as up, Gateway(conf(up, routes)) as gw:
        up.reset()

        def who(r):
            return dict((n.lower(), v) for n, v in json.loads(r.body)["headers"]).get("x-user-id")
        a1 = get(gw, "/mine/profile", {"X-API-Key": "k-alice"})
        b1 = get(gw, "/mine/profile", {"X-API-Key": "k-bob"})
        assert xc(a1) == "MISS" and who(a1) == "alice"
        assert xc(b1) == "MISS" and who(b1) == "bob"
        for _ in range(3):
            a = get(gw, "/mine/profile", {"X-API-Key": "k-alice"})
            b = get(gw, "/mine/profile", {"X-API-Key": "k-bob"})
            assert xc(a) == "HIT" and who(a) == "alice" and a.body == a1.body
            assert xc(b) == "HIT" and who(b) == "bob" and b.body == b1.body
        assert get(gw, "/mine/profile").status == 401
        assert upstream_requests(up) == 2
        # Without vary_by_consumer, authenticated requests bypass the cache.
        for key in ("k-alice", "k-bob", "k-alice"):
            r = get(gw, "/shared/profile", {"X-API-Key": key})
            assert xc(r) == "BYPASS" and who(r) == key[2:]
        assert upstream_requests(up) == 5
        # A purge of the URL (authenticated: key-auth runs first) removes
        # every consumer's entry.
        p = get(gw, "/mine/profile", {"X-API-Key": "k-alice"}, method="PURGE")
        assert p.status == 200 and json.loads(p.body) == {"purged": 2}, p
        assert xc(get(gw, "/mine/profile", {"X-API-Key": "k-bob"})) == "MISS"


def test_purge_by_url_and_by_prefix_only_from_allowed_addresses():
    routes = [("/c/*", "{ ttl = 30, allow_purge = true }"),
              ("/closed/*", '{ ttl = 30, allow_purge = true, purge_allow = { "10.0.0.0/8" } }'),
              ("/off/*", "{ ttl = 30 }")]
    with Upstream() as up, Gateway(conf(up, routes)) as gw:
        for p in ("/c/p?x=1", "/c/p?x=2", "/c/dir/1", "/c/dir/2", "/c/dirt", "/closed/a", "/off/a"):
            assert xc(get(gw, p)) == "MISS"
            assert xc(get(gw, p)) == "HIT"
        r = get(gw, "/c/p?x=1", method="PURGE")
        assert r.status == 200 and json.loads(r.body) == {"purged": 1}, r
        assert xc(get(gw, "/c/p?x=1")) == "MISS"
        assert xc(get(gw, "/c/p?x=2")) == "HIT"
        r = get(gw, "/c/dir/*", method="PURGE")
        assert r.status == 200 and json.loads(r.body) == {"purged": 2}, r
        assert xc(get(gw, "/c/dir/1")) == "MISS" and xc(get(gw, "/c/dir/2")) == "MISS"
        assert xc(get(gw, "/c/dirt")) == "HIT"
        r = get(gw, "/c/nothing", method="PURGE")
        assert r.status == 404, r
        r = get(gw, "/closed/a", method="PURGE")
        assert r.status == 403 and json.loads(r.body)["error"] == "purge not allowed", r
        assert xc(get(gw, "/closed/a")) == "HIT"
        # Without allow_purge, PURGE is not the plugin's: it goes upstream.
        r = get(gw, "/off/a", method="PURGE")
        assert json.loads(r.body)["method"] == "PURGE"
        assert xc(get(gw, "/off/a")) == "HIT"


def test_conditional_requests_get_304_from_the_cache():
    lm = "Sun, 06 Nov 1994 08:49:37 GMT"
    path = "/c/e?" + hdr("ETag", '"v1"') + "&" + hdr("Last-Modified", lm)
    with Upstream() as up, Gateway(conf(up, [("/c/*", "{ ttl = 30 }")])) as gw:
        up.reset()
        # On a miss the conditional is not forwarded: a full 200 to store.
        first = get(gw, path, {"If-None-Match": '"v1"'})
        assert first.status == 200 and xc(first) == "MISS"
        sent = [n.lower() for n, _ in json.loads(first.body)["headers"]]
        assert "if-none-match" not in sent
        r = get(gw, path, {"If-None-Match": '"v1"'})
        assert r.status == 304 and xc(r) == "HIT" and r.body == b"", r
        assert r.header("etag") == '"v1"' and r.header("last-modified") == lm
        assert get(gw, path, {"If-None-Match": 'W/"v0", W/"v1"'}).status == 304
        r = get(gw, path, {"If-None-Match": '"v2"'})
        assert r.status == 200 and xc(r) == "HIT" and r.body == first.body
        assert get(gw, path, {"If-Modified-Since": lm}).status == 304
        assert get(gw, path, {"If-Modified-Since": "Sat, 05 Nov 1994 08:49:37 GMT"}).status == 200
        assert upstream_requests(up) == 1


def test_client_no_cache_refetches_only_when_configured():
    routes = [("/c/*", "{ ttl = 30 }"), ("/fresh/*", "{ ttl = 30, honor_client_no_cache = true }")]
    with Upstream() as up, Gateway(conf(up, routes)) as gw:
        up.reset()
        nc = {"Cache-Control": "no-cache"}
        for base in ("/c/x", "/fresh/x"):
            assert xc(get(gw, base)) == "MISS"
        assert xc(get(gw, "/c/x", nc)) == "HIT"
        r = get(gw, "/fresh/x", nc)
        assert xc(r) == "MISS"
        assert get(gw, "/fresh/x").body == r.body  # the refetched answer was stored
        assert xc(get(gw, "/fresh/x", {"Cache-Control": "no-store"})) == "BYPASS"
        assert upstream_requests(up) == 4


# ------------------------------------------------------------------ collapsing


def test_100_concurrent_misses_make_one_upstream_request():
    with Upstream() as up, Gateway(conf(up, [("/c/*", "{ ttl = 60, lock_timeout = 10 }")],
                                        workers=2)) as gw:
        up.reset()
        results, errors = [None] * 100, []
        start = threading.Event()

        def one(i):
            try:
                with Client(gw.port, timeout=20) as c:
                    start.wait(10)
                    results[i] = c.request("GET", "/c/cold?delay=0.3")
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
        for t in threads:
            t.start()
        time.sleep(0.2)  # connections open (each worker accepted some)
        start.set()
        for t in threads:
            t.join(30)
        assert not errors, errors[:3]
        assert all(r is not None and r.status == 200 for r in results), \
            [r for r in results if r is None or r.status != 200][:3]
        assert len({r.body for r in results}) == 1
        labels = {}
        for r in results:
            labels[xc(r)] = labels.get(xc(r), 0) + 1
        print("100 concurrent cold requests: %r, upstream requests %d"
              % (labels, upstream_requests(up)))
        assert labels.get("MISS") == 1, labels
        assert upstream_requests(up) == 1


test_100_concurrent_misses_make_one_upstream_request.timeout = 90


def test_collapsed_requests_go_upstream_when_the_first_answer_is_not_cacheable():
    path = "/c/nc?delay=0.3&" + hdr("Cache-Control", "no-store")
    with Upstream() as up, Gateway(conf(up, [("/c/*", "{ ttl = 60 }")])) as gw:
        up.reset()
        out = []

        def one():
            out.append(request(gw.port, "GET", path, timeout=10))
        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        # The waiters were not served the uncacheable answer: each went
        # upstream itself once the first one's lock was released.
        assert len(out) == 5 and all(r.status == 200 and xc(r) == "MISS" for r in out)
        assert len({r.body for r in out}) == 5
        assert upstream_requests(up) == 5


# ------------------------------------------------------------------ redis


def test_two_gateways_share_entries_through_redis():
    with RedisServer() as rs, Upstream() as up:
        extra = 'redis = { url = "redis://127.0.0.1:%d", timeout = 2 },' % rs.port
        c = '{ ttl = 30, storage = "redis", key_prefix = "mg:", allow_purge = true }'
        text = conf(up, [("/c/*", c)], extra=extra)
        with Gateway(text) as g1, Gateway(text) as g2:
            up.reset()
            a = request(g1.port, "GET", "/c/r?x=1", host="api.test")
            assert xc(a) == "MISS"
            wait_until(lambda: rs.cmd("EXISTS", "mg:GET:api.test/c/r?x=1") == 1, 5,
                       what="the entry in redis")
            ttl = rs.cmd("PTTL", "mg:GET:api.test/c/r?x=1")
            assert 0 < ttl <= 30000, ttl
            b = request(g2.port, "GET", "/c/r?x=1", host="api.test")
            assert xc(b) == "HIT" and b.body == a.body
            assert upstream_requests(up) == 1
            # Vary through redis too: the vary record, then the variant.
            v = "/c/v?" + hdr("Vary", "Accept")
            assert xc(request(g1.port, "GET", v, {"Accept": "x/y"}, host="api.test")) == "MISS"
            wait_until(lambda: xc(request(g2.port, "GET", v, {"Accept": "x/y"},
                                          host="api.test")) == "HIT", 5, what="the variant")
            assert xc(request(g2.port, "GET", v, {"Accept": "z/w"}, host="api.test")) == "MISS"
            # A purge through one gateway empties it for both.
            p = request(g2.port, "PURGE", "/c/*", host="api.test")
            assert p.status == 200 and json.loads(p.body)["purged"] >= 3, p
            assert xc(request(g1.port, "GET", "/c/r?x=1", host="api.test")) == "MISS"


test_two_gateways_share_entries_through_redis.timeout = 60


# ------------------------------------------------------------------ limits


def test_a_50mb_response_streams_through_uncached_in_bounded_memory():
    size = 50 * 1024 * 1024
    with Upstream() as up, Gateway(conf(up, [("/c/*", "{ ttl = 60 }")])) as gw:
        pid = gw.worker_pids()[0]
        get(gw, "/c/warm?size=100000")
        up.reset()
        before = rss_kb(pid)
        peaks = []
        for _ in range(2):
            with Client(gw.port, timeout=60) as c:
                c.send(b"GET /c/big?size=%d HTTP/1.1\r\nHost: a\r\n\r\n" % size)
                seen = [0, 0]

                def sink(piece):
                    seen[0] += len(piece)
                    if seen[0] - seen[1] > (8 << 20):
                        seen[1] = seen[0]
                        peaks.append(rss_kb(pid))
                r = c.read_response(sink=sink)
            assert r.status == 200 and seen[0] == size and xc(r) == "MISS", (r, seen)
        grown = max(peaks + [rss_kb(pid)]) - before
        print("rss growth while 2 x 50 MB streamed through the cache: %d kB" % grown)
        assert grown < 16 * 1024, grown
        assert upstream_requests(up) == 2  # not stored
        # Below the limit it is stored.
        assert xc(get(gw, "/c/small?size=500000")) == "MISS"
        assert xc(get(gw, "/c/small?size=500000")) == "HIT"


test_a_50mb_response_streams_through_uncached_in_bounded_memory.timeout = 120


# ------------------------------------------------------------------ stale


def test_stale_while_revalidate_serves_stale_and_refreshes_once_in_the_background():
    routes = """
    { path = "/s/*", upstream = "up", strip_prefix = true,
      plugins = { cache = { ttl = 1, stale_while_revalidate = 30 } } },
"""
    with Upstream() as up, Gateway(conf(up, routes)) as gw:
        up.reset()
        first = get(gw, "/s/item?delay=0.5")
        assert xc(first) == "MISS" and json.loads(first.body)["path"] == "/item?delay=0.5"
        time.sleep(1.2)
        t0 = time.monotonic()
        stale = [get(gw, "/s/item?delay=0.5") for _ in range(5)]
        took = time.monotonic() - t0
        assert all(xc(r) == "STALE" and r.body == first.body for r in stale), stale
        print("5 STALE answers in %.3fs while the refresh waits 0.5s upstream" % took)
        wait_until(lambda: upstream_requests(up) == 2, 5, what="the background refresh")
        wait_until(lambda: xc(get(gw, "/s/item?delay=0.5")) == "HIT", 5, what="the refreshed entry")
        fresh = get(gw, "/s/item?delay=0.5")
        assert fresh.body != first.body
        assert json.loads(fresh.body)["path"] == "/item?delay=0.5"  # strip_prefix applied
        time.sleep(0.3)
        assert upstream_requests(up) == 2  # refreshed once


def test_stale_if_error_replaces_an_upstream_5xx_with_the_stale_entry():
    routes = [("/c/*", '{ ttl = 1, stale_if_error = 30, ignore_query = { "status" } }'),
              ("/no/*", '{ ttl = 1, ignore_query = { "status" } }')]
    with Upstream() as up, Gateway(conf(up, routes)) as gw:
        for base in ("/c/x", "/no/x"):
            ok = get(gw, base)
            assert xc(ok) == "MISS"
            time.sleep(1.2) if base == "/no/x" else None
        time.sleep(0.2)
        r = get(gw, "/c/x?status=503")  # same key: status is ignored
        assert r.status == 200 and xc(r) == "STALE", r
        assert r.body == get(gw, "/c/x?status=503").body
        assert r.header("content-type") == "application/json"
        plain = get(gw, "/no/x?status=503")
        assert plain.status == 503 and xc(plain) == "MISS"
        # A fresh answer replaces the stale entry.
        ok2 = get(gw, "/c/x")
        assert ok2.status == 200 and xc(ok2) == "MISS"
        assert xc(get(gw, "/c/x")) == "HIT"


# ------------------------------------------------------------------ runtime


def test_timers_can_start_in_header_filter_body_filter_and_log():
    routes = """
    { path = "/t/*", upstream = "up", plugins = { t = {
        header_filter = function(conf, ctx) gw.timer.at(0, function() gw.shared.cache:incr("hf", 1, 0) end) end,
        body_filter = function(conf, ctx, chunk, eof)
            if eof then gw.timer.at(0, function() gw.shared.cache:incr("bf", 1, 0) end) end
        end,
        log = function(conf, ctx)
            gw.timer.at(0.05, function() gw.sleep(0.01); gw.shared.cache:incr("log", 1, 0) end)
        end,
    } } },
    { path = "/count", handler = function(ctx)
        return 200, { hf = gw.shared.cache:get("hf"), bf = gw.shared.cache:get("bf"),
                      log = gw.shared.cache:get("log") }
    end },
"""
    with Upstream() as up, Gateway(conf(up, routes)) as gw:
        for _ in range(3):
            assert get(gw, "/t/x").status == 200

        def counted():
            return json.loads(get(gw, "/count").body) == {"hf": 3, "bf": 3, "log": 3}
        wait_until(counted, 5, what="the timers to run")
        assert "error" not in gw.error_log_text().lower()


def test_bad_cache_configs_are_refused_with_route_and_field():
    import subprocess
    from harness import moongate_bin
    with Upstream() as up:
        text = conf(up, [("/a/*", '{ storage = "disk" }'), ("/b/*", '{ purge_allow = { "1.2.3.4/40" } }')])
        gw = Gateway(text)
        out = subprocess.run([moongate_bin(), "check", "-c", gw.conf_path],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 1, out
        err = out.stdout + out.stderr
        assert 'routes[1] "/a/*": plugins.cache.storage: must be one of shared, redis' in err, err
        assert 'routes[2] "/b/*": plugins.cache: purge_allow: prefix length over 32' in err, err


def test_redis_killed_or_hung_counts_as_a_miss_and_requests_are_still_proxied():
    with RedisServer() as rs, Upstream() as up:
        extra = 'redis = { url = "redis://127.0.0.1:%d", timeout = 0.3, connect_timeout = 0.3 },' \
            % rs.port
        with Gateway(conf(up, [("/c/*", '{ ttl = 30, storage = "redis" }')], extra=extra)) as gw:
            assert xc(get(gw, "/c/a")) == "MISS"
            wait_until(lambda: xc(get(gw, "/c/a")) == "HIT", 5, what="the entry in redis")
            rs.pause()  # hung: accepts, never answers
            try:
                r = get(gw, "/c/a")
                assert r.status == 200 and xc(r) == "MISS", r
                gw.wait_log(r"\[warn\].*cache: redis GET failed \(treated as a miss\): timeout")
            finally:
                rs.resume()
            rs.kill()  # killed: connection refused
            for _ in range(5):
                r = get(gw, "/c/b")
                assert r.status == 200 and xc(r) == "MISS", r
            text = gw.error_log_text()
            assert text.count("cache: redis GET failed") <= 4, text  # throttled


test_redis_killed_or_hung_counts_as_a_miss_and_requests_are_still_proxied.timeout = 60
