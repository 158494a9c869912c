"""The process model: worker replacement after kill -9, reload (SIGHUP) with
generations swapped inside running workers, reload under wrk load, in-flight
requests across reloads and SIGTERM, bad configs, and the CLI (check,
reload, stop, version)."""

import os
import signal
import subprocess
import tempfile
import threading
import time

from harness import Client, Gateway, Upstream, WRK_COUNT_SCRIPT, assert_gateway_error, \
    children, free_port, moongate_bin, pid_alive, request, route, run_wrk, spawn, upstream_conf, \
    upstream_saw, wait_until, write_file, SANITIZER_MARKS


def base_conf(up, routes=None, **kw):
    c = {"upstreams": {"up": upstream_conf(up.addr)},
         "routes": routes if routes is not None else [route("/users/*")],
         "limits": {"drain_timeout": 10}}
    c.update(kw)
    return c


class Loop:
    """Client threads sending requests in a loop until stopped; each result
    is recorded as (start time, end time, ok, detail)."""

    def __init__(self, port, path, threads=4, keepalive=False):
        self.port = port
        self.path = path
        self.keepalive = keepalive
        self.results = []
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self):
        c = None
        while not self.stop_ev.is_set():
            t0 = time.monotonic()
            ok, detail = False, ""
            try:
                if c is None:
                    c = Client(self.port, timeout=5)
                hdrs = [] if self.keepalive else [("Connection", "close")]
                r = c.request("GET", self.path, headers=hdrs)
                ok = r.status == 200
                detail = r.status
                if not self.keepalive or not ok:
                    c.close()
                    c = None
            except Exception as e:  # noqa: BLE001
                detail = repr(e)
                if c:
                    c.close()
                c = None
            with self.lock:
                self.results.append((t0, time.monotonic(), ok, detail))
        if c:
            c.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_ev.set()
        for t in self.threads:
            t.join(10)
        return False


# ---------------------------------------------------------------- workers


def test_configured_number_of_workers_is_started():
    with Upstream() as up:
        with Gateway(base_conf(up), workers=3) as gw:
            assert len(gw.worker_pids()) == 3, gw.worker_pids()


def test_killed_worker_is_replaced_and_the_gateway_keeps_answering():
    with Upstream() as up:
        with Gateway(base_conf(up), workers=2) as gw:
            before = gw.worker_pids()
            assert len(before) == 2, before
            victim = before[0]
            with Loop(gw.port, "/users/1", threads=4) as load:
                time.sleep(0.5)
                os.kill(victim, signal.SIGKILL)
                wait_until(lambda: not pid_alive(victim), 5, what="the killed worker to die")
                t_dead = time.monotonic()
                new = wait_until(lambda: [p for p in gw.worker_pids() if p not in before], 5,
                                 what="a replacement worker")
                time.sleep(1.0)
            after = gw.worker_pids()
            assert len(after) == 2 and victim not in after and new[0] in after, (before, after)
            res = load.results
            assert len(res) > 20, "the load loop barely ran: %d requests" % len(res)
            # In flight on the killed worker may fail; anything started after
            # its death must succeed.
            late_failures = [r for r in res if r[0] > t_dead and not r[2]]
            assert not late_failures, "%d requests started after the kill failed, e.g. %r" % (
                len(late_failures), late_failures[:3])
            assert [r for r in res if r[0] > t_dead and r[2]], "no request succeeded after the kill"
            # The replacement itself serves: kill the surviving original too.
            survivor = [p for p in before if p != victim][0]
            os.kill(survivor, signal.SIGKILL)
            wait_until(lambda: not pid_alive(survivor), 5, what="the second worker to die")
            r = request(gw.port, "GET", "/users/2", timeout=5)
            assert upstream_saw(r)["path"] == "/users/2"
            wait_until(lambda: len(gw.worker_pids()) == 2, 5, what="two workers again")


# ---------------------------------------------------------------- reload


def test_reload_switches_routes_for_new_requests_without_replacing_workers():
    with Upstream() as up:
        with Gateway(base_conf(up), workers=2) as gw:
            pids = gw.worker_pids()
            assert request(gw.port, "GET", "/users/1").status == 200
            assert_gateway_error(request(gw.port, "GET", "/orders/1"), 404)
            gw.reload(base_conf(up, [route("/orders/*")]))
            assert upstream_saw(request(gw.port, "GET", "/orders/1"))["path"] == "/orders/1"
            assert_gateway_error(request(gw.port, "GET", "/users/1"), 404)
            assert gw.worker_pids() == pids, "workers were replaced by a reload"


def test_reload_switches_upstream_targets():
    with Upstream(ports=2) as up:
        conf = {"upstreams": {"up": upstream_conf(up.addrs()[0])}, "routes": [route("/*")]}
        with Gateway(conf) as gw:
            assert upstream_saw(request(gw.port, "GET", "/t"))["port"] == up.ports[0]
            conf["upstreams"]["up"] = upstream_conf(up.addrs()[1])
            gw.reload(conf)
            for _ in range(3):
                assert upstream_saw(request(gw.port, "GET", "/t"))["port"] == up.ports[1]


def test_keep_alive_connection_survives_a_reload_and_sees_the_new_routes():
    with Upstream() as up:
        with Gateway(base_conf(up), workers=2) as gw:
            clients = [Client(gw.port) for _ in range(4)]
            try:
                for c in clients:
                    assert c.request("GET", "/users/1").status == 200
                gw.reload(base_conf(up, [route("/users/*"), route("/fresh")]))
                for c in clients:
                    r = c.request("GET", "/fresh")
                    assert upstream_saw(r)["path"] == "/fresh"
                    assert "close" not in (r.header("connection") or "").lower(), r
            finally:
                for c in clients:
                    c.close()


def test_request_in_flight_during_a_reload_completes():
    with Upstream() as up:
        with Gateway(base_conf(up)) as gw:
            result = {}

            def slow():
                try:
                    result["r"] = request(gw.port, "GET", "/users/slow?delay=3", timeout=15)
                except Exception as e:  # noqa: BLE001
                    result["e"] = e

            t = threading.Thread(target=slow, daemon=True)
            t.start()
            wait_until(lambda: up.stats()["requests"] == 1, 5, what="the slow request upstream")
            # The new generation does not even have the route any more.
            gw.reload(base_conf(up, [route("/other")]))
            assert_gateway_error(request(gw.port, "GET", "/users/1"), 404)
            t.join(15)
            assert "e" not in result, "slow request failed across the reload: %r" % result.get("e")
            assert upstream_saw(result["r"])["path"] == "/users/slow?delay=3"


test_request_in_flight_during_a_reload_completes.timeout = 40


def test_reload_with_an_invalid_config_keeps_the_old_generation_serving():
    with Upstream() as up:
        with Gateway(base_conf(up), workers=2) as gw:
            pids = gw.worker_pids()
            bad_configs = [
                "return { listen = { '@LISTEN@' }, routes = { { path = '/x', upstream = 'nope' } } }",
                "return { this is not lua",
                "error('config raised an error')",
            ]
            for bad in bad_configs:
                gens = gw.generations()
                since = gw.log_size()
                gw.write_config(bad)
                gw.signal(signal.SIGHUP)
                gw.wait_log(r"\[error\]", since=since)
                time.sleep(0.2)
                assert gw.generations() == gens, "a bad config became a generation: %s" % bad
                r = request(gw.port, "GET", "/users/1")
                assert upstream_saw(r)["path"] == "/users/1", (bad, r)
                assert gw.worker_pids() == pids
            # And a good config after the bad ones is taken.
            gw.reload(base_conf(up, [route("/users/*"), route("/good")]))
            assert request(gw.port, "GET", "/good").status == 200


def test_reload_under_wrk_load_loses_no_request_and_no_connection():
    with Upstream() as up:
        base_routes = [route("/users/*")]
        with Gateway(base_conf(up, base_routes), workers=2) as gw:
            script = write_file(gw.dir, "count.lua", WRK_COUNT_SCRIPT)
            clients = [Client(gw.port) for _ in range(4)]
            errors = []
            wrk_result = {}

            def wrk():
                try:
                    wrk_result["r"] = run_wrk("http://127.0.0.1:%d/users/1" % gw.port,
                                              threads=2, conns=64, duration=10, script=script)
                except BaseException as e:  # noqa: BLE001
                    wrk_result["e"] = e

            t = threading.Thread(target=wrk, daemon=True)
            try:
                for c in clients:
                    assert c.request("GET", "/users/0").status == 200
                t.start()
                time.sleep(1.0)
                for i in range(1, 6):
                    gw.reload(base_conf(up, base_routes + [route("/new%d" % i)]))
                    for k, c in enumerate(clients):
                        try:
                            r = c.request("GET", "/new%d" % i)
                            if r.status != 200:
                                errors.append("reload %d client %d: /new%d -> %d" % (
                                    i, k, i, r.status))
                            if i > 1:
                                r = c.request("GET", "/new%d" % (i - 1))
                                if r.status != 404:
                                    errors.append("reload %d client %d: removed /new%d -> %d" % (
                                        i, k, i - 1, r.status))
                        except Exception as e:  # noqa: BLE001
                            errors.append("reload %d client %d: %r" % (i, k, e))
                    time.sleep(1.2)
                t.join(40)
            finally:
                for c in clients:
                    c.close()
            assert "e" not in wrk_result, wrk_result.get("e")
            res = wrk_result["r"]
            assert not errors, errors
            assert res.requests > 1000, res.text
            assert res.non2xx == 0, res.text
            assert not any(res.socket_errors.values()), res.text
            assert res.values.get("non2xx") == "0", res.text
            assert res.values.get("closes") == "0", \
                "the gateway closed wrk's keep-alive connections:\n" + res.text
            assert max(gw.generations().values()) >= 6, gw.generations()


test_reload_under_wrk_load_loses_no_request_and_no_connection.timeout = 90


def test_new_connections_are_accepted_throughout_reloads():
    with Upstream() as up:
        with Gateway(base_conf(up), workers=2) as gw:
            with Loop(gw.port, "/users/1", threads=3) as load:
                for i in range(3):
                    gw.reload(base_conf(up, [route("/users/*"), route("/r%d" % i)]))
                    time.sleep(0.2)
            fails = [r for r in load.results if not r[2]]
            assert load.results and not fails, "%d of %d failed, e.g. %r" % (
                len(fails), len(load.results), fails[:3])


# ---------------------------------------------------------------- stop


def test_sigterm_drains_an_in_flight_request_then_exits_zero():
    with Upstream() as up:
        with Gateway(base_conf(up), workers=2) as gw:
            result = {}

            def slow():
                try:
                    result["r"] = request(gw.port, "GET", "/users/slow?delay=2", timeout=15)
                except Exception as e:  # noqa: BLE001
                    result["e"] = e

            t = threading.Thread(target=slow, daemon=True)
            t.start()
            wait_until(lambda: up.stats()["requests"] == 1, 5, what="the slow request upstream")
            gw.signal(signal.SIGTERM)
            t.join(15)
            code = gw.proc.wait(timeout=15)
            assert "e" not in result, "in-flight request failed on SIGTERM: %r" % result.get("e")
            r = result["r"]
            assert upstream_saw(r)["path"] == "/users/slow?delay=2"
            assert "close" in (r.header("connection") or "").lower(), \
                "the last response of a draining connection should say Connection: close: %r" % (
                    r.headers,)
            assert code == 0, "exit status %s" % code
            wait_until(lambda: not children(gw.pid), 3, what="the workers to be gone")


test_sigterm_drains_an_in_flight_request_then_exits_zero.timeout = 40


def test_sigterm_with_idle_keep_alive_connections_exits_without_waiting_for_them():
    with Upstream() as up:
        conf = base_conf(up)
        conf["limits"] = {"drain_timeout": 30, "keepalive_timeout": 60}
        with Gateway(conf) as gw:
            with Client(gw.port) as c:
                assert c.request("GET", "/users/1").status == 200
                gw.signal(signal.SIGTERM)
                # An idle connection has nothing to drain: far less than 30 s.
                code = gw.proc.wait(timeout=10)
                assert code == 0, code
                assert c.wait_closed(2), "idle client connection left open at exit"


def test_sigint_stops_gracefully_too():
    with Upstream() as up:
        with Gateway(base_conf(up)) as gw:
            assert request(gw.port, "GET", "/users/1").status == 200
            gw.signal(signal.SIGINT)
            assert gw.proc.wait(timeout=10) == 0


def test_listener_keeps_accepting_while_draining():
    # While a slow request drains, a new client is still accepted and
    # answered (or told to go away with an HTTP response), never refused.
    with Upstream() as up:
        with Gateway(base_conf(up)) as gw:
            result = {}

            def slow():
                result["r"] = request(gw.port, "GET", "/users/slow?delay=2", timeout=15)

            t = threading.Thread(target=slow, daemon=True)
            t.start()
            wait_until(lambda: up.stats()["requests"] == 1, 5, what="the slow request upstream")
            gw.signal(signal.SIGTERM)
            time.sleep(0.3)
            try:
                r = request(gw.port, "GET", "/users/late", timeout=10)
                late = r.status
            except ConnectionRefusedError:
                late = "refused"
            except Exception as e:  # noqa: BLE001
                late = repr(e)
            t.join(15)
            assert gw.proc.wait(timeout=15) == 0
            assert result["r"].status == 200
            assert late != "refused", "the listener was closed while draining"


test_listener_keeps_accepting_while_draining.timeout = 40


# ---------------------------------------------------------------- CLI


def run_cli(*args, timeout=20):
    p = spawn([moongate_bin()] + list(args), "moongate " + " ".join(args),
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("moongate %s did not finish in %ss" % (" ".join(args), timeout))
    out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    for mark in SANITIZER_MARKS:
        assert mark not in out + err, "sanitizer report from moongate %s:\n%s" % (args, err)
    return p.returncode, out, err


def test_version_prints_the_version():
    code, out, err = run_cli("version")
    assert code == 0, (code, out, err)
    assert "moongate" in out and any(ch.isdigit() for ch in out), out


def test_check_accepts_a_valid_config_and_prints_a_summary():
    with tempfile.TemporaryDirectory() as d:
        path = write_file(d, "ok.lua", """return {
  listen = { "127.0.0.1:18080" }, workers = 1,
  upstreams = { users = { targets = { "127.0.0.1:9001" } } },
  routes = { { path = "/users/*", upstream = "users" } },
}""")
        code, out, err = run_cli("check", "-c", path)
        assert code == 0, (code, out, err)
        assert out.strip(), "no summary on stdout"


def test_check_reports_every_error_with_file_place_and_field():
    with tempfile.TemporaryDirectory() as d:
        path = write_file(d, "bad.lua", """return {
  listen = { "127.0.0.1:18080" }, workers = 1,
  limits = { max_uri = "lots" },
  upstreams = { users = { targets = { "127.0.0.1:9001" } } },
  routes = {
    { path = "/users/*", upstream = "users" },
    { path = "/orders/*", upstream = "ordrs" },
  },
}""")
        code, out, err = run_cli("check", "-c", path)
        assert code == 1, (code, out, err)
        lines = [l for l in err.splitlines() if l.strip()]
        assert len(lines) >= 2, "expected one line per error (2 errors):\n" + err
        for l in lines:
            assert l.startswith(path + ": "), "line does not start with the file: %r" % l
            assert len(l[len(path) + 2:].split(": ")) >= 3, \
                "not 'FILE: <where>: <field>: <why>': %r" % l
        route_lines = [l for l in lines if "upstream" in l and "ordrs" in l]
        assert route_lines, "no error naming the route's upstream field:\n" + err
        assert "routes[2]" in route_lines[0] or "/orders/*" in route_lines[0], route_lines[0]
        assert any("max_uri" in l for l in lines), "no error naming max_uri:\n" + err


def test_check_rejects_a_lua_syntax_error():
    with tempfile.TemporaryDirectory() as d:
        path = write_file(d, "syntax.lua", "return { listen = { \"127.0.0.1:1\" ")
        code, out, err = run_cli("check", "-c", path)
        assert code == 1, (code, out, err)
        assert path in err, err


def test_start_with_an_invalid_config_fails_fast():
    with tempfile.TemporaryDirectory() as d:
        path = write_file(d, "bad.lua", "return { listen = { \"127.0.0.1:1\" }, "
                                        "routes = { { path = '/x', upstream = 'none' } } }")
        code, out, err = run_cli("-c", path, timeout=10)
        assert code != 0, (code, out, err)
        assert "none" in err or "upstream" in err, err


def test_reload_and_stop_commands_signal_the_master_through_the_pid_file():
    with Upstream() as up:
        with Gateway(base_conf(up)) as gw:
            wait_until(lambda: os.path.exists(gw.pid_file), 5, what="the pid file")
            with open(gw.pid_file) as f:
                assert int(f.read().strip()) == gw.pid
            before = max(gw.generations().values() or [0])
            since = gw.log_size()
            gw.write_config(base_conf(up, [route("/users/*"), route("/via-cli")]))
            code, out, err = run_cli("reload", "-c", gw.conf_path)
            assert code == 0, (code, out, err)
            gw.wait_generation(before, since)
            assert request(gw.port, "GET", "/via-cli").status == 200
            code, out, err = run_cli("stop", "-c", gw.conf_path)
            assert code == 0, (code, out, err)
            assert gw.proc.wait(timeout=15) == 0


def test_reload_that_changes_the_worker_count_replaces_the_workers():
    with Upstream() as up:
        with Gateway(base_conf(up), workers=1) as gw:
            old = gw.worker_pids()
            conf = base_conf(up)
            conf["workers"] = 2
            gw.write_config(conf)
            with Loop(gw.port, "/users/1", threads=2) as load:
                gw.signal(signal.SIGHUP)
                wait_until(lambda: len(gw.worker_pids()) == 2 and
                           not set(old) & set(gw.worker_pids()), 10,
                           what="two new workers replacing the old one")
                time.sleep(0.3)
            fails = [r for r in load.results if not r[2]]
            assert load.results and not fails, fails[:3]


def test_sigterm_gives_up_on_a_request_longer_than_drain_timeout():
    with Upstream() as up:
        conf = base_conf(up)
        conf["limits"] = {"drain_timeout": 1}
        with Gateway(conf) as gw:
            result = {}

            def slow():
                try:
                    result["r"] = request(gw.port, "GET", "/users/slow?delay=20", timeout=30)
                except Exception as e:  # noqa: BLE001
                    result["e"] = e

            t = threading.Thread(target=slow, daemon=True)
            t.start()
            wait_until(lambda: up.stats()["requests"] == 1, 5, what="the slow request upstream")
            gw.signal(signal.SIGTERM)
            try:
                gw.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                raise AssertionError("still running 8 s after SIGTERM with drain_timeout = 1")
            wait_until(lambda: not children(gw.pid), 3, what="the workers to be gone")
            t.join(5)
            # The client was cut (or answered with an error), not left hanging.
            assert not t.is_alive(), "the client of the cut request was left hanging"
            if "r" in result:
                assert result["r"].status != 200, result["r"]


def test_burst_of_reloads_ends_on_the_last_config():
    with Upstream() as up:
        with Gateway(base_conf(up), workers=2) as gw:
            pids = gw.worker_pids()
            for i in range(10):
                gw.write_config(base_conf(up, [route("/users/*"), route("/r%d" % i)]))
                gw.signal(signal.SIGHUP)
                time.sleep(0.02)

            def final():
                try:
                    return request(gw.port, "GET", "/r9").status == 200
                except Exception:  # noqa: BLE001
                    return False
            wait_until(final, 10, interval=0.1, what="the last config to serve /r9")
            time.sleep(0.5)
            for _ in range(4):   # every worker, whichever takes the connection
                assert request(gw.port, "GET", "/r9").status == 200
                assert_gateway_error(request(gw.port, "GET", "/r8"), 404)
            assert gw.worker_pids() == pids


def test_reload_adding_a_listener_serves_on_it_and_keeps_the_old_one():
    with Upstream() as up:
        with Gateway(base_conf(up)) as gw:
            extra = free_port()
            conf = base_conf(up)
            conf["listen"] = ["127.0.0.1:%d" % gw.port, "127.0.0.1:%d" % extra]
            gw.write_config(conf)
            gw.signal(signal.SIGHUP)

            def on_new():
                try:
                    return request(extra, "GET", "/users/new").status == 200
                except OSError:
                    return False
            wait_until(on_new, 10, interval=0.1, what="the added listener to answer")
            assert request(gw.port, "GET", "/users/old").status == 200
