#!/usr/bin/python3
"""The soak test behind `make soak` (issue 11; not part of `make test`).

  SOAK_SECONDS=600 /usr/bin/python3 tests/soak.py

Runs the real binary (MOONGATE_BIN, default build/moongate; 2 workers) for
SOAK_SECONDS (default 600) of mixed traffic, with the e2e harness's real
parts (tests/e2e/harness.py: the programmable upstream, wrk, raw clients):

  - wrk on /open/ (request-id and cors, global) and wrk on /api/ (jwt-auth
    with an HS256 token, and rate-limit by consumer with a limit it never
    reaches), 1 thread and 8 connections each, for the whole run;
  - a Python client checking correctness in a loop: each answer is
    compared with what it must be. Proxied GETs and POSTs (the upstream's
    JSON echo is checked: path, body length, X-User-ID from the token), a
    100 KB chunked download, a CORS preflight, a missing token (401), a
    rate-limit by header spent with a fresh key each round (3 x 200 then
    429; the keys go to a 1 MiB zone, filled with 20,000 keys before the
    run starts, that must evict), a slow upstream
    (0.2 s: 200), a too slow one (3 s against a 1 s read timeout: 504), a
    dead upstream (502), an upstream 503 passed through, a Lua handler;
  - a reload (SIGHUP, a changed config) every 30 s, waited for;
  - the workers' RSS summed every 10 s and printed.

Passes when: no answer differed from what it must be (the 401, 429, 502,
503 and 504 above are provoked and expected); wrk saw no non-2xx answer
and no socket error (no request lost, reloads included); the worker pids
never changed (no crash); and the workers' RSS at the end is less than 5%
above their RSS at the end of the warm-up (SOAK_WARMUP, default 120 s, or
a third of the run when that is shorter). Exit status 0 on a pass.
"""

import os
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "e2e"))
os.chdir(os.path.dirname(HERE))

import harness  # noqa: E402
from harness import (WRK_COUNT_SCRIPT, Gateway, Upstream, free_port, request,  # noqa: E402
                     rss_kb, run_wrk)
from test_auth import SECRET, bearer, claims, jwt  # noqa: E402

SECONDS = int(os.environ.get("SOAK_SECONDS", "600"))
WARMUP = int(os.environ.get("SOAK_WARMUP", str(min(120, SECONDS // 3))))
RELOAD_EVERY = 30
SAMPLE_EVERY = 10
GROWTH_LIMIT = 0.05
PREFILL_KEYS = 20000

CONF = """local gw = require("moongate.gw")
-- soak generation %(gen)d
return {
  listen = { "@LISTEN@" }, workers = 2,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  shared = { limits = "1m" },
  plugins = {
    ["request-id"] = {},
    cors = { origins = { "https://app.example" } },
  },
  upstreams = {
    up = { targets = { "%(up)s" } },
    dead = { targets = { "127.0.0.1:%(dead)d" } },
  },
  routes = {
    { path = "/open/*", upstream = "up" },
    { path = "/api/*", upstream = "up", plugins = {
        ["jwt-auth"] = { key = { secret = "%(secret)s", algorithms = { "HS256" } } },
        ["rate-limit"] = { limit = 1000000000, window = 60, by = "consumer" } } },
    { path = "/limited/*", upstream = "up", plugins = {
        ["rate-limit"] = { limit = 3, window = 600, by = "header", header = "X-Key" } } },
    { path = "/slow/*", upstream = "up", timeouts = { read = 1 } },
    { path = "/fail/*", upstream = "dead", timeouts = { connect = 1 } },
    { path = "/handler", handler = function(ctx)
        return 200, { gen = %(gen)d, zone = gw.shared.limits:stats().capacity }
      end },
  },
}
"""


def conf(up, dead, gen):
    return CONF % {"up": up.addr, "dead": dead, "secret": SECRET, "gen": gen}


class Checker(threading.Thread):
    """The correctness client: rounds of checked requests until stopped."""

    def __init__(self, port, token):
        super().__init__(daemon=True)
        self.port = port
        self.token = token
        self.stop = threading.Event()
        self.ok = 0
        self.failures = []
        self.rounds = 0

    def expect(self, what, cond, detail):
        if cond:
            self.ok += 1
        else:
            self.failures.append("%s: %s" % (what, detail))

    def req(self, *a, **kw):
        kw.setdefault("timeout", 10)
        return request(self.port, *a, **kw)

    def one_round(self):
        r = self.req("GET", "/open/a?x=1")
        self.expect("GET /open", r.status == 200 and r.json()["path"] == "/open/a?x=1"
                    and r.header("x-request-id") and r.header("x-trace-id"), r)
        body = os.urandom(10000)
        r = self.req("POST", "/open/post", body=body)
        self.expect("POST /open", r.status == 200 and r.json()["body_len"] == len(body), r)
        r = self.req("GET", "/open/big?chunked=1&size=100000")
        self.expect("chunked download", r.status == 200 and len(r.body) == 100000
                    and r.body == harness.pattern_bytes(100000), r)
        r = self.req("OPTIONS", "/open/a", headers=[
            ("Origin", "https://app.example"), ("Access-Control-Request-Method", "PUT")])
        self.expect("CORS preflight", r.status in (200, 204)
                    and r.header("access-control-allow-origin") == "https://app.example", r)
        r = self.req("GET", "/api/me", headers=bearer(self.token))
        ok = r.status == 200 and harness.hdr_values(r.json(), "x-user-id") == ["soak"]
        self.expect("GET /api with a token", ok, r)
        r = self.req("GET", "/api/me")
        self.expect("GET /api without a token", r.status == 401, r)
        key = uuid.uuid4().hex
        got = [self.req("GET", "/limited/x", headers=[("X-Key", key)]).status
               for _ in range(4)]
        self.expect("rate limit by header", got == [200, 200, 200, 429], got)
        r = self.req("GET", "/slow/a?delay=0.2")
        self.expect("slow upstream", r.status == 200, r)
        r = self.req("GET", "/fail/a")
        self.expect("dead upstream", r.status == 502, r)
        r = self.req("GET", "/open/a?status=503")
        self.expect("upstream 503", r.status == 503, r)
        r = self.req("GET", "/handler")
        self.expect("Lua handler", r.status == 200 and r.json()["zone"] == 1024 * 1024, r)
        if self.rounds % 10 == 0:
            r = self.req("GET", "/slow/b?delay=3")
            self.expect("too slow upstream", r.status == 504, r)

    def run(self):
        while not self.stop.is_set():
            try:
                self.one_round()
            except Exception as e:  # noqa: BLE001
                self.failures.append("round %d: %r" % (self.rounds, e))
            self.rounds += 1


def workers_rss(gw):
    pids = gw.worker_pids()
    return pids, sum(rss_kb(p) for p in pids)


def main():
    print("soak: %d s (warm-up %d s), reload every %d s, RSS every %d s, binary %s"
          % (SECONDS, WARMUP, RELOAD_EVERY, SAMPLE_EVERY, harness.moongate_bin()), flush=True)
    harness.begin_test()
    dead = free_port()  # nothing listens there: connection refused, 502
    token = jwt(claims(sub="soak", exp=int(time.time()) + SECONDS + 3600))
    failures = []
    samples = []
    wrk_results = {}
    try:
        with Upstream() as up, Gateway(conf(up, dead, 1)) as gw:
            script = os.path.join(gw.dir, "count.lua")
            with open(script, "w") as f:
                f.write(WRK_COUNT_SCRIPT)

            def wrk(name, path, extra=()):
                try:
                    wrk_results[name] = run_wrk("http://127.0.0.1:%d%s" % (gw.port, path),
                                                threads=1, conns=8, duration=SECONDS,
                                                script=script, extra=extra)
                except BaseException as e:  # noqa: BLE001
                    wrk_results[name] = e

            # Fill the rate-limit zone first (more unique keys than it
            # holds), so that the soak measures it evicting, not its pages
            # being touched for the first time.
            with harness.Client(gw.port) as c:
                for i in range(PREFILL_KEYS):
                    c.request("GET", "/limited/prefill", headers=[("X-Key", "prefill-%d" % i)])
                zone = c.request("GET", "/handler").json()
            print("soak: %d unique rate-limit keys sent first to fill the %d-byte zone"
                  % (PREFILL_KEYS, zone["zone"]), flush=True)
            pids0 = gw.worker_pids()
            checker = Checker(gw.port, token)
            threads = [threading.Thread(target=wrk, args=("open", "/open/w"), daemon=True),
                       threading.Thread(target=wrk, args=(
                           "api", "/api/w", ("-H", "Authorization: Bearer " + token)),
                           daemon=True)]
            for t in threads:
                t.start()
            checker.start()
            start = time.monotonic()
            gen = 1
            next_sample = start + SAMPLE_EVERY
            next_reload = start + RELOAD_EVERY
            end = start + SECONDS
            while True:
                now = time.monotonic()
                if now >= next_reload and now < end - 5:
                    gen += 1
                    try:
                        gw.reload(conf(up, dead, gen), timeout=20)
                    except AssertionError as e:
                        failures.append("reload %d: %s" % (gen, e))
                    next_reload += RELOAD_EVERY
                if now >= next_sample:
                    pids, rss = workers_rss(gw)
                    t = now - start
                    samples.append((t, rss))
                    print("soak: t=%4.0fs workers %s RSS %6d KiB; checks %d ok, %d unexpected, "
                          "%d rounds; generation %d"
                          % (t, pids, rss, checker.ok, len(checker.failures), checker.rounds,
                             gen), flush=True)
                    if pids != pids0:
                        failures.append("worker pids changed: %s -> %s" % (pids0, pids))
                        pids0 = pids
                    next_sample += SAMPLE_EVERY
                if now >= end:
                    break
                time.sleep(min(0.2, max(0.0, min(next_sample, next_reload, end) - now)))
            checker.stop.set()
            checker.join(30)
            for t in threads:
                t.join(60)
            failures += ["check: " + f for f in checker.failures[:20]]
            if len(checker.failures) > 20:
                failures.append("... and %d more check failures" % (len(checker.failures) - 20))
            for name in ("open", "api"):
                res = wrk_results.get(name)
                if not isinstance(res, harness.WrkResult):
                    failures.append("wrk %s: %r" % (name, res))
                    continue
                errs = sum(res.socket_errors.values())
                print("soak: wrk %s: %d requests, %d non-2xx, socket errors %s"
                      % (name, res.requests, res.non2xx, res.socket_errors or "none"))
                if res.non2xx or errs or res.values.get("non2xx") != "0":
                    failures.append("wrk %s lost or failed requests:\n%s" % (name, res.text))
            print("soak: checker: %d checks ok in %d rounds, %d unexpected"
                  % (checker.ok, checker.rounds, len(checker.failures)))
    except BaseException as e:  # noqa: BLE001
        failures.append("soak aborted: %r" % (e,))
    finally:
        leftovers, problems = harness.end_test()
        failures += ["left running: %s" % l for l in leftovers] + problems

    after = [s for s in samples if s[0] >= WARMUP]
    if len(after) >= 2:
        base, last = after[0][1], after[-1][1]
        peak = max(s[1] for s in after)
        growth = (last - base) / float(base)
        print("soak: RSS after warm-up: %d KiB at t=%.0fs, %d KiB at the end (t=%.0fs), "
              "peak %d KiB: growth %+.2f%% (limit %.0f%%)"
              % (base, after[0][0], last, after[-1][0], peak, growth * 100, GROWTH_LIMIT * 100))
        if growth >= GROWTH_LIMIT:
            failures.append("RSS grew %.2f%% after warm-up" % (growth * 100))
    else:
        failures.append("too few RSS samples after the warm-up (%d): run longer" % len(after))
    if failures:
        print("soak: FAIL")
        for f in failures:
            print("  " + str(f).replace("\n", "\n    "))
        return 1
    print("soak: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
