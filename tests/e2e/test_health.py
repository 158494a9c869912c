"""Active health checks: sent by one process whatever the worker count
(counted at the upstream), a failing check takes a target out of every
worker's rotation and a passing one brings it back, a bad health config is
refused naming the upstream and field."""

import subprocess
import time

from harness import Client, Gateway, Upstream, moongate_bin, request, route, upstream_conf, \
    upstream_saw, write_file


def test_health_checks_come_from_one_process_whatever_the_worker_count():
    with Upstream(ports=2) as up:
        conf = {"upstreams": {"h": upstream_conf(*up.addrs(), health={
                    "path": "/health", "interval": 0.2, "timeout": 0.5})},
                "routes": [route("/*", "h")]}
        with Gateway(conf, workers=4) as gw:
            time.sleep(0.5)
            up.reset()
            t0 = time.monotonic()
            time.sleep(3.0)
            st = up.stats()
            elapsed = time.monotonic() - t0
            assert len(gw.worker_pids()) == 4
    checks = st["paths"].get("/health", 0)
    per_target = elapsed / 0.2
    print("4 workers, 2 targets, interval 0.2s: %d checks in %.2fs (one process: ~%.0f; "
          "one per worker would be ~%.0f)" % (checks, elapsed, 2 * per_target, 8 * per_target))
    # One checker: at most one check per target per interval (+1 for the
    # edges of the window); four would give four times as many.
    assert checks <= 2 * (per_target + 1)
    assert checks >= 2 * (per_target / 3)


def test_a_failing_health_check_takes_a_target_out_and_a_passing_one_brings_it_back():
    a, b = Upstream(name="a"), Upstream(name="b")
    with a, b:
        conf = {"upstreams": {"h": upstream_conf(a.addr, b.addr, health={
                    "path": "/health", "interval": 0.1, "timeout": 0.5,
                    "healthy": 2, "unhealthy": 2, "statuses": [200]})},
                "routes": [route("/*", "h")]}
        with Gateway(conf, workers=2) as gw:
            since = gw.log_size()
            r = request(b.port, "POST", "/__mode?health=500")
            assert r.status == 200
            gw.wait_log(r"%s marked down by health checks \(2 failed: status 500\)"
                        % b.addr, since=since, timeout=5)
            b.reset()
            for _ in range(30):
                assert request(gw.port, "GET", "/x").status == 200
            assert b.stats()["paths"].get("/x", 0) == 0
            since = gw.log_size()
            request(b.port, "POST", "/__mode?health=200")
            gw.wait_log(r"%s healthy again" % b.addr, since=since, timeout=5)
            ports = set()
            for _ in range(10):
                ports.add(upstream_saw(request(gw.port, "GET", "/y"))["port"])
            assert ports == {a.port, b.port}


def test_a_dead_target_is_marked_down_by_checks_alone_without_traffic():
    a, b = Upstream(name="a"), Upstream(name="b")
    with a, b:
        conf = {"upstreams": {"h": upstream_conf(a.addr, b.addr, health={
                    "interval": 0.1, "timeout": 0.3, "unhealthy": 2})},
                "routes": [route("/*", "h")]}
        with Gateway(conf) as gw:
            since = gw.log_size()
            b.kill()
            gw.wait_log(r"%s marked down by health checks" % b.addr, since=since, timeout=5)
            with Client(gw.port) as c:
                for _ in range(10):
                    assert c.request("GET", "/x").status == 200


def test_bad_health_settings_are_refused_naming_the_upstream_and_field():
    with Gateway({"upstreams": {"u": upstream_conf("127.0.0.1:1")},
                  "routes": [route("/*", "u")]}) as gw:
        path = write_file(gw.dir, "bad.lua", """return { listen = "127.0.0.1:0",
  upstreams = { users = { targets = { "127.0.0.1:9001" },
    health = { path = "health", unhealthy = 0 },
    breaker = { open_for = "30s" } } },
  routes = { { path = "/*", upstream = "users" } } }""")
        p = subprocess.run([moongate_bin(), "check", "-c", path], capture_output=True,
                           timeout=20)
        out = (p.stdout + p.stderr).decode()
        print(out.strip())
        assert p.returncode != 0
        assert "upstreams.users: health.path: must start with '/'" in out
        assert "upstreams.users: health.unhealthy: must be between 1 and 1000, got 0" in out
        assert "upstreams.users: breaker.open_for: expected a number of seconds, got string" \
            in out


def test_a_passive_mark_survives_a_reload_and_expires_after_down_for():
    a = Upstream(name="a")
    with a:
        b = Upstream(name="b").__enter__()
        b_port = b.port
        try:
            conf = {"upstreams": {"p": upstream_conf(a.addr, b.addr, retries={"count": 0},
                                                     passive={"failures": 2, "down_for": 3})},
                    "routes": [route("/*", "p")]}
            with Gateway(conf, workers=2) as gw:
                b.kill()
                since = gw.log_size()
                for _ in range(6):
                    request(gw.port, "GET", "/x")
                gw.wait_log(r"127.0.0.1:%d marked down after 2 failures" % b_port, since=since,
                            timeout=3)
                marked = time.monotonic()
                b = Upstream(name="b", fixed_ports=[b_port]).__enter__()
                gw.reload(conf)
                with Client(gw.port) as c:
                    for _ in range(10):
                        assert c.request("GET", "/x").status == 200
                assert b.stats()["paths"].get("/x", 0) == 0, "the mark was lost by the reload"
                time.sleep(max(0.0, marked + 3.2 - time.monotonic()))
                for _ in range(10):
                    assert request(gw.port, "GET", "/y").status == 200
                assert b.stats()["paths"].get("/y", 0) > 0, "down_for did not expire"
        finally:
            b.kill()
