"""gw.http.request / gw.http.request_multi end to end: handler routes of the
real binary calling the real upstream (tests/e2e/upstream.py), real clients.

Acceptance 3 of issue 3: request_multi of 3 upstream calls that each take
200 ms completes in under 300 ms, measured inside the handler with gw.now()
(best of 3 runs, so that one run slowed by a loaded machine does not fail
the test; every figure is printed); a timeout on one call does not stall the
others. Then: an upstream by name (round-robin over its targets), a literal
URL, method/headers/query/body as the upstream receives them, response
status/headers/body as Lua receives them, failures as results (refused,
unknown upstream, timeout, reset, garbage, too large), invalid arguments as
Lua errors (500 and a "lua:" error line), a client that goes away while its
handler waits, pooled connection reuse, and `moongate lua` scripts.

Handlers answer a JSON object of what they observed; assertions are here.
Run it against the ASan build too (MOONGATE_BIN=build/asan/moongate): the
harness fails a test whose gateway wrote a sanitizer report."""

import re
import subprocess
import tempfile
import time

from harness import Client, Gateway, Upstream, assert_gateway_error, free_port, hdr_values, \
    moongate_bin, pattern_bytes, request, spawn, write_file, SANITIZER_MARKS

PRELUDE = """local gw = require("moongate.gw")
local null = gw.json.null
local function pack(...)
    local t = {}
    for i = 1, select("#", ...) do
        local v = select(i, ...)
        if v == nil then t[i] = null else t[i] = v end
    end
    return t
end
-- A response as JSON-able data: the upstream's JSON echo decoded.
local function show(res, err)
    if not res then return { err = err == nil and null or err } end
    return { status = res.status, headers = res.headers,
             echo = gw.json.decode(res.body) or null, len = #res.body }
end
"""


def conf(up, routes, workers=1, extra=""):
    """Config text with upstreams "slow" (the upstream's first port) and
    "pair" (its first two ports); `routes` is a list of (path, handler
    body) pairs, or of raw route text."""
    addrs = up.addrs()
    body = []
    for r in routes:
        if isinstance(r, str):
            body.append(r)
        else:
            body.append('    { path = "%s", handler = function(ctx)\n%s\n    end },' % r)
    return PRELUDE + """return {
  listen = { "@LISTEN@" }, workers = %d,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  upstreams = {
    slow = { targets = { "%s" } },
    pair = { targets = { %s } },
  },
  routes = {
    { path = "/quick", handler = function(ctx) return 200, "quick" end },
%s
  },
  %s
}
""" % (workers, addrs[0], ", ".join('"%s"' % a for a in addrs[:2]), "\n".join(body), extra)


def get_json(c_or_port, path, timeout=10):
    if isinstance(c_or_port, Client):
        r = c_or_port.request("GET", path)
    else:
        r = request(c_or_port, "GET", path, timeout=timeout)
    assert r.status == 200, "GET %s -> %r" % (path, r)
    return r.json()


def lua_error_lines(text):
    return [l for l in text.splitlines() if "[error]" in l and "lua: " in l]


def assert_upstream_clean(up):
    st = up.stats()
    assert st["errors"] == 0, "the upstream received malformed requests: %r" % st["error_list"]


# ------------------------------------------------------------------ acceptance 3

MULTI = ("/multi", """
        local t0 = gw.now()
        local res, errs = gw.http.request_multi{
            { upstream = "slow", path = "/a", query = { delay = 0.2 } },
            { upstream = "slow", path = "/b", query = { delay = 0.2 } },
            { upstream = "slow", path = "/c", query = { delay = 0.2 } },
        }
        local o = { total = gw.now() - t0, results = {} }
        for i = 1, 3 do o.results[i] = show(res[i], errs[i]) end
        return 200, o""")

TIMEOUT_ONE = ("/timeout-one", """
        local t0 = gw.now()
        local res, errs = gw.http.request_multi{
            { upstream = "slow", path = "/fast1", query = { delay = 0.1 } },
            { upstream = "slow", path = "/stuck", query = { delay = 3 }, timeout = 0.5 },
            { upstream = "slow", path = "/fast2", query = { delay = 0.1 } },
        }
        local o = { total = gw.now() - t0, results = {} }
        for i = 1, 3 do o.results[i] = show(res[i], errs[i]) end
        return 200, o""")

ECHO_PATH = ("/echo-path/*", """
        local p = gw.request.get_path(ctx):sub(#"/echo-path" + 1)
        return 200, show(gw.http.request{ upstream = "slow", path = p })""")


def test_request_multi_of_three_200ms_calls_takes_under_300ms():
    with Upstream() as up:
        with Gateway(conf(up, [MULTI])) as gw:
            totals = []
            with Client(gw.port, timeout=10) as c:
                for _ in range(3):
                    up.reset()
                    o = get_json(c, "/multi")
                    for i, name in enumerate("abc"):
                        r = o["results"][i]
                        assert r.get("status") == 200, "call %d: %r" % (i + 1, r)
                        assert r["echo"]["path"] == "/%s?delay=0.2" % name, r
                    assert up.stats()["requests"] == 3
                    totals.append(o["total"])
            print("request_multi of 3 x 200 ms: %s s (best %.3f s)"
                  % (", ".join("%.3f" % t for t in totals), min(totals)))
            # Each call really waited 200 ms...
            assert min(totals) >= 0.19, totals
            # ...and they ran in parallel (serially it is >= 0.6 s).
            assert min(totals) < 0.3, "request_multi of 3 x 200 ms took %s s" % totals
            assert_upstream_clean(up)


def test_a_timeout_on_one_call_does_not_stall_the_others():
    with Upstream() as up:
        with Gateway(conf(up, [TIMEOUT_ONE, ECHO_PATH])) as gw:
            with Client(gw.port, timeout=10) as c:
                t0 = time.monotonic()
                o = get_json(c, "/timeout-one")
                wall = time.monotonic() - t0
                r1, r2, r3 = o["results"]
                assert r1.get("status") == 200 and r1["echo"]["path"] == "/fast1?delay=0.1", r1
                assert r3.get("status") == 200 and r3["echo"]["path"] == "/fast2?delay=0.1", r3
                assert r2 == {"err": "timeout"}, r2
                print("request_multi with one 0.5 s timeout over a 3 s call: %.3f s "
                      "(client saw %.3f s)" % (o["total"], wall))
                assert 0.49 <= o["total"] < 1.5, \
                    "a 0.5 s timeout among 0.1 s calls took %.3f s" % o["total"]
                # The connection of the abandoned call is not reused: its
                # late answer never becomes the answer of a later request.
                for i in range(6):
                    d = get_json(c, "/echo-path/after%d" % i)
                    assert d.get("status") == 200 and d["echo"]["path"] == "/after%d" % i, d
                time.sleep(2.7)      # past the stuck call's 3 s: its answer is sent
                for i in range(6):
                    d = get_json(c, "/echo-path/late%d" % i)
                    assert d.get("status") == 200 and d["echo"]["path"] == "/late%d" % i, d
            assert_upstream_clean(up)


test_a_timeout_on_one_call_does_not_stall_the_others.timeout = 40


# ------------------------------------------------------------------ targets

BALANCE = ("/balance", """
        local ports = {}
        for i = 1, 10 do
            local res, err = gw.http.request{ upstream = "pair", path = "/rr" .. i }
            ports[i] = res and gw.json.decode(res.body).port or tostring(err)
        end
        return 200, ports""")


def test_request_to_an_upstream_name_round_robins_over_its_targets():
    with Upstream(ports=2) as up:
        with Gateway(conf(up, [BALANCE])) as gw:
            up.reset()
            ports = get_json(gw.port, "/balance")
            assert all(p in up.ports for p in ports), ports
            counts = [ports.count(p) for p in up.ports]
            assert all(n >= 3 for n in counts), "10 requests over 2 targets: %r" % ports
            st = up.stats()
            assert st["requests"] == 10, st
            assert sorted(st["ports"].values()) == sorted(counts), (st["ports"], counts)


def test_request_to_a_literal_url():
    with Upstream(ports=2) as up:
        lit = "http://127.0.0.1:%d/lit?x=1" % up.ports[1]
        routes = [
            ("/lit", 'return 200, show(gw.http.request{ url = "%s" })' % lit),
            ("/lit-root", 'return 200, show(gw.http.request{ url = "http://127.0.0.1:%d" })'
             % up.ports[1]),
            ("/lit-query", 'return 200, show(gw.http.request{ url = "%s", query = { y = 2 } })'
             % lit),
            ("/lit-name", 'return 200, show(gw.http.request{ url = "http://example.invalid/" })'),
            ("/lit-bad", 'return 200, show(gw.http.request{ url = "https://127.0.0.1/" })'),
        ]
        with Gateway(conf(up, routes)) as gw:
            d = get_json(gw.port, "/lit")
            assert d.get("status") == 200, d
            e = d["echo"]
            assert e["port"] == up.ports[1] and e["path"] == "/lit?x=1", e
            assert hdr_values(e, "host") == ["127.0.0.1:%d" % up.ports[1]], e["headers"]
            d = get_json(gw.port, "/lit-root")
            assert d["echo"]["path"] == "/", d
            d = get_json(gw.port, "/lit-query")
            assert d["echo"]["path"] == "/lit?x=1&y=2", d
            # A host name: no resolving inside the worker -> an error result.
            d = get_json(gw.port, "/lit-name")
            assert isinstance(d.get("err"), str) and d["err"], d
            # Not http:// -> a Lua error.
            since = gw.log_size()
            assert_gateway_error(request(gw.port, "GET", "/lit-bad"), 500)
            gw.wait_log(r"lua: .*url must be http://", since=since)


ECHO_ROUTES = [
    ("/post", """
        return 200, show(gw.http.request{ upstream = "slow", method = "POST", path = "/e",
            query = { a = "1 2", b = "x/y" },
            headers = { ["X-A"] = "1", ["X-M"] = { "p", "q" }, ["X-Num"] = 5 },
            body = "hello" })"""),
    ("/put-empty", 'return 200, show(gw.http.request{ upstream = "slow", method = "PUT", '
                   'path = "/put" })'),
    ("/get-plain", 'return 200, show(gw.http.request{ upstream = "slow", path = "/g" })'),
    ("/get-body", 'return 200, show(gw.http.request{ upstream = "slow", path = "/gb", '
                  'body = "xyz" })'),
    ("/delete", 'return 200, show(gw.http.request{ upstream = "slow", method = "DELETE", '
                'path = "/d/1" })'),
    ("/query-string", 'return 200, show(gw.http.request{ upstream = "slow", path = "/q?y=2", '
                      'query = "z=1" })'),
    ("/host", 'return 200, show(gw.http.request{ upstream = "slow", path = "/h", '
              'headers = { Host = "backend.example" } })'),
    ("/big-body", """
        local body = string.rep("0123456789", 20000)
        return 200, show(gw.http.request{ upstream = "slow", method = "POST", path = "/bb",
            body = body })"""),
]


def test_method_headers_query_and_body_reach_the_upstream():
    with Upstream() as up:
        with Gateway(conf(up, ECHO_ROUTES)) as gw:
            with Client(gw.port, timeout=10) as c:
                d = get_json(c, "/post")
                assert d.get("status") == 200, d
                e = d["echo"]
                assert e["method"] == "POST" and e["path"] == "/e?a=1%202&b=x%2Fy", e
                assert hdr_values(e, "x-a") == ["1"], e["headers"]
                assert hdr_values(e, "x-m") == ["p", "q"], e["headers"]
                assert hdr_values(e, "x-num") == ["5"], e["headers"]
                assert hdr_values(e, "content-length") == ["5"], e["headers"]
                assert hdr_values(e, "host") == ["slow"], e["headers"]
                assert e["body"] == "hello" and e["framing"] == "length", e
                e = get_json(c, "/put-empty")["echo"]
                assert e["method"] == "PUT" and hdr_values(e, "content-length") == ["0"], e
                e = get_json(c, "/get-plain")["echo"]
                assert e["method"] == "GET" and e["path"] == "/g", e
                assert not hdr_values(e, "content-length") and e["body_len"] == 0, e
                e = get_json(c, "/get-body")["echo"]
                assert hdr_values(e, "content-length") == ["3"] and e["body"] == "xyz", e
                e = get_json(c, "/delete")["echo"]
                assert e["method"] == "DELETE" and e["path"] == "/d/1", e
                e = get_json(c, "/query-string")["echo"]
                assert e["path"] == "/q?y=2&z=1", e
                e = get_json(c, "/host")["echo"]
                assert hdr_values(e, "host") == ["backend.example"], e["headers"]
                e = get_json(c, "/big-body")["echo"]
                assert e["body_len"] == 200000, e
                assert hdr_values(e, "content-length") == ["200000"], e["headers"]
            assert_upstream_clean(up)


RESPONSE_ROUTES = [
    ("/hdrs", 'return 200, show(gw.http.request{ upstream = "slow", '
              'path = "/r?hdr=X-R:1&hdr=X-R:2&hdr=X-One:v" })'),
    ("/s404", 'return 200, show(gw.http.request{ upstream = "slow", path = "/x?status=404" })'),
    ("/s500", 'return 200, show(gw.http.request{ upstream = "slow", path = "/x?status=500" })'),
    ("/s204", """
        local res, err = gw.http.request{ upstream = "slow", path = "/x?status=204" }
        return 200, { status = res.status, body = res.body, err = err or null }"""),
    ("/head", """
        local res, err = gw.http.request{ upstream = "slow", method = "HEAD", path = "/hd" }
        return 200, { status = res.status, body = res.body, cl = res.headers["content-length"],
                      err = err or null }"""),
    # Bodies go back to the client as they came, to compare byte for byte.
    ("/size/*", """
        local q = gw.request.get_path(ctx):sub(#"/size/" + 1)
        local res, err = gw.http.request{ upstream = "slow", path = "/b", query = q }
        if not res then return 502, "error: " .. tostring(err) end
        return res.status, res.body, { ["X-TE"] = tostring(res.headers["transfer-encoding"]) }"""),
    ("/interim", 'return 200, show(gw.http.request{ upstream = "slow", path = "/i?interim=1" })'),
]


def test_response_status_headers_and_body_come_back_to_lua():
    with Upstream() as up:
        with Gateway(conf(up, RESPONSE_ROUTES)) as gw:
            with Client(gw.port, timeout=10) as c:
                d = get_json(c, "/hdrs")
                assert d.get("status") == 200, d
                h = d["headers"]
                assert h.get("x-r") == ["1", "2"], "repeated header: %r" % h
                assert h.get("x-one") == "v", h
                assert h.get("content-type") == "application/json", h
                assert int(h.get("content-length")) == d["len"], h
                assert d["echo"]["path"] == "/r?hdr=X-R:1&hdr=X-R:2&hdr=X-One:v", d
                # Error statuses are results, not errors.
                for path, status in (("/s404", 404), ("/s500", 500)):
                    d = get_json(c, path)
                    assert d.get("status") == status and "err" not in d, d
                    assert d["echo"]["path"] == "/x?status=%d" % status, d
                d = get_json(c, "/s204")
                assert d == {"status": 204, "body": "", "err": None}, d
                d = get_json(c, "/head")
                assert d["status"] == 200 and d["body"] == "" and d["err"] is None, d
                assert int(d["cl"]) > 0, d
                d = get_json(c, "/interim")
                assert d.get("status") == 200 and d["echo"]["path"] == "/i?interim=1", d
                for q, framing in (("size=1000000", "length"), ("size=300000&chunked=1", "chunked"),
                                   ("size=70000&nolen=1", "close"), ("size=0", "length")):
                    n = int(re.search(r"size=(\d+)", q).group(1))
                    r = c.request("GET", "/size/" + q)
                    assert r.status == 200, (q, r)
                    assert len(r.body) == n and r.body == pattern_bytes(n), \
                        "%s: %d bytes back, body %s" % (
                            q, len(r.body), "intact" if r.body == pattern_bytes(n) else "differs")
                    if framing == "chunked":
                        assert r.header("x-te") == "chunked", r.headers
            assert_upstream_clean(up)


FAILURE_ROUTES = [
    ("/refused", """
        local t0 = gw.now()
        local res, err = gw.http.request{ url = "http://127.0.0.1:@DEAD@/x" }
        return 200, { res = res or null, err = err or null, t = gw.now() - t0 }"""),
    ("/refused-up", """
        local res, err = gw.http.request{ upstream = "dead", path = "/x" }
        return 200, { res = res or null, err = err or null }"""),
    ("/unknown", """
        local res, err = gw.http.request{ upstream = "nope", path = "/x" }
        return 200, { res = res or null, err = err or null }"""),
    ("/reset", 'return 200, show(gw.http.request{ upstream = "slow", path = "/x?reset=1" })'),
    ("/garbage", 'return 200, show(gw.http.request{ upstream = "slow", path = "/x?garbage=1" })'),
    ("/truncated", 'return 200, show(gw.http.request{ upstream = "slow", '
                   'path = "/x?size=100000&truncate=5000" })'),
    ("/too-large", 'return 200, show(gw.http.request{ upstream = "slow", '
                   'path = "/x?size=17000000" })'),
    ("/mixed", """
        local res, errs = gw.http.request_multi{
            { upstream = "nope" },
            { upstream = "slow", path = "/ok1" },
            { url = "http://127.0.0.1:@DEAD@/" },
            { upstream = "slow", path = "/ok2" },
        }
        local o = {}
        for i = 1, 4 do o[i] = show(res[i], errs[i]) end
        return 200, o"""),
]


def test_failures_are_error_results_and_the_handler_goes_on():
    with Upstream() as up:
        dead = free_port()
        routes = [(p, code.replace("@DEAD@", str(dead))) for p, code in FAILURE_ROUTES]
        text = conf(up, routes).replace(
            "    pair =", '    dead = { targets = { "127.0.0.1:%d" } },\n    pair =' % dead)
        with Gateway(text) as gw:
            with Client(gw.port, timeout=15) as c:
                t0 = time.monotonic()
                d = get_json(c, "/refused")
                wall = time.monotonic() - t0
                assert d["res"] is None and isinstance(d["err"], str) and d["err"], d
                assert wall < 2 and d["t"] < 1, "a refused connection took %.3f s" % wall
                print("refused port -> %r in %.3f s" % (d["err"], d["t"]))
                d = get_json(c, "/refused-up")
                assert d["res"] is None and isinstance(d["err"], str) and d["err"], d
                assert get_json(c, "/unknown") == {"res": None, "err": "no such upstream"}
                for path in ("/reset", "/garbage", "/truncated", "/too-large"):
                    d = get_json(c, path)
                    assert set(d) == {"err"} and isinstance(d["err"], str) and d["err"], \
                        "%s: %r" % (path, d)
                    print("%s -> %r" % (path, d["err"]))
                assert get_json(c, "/garbage")["err"] == "invalid response"
                m = get_json(c, "/mixed")
                assert m[0] == {"err": "no such upstream"}, m
                assert m[1].get("status") == 200 and m[1]["echo"]["path"] == "/ok1", m
                assert set(m[2]) == {"err"} and m[2]["err"], m
                assert m[3].get("status") == 200 and m[3]["echo"]["path"] == "/ok2", m
                assert c.request("GET", "/quick").body == b"quick"


def test_a_response_over_16_mib_fails_with_response_too_large():
    routes = [
        ("/max-size", 'return 200, show(gw.http.request{ upstream = "slow", '
                      'path = "/x?size=16777216" })'),
        ("/over/*", """
            local n = gw.request.get_path(ctx):sub(#"/over/" + 1)
            return 200, show(gw.http.request{ upstream = "slow", path = "/x?size=" .. n })"""),
    ]
    with Upstream() as up:
        with Gateway(conf(up, routes)) as gw:
            with Client(gw.port, timeout=15) as c:
                d = get_json(c, "/max-size")
                assert d.get("status") == 200 and d["len"] == 16 << 20, \
                    "a response of exactly 16 MiB: %r" % d
                # Over the cap: the same error however the body arrived in
                # reads (a few sizes and repeats, so read boundaries vary).
                errs = {}
                for n in (16777217, 17000000, 20000000) * 2:
                    errs.setdefault(n, []).append(get_json(c, "/over/%d" % n).get("err"))
                bad = {n: e for n, e in errs.items() if e != ["response too large"] * len(e)}
                assert not bad, "responses over 16 MiB gave the errors %r" % bad
                assert c.request("GET", "/quick").body == b"quick"


BAD_ARGS = [
    ("/bad/none", "gw.http.request{ path = '/x' }", "a request needs `upstream`"),
    ("/bad/crlf", "gw.http.request{ upstream = 'slow', headers = { ['X-A'] = 'a\\r\\nX-Inj: 1' } }",
     "invalid header value"),
    ("/bad/name", "gw.http.request{ upstream = 'slow', headers = { ['X A'] = '1' } }",
     "invalid header name"),
    ("/bad/lower", "gw.http.request{ upstream = 'slow', method = 'get' }", "invalid method"),
    ("/bad/space", "gw.http.request{ upstream = 'slow', method = 'GE T' }", "invalid method"),
    ("/bad/cl", "gw.http.request{ upstream = 'slow', headers = { ['Content-Length'] = '5' } }",
     "set by the gateway"),
    ("/bad/path", "gw.http.request{ upstream = 'slow', path = 'x y' }", "path must start"),
    ("/bad/body", "gw.http.request{ upstream = 'slow', body = 5 }", "body must be a string"),
    ("/bad/timeout", "gw.http.request{ upstream = 'slow', timeout = -1 }", "timeout must be"),
    ("/bad/empty", "gw.http.request_multi{}", "non-empty list"),
    ("/bad/type", "gw.http.request('http://127.0.0.1/')", "a request must be a table"),
    ("/bad/one-of-many", "gw.http.request_multi{ { upstream = 'slow' }, { upstream = 'slow', "
                         "method = 'B@D' } }", "invalid method"),
]


def test_invalid_arguments_are_lua_errors_500_and_nothing_is_sent():
    with Upstream() as up:
        routes = [(p, "    %s\n        return 200, 'not reached'" % code) for p, code, _ in BAD_ARGS]
        routes.append('    { path = "/bad/phase", handler = function(ctx) return 200, "x" end, '
                      'plugins = { hf = { header_filter = function(conf, ctx) '
                      'gw.http.request{ upstream = "slow" } end } } },')
        with Gateway(conf(up, routes)) as gw:
            pids = gw.worker_pids()
            up.reset()
            with Client(gw.port, timeout=10) as c:
                for path, _, why in BAD_ARGS + [("/bad/phase", None, "cannot wait here")]:
                    since = gw.log_size()
                    r = c.request("GET", path)
                    assert_gateway_error(r, 500)
                    gw.wait_log(re.escape(why), since=since)
                    lines = lua_error_lines(gw.log_since(since))
                    assert lines, "no 'lua:' error line for %s:\n%s" % (path, gw.log_since(since))
                    assert c.request("GET", "/quick").body == b"quick", path
            st = up.stats()
            assert st["requests"] == 0, \
                "invalid requests reached the upstream: %r" % st["last"]
            assert gw.worker_pids() == pids


# ------------------------------------------------------------------ lifetimes

LEAVE_ROUTES = [
    ("/wait", """
        local res, errs = gw.http.request_multi{
            { upstream = "slow", path = "/w1", query = { delay = 1 } },
            { upstream = "slow", path = "/w2", query = { delay = 1 } },
            { upstream = "slow", path = "/w3", query = { delay = 1.5 }, timeout = 0.4 },
        }
        return 200, "finished" """),
    ("/wait-one", """
        gw.http.request{ upstream = "slow", path = "/w", query = { delay = 1 } }
        return 200, "finished" """),
    ("/par", """
        local res, errs = gw.http.request_multi{
            { upstream = "slow", path = "/p1" }, { upstream = "slow", path = "/p2" },
            { upstream = "slow", path = "/p3" },
        }
        local o = {}
        for i = 1, 3 do o[i] = show(res[i], errs[i]) end
        return 200, o"""),
]


def test_client_leaving_while_its_handler_waits_in_request_multi_is_harmless():
    with Upstream() as up:
        with Gateway(conf(up, LEAVE_ROUTES, workers=2)) as gw:
            pids = gw.worker_pids()
            up.reset()
            for path in ("/wait", "/wait-one") * 4:
                c = Client(gw.port)
                c.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
                time.sleep(0.05)
                c.close()
            # The gateway keeps serving while the orphaned calls are pending.
            r = request(gw.port, "GET", "/quick")
            assert r.status == 200 and r.body == b"quick", r
            time.sleep(1.8)         # the orphaned calls finish or time out
            st = up.stats()
            assert st["requests"] == 16, "the upstream saw %d of 16 calls" % st["requests"]
            # The pool is sane afterwards: every answer is its own.
            with Client(gw.port, timeout=10) as c:
                for _ in range(5):
                    o = get_json(c, "/par")
                    for i in range(3):
                        assert o[i].get("status") == 200 and \
                            o[i]["echo"]["path"] == "/p%d" % (i + 1), o
            assert gw.worker_pids() == pids, "a worker died"
            assert not lua_error_lines(gw.error_log_text()), gw.error_log_text()
            # Again, with a reload removing the upstream (and the routes)
            # while the orphaned calls are pending: the generation they were
            # started from goes away before they finish.
            up.reset()
            for path in ("/wait", "/wait-one") * 2:
                c = Client(gw.port)
                c.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
                time.sleep(0.05)
                c.close()
            gw.reload(PRELUDE + """return {
  listen = { "@LISTEN@" }, workers = 2,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  routes = { { path = "/quick", handler = function(ctx) return 200, "quick again" end } },
}""")
            r = request(gw.port, "GET", "/quick")
            assert r.status == 200 and r.body == b"quick again", r
            time.sleep(1.8)
            assert up.stats()["requests"] == 8, up.stats()
            for _ in range(4):
                r = request(gw.port, "GET", "/quick")
                assert r.status == 200 and r.body == b"quick again", r
            assert gw.worker_pids() == pids, "a worker died"
            assert_upstream_clean(up)


test_client_leaving_while_its_handler_waits_in_request_multi_is_harmless.timeout = 40


REUSE_ROUTES = [
    ("/dropped-get", """
        local a, e1 = gw.http.request{ upstream = "slow", path = "/a?kill_next=1" }
        local b, e2 = gw.http.request{ upstream = "slow", path = "/b" }
        return 200, { a = show(a, e1), b = show(b, e2) }"""),
    ("/dropped-post", """
        local a, e1 = gw.http.request{ upstream = "slow", path = "/a?kill_next=1" }
        local b, e2 = gw.http.request{ upstream = "slow", method = "POST", path = "/b",
                                       body = "once" }
        return 200, { a = show(a, e1), b = show(b, e2) }"""),
    ("/idle-closed", """
        local a, e1 = gw.http.request{ upstream = "slow", path = "/a?idle_close=0.1" }
        gw.sleep(0.4)
        local b, e2 = gw.http.request{ upstream = "slow", path = "/b" }
        return 200, { a = show(a, e1), b = show(b, e2) }"""),
]


def test_pooled_connection_closed_by_the_upstream_is_replaced_and_a_get_retried():
    # The same pool races as the proxy's (test_upstream.py): an idle pooled
    # connection the upstream closed is not used; one the upstream drops
    # just as it is reused costs an idempotent request nothing (one retry
    # on a fresh connection), and a POST is never sent twice.
    with Upstream() as up:
        with Gateway(conf(up, REUSE_ROUTES)) as gw:
            up.reset()
            d = get_json(gw.port, "/idle-closed")
            assert d["a"].get("status") == 200, d
            assert d["b"].get("status") == 200 and d["b"]["echo"]["path"] == "/b", d
            up.reset()
            d = get_json(gw.port, "/dropped-post")
            assert d["a"].get("status") == 200, d
            assert set(d["b"]) == {"err"} and d["b"]["err"], d
            st = up.stats()
            assert st["dropped"] == 1 and st["last"].count("POST /b") == 1, st
            up.reset()
            d = get_json(gw.port, "/dropped-get")
            assert d["a"].get("status") == 200, d
            st = up.stats()
            assert st["dropped"] == 1, "the reused connection was not the one dropped: %r" % st
            assert d["b"].get("status") == 200 and d["b"]["echo"]["path"] == "/b", \
                "a GET on a pooled connection the upstream dropped as it was reused: %r" % d


POOL_ROUTES = [
    ("/many", """
        local ok = 0
        for i = 1, 200 do
            local res, err = gw.http.request{ upstream = "slow", path = "/m" .. i }
            if res and res.status == 200 and gw.json.decode(res.body).path == "/m" .. i then
                ok = ok + 1
            end
        end
        return 200, { ok = ok }"""),
    ("/one", 'return 200, show(gw.http.request{ upstream = "slow", path = "/one" })'),
    ("/lit-many", """
        local ok = 0
        for i = 1, 50 do
            local res = gw.http.request{ url = "http://@ADDR@/l" .. i }
            if res and res.status == 200 then ok = ok + 1 end
        end
        return 200, { ok = ok }"""),
]


def test_upstream_connections_are_pooled_and_reused():
    with Upstream() as up:
        routes = [(p, code.replace("@ADDR@", up.addr)) for p, code in POOL_ROUTES]
        with Gateway(conf(up, routes, workers=2)) as gw:
            up.reset()
            assert get_json(gw.port, "/many", timeout=30) == {"ok": 200}
            st = up.stats()
            assert st["requests"] == 200, st
            print("200 sequential gw.http.request in one handler: %d upstream connections"
                  % st["connections"])
            assert st["connections"] < 10, \
                "200 sequential calls opened %d upstream connections" % st["connections"]
            up.reset()
            with Client(gw.port, timeout=10) as c:
                for _ in range(100):
                    assert get_json(c, "/one").get("status") == 200
            for _ in range(100):
                assert get_json(gw.port, "/one").get("status") == 200
            st = up.stats()
            assert st["requests"] == 200, st
            print("200 client requests each doing one call (2 workers): %d upstream connections"
                  % st["connections"])
            assert st["connections"] < 10, st
            up.reset()
            assert get_json(gw.port, "/lit-many", timeout=30) == {"ok": 50}
            assert up.stats()["connections"] < 10, up.stats()
            assert_upstream_clean(up)


# ------------------------------------------------------------------ moongate lua

SCRIPT = """local gw = require("moongate.gw")
local res, err = gw.http.request{ url = "http://127.0.0.1:%(port)d/script?status=203",
                                  headers = { ["X-From"] = "script" } }
print("status " .. tostring(res and res.status) .. " err " .. tostring(err))
print("path " .. gw.json.decode(res.body).path)
local all, errs = gw.http.request_multi{
    { url = "http://127.0.0.1:%(port)d/m1" }, { url = "http://127.0.0.1:%(port)d/m2?status=404" },
    { url = "http://127.0.0.1:%(dead)d/" },
}
print("multi " .. all[1].status .. " " .. all[2].status .. " " .. tostring(all[3]) ..
      " " .. tostring(errs[3]))
"""


def run_lua_script(path, timeout=20):
    p = spawn([moongate_bin(), "lua", path], "moongate lua", stdout=subprocess.PIPE,
              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("moongate lua %s did not finish in %ss" % (path, timeout))
    out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    for mark in SANITIZER_MARKS:
        assert mark not in out + err, "sanitizer report from moongate lua:\n%s" % err
    return p.returncode, out, err


def test_moongate_lua_script_makes_http_requests():
    with Upstream() as up:
        with tempfile.TemporaryDirectory() as d:
            path = write_file(d, "client.lua", SCRIPT % {"port": up.port, "dead": free_port()})
            t0 = time.monotonic()
            code, out, err = run_lua_script(path)
            took = time.monotonic() - t0
            assert code == 0, (code, out, err)
            lines = out.splitlines()
            assert "status 203 err nil" in lines, (out, err)
            assert "path /script?status=203" in lines, (out, err)
            multi = [l for l in lines if l.startswith("multi ")]
            assert multi and multi[0].startswith("multi 200 404 false "), (out, err)
            assert multi[0] != "multi 200 404 false nil", "no error for a refused port: " + out
            assert took < 10, took
        st = up.stats()
        assert st["requests"] == 3, st
        assert any("/script?status=203" in l for l in st["last"]), st


def test_a_timer_request_in_flight_when_the_worker_stops_is_cleaned_up():
    # A plugin's timer calls a server that accepts and never answers; the
    # gateway stops meanwhile. The request's connection outlives the Lua
    # side's targets: it must neither touch freed memory (the ASan run
    # checks) nor keep the worker from exiting past the call's timeout.
    import socket as _socket
    from test_lua import conf_text, make_gateway
    silent = _socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    plugin = """local gw = require("moongate.gw")
return { name = "hang", priority = 1, schema = { fields = {} },
  init_worker = function()
    gw.timer.at(0, function()
      gw.log("info", "hang: calling")
      local res, err = gw.http.request({ url = "http://127.0.0.1:%d/x", timeout = 3 })
      gw.log("info", "hang: done ", tostring(err))
    end)
  end,
  access = function() end }
""" % port
    try:
        with Upstream() as up:
            gw = make_gateway(conf_text(up, '{ path = "/*", upstream = "up" }', '["hang"] = {}'),
                              {"hang": plugin})
            with gw:
                gw.wait_log("hang: calling")
                conn, _ = silent.accept()
                t0 = time.monotonic()
                gw.stop()
                took = time.monotonic() - t0
                conn.close()
            assert took < 6, "stopping took %.1fs" % took
    finally:
        silent.close()
