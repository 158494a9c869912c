"""/metrics on the admin listener: counts that add up across two workers,
bounded labels, gauges (connections, generations alive), reload and restart
counters, the exposition checked by `promtool check metrics`, and a real
Prometheus server scraping it."""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

from harness import (Client, Gateway, Upstream, free_port, proxied, request, route, spawn,
                     upstream_conf, wait_until, _kill_group)

TOKEN = "metrics-token"
LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

# A handler route answering with the worker's pid, to see both workers serve.
PID_ROUTE = ('{ path = "/pid", handler = function() local ffi = require("ffi") '
             'pcall(ffi.cdef, "int getpid(void);") return 200, tostring(ffi.C.getpid()) end }')


def scrape(port, token=TOKEN):
    r = request(port, "GET", "/metrics", headers=[("Authorization", "Bearer " + token)],
                host="127.0.0.1")
    assert r.status == 200, r
    assert r.header("content-type") == "text/plain; version=0.0.4; charset=utf-8", r
    return r.body.decode()


def parse(text):
    """{(name, ((label, value), ...)): float}; also checks every sample has
    a preceding TYPE line."""
    out, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        assert m, "unparsable line %r" % line
        name = m.group(1)
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or base in typed, "no TYPE for %s" % name
        labels = tuple(sorted(LABEL.findall(m.group(3) or "")))
        out[(name, labels)] = float(m.group(4))
    return out


def val(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after, before, name, **labels):
    return val(after, name, **labels) - val(before, name, **labels)


def config_text(gw, up_addr, aport, extra_routes=""):
    return """return {
  listen = "@LISTEN@", workers = 2, pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@",
  admin = { listen = "127.0.0.1:%d", token = "%s" },
  upstreams = { up = { targets = { "%s" } } },
  routes = { { path = "/x/*", upstream = "up" }, %s, %s },
}
""" % (aport, TOKEN, up_addr, PID_ROUTE, extra_routes)


def test_counts_add_up_across_two_workers():
    aport = free_port()
    with Upstream() as up:
        gw = Gateway(config_text(None, up.addr, aport), workers=2)
        with gw:
            pids = set()
            deadline = time.monotonic() + 10
            while len(pids) < 2 and time.monotonic() < deadline:
                r = request(gw.port, "GET", "/pid")
                assert r.status == 200, r
                pids.add(int(r.body))
            assert pids == set(gw.worker_pids()), (pids, gw.worker_pids())
            before = parse(scrape(aport))
            for i in range(40):
                assert request(gw.port, "GET", "/x/%d" % i).status == 200
            for i in range(10):
                assert request(gw.port, "POST", "/x/p", body=b"hello").status == 200
            for i in range(5):
                assert request(gw.port, "GET", "/x/e?status=503").status == 503
            for i in range(3):
                assert request(gw.port, "DELETE", "/nowhere").status == 404
            for i in range(2):
                assert request(gw.port, "PROPFIND", "/x/q").status == 501
            req = "moongate_http_requests_total"

            # A request is counted once its response is written: the client
            # may have read it a moment before. Wait for all 60.
            def all_counted():
                a = parse(scrape(aport))
                total = sum(v - before.get(k, 0) for k, v in a.items() if k[0] == req)
                return a if total == 60 else None
            after = wait_until(all_counted, 5, interval=0.05, what="60 requests counted")
            assert delta(after, before, req, route="/x/*", method="GET", status="2xx") == 40
            assert delta(after, before, req, route="/x/*", method="POST", status="2xx") == 10
            assert delta(after, before, req, route="/x/*", method="GET", status="5xx") == 5
            assert delta(after, before, req, route="(unmatched)", method="OTHER",
                         status="5xx") == 2
            assert delta(after, before, req, route="(unmatched)", method="DELETE",
                         status="4xx") == 3
            assert val(after, req, route="/pid", method="GET", status="2xx") >= 2
            # No label carries a raw path.
            for (name, labels) in after:
                for k, v in labels:
                    assert not v.startswith("/x/") or v == "/x/*", (name, labels)
            hist = "moongate_http_request_duration_seconds"
            assert delta(after, before, hist + "_count", route="/x/*") == 55
            assert delta(after, before, hist + "_bucket", route="/x/*", le="+Inf") == 55
            assert delta(after, before, hist + "_sum", route="/x/*") > 0
            # Buckets are cumulative.
            buckets = sorted((float(dict(l)["le"]), v) for (n, l), v in after.items()
                             if n == hist + "_bucket" and dict(l)["route"] == "/x/*")
            assert [v for _, v in buckets] == sorted(v for _, v in buckets), buckets
            up_hist = "moongate_upstream_duration_seconds"
            assert delta(after, before, up_hist + "_count", route="/x/*") == 55
            assert val(after, up_hist + "_count", route="/pid") == 0, "a handler has no upstream"
            assert delta(after, before, "moongate_http_received_bytes_total", route="/x/*") == 50
            assert delta(after, before, "moongate_http_sent_bytes_total", route="/x/*") > 55 * 100
            assert val(after, "moongate_workers") == 2
            assert val(after, "moongate_generations_alive") == 2
            assert val(after, "moongate_worker_restarts_total") == 0


def test_gauges_follow_connections_and_generations():
    aport = free_port()
    with Upstream() as up:
        conf = config_text(None, up.addr, aport)
        with Gateway(conf, workers=2) as gw:
            conns = [Client(gw.port) for _ in range(3)]
            try:
                for c in conns:
                    assert c.request("GET", "/x/1").status == 200  # kept alive
                wait_until(lambda: val(parse(scrape(aport)), "moongate_active_connections") == 3,
                           5, what="3 active connections")
            finally:
                for c in conns:
                    c.close()
            wait_until(lambda: val(parse(scrape(aport)), "moongate_active_connections") == 0,
                       5, what="0 active connections")
            # A request in flight holds its generation across a reload.
            slow = Client(gw.port, timeout=10)
            slow.send(b"GET /x/slow?delay=1.5 HTTP/1.1\r\nHost: a\r\n\r\n")
            time.sleep(0.3)
            gw.reload(conf + "\n-- edited\n")
            assert val(parse(scrape(aport)), "moongate_generations_alive") == 3
            assert slow.read_response().status == 200
            slow.close()
            wait_until(lambda: val(parse(scrape(aport)), "moongate_generations_alive") == 2,
                       5, what="the old generation to be released")


def test_reloads_restarts_and_config_hash_are_reported_and_counts_survive_reload():
    aport = free_port()
    with Upstream() as up:
        conf = config_text(None, up.addr, aport)
        with Gateway(conf, workers=2) as gw:
            for i in range(7):
                request(gw.port, "GET", "/x/%d" % i)
            s = parse(scrape(aport))
            old_hash = [dict(l)["hash"] for (n, l) in s if n == "moongate_config_info"]
            assert len(old_hash) == 1 and len(old_hash[0]) == 64, old_hash
            gw.reload(config_text(None, up.addr, aport, '{ path = "/y", upstream = "up" }'))
            os.kill(gw.worker_pids()[0], signal.SIGKILL)
            wait_until(lambda: len(gw.worker_pids()) == 2 and val(
                parse(scrape(aport)), "moongate_worker_restarts_total") == 1, 10,
                what="the restart to be counted")
            gw.wait_ready()
            with open(gw.conf_path, "a") as f:
                f.write("}")
            gw.signal(signal.SIGHUP)
            gw.wait_log("reload refused")
            s = parse(scrape(aport))
            assert val(s, "moongate_config_reloads_total", result="success") == 1
            assert val(s, "moongate_config_reloads_total", result="failure") == 1
            new_hash = [dict(l)["hash"] for (n, l) in s if n == "moongate_config_info"]
            assert len(new_hash) == 1 and new_hash != old_hash, (old_hash, new_hash)
            assert val(s, "moongate_http_requests_total", route="/x/*", method="GET",
                       status="2xx") == 7
            assert request(gw.port, "GET", "/y").status == 200
            assert val(parse(scrape(aport)), "moongate_http_requests_total", route="/y",
                       method="GET", status="2xx") == 1


def test_route_names_with_quotes_and_backslashes_are_escaped():
    aport = free_port()
    routes = [route("/q/*", name='we"ird\\name'), route("/x/*")]
    with proxied(routes, admin={"listen": "127.0.0.1:%d" % aport, "token": TOKEN}) as (gw, up):
        assert request(gw.port, "GET", "/q/1").status == 200
        text = scrape(aport)
        assert 'route="we\\"ird\\\\name"' in text, text
        s = parse(text)
        assert val(s, "moongate_http_requests_total", route='we\\"ird\\\\name', method="GET",
                   status="2xx") == 1
        check_with_promtool(text)


def check_with_promtool(text):
    p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, "promtool check metrics failed:\n%s%s" % (p.stdout, p.stderr)
    # promtool prints lint findings (and exits 0 for some): there must be none.
    assert p.stdout.strip() == "" and p.stderr.strip() == "", (p.stdout, p.stderr)


def test_promtool_accepts_the_exposition():
    aport = free_port()
    with proxied([route("/x/*")], workers=2,
                 admin={"listen": "127.0.0.1:%d" % aport, "token": TOKEN}) as (gw, up):
        for i in range(5):
            request(gw.port, "GET", "/x/%d" % i)
            request(gw.port, "POST", "/nope", body=b"x")
        check_with_promtool(scrape(aport))


def http_json(url, timeout=3):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def test_a_real_prometheus_server_scrapes_the_admin_listener():
    aport, pport = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="mg-prom-")
    try:
        with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
            f.write("""global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: moongate
    authorization:
      credentials: %s
    static_configs:
      - targets: ["127.0.0.1:%d"]
""" % (TOKEN, aport))
        with proxied([route("/x/*")], workers=2,
                     admin={"listen": "127.0.0.1:%d" % aport, "token": TOKEN}) as (gw, up):
            for i in range(3):
                assert request(gw.port, "GET", "/x/%d" % i).status == 200
            prom = spawn(["prometheus", "--config.file=" + os.path.join(tmp, "prometheus.yml"),
                          "--storage.tsdb.path=" + os.path.join(tmp, "data"),
                          "--web.listen-address=127.0.0.1:%d" % pport, "--log.level=warn"],
                         "prometheus", stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(tmp, "prom.log"), "wb"),
                         stdin=subprocess.DEVNULL)
            try:
                base = "http://127.0.0.1:%d" % pport

                def target_up():
                    try:
                        t = http_json(base + "/api/v1/targets")["data"]["activeTargets"]
                    except OSError:
                        return None
                    return t and t[0]["health"] == "up" and t[0]
                t = wait_until(target_up, 30, interval=0.5, what="Prometheus to scrape moongate")
                assert t["scrapeUrl"] == "http://127.0.0.1:%d/metrics" % aport, t
                assert t["lastError"] == "", t

                def query():
                    q = urllib.request.quote(
                        'moongate_http_requests_total{route="/x/*",method="GET",status="2xx"}')
                    res = http_json(base + "/api/v1/query?query=" + q)["data"]["result"]
                    return res and res[0]["value"][1]
                assert wait_until(query, 20, interval=0.5, what="the sample in Prometheus") == "3"
            finally:
                prom.send_signal(signal.SIGTERM)
                try:
                    prom.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    _kill_group(prom)
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_recording_is_off_without_an_admin_listener():
    aport = free_port()
    with Upstream() as up:
        conf = {"upstreams": {"up": upstream_conf(up.addr)}, "routes": [route("/x/*")]}
        with Gateway(conf) as gw:
            for i in range(4):
                assert request(gw.port, "GET", "/x/%d" % i).status == 200
            # Turned on by a reload: counting starts from there.
            conf["admin"] = {"listen": "127.0.0.1:%d" % aport, "token": TOKEN}
            gw.reload(conf)
            wait_until(lambda: _answers(aport), 5, what="the admin listener")
            assert request(gw.port, "GET", "/x/9").status == 200
            s = parse(scrape(aport))
            assert val(s, "moongate_http_requests_total", route="/x/*", method="GET",
                       status="2xx") == 1


def _answers(port):
    try:
        scrape(port)
        return True
    except OSError:
        return False


COUNTER_PLUGIN = """local gw = require("moongate.gw")
local hits = gw.metrics.counter("team_hits_total", "Hits by kind.", { "kind" })
local P = { name = "counting", priority = 5, schema = { fields = {} } }
function P.access(conf, ctx)
    hits:inc(1, { gw.request.get_header(ctx, "x-kind") or "none" })
end
return P
"""


def test_plugin_counters_rate_limit_decisions_and_auth_failures():
    import test_auth
    aport = free_port()
    with Upstream() as up:
        conf = {"admin": {"listen": "127.0.0.1:%d" % aport, "token": TOKEN},
                "shared": {"limits": "1m"}, "plugin_paths": ["plugins"],
                "upstreams": {"up": upstream_conf(up.addr)},
                "routes": [route("/c/*", name="counted", plugins={"counting": True}),
                           route("/rl", plugins={"rate-limit": {"limit": 3, "window": 3600}}),
                           route("/jwt", plugins={"jwt-auth": {"keys": {"k": {
                               "secret": test_auth.SECRET, "algorithms": ["HS256"]}}}})]}
        gw = Gateway(conf, workers=2)
        os.makedirs(os.path.join(gw.dir, "plugins"))
        with open(os.path.join(gw.dir, "plugins", "counting.lua"), "w") as f:
            f.write(COUNTER_PLUGIN)
        with gw:
            for i in range(10):
                request(gw.port, "GET", "/c/x", headers=[("X-Kind", "a" if i < 7 else 'q"b')])
            statuses = [request(gw.port, "GET", "/rl").status for _ in range(5)]
            assert statuses == [200, 200, 200, 429, 429], statuses
            good = test_auth.jwt(test_auth.claims(), kid="k")
            assert request(gw.port, "GET", "/jwt", headers=test_auth.bearer(good)).status == 200
            assert request(gw.port, "GET", "/jwt").status == 401
            bad = test_auth.jwt(test_auth.claims(), kid="k", secret="nope")
            for _ in range(2):
                assert request(gw.port, "GET", "/jwt",
                               headers=test_auth.bearer(bad)).status == 401
            # A reload re-runs counter() in every worker: same counters.
            gw.reload(conf)
            request(gw.port, "GET", "/c/x", headers=[("X-Kind", "a")])
            text = scrape(aport)
            check_with_promtool(text)
            s = parse(text)
            assert val(s, "team_hits_total", kind="a") == 8, text
            assert val(s, "team_hits_total", kind='q\\"b') == 3, text
            rl = "moongate_ratelimit_decisions_total"
            assert val(s, rl, route="/rl", decision="allowed") == 3, text
            assert val(s, rl, route="/rl", decision="limited") == 2, text
            af = "moongate_auth_failures_total"
            assert val(s, af, route="/jwt", plugin="jwt-auth", reason="missing token") == 1, text
            assert val(s, af, route="/jwt", plugin="jwt-auth",
                       reason="signature mismatch") == 2, text
            assert "# TYPE team_hits_total counter" in text


def test_target_health_and_breaker_state_are_reported():
    aport, dead = free_port(), free_port()  # nothing listens on `dead`
    with Upstream() as up:
        conf = """return {
  listen = "@LISTEN@", workers = 2, pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@",
  admin = { listen = "127.0.0.1:%d", token = "%s" },
  upstreams = { up = { targets = { "%s", "127.0.0.1:%d" },
                       passive = { failures = 1, down_for = 60 },
                       breaker = { failures = 1, open_for = 60 } } },
  routes = { { path = "/x/*", upstream = "up" } },
}
""" % (aport, TOKEN, up.addr, dead)
        with Gateway(conf) as gw:
            for i in range(20):
                request(gw.port, "GET", "/x/%d" % i)
            text = scrape(aport)
            s = parse(text)
            live, gone = dict(upstream="up", target=up.addr), \
                dict(upstream="up", target="127.0.0.1:%d" % dead)
            assert val(s, "moongate_upstream_target_up", **live) == 1, text
            assert val(s, "moongate_upstream_target_up", **gone) == 0, text
            assert val(s, "moongate_upstream_breaker_state", state="closed", **live) == 1
            assert val(s, "moongate_upstream_breaker_state", state="open", **gone) == 1, text
            assert val(s, "moongate_upstream_target_failures_total", **gone) >= 1
            assert val(s, "moongate_upstream_target_requests_total", **live) >= 10
            check_with_promtool(text)
