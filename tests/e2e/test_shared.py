"""Shared dicts (gw.shared.<zone>) end to end: the real binary with 2
workers, handler routes calling the API, real clients.

Acceptance 2 of issue 3: 2 workers, 64 keep-alive connections, 20,000
requests each doing incr on one key -> the key reads exactly 20,000 (and
both workers took part). Then TTL expiry, add/replace/incr/delete/flags/
booleans/expire/stats semantics, LRU eviction in a full 64k zone (a key
read recently outlives one that was not), a value larger than the zone, a
value visible across workers, and the zones' life across reloads (in-place
reload, a killed worker, a reload that adds/resizes/removes zones and so
replaces the workers).

Configs are Lua text: handlers are Lua functions. Every handler answers a
JSON object of what it observed, and the assertions are made here. The
prelude declares getpid() through the FFI so that a handler can say which
worker ran it (there is no pid call in the gw API)."""

import os
import re
import signal
import threading
import time

from harness import Client, Gateway, children, pid_alive, request, wait_until

PRELUDE = """local gw = require("moongate.gw")
local ffi = require("ffi")
pcall(ffi.cdef, "int getpid(void);")
local function pid() return tonumber(ffi.C.getpid()) end
local null = gw.json.null
-- Every return value of a call, nil as JSON null (arrays keep their holes).
local function pack(...)
    local t = {}
    for i = 1, select("#", ...) do
        local v = select(i, ...)
        if v == nil then t[i] = null else t[i] = v end
    end
    return t
end
"""


def conf(zones, routes, workers=2):
    """Config text: `zones` is the body of shared = { ... }, `routes` a list
    of (path, lua handler body) pairs; every config also has /pid."""
    body = ['    { path = "/pid", handler = function(ctx) return 200, tostring(pid()) end },']
    for path, code in routes:
        body.append('    { path = "%s", handler = function(ctx)\n%s\n    end },' % (path, code))
    return PRELUDE + """return {
  listen = { "@LISTEN@" }, workers = %d,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  shared = { %s },
  routes = {
%s
  },
}
""" % (workers, zones, "\n".join(body))


def get_json(c_or_port, path):
    """GET on a Client (keep-alive) or on a fresh connection to a port;
    asserts 200 and returns the JSON body."""
    if isinstance(c_or_port, Client):
        r = c_or_port.request("GET", path)
    else:
        r = request(c_or_port, "GET", path, timeout=10)
    assert r.status == 200, "GET %s -> %r" % (path, r)
    return r.json()


def lua_error_lines(text):
    return [l for l in text.splitlines() if "[error]" in l and "lua: " in l]


def client_per_worker(gw, tries=300):
    """{worker pid: keep-alive Client connected to that worker}: opens
    connections until every worker has one (a keep-alive connection stays
    with the worker that accepted it). Which worker accepts is the kernel's
    choice (one shared listening socket); a just-restarted worker can lose
    many races in a row, hence the tries spread over a few seconds."""
    want = set(gw.worker_pids())
    got, spare = {}, []
    try:
        for _ in range(tries):
            c = Client(gw.port, timeout=10)
            r = c.request("GET", "/pid")
            assert r.status == 200, r
            p = int(r.body)
            assert p in want, "a handler ran in pid %d, not a worker of %s" % (p, sorted(want))
            if p in got:
                spare.append(c)
            else:
                got[p] = c
            if set(got) == want:
                return got
            time.sleep(0.01)
        raise AssertionError("%d connections all went to workers %s of %s"
                             % (tries, sorted(got), sorted(want)))
    except BaseException:
        for c in got.values():
            c.close()
        raise
    finally:
        for c in spare:
            c.close()


def close_all(clients):
    for c in clients.values():
        c.close()


# ------------------------------------------------------------------ exactness

EXACT_ROUTES = [
    ("/incr", """
        local v, err = gw.shared.counters:incr("hits", 1, 0)
        if not v then return 500, "incr: " .. tostring(err) end
        return 200, tostring(pid())"""),
    ("/read", """
        return 200, { hits = gw.shared.counters:get("hits") or null, pid = pid() }"""),
]


def test_incr_on_one_key_is_exact_across_2_workers_and_64_connections():
    conns, total = 64, 20000
    with Gateway(conf('counters = "1m"', EXACT_ROUTES)) as gw:
        workers = gw.worker_pids()
        assert len(workers) == 2, workers
        per = [total // conns + (1 if i < total % conns else 0) for i in range(conns)]
        assert sum(per) == total
        barrier = threading.Barrier(conns, timeout=20)
        deadline = time.monotonic() + 45   # bounded: never a runaway load
        results = [None] * conns

        def run(i):
            ok, pids, errors, c = 0, {}, [], None
            try:
                c = Client(gw.port, timeout=10)
                barrier.wait()      # all 64 connections open at once
                for _ in range(per[i]):
                    if time.monotonic() > deadline:
                        errors.append("deadline passed")
                        break
                    r = c.request("GET", "/incr")
                    if r.status != 200:
                        errors.append("status %d: %r" % (r.status, r.body[:200]))
                        continue
                    ok += 1
                    p = int(r.body)
                    pids[p] = pids.get(p, 0) + 1
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
            finally:
                if c:
                    c.close()
            results[i] = (ok, pids, errors)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(conns)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1, deadline + 5 - time.monotonic()))
        elapsed = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads), "client threads still running"
        ok = sum(r[0] for r in results)
        errors = [e for r in results for e in r[2]]
        by_pid = {}
        for r in results:
            for p, n in r[1].items():
                by_pid[p] = by_pid.get(p, 0) + n
        assert not errors, "%d client errors, e.g. %r" % (len(errors), errors[:5])
        assert ok == total, "%d of %d requests answered 200" % (ok, total)
        # Read the key through another route, from both workers.
        clients = client_per_worker(gw)
        try:
            reads = {p: get_json(c, "/read") for p, c in clients.items()}
        finally:
            close_all(clients)
        for p, d in reads.items():
            assert d["pid"] == p and d["hits"] == total, \
                "worker %d reads hits = %r after %d increments" % (p, d["hits"], total)
        # Both workers incremented (else this proves nothing across workers).
        assert set(by_pid) == set(workers), (by_pid, workers)
        assert all(n > 0 for n in by_pid.values()), by_pid
        print("exactness: %d incr over %d connections -> key reads %d; per worker %s; "
              "%.1f s" % (total, conns, reads[workers[0]]["hits"], by_pid, elapsed))


test_incr_on_one_key_is_exact_across_2_workers_and_64_connections.timeout = 90


def test_a_value_set_in_one_worker_is_read_in_the_other():
    routes = [
        ("/set", 'return 200, pack(gw.shared.counters:set("shared-key", "from " .. pid()))'),
        ("/get", 'return 200, pack(gw.shared.counters:get("shared-key"))'),
        ("/del", 'gw.shared.counters:delete("shared-key"); return 200, { done = true }'),
    ]
    with Gateway(conf('counters = "1m"', routes)) as gw:
        clients = client_per_worker(gw)
        try:
            (pa, a), (pb, b) = sorted(clients.items())
            assert get_json(a, "/set") == [True, None, False]
            assert get_json(b, "/get") == ["from %d" % pa, 0]
            assert get_json(b, "/del") == {"done": True}
            assert get_json(a, "/get") == [None]
        finally:
            close_all(clients)


# ------------------------------------------------------------------ semantics

TTL_ROUTES = [
    ("/ttl/set", """
        local d = gw.shared.counters
        local ok, err = d:set("t", "short-lived", 0.3)
        return 200, { ok = ok, err = err or null, ttl = d:ttl("t") or null }"""),
    ("/ttl/get", """
        local d = gw.shared.counters
        local v = d:get("t")
        local ttl, err = d:ttl("t")
        return 200, { v = v or null, ttl = ttl or null, err = err or null }"""),
    # Everything else about expiry, timed inside one handler with gw.sleep.
    ("/ttl/inner", """
        local d = gw.shared.counters
        local out = {}
        -- No TTL: 0 = never expires.
        d:set("forever", 1)
        out.forever_ttl = d:ttl("forever")
        -- incr with init_ttl creates an expiring counter; incr keeps it.
        out.c1 = d:incr("c", 1, 0, 0.25)
        out.c_ttl = d:ttl("c")
        gw.sleep(0.1)
        out.c2 = d:incr("c", 1)
        out.c_ttl2 = d:ttl("c")
        -- expire gives a key without TTL a lifetime; expire 0 removes it.
        d:set("e", "x")
        out.expire = pack(d:expire("e", 0.2))
        d:set("keep", "x", 0.2)
        out.expire0 = pack(d:expire("keep", 0))
        out.keep_ttl = d:ttl("keep")
        out.expire_missing = pack(d:expire("nope", 1))
        -- add over an expired key succeeds.
        d:set("a", "old", 0.15)
        out.add_live = pack(d:add("a", "new"))
        gw.sleep(0.35)
        out.c_after = pack(d:get("c"))
        out.c_ttl_after = pack(d:ttl("c"))
        out.c_incr_noinit = pack(d:incr("c", 1))
        out.c_incr_init = pack(d:incr("c", 1, 10))
        out.e_after = pack(d:get("e"))
        out.keep_after = pack(d:get("keep"))
        out.forever_after = pack(d:get("forever"))
        out.add_expired = pack(d:add("a", "new"))
        out.a_after = pack(d:get("a"))
        return 200, out"""),
]


def test_ttl_expiry_is_seen_by_every_worker_and_ttl_counts_down():
    with Gateway(conf('counters = "1m"', TTL_ROUTES)) as gw:
        clients = client_per_worker(gw)
        try:
            (_, a), (_, b) = sorted(clients.items())
            for attempt in range(3):
                t0 = time.monotonic()
                s = get_json(a, "/ttl/set")
                g1 = get_json(b, "/ttl/get")          # the other worker
                t1 = time.monotonic()
                time.sleep(0.1)
                g2 = get_json(a, "/ttl/get")
                t2 = time.monotonic()
                if t2 - t0 < 0.25:
                    break
                # A machine too loaded to read twice within the TTL: again.
            else:
                raise AssertionError("could not read the key twice within 0.25 s in 3 tries")
            assert s["ok"] is True and s["err"] is None, s
            assert 0.2 < s["ttl"] <= 0.3, "ttl right after set(ttl = 0.3): %r" % s
            assert g1["v"] == "short-lived", "gone %.3f s after set: %r" % (t1 - t0, g1)
            assert 0 < g1["ttl"] <= s["ttl"], (s, g1)
            assert g2["v"] == "short-lived", g2
            assert 0 < g2["ttl"] < g1["ttl"] - 0.05, \
                "ttl did not count down over 0.1 s: %r then %r" % (g1, g2)
            time.sleep(max(0.0, t0 + 0.5 - time.monotonic()))
            for c in (a, b):
                g = get_json(c, "/ttl/get")
                assert g == {"v": None, "ttl": None, "err": "not found"}, \
                    "still there 0.5 s after set(ttl = 0.3): %r" % g
        finally:
            close_all(clients)
        o = get_json(gw.port, "/ttl/inner")
        assert o["forever_ttl"] == 0, o
        assert o["c1"] == 1 and 0.2 < o["c_ttl"] <= 0.25, o
        assert o["c2"] == 2, o
        assert 0 < o["c_ttl2"] < o["c_ttl"], "incr reset the counter's expiry: %r" % o
        assert o["expire"] == [True], o
        assert o["expire0"] == [True] and o["keep_ttl"] == 0, o
        assert o["expire_missing"] == [None, "not found"], o
        assert o["add_live"] == [False, "exists"], o
        assert o["c_after"] == [None], "the counter outlived its init_ttl: %r" % o
        assert o["c_ttl_after"] == [None, "not found"], o
        assert o["c_incr_noinit"] == [None, "not found"], o
        assert o["c_incr_init"] == [11], o
        assert o["e_after"] == [None], "expire(0.2) did not expire the key: %r" % o
        assert o["keep_after"] == ["x", 0], "expire(key, 0) did not keep the key: %r" % o
        assert o["forever_after"] == [1, 0], o
        assert o["add_expired"][0] is True, "add over an expired key: %r" % o
        assert o["a_after"] == ["new", 0], o


SEMANTICS = """
        local d = gw.shared.small
        d:flush_all()
        local o = {}
        -- get of a missing key -> nil
        o.get_missing = pack(d:get("missing"))
        -- set / get of each type, with flags
        o.set_str = pack(d:set("s", "text"))
        o.get_str = pack(d:get("s"))
        o.set_num = pack(d:set("n", 2.5, 0, 42))
        o.get_num = pack(d:get("n"))
        o.set_false = pack(d:set("bf", false))
        o.get_false = pack(d:get("bf"))
        o.set_true = pack(d:set("bt", true, nil, 7))
        o.get_true = pack(d:get("bt"))
        o.set_empty = pack(d:set("empty", ""))
        o.get_empty = pack(d:get("empty"))
        o.binary = d:set("bin", "a\\0b\\255") and d:get("bin") == "a\\0b\\255"
        -- a set replaces value, type and flags
        d:set("r", "x", 0, 9)
        d:set("r", 3)
        o.get_reset = pack(d:get("r"))
        -- add: only when absent
        o.add_new = pack(d:add("a", 1))
        o.add_again = pack(d:add("a", 2))
        o.get_a = pack(d:get("a"))
        -- replace: only when present
        o.replace_missing = pack(d:replace("nope", 1))
        o.get_nope = pack(d:get("nope"))
        o.replace = pack(d:replace("a", "replaced", 0, 3))
        o.get_replaced = pack(d:get("a"))
        -- incr
        o.incr_missing = pack(d:incr("i", 1))
        o.incr_init = pack(d:incr("i", 5, 10))
        o.incr = pack(d:incr("i", -2.5))
        o.get_i = pack(d:get("i"))
        o.incr_init_existing = pack(d:incr("i", 1, 1000))
        o.incr_string = pack(d:incr("s", 1))
        o.incr_string_init = pack(d:incr("s", 1, 0))
        o.incr_bool = pack(d:incr("bt", 1))
        o.get_s_after = pack(d:get("s"))
        local ok, err = pcall(d.incr, d, "i", "1")
        o.incr_bad_delta = { ok, tostring(err) }
        -- delete
        o.delete = pack(d:delete("s"))
        o.get_deleted = pack(d:get("s"))
        o.delete_missing = pack(d:delete("never-there"))
        o.set_nil = pack(d:set("n", nil))
        o.get_nil = pack(d:get("n"))
        -- keys and values that are refused
        ok, err = pcall(d.get, d, 5)
        o.key_number = { ok, tostring(err) }
        ok, err = pcall(d.set, d, "", 1)
        o.key_empty = { ok, tostring(err) }
        ok, err = pcall(d.set, d, "t", {})
        o.value_table = { ok, tostring(err) }
        -- stats
        local before = d:stats()
        d:set("stat-a", string.rep("x", 500))
        d:set("stat-b", 1)
        local after = d:stats()
        o.stats_before, o.stats_after = before, after
        d:flush_all()
        o.stats_flushed = d:stats()
        o.get_after_flush = pack(d:get("a"))
        -- zones not configured
        o.nope_zone = gw.shared.nope == nil
        o.small_name = gw.shared.small.name
        o.same_object = gw.shared.small == gw.shared.small
        return 200, o"""


def test_set_get_add_replace_incr_delete_flags_and_stats_semantics():
    with Gateway(conf('small = "64k"', [("/sem", SEMANTICS)], workers=1)) as gw:
        since = gw.log_size()
        o = get_json(gw.port, "/sem")
        assert o["get_missing"] == [None], o["get_missing"]
        assert o["set_str"] == [True, None, False], o["set_str"]
        assert o["get_str"] == ["text", 0], o["get_str"]
        assert o["set_num"] == [True, None, False] and o["get_num"] == [2.5, 42], o
        assert o["set_false"] == [True, None, False], o
        assert o["get_false"] == [False, 0], "a stored false read back as %r" % o["get_false"]
        assert o["get_true"] == [True, 7], o["get_true"]
        assert o["get_empty"] == ["", 0], o["get_empty"]
        assert o["binary"] is True, "a string with NUL and 0xFF bytes did not round-trip"
        assert o["get_reset"] == [3, 0], "set kept the old type or flags: %r" % o["get_reset"]
        assert o["add_new"] == [True, None, False], o
        assert o["add_again"] == [False, "exists"], o["add_again"]
        assert o["get_a"] == [1, 0], o["get_a"]
        assert o["replace_missing"] == [False, "not found"], o["replace_missing"]
        assert o["get_nope"] == [None], o
        assert o["replace"] == [True, None, False], o
        assert o["get_replaced"] == ["replaced", 3], o["get_replaced"]
        assert o["incr_missing"] == [None, "not found"], o["incr_missing"]
        assert o["incr_init"] == [15], "incr(k, 5, 10) on a missing key: %r" % o["incr_init"]
        assert o["incr"] == [12.5], o["incr"]
        assert o["get_i"] == [12.5, 0], o["get_i"]
        assert o["incr_init_existing"] == [13.5], "init applied to an existing key: %r" % o
        assert o["incr_string"] == [None, "not a number"], o["incr_string"]
        assert o["incr_string_init"] == [None, "not a number"], o["incr_string_init"]
        assert o["incr_bool"] == [None, "not a number"], o["incr_bool"]
        assert o["get_s_after"] == ["text", 0], "a failed incr changed the value: %r" % o
        assert o["incr_bad_delta"][0] is False and "delta" in o["incr_bad_delta"][1], o
        assert o["get_deleted"] == [None] and o["get_nil"] == [None], o
        for k in ("key_number", "key_empty"):
            assert o[k][0] is False and "key" in o[k][1], (k, o[k])
        assert o["value_table"][0] is False and "value" in o["value_table"][1], o["value_table"]
        b, a, f = o["stats_before"], o["stats_after"], o["stats_flushed"]
        for st in (b, a, f):
            assert st["capacity"] == 65536, st
            assert 0 < st["free"] < st["capacity"], st
        assert a["count"] == b["count"] + 2, (b, a)
        assert b["free"] - a["free"] >= 500, "a 500-byte value used %d bytes" % (
            b["free"] - a["free"])
        assert f["count"] == 0 and f["free"] >= b["free"], (b, f)
        assert o["get_after_flush"] == [None], o
        assert o["nope_zone"] is True, "gw.shared.nope is not nil"
        assert o["small_name"] == "small" and o["same_object"] is True, o
        # pcall'ed errors only: nothing went to the error log as a Lua error.
        assert not lua_error_lines(gw.log_since(since)), gw.log_since(since)


def test_api_misuse_outside_pcall_is_a_500_and_a_lua_error_line():
    routes = [("/badkey", "gw.shared.small:get(42); return 200, 'no'"),
              ("/ok", "return 200, 'ok'")]
    with Gateway(conf('small = "64k"', routes, workers=1)) as gw:
        since = gw.log_size()
        with Client(gw.port) as c:
            r = c.request("GET", "/badkey")
            assert r.status == 500, r
            gw.wait_log(r"lua: .*key must be a non-empty string", since=since)
            assert c.request("GET", "/ok").body == b"ok"


# ------------------------------------------------------------------ LRU

LRU = """
        local d = gw.shared.small
        local val = string.rep("v", 1000)
        local o = { errors = {}, over = {} }
        local function check_stats(i)
            local st = d:stats()
            if st.capacity ~= 65536 or st.free < 0 or st.free > st.capacity
               or st.count * 1000 > st.capacity then
                o.over[#o.over + 1] = { i = i, st = st }
            end
            o.max_count = math.max(o.max_count or 0, st.count)
        end
        -- 1. Fill with 300 distinct keys of 1000-byte values.
        d:flush_all()
        for i = 1, 300 do
            local ok, err, forcible = d:set("k" .. i, val)
            if not ok then o.errors[#o.errors + 1] = i .. ": " .. tostring(err) end
            if forcible and not o.first_forcible then o.first_forcible = i end
            if i == 1 then o.forcible_1 = forcible end
            check_stats(i)
        end
        o.last_forcible = select(3, d:set("k301", val))
        local present = {}
        for i = 1, 301 do
            if d:get("k" .. i) == val then present[#present + 1] = i end
        end
        o.present = present
        -- 2. Recency: fill to just below eviction, read the oldest key, then
        -- add keys until about half the zone was replaced.
        d:flush_all()
        local fit = o.first_forcible - 1
        for i = 1, fit do d:set("r" .. i, val) end
        o.recent_read = d:get("r1") == val
        local forced = 0
        for i = 1, math.floor(fit / 2) do
            local _, _, forcible = d:set("n" .. i, val)
            if forcible then forced = forced + 1 end
            check_stats(300 + i)
        end
        o.forced = forced
        o.fit = fit
        o.r1 = d:get("r1") == val            -- read recently: kept
        o.r2 = d:get("r2") == val            -- never read, older than r3..: gone
        o.r_last = d:get("r" .. fit) == val  -- the newest of the first batch
        o.n_last = d:get("n" .. math.floor(fit / 2)) == val
        return 200, o"""


def test_full_zone_evicts_the_least_recently_used_keys():
    with Gateway(conf('small = "64k"', [("/lru", LRU)], workers=1)) as gw:
        o = get_json(gw.port, "/lru")
        # (an empty Lua table is encoded as {})
        assert not o["errors"], o["errors"]
        assert not o["over"], "stats beyond the capacity: %r" % (o["over"],)
        assert o["forcible_1"] is False, o
        first = o["first_forcible"]
        # 64 KiB minus the header and hash table holds several dozen 1 KB values.
        assert isinstance(first, int) and 30 <= first <= 64, \
            "first forcible set at key %r" % first
        assert o["last_forcible"] is True, o
        present = o["present"]
        assert present, "nothing left in the zone"
        n = len(present)
        assert present == list(range(302 - n, 302)), \
            "the keys left are not the most recent ones: %r" % present
        assert first - 1 - 2 <= n <= first, (n, first)   # about as many as fit
        assert 1 not in present and 301 in present
        assert o["max_count"] <= first, o
        # Recency.
        assert o["recent_read"] is True and o["forced"] > 0, o
        assert o["r1"] is True, "the key read just before the inserts was evicted: %r" % o
        assert o["r2"] is False, "an unread older key survived the recently read one: %r" % o
        assert o["r_last"] is True and o["n_last"] is True, o


BIG = """
        local d = gw.shared.small
        d:flush_all()
        local o = {}
        d:set("big", "small value", 0, 4)
        d:set("other", 1)
        -- Larger than the zone itself, then larger than its heap.
        o.too_big = pack(d:set("big", string.rep("x", 70000)))
        o.heap_big = pack(d:set("big", string.rep("x", 65000)))
        o.add_big = pack(d:add("new", string.rep("x", 70000)))
        o.kept = pack(d:get("big"))
        o.other = pack(d:get("other"))
        o.new = pack(d:get("new"))
        -- A large value that fits (bigger than the 4 KiB get buffer).
        local v = {}
        for i = 1, 3000 do v[i] = string.format("%04d,", i % 10000) end
        v = table.concat(v)                -- 15000 bytes
        o.fits = pack(d:set("fits", v))
        o.fits_back = d:get("fits") == v
        o.fits_len = #(d:get("fits") or "")
        o.small_after = pack(d:get("other"))
        -- a huge key
        o.huge_key = pack(d:set(string.rep("k", 70000), 1))
        return 200, o"""


def test_a_value_larger_than_the_zone_is_refused_with_no_memory():
    with Gateway(conf('small = "64k"', [("/big", BIG)], workers=1)) as gw:
        o = get_json(gw.port, "/big")
        assert o["too_big"] == [False, "no memory"], o["too_big"]
        assert o["heap_big"] == [False, "no memory"], o["heap_big"]
        assert o["add_big"] == [False, "no memory"], o["add_big"]
        assert o["kept"] == ["small value", 4], \
            "a refused set did not leave the old value in place: %r" % o["kept"]
        assert o["other"] == [1, 0] and o["new"] == [None], o
        assert o["fits"][0] is True, o["fits"]
        assert o["fits_back"] is True and o["fits_len"] == 15000, o
        assert o["huge_key"][0] is False and o["huge_key"][1], o["huge_key"]


# ------------------------------------------------------------------ reloads

LIFE_ROUTES = [
    ("/put", 'return 200, pack(gw.shared.counters:set("kept", "value-1", 0, 5))'),
    ("/incr", 'return 200, pack(gw.shared.counters:incr("n", 1, 0))'),
    ("/get", """
        return 200, { kept = pack(gw.shared.counters:get("kept")),
                      n = gw.shared.counters:get("n") or null, pid = pid() }"""),
]


def read_on_every_worker(gw, path="/get"):
    clients = client_per_worker(gw)
    try:
        return {p: get_json(c, path) for p, c in clients.items()}
    finally:
        close_all(clients)


def test_dict_survives_a_reload_and_a_killed_worker():
    with Gateway(conf('counters = "1m"', LIFE_ROUTES)) as gw:
        assert get_json(gw.port, "/put") == [True, None, False]
        for _ in range(5):
            get_json(gw.port, "/incr")
        pids = gw.worker_pids()
        # In-place reload (same zones): the workers stay, the dict stays.
        gen = gw.reload(conf('counters = "1m"', LIFE_ROUTES + [("/new", "return 200, 'new'")]))
        assert gen >= 2
        assert request(gw.port, "GET", "/new").body == b"new"
        assert gw.worker_pids() == pids, "a reload with the same zones replaced the workers"
        for p, d in read_on_every_worker(gw).items():
            assert d["kept"] == ["value-1", 5] and d["n"] == 5, \
                "worker %d after a reload: %r" % (p, d)
        # Kill -9 each worker in turn: the replacement maps the same zone.
        for victim in list(pids):
            before = gw.worker_pids()
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: not pid_alive(victim), 5, what="the killed worker to die")
            wait_until(lambda: len(gw.worker_pids()) == 2 and victim not in gw.worker_pids(),
                       10, what="a replacement worker")
            new = [p for p in gw.worker_pids() if p not in before]
            assert len(new) == 1, (before, gw.worker_pids())
            reads = wait_until(lambda: _readable(gw), 10, what="every worker to answer")
            for p, d in reads.items():
                assert d["kept"] == ["value-1", 5] and d["n"] == 5, \
                    "worker %d after kill -9 of %d: %r" % (p, victim, d)
        assert not set(pids) & set(gw.worker_pids())
        # And the counter still counts in the replacements.
        assert get_json(gw.port, "/incr") == [6]


def _readable(gw):
    try:
        return read_on_every_worker(gw)
    except (OSError, AssertionError):
        return None


def wait_replaced(gw, old, since, timeout=15):
    """Waits until none of the `old` worker pids is alive and
    gw.workers new ones each logged their first generation after `since`."""
    def done():
        now = children(gw.pid)
        if any(pid_alive(p) for p in old) or len(now) != gw.workers:
            return None
        gens = re.findall(r"worker \d+: generation 1 active", gw.log_since(since))
        return now if len(gens) >= gw.workers else None
    return wait_until(done, timeout, interval=0.05, what="the workers to be replaced")


ZONES_ROUTES = [
    ("/put", """
        local ok1 = gw.shared.counters:set("kept", "value-1")
        local ok2 = gw.shared.small:set("s", "small-1")
        local ok3 = gw.shared.gone:set("g", 1)
        return 200, { ok1, ok2, ok3 }"""),
    ("/zones", """
        local o = { pid = pid() }
        for _, name in ipairs({ "counters", "small", "gone", "extra" }) do
            local z = gw.shared[name]
            o[name] = z and z:stats() or "none"
        end
        o.kept = gw.shared.counters:get("kept") or null
        o.s = gw.shared.small:get("s") or null
        if gw.shared.extra then
            o.extra_incr = gw.shared.extra:incr("x", 1, 0)
            o.extra_set = pack(gw.shared.extra:set("y", "in extra"))
            o.extra_get = pack(gw.shared.extra:get("y"))
        end
        return 200, o"""),
]


def test_reload_that_changes_the_zones_replaces_workers_and_keeps_unchanged_zones():
    zones1 = 'counters = "1m", small = "64k", gone = "64k"'
    # extra added, small resized, gone removed, counters unchanged.
    zones2 = 'counters = "1m", small = "128k", extra = "256k"'
    with Gateway(conf(zones1, ZONES_ROUTES)) as gw:
        r = request(gw.port, "GET", "/put")
        assert r.json() == [True, True, True], r
        for d in read_on_every_worker(gw, "/zones").values():
            assert d["extra"] == "none" and d["gone"] != "none", d
        old = gw.worker_pids()
        since = gw.log_size()
        gw.write_config(conf(zones2, ZONES_ROUTES))
        gw.signal(signal.SIGHUP)
        new = wait_replaced(gw, old, since)
        assert not set(new) & set(old), (old, new)
        reads = read_on_every_worker(gw, "/zones")
        assert set(reads) == set(new), (reads.keys(), new)
        incrs = []
        for p, d in reads.items():
            assert d["kept"] == "value-1", \
                "worker %d: the unchanged zone lost its contents: %r" % (p, d)
            assert d["extra"] != "none" and d["extra"]["capacity"] == 256 * 1024, d
            assert d["extra_get"] == ["in extra", 0], d
            incrs.append(d["extra_incr"])
            assert d["gone"] == "none", "a removed zone is still reachable: %r" % d
            assert d["small"]["capacity"] == 128 * 1024, d
            assert d["s"] is None, "a resized zone kept its old contents: %r" % d
        # One zone for both workers: their increments of x were 1 then 2.
        assert sorted(incrs) == [1, 2], incrs
        assert "shared zone extra" in gw.log_since(since), gw.log_since(since)


def test_zone_keeps_working_after_a_worker_is_killed_during_incr_load():
    # kill -9 while both workers hammer one key: the zone's lock is robust
    # (a holder that died does not hang the others). A kill in the middle
    # of a change may flush the zone (shdict.c, "Lock"), so only "it keeps
    # counting, exactly, afterwards" is asserted, not the total.
    with Gateway(conf('counters = "1m"', EXACT_ROUTES)) as gw:
        stop = threading.Event()
        errors, done = [], [0]
        lock = threading.Lock()

        def run():
            c = None
            while not stop.is_set():
                try:
                    if c is None:
                        c = Client(gw.port, timeout=5)
                    r = c.request("GET", "/incr")
                    with lock:
                        if r.status == 200:
                            done[0] += 1
                        else:
                            errors.append(r.status)
                except Exception:  # noqa: BLE001 (the killed worker's clients)
                    if c:
                        c.close()
                    c = None
            if c:
                c.close()

        threads = [threading.Thread(target=run, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            victim = gw.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: not pid_alive(victim), 5, what="the killed worker to die")
            wait_until(lambda: len(gw.worker_pids()) == 2 and victim not in gw.worker_pids(),
                       10, what="a replacement worker")
            with lock:
                at_replacement = done[0]
            # Both the survivor and the replacement go on incrementing.
            wait_until(lambda: done[0] > at_replacement + 200, 10,
                       what="increments to go on after the replacement")
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert not errors, "non-200 answers: %r" % errors[:5]
        clients = client_per_worker(gw)
        try:
            (pa, a), (pb, b) = sorted(clients.items())
            base = get_json(a, "/read")["hits"]
            # (+ 8: increments whose answer was lost with the killed worker)
            assert isinstance(base, (int, float)) and 0 < base <= done[0] + 8, (base, done[0])
            for _ in range(50):
                assert a.request("GET", "/incr").status == 200
                assert b.request("GET", "/incr").status == 200
            assert get_json(b, "/read")["hits"] == base + 100
        finally:
            close_all(clients)
