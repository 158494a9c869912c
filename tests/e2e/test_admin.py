"""The admin listener (served by the master): GET /status, GET /metrics,
POST /reload, the token, bad methods, paths and requests, loopback-only
binding, and reloads that are refused while the old config keeps serving."""

import hashlib
import os
import shutil
import signal
import subprocess
import time

from harness import (Client, Gateway, Upstream, free_port, moongate_bin, proxied,
                     request, route, upstream_conf, wait_until, write_file)

TOKEN = "t0ken-for-tests"


def admin(port, method="GET", path="/status", token=TOKEN, body=None, headers=None):
    hdrs = list(headers or [])
    if token is not None:
        hdrs.append(("Authorization", "Bearer " + token))
    return request(port, method, path, headers=hdrs, body=body, host="127.0.0.1")


def admin_conf(port, token=TOKEN):
    conf = {"listen": "127.0.0.1:%d" % port}
    if token:
        conf["token"] = token
    return conf


def test_status_reports_version_hash_generation_workers_routes_and_upstreams():
    aport = free_port()
    routes = [route("/users/{id}", methods=["GET", "POST"], plugins={"request-id": True}),
              route("/x/*", name="x-all")]
    with proxied(routes, workers=2, admin=admin_conf(aport)) as (gw, up):
        r = admin(aport)
        assert r.status == 200 and r.header("content-type") == "application/json", r
        st = r.json()
        assert st["version"] == "0.1.0", st
        with open(gw.conf_path, "rb") as f:
            assert st["config_hash"] == hashlib.sha256(f.read()).hexdigest(), st
        assert st["generation"] == 1 and st["master_pid"] == gw.pid, st
        pids = sorted(w["pid"] for w in st["workers"])
        assert pids == sorted(gw.worker_pids()), (pids, gw.worker_pids())
        assert [w["restarts"] for w in st["workers"]] == [0, 0], st
        assert all(w["running"] for w in st["workers"]), st
        by_path = {rt["path"]: rt for rt in st["routes"]}
        users = by_path["/users/{id}"]
        assert users["methods"] == ["GET", "POST"] and users["upstream"] == "up", users
        chain = users["plugin_chain"]
        assert chain["plugins"] == ["request-id"], chain
        assert [p["name"] for p in chain["phases"]["rewrite"]] == ["request-id"], chain
        assert chain["phases"]["access"] == [] and chain["handler"] is False, chain
        assert by_path["/x/*"]["name"] == "x-all", by_path
        ups = {u["name"]: u for u in st["upstreams"]}
        t = ups["up"]["targets"]
        assert [(x["address"], x["weight"]) for x in t] == [(up.addr, 1)], ups
        assert t[0]["healthy"] is True and t[0]["breaker"] == "closed", ups
        assert t[0]["inflight"] == 0 and ups["up"]["health_checks"] is False, ups
        assert st["last_reload"] is None, st
        assert ups["up"]["balance"] == "round_robin", ups


def test_token_is_required_and_compared_exactly():
    aport = free_port()
    with proxied(admin=admin_conf(aport)) as (gw, up):
        for token in (None, "wrong", TOKEN + "x", TOKEN[:-1], ""):
            for method, path in (("GET", "/status"), ("GET", "/metrics"), ("POST", "/reload"),
                                 ("GET", "/nope")):
                r = admin(aport, method, path, token=token)
                assert r.status == 401, (token, path, r)
                assert r.json() == {"error": "missing or wrong admin token"}, r
                assert r.header("www-authenticate", "").startswith("Bearer"), r
        # Basic instead of Bearer is not accepted either.
        r = admin(aport, token=None, headers=[("Authorization", "Basic " + TOKEN)])
        assert r.status == 401, r
        assert admin(aport).status == 200
        # No reload happened through any of the refused requests.
        assert admin(aport).json()["reloads"] == {"success": 0, "failure": 0}


def test_without_a_token_the_loopback_listener_answers_anyone_local():
    aport = free_port()
    with proxied(admin=admin_conf(aport, token=None)) as (gw, up):
        assert admin(aport, token=None).status == 200
        assert admin(aport, path="/metrics", token=None).status == 200


def test_wrong_method_unknown_path_and_bad_requests_get_json_errors():
    aport = free_port()
    with proxied(admin=admin_conf(aport)) as (gw, up):
        for method, path, allow in (("POST", "/status", "GET"), ("DELETE", "/metrics", "GET"),
                                    ("GET", "/reload", "POST"), ("PUT", "/reload", "POST")):
            r = admin(aport, method, path, body=b"" if method != "GET" else None)
            assert r.status == 405, (method, path, r)
            assert r.header("allow") == allow, r
            assert r.json() == {"error": "%s takes %s only" % (path, allow)}, r
        for path in ("/statusx", "/status/", "/admin/status", "/metrics/../status"):
            r = admin(aport, "GET", path)
            assert r.status == 404 and "no such admin endpoint" in r.json()["error"], (path, r)
        # The query string is ignored.
        assert admin(aport, "GET", "/status?x=1").status == 200
        # Malformed request line, unsupported framing, oversized body.
        with Client(aport) as c:
            c.send(b"GARBAGE\r\n\r\n")
            r = c.read_response()
            assert r.status == 400 and r.json() == {"error": "malformed request line"}, r
        r = admin(aport, "POST", "/reload", headers=[("Transfer-Encoding", "chunked")],
                  body=b"0\r\n\r\n")
        assert r.status == 400 and "Transfer-Encoding" in r.json()["error"], r
        r = admin(aport, "POST", "/reload", headers=[("Content-Length", "1000000")])
        assert r.status == 413, r
        with Client(aport) as c:
            c.send(b"GET /status HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
            assert c.read_response().status == 431
        # Still serving after all that.
        assert admin(aport).status == 200


def test_post_reload_applies_a_new_config_and_answers_with_the_result():
    aport = free_port()
    with Upstream() as up:
        conf = {"admin": admin_conf(aport), "upstreams": {"up": upstream_conf(up.addr)},
                "routes": [route("/a/*")]}
        with Gateway(conf, workers=2) as gw:
            assert request(gw.port, "GET", "/b/1").status == 404
            conf["routes"] = [route("/a/*"), route("/b/*")]
            gw.write_config(conf)
            since = gw.log_size()
            r = admin(aport, "POST", "/reload")
            assert r.status == 200, r
            body = r.json()
            assert body["reloaded"] is True and body["generation"] == 2, body
            assert body["routes"] == 2 and body["workers"] == 2, body
            with open(gw.conf_path, "rb") as f:
                assert body["config_hash"] == hashlib.sha256(f.read()).hexdigest()
            gw.wait_generation(1, since)
            assert request(gw.port, "GET", "/b/1").status == 200
            st = admin(aport).json()
            assert st["generation"] == 2 and st["reloads"] == {"success": 1, "failure": 0}
            assert sorted(rt["path"] for rt in st["routes"]) == ["/a/*", "/b/*"], st


def test_a_broken_config_is_refused_with_its_message_and_the_old_one_keeps_serving():
    aport = free_port()
    with Upstream() as up:
        conf = {"admin": admin_conf(aport), "upstreams": {"up": upstream_conf(up.addr)},
                "routes": [route("/a/*")]}
        with Gateway(conf, workers=2) as gw:
            good_hash = admin(aport).json()["config_hash"]
            # A Lua syntax error.
            with open(gw.conf_path, "a") as f:
                f.write("}}\n")
            r = admin(aport, "POST", "/reload")
            assert r.status == 400, r
            body = r.json()
            assert body["reloaded"] is False and body["generation"] == 1, body
            assert body["error"].startswith(gw.conf_path + ":"), body
            assert request(gw.port, "GET", "/a/1").status == 200
            # A field error names the route and the field.
            bad = dict(conf, routes=[route("/a/*"), route("/c/*", upstream="nope")])
            gw.write_config(bad)
            r = admin(aport, "POST", "/reload")
            assert r.status == 400, r
            assert r.json()["error"] == ('%s: routes[2] "/c/*": upstream: no upstream named '
                                         '"nope"' % gw.conf_path), r.json()
            # A plugin config error.
            gw.write_config(dict(conf, routes=[route("/a/*", plugins={"rate-limit": {
                "limits": "lots"}})]))
            r = admin(aport, "POST", "/reload")
            assert r.status == 400 and "plugins.rate-limit" in r.json()["error"], r
            assert request(gw.port, "GET", "/a/1").status == 200
            st = admin(aport).json()
            assert st["generation"] == 1 and st["config_hash"] == good_hash, st
            assert st["reloads"] == {"success": 0, "failure": 3}, st
            assert [rt["path"] for rt in st["routes"]] == ["/a/*"], st
            metrics = admin(aport, path="/metrics").body.decode()
            assert 'moongate_config_reloads_total{result="failure"} 3' in metrics
            assert 'moongate_config_info{hash="%s"} 1' % good_hash in metrics
            assert "reload refused" in gw.error_log_text()


def test_an_edited_plugin_script_that_breaks_is_refused_and_the_old_one_keeps_serving():
    aport = free_port()
    plugin = """local gw = require("moongate.gw")
local P = { name = "tagger", priority = 10, schema = { fields = {
    tag = { type = "string", default = "one", description = "tag" } } } }
function P.header_filter(conf, ctx) gw.response.set_header(ctx, "X-Tag", conf.tag) end
return P
"""
    with Upstream() as up:
        conf = {"admin": admin_conf(aport), "upstreams": {"up": upstream_conf(up.addr)},
                "plugin_paths": ["plugins"],
                "routes": [route("/a/*", plugins={"tagger": True})]}
        gw = Gateway(conf, workers=2)
        os.makedirs(os.path.join(gw.dir, "plugins"))
        path = write_file(os.path.join(gw.dir, "plugins"), "tagger.lua",
                          plugin)
        with gw:
            assert request(gw.port, "GET", "/a/1").header("x-tag") == "one"
            write_file(os.path.dirname(path), "tagger.lua", "return { name = ")
            r = admin(aport, "POST", "/reload")
            assert r.status == 400, r
            assert path in r.json()["error"], r.json()
            assert request(gw.port, "GET", "/a/1").header("x-tag") == "one"
            # Fixed: the edit takes effect.
            write_file(os.path.dirname(path), "tagger.lua",
                       plugin.replace('default = "one"', 'default = "two"'))
            since = gw.log_size()
            assert admin(aport, "POST", "/reload").status == 200
            gw.wait_generation(1, since)
            assert request(gw.port, "GET", "/a/1").header("x-tag") == "two"


def test_a_non_loopback_admin_address_is_a_config_error_unless_allowed():
    gw = Gateway({"admin": {"listen": "0.0.0.0:%d" % free_port()}})
    out = subprocess.run([moongate_bin(), "check", "-c", gw.conf_path],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 1, out
    assert ('%s: top level: admin.listen: "0.0.0.0:' % gw.conf_path) in out.stderr, out.stderr
    assert "is not a loopback address" in out.stderr and "allow_remote" in out.stderr
    gw.write_config({"admin": {"listen": "0.0.0.0:%d" % free_port(), "allow_remote": True,
                               "token": TOKEN}})
    out = subprocess.run([moongate_bin(), "check", "-c", gw.conf_path],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out
    shutil.rmtree(gw.dir)


def test_an_admin_port_in_use_stops_the_start_with_a_message():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        gw = Gateway({"admin": {"listen": "127.0.0.1:%d" % s.getsockname()[1]}})
        out = subprocess.run([moongate_bin(), "-c", gw.conf_path], capture_output=True,
                             text=True, timeout=20)
        assert out.returncode == 1, out
        log = gw.error_log_text()
        assert "cannot listen on admin address 127.0.0.1:%d" % s.getsockname()[1] in log, log
        assert not os.path.exists(gw.pid_file)
        shutil.rmtree(gw.dir)
    finally:
        s.close()


def test_reload_moves_the_admin_listener_and_changes_the_token():
    aport, aport2 = free_port(), free_port()
    with Upstream() as up:
        conf = {"admin": admin_conf(aport), "upstreams": {"up": upstream_conf(up.addr)},
                "routes": [route("/a/*")]}
        with Gateway(conf) as gw:
            gw.write_config(dict(conf, admin={"listen": "127.0.0.1:%d" % aport2,
                                              "token": "new"}))
            r = admin(aport, "POST", "/reload")
            assert r.status == 200, r
            def answers():
                try:
                    return admin(aport2, token="new").status == 200
                except OSError:
                    return False
            wait_until(answers, 5, what="the admin listener on its new port")
            assert admin(aport2).status == 401
            try:
                admin(aport)
                raise AssertionError("the old admin port still answers")
            except OSError:
                pass
            # SIGHUP applies admin changes too: token back to the default.
            gw.write_config(dict(conf, admin=admin_conf(aport2)))
            gw.reload()
            wait_until(lambda: admin(aport2).status == 200, 5, what="the old token again")


def test_a_killed_worker_is_counted_in_status_and_metrics():
    aport = free_port()
    with proxied(workers=2, admin=admin_conf(aport)) as (gw, up):
        st = admin(aport).json()
        victim = st["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)

        def restarted():
            w = admin(aport).json()["workers"][0]
            return w["pid"] not in (0, victim) and w["running"] and w
        w = wait_until(restarted, 10, what="the worker to be restarted")
        assert w["restarts"] == 1, w
        assert admin(aport).json()["workers"][1]["restarts"] == 0
        text = admin(aport, path="/metrics").body.decode()
        assert "moongate_worker_restarts_total 1\n" in text, text
        assert request(gw.port, "GET", "/x").status == 200


TAGGER = """local gw = require("moongate.gw")
local P = { name = "tagger", priority = 10, schema = { fields = {
    tag = { type = "string", default = "%s", description = "tag" } } } }
function P.header_filter(conf, ctx) gw.response.set_header(ctx, "X-Tag", conf.tag) end
return P
"""


def test_reload_under_load_loses_nothing_and_keeps_rate_limit_counters():
    """wrk at 64 connections for 20 s while the config is rewritten and
    POST /reload applied 20 times (routes added and removed, a plugin script
    edited): no non-2xx response, no socket error; a rate-limit counter
    counted before the reloads is still there after them."""
    import threading
    from harness import WRK_COUNT_SCRIPT, run_wrk
    aport = free_port()
    with Upstream() as up:
        def conf(i):
            extra = [route("/r%d/*" % k) for k in range(i % 4)]
            return {"admin": admin_conf(aport), "workers": 2,
                    "shared": {"limits": "1m"},
                    "upstreams": {"up": upstream_conf(up.addr)},
                    "plugin_paths": ["plugins"],
                    "routes": [route("/a/*", plugins={"tagger": True}),
                               route("/rl", plugins={"rate-limit": {"limit": 10,
                                                                    "window": 3600}})]
                    + extra}
        gw = Gateway(conf(0), workers=2)
        pdir = os.path.join(gw.dir, "plugins")
        os.makedirs(pdir)
        write_file(pdir, "tagger.lua", TAGGER % "v0")
        script = write_file(gw.dir, "count.lua", WRK_COUNT_SCRIPT)
        with gw:
            for _ in range(4):
                assert request(gw.port, "GET", "/rl").status == 200
            result = {}
            t = threading.Thread(target=lambda: result.setdefault(
                "wrk", run_wrk("http://127.0.0.1:%d/a/x" % gw.port, conns=64, duration=20,
                               script=script)))
            t.start()
            try:
                time.sleep(1)
                answers = []
                for i in range(1, 21):
                    write_file(pdir, "tagger.lua", TAGGER % ("v%d" % i))
                    gw.write_config(conf(i))
                    r = admin(aport, "POST", "/reload")
                    answers.append((r.status, r.json()))
                    time.sleep(0.8)
            finally:
                t.join(60)
            assert all(s == 200 and b["reloaded"] for s, b in answers), answers
            assert answers[-1][1]["generation"] == 21, answers[-1]
            res = result["wrk"]
            print("reload under load: %d requests in 20 s, 20 reloads" % res.requests)
            assert res.requests > 1000, res.text
            assert res.non2xx == 0 and res.values.get("non2xx") == "0", res.text
            assert not any(res.socket_errors.values()), res.text
            # The last plugin edit is what answers now (every worker).
            wait_until(lambda: all(request(gw.port, "GET", "/a/y").header("x-tag") == "v20"
                                   for _ in range(6)), 10, what="the last plugin edit")
            # 4 counted before the reloads: 6 left of 10.
            statuses = [request(gw.port, "GET", "/rl").status for _ in range(8)]
            assert statuses == [200] * 6 + [429] * 2, statuses
            assert admin(aport).json()["reloads"] == {"success": 20, "failure": 0}


def test_reload_that_changes_the_workers_replaces_them_and_one_that_cannot_listen_is_a_500():
    import socket
    aport = free_port()
    with Upstream() as up:
        conf = {"admin": admin_conf(aport), "workers": 1,
                "upstreams": {"up": upstream_conf(up.addr)}, "routes": [route("/a/*")]}
        with Gateway(conf, workers=1) as gw:
            old = admin(aport).json()["workers"][0]["pid"]
            gw.write_config(dict(conf, workers=2))
            r = admin(aport, "POST", "/reload")
            assert r.status == 200 and r.json()["workers"] == 2, r
            st = admin(aport).json()
            assert len(st["workers"]) == 2 and old not in [w["pid"] for w in st["workers"]], st
            gw.workers = 2
            wait_until(lambda: old not in gw.worker_pids() and len(gw.worker_pids()) == 2, 10,
                       what="the old worker to drain and the new ones to run")
            wait_until(lambda: not admin(aport).json()["draining_workers"], 5,
                       what="no worker draining")
            assert request(gw.port, "GET", "/a/1").status == 200
            # A new listen address that is taken: valid config, cannot apply.
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            try:
                taken = "127.0.0.1:%d" % s.getsockname()[1]
                gw.write_config(dict(conf, workers=2,
                                     listen=["127.0.0.1:%d" % gw.port, taken]))
                r = admin(aport, "POST", "/reload")
                assert r.status == 500, r
                assert r.json()["reloaded"] is False, r
                assert "listeners could not be opened: Address already in use" in \
                    r.json()["error"], r
            finally:
                s.close()
            st = admin(aport).json()
            assert st["generation"] == 2 and st["reloads"] == {"success": 1, "failure": 1}, st
            assert sorted(w["pid"] for w in st["workers"]) == sorted(gw.worker_pids())
            assert request(gw.port, "GET", "/a/1").status == 200


def test_watch_reloads_when_the_config_file_changes_once_per_burst_of_writes():
    aport = free_port()
    with Upstream() as up:
        conf = {"admin": admin_conf(aport), "watch": True, "workers": 2,
                "upstreams": {"up": upstream_conf(up.addr)}, "routes": [route("/a/*")]}
        with Gateway(conf, workers=2) as gw:
            gw.wait_log("watching .*moongate.lua for changes")
            since = gw.log_size()
            # A burst of writes (as an editor or a deploy makes): one reload.
            for extra in ("/b/*", "/c/*", "/d/*"):
                gw.write_config(dict(conf, routes=[route("/a/*"), route(extra)]))
                time.sleep(0.02)
            gw.wait_generation(1, since)
            assert request(gw.port, "GET", "/d/1").status == 200
            assert request(gw.port, "GET", "/b/1").status == 404
            time.sleep(0.6)
            assert admin(aport).json()["reloads"] == {"success": 1, "failure": 0}
            # A broken save is refused; the running config keeps serving.
            with open(gw.conf_path, "a") as f:
                f.write("}")
            gw.wait_log("reload refused", since=since)
            assert request(gw.port, "GET", "/d/1").status == 200
            assert admin(aport).json()["reloads"]["failure"] == 1
            # Other files in the directory do not trigger anything.
            write_file(gw.dir, "other.lua", "return 1")
            # watch = false (applied by a reload) stops watching.
            since = gw.log_size()
            gw.write_config(dict(conf, watch=False))
            gw.wait_generation(2, since)
            gw.wait_log("no longer watching", since=since)
            gw.write_config(dict(conf, watch=False, routes=[route("/e/*")]))
            time.sleep(1)
            assert request(gw.port, "GET", "/e/1").status == 404
            assert admin(aport).json()["reloads"] == {"success": 2, "failure": 1}
