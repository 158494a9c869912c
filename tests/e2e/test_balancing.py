"""Load balancing across real upstream processes: smooth weighted round
robin exact through the gateway, consistent hashing sticky per key, least
connections avoiding a busy target, and passive health under wrk load: one
of three targets killed, errors stop after the passive threshold, and the
active checks bring it back. All targets down: 503 at once, with
Retry-After, and no connection attempted."""

import select
import socket
import statistics
import threading
import time

from harness import WRK_COUNT_SCRIPT, Client, Gateway, Raw, Upstream, assert_gateway_error, \
    request, route, run_wrk, upstream_conf, upstream_saw, wait_until, write_file


def ports_of(gw, n, path="/b", headers=None):
    seen = []
    with Client(gw.port) as c:
        for _ in range(n):
            r = c.request("GET", path, headers=headers or {})
            assert r.status == 200, r
            seen.append(upstream_saw(r)["port"])
    return seen


def test_weighted_round_robin_is_exact_over_its_cycles():
    with Upstream(ports=3) as up:
        a, b, c = up.addrs()
        conf = {"upstreams": {"w": upstream_conf(a, Raw('{ "%s", weight = 2 }' % b),
                                                 Raw('{ "%s", weight = 3 }' % c),
                                                 balance="weighted")},
                "routes": [route("/b", "w")]}
        with Gateway(conf) as gw:
            seen = ports_of(gw, 600)
    counts = {p: seen.count(p) for p in up.ports}
    print("weighted 1:2:3 over 600 requests:", counts)
    assert [counts[p] for p in up.ports] == [100, 200, 300]
    # Smooth: the heaviest target never gets more than two in a row.
    run, longest = 1, 1
    for x, y in zip(seen, seen[1:]):
        run = run + 1 if x == y else 1
        longest = max(longest, run)
    assert longest <= 2, seen[:12]


def test_hash_on_a_header_keeps_each_user_on_one_target():
    with Upstream(ports=3) as up:
        conf = {"upstreams": {"h": upstream_conf(*up.addrs(), balance="hash",
                                                 hash_on="header:X-User")},
                "routes": [route("/b", "h")]}
        with Gateway(conf, workers=2) as gw:
            homes = {}
            for u in range(40):
                got = set()
                for _ in range(3):
                    # New connections: both workers answer, the ring is the same.
                    r = request(gw.port, "GET", "/b", headers={"X-User": "user-%d" % u})
                    got.add(upstream_saw(r)["port"])
                assert len(got) == 1, "user-%d went to %r" % (u, got)
                homes[u] = got.pop()
    spread = {p: list(homes.values()).count(p) for p in up.ports}
    print("40 users over 3 targets:", spread)
    assert len([p for p in spread if spread[p]]) == 3


def test_least_connections_sends_new_requests_to_the_idle_target():
    with Upstream(ports=2) as up:
        conf = {"upstreams": {"l": upstream_conf(*up.addrs(), balance="least_conn")},
                "routes": [route("/*", "l")]}
        with Gateway(conf) as gw:
            slow = {}

            def hold():
                slow["r"] = request(gw.port, "GET", "/slow?delay=1.5", timeout=10)

            t = threading.Thread(target=hold)
            t.start()
            wait_until(lambda: up.stats()["requests"] >= 1, 5, what="the slow request")
            quick = ports_of(gw, 10, "/quick")
            t.join()
            busy = upstream_saw(slow["r"])["port"]
    print("busy target %d; quick requests went to %r" % (busy, sorted(set(quick))))
    assert busy not in quick


def test_a_target_killed_under_load_is_left_after_the_passive_threshold_and_comes_back():
    ups = [Upstream(name="t%d" % i) for i in range(3)]
    for u in ups:
        u.__enter__()
    try:
        victim_port = ups[2].port
        conf = {"upstreams": {"three": upstream_conf(
                    *[u.addr for u in ups],
                    passive={"failures": 3},
                    health={"path": "/health", "interval": 0.2, "timeout": 0.5,
                            "healthy": 2, "unhealthy": 3},
                    retries={"count": 0})},
                "routes": [route("/*", "three")]}
        with Gateway(conf, workers=2) as gw:
            script = write_file(gw.dir, "count.lua", WRK_COUNT_SCRIPT)
            result = {}

            def load():
                result["wrk"] = run_wrk("http://127.0.0.1:%d/x" % gw.port, threads=2, conns=8,
                                        duration=7, script=script)

            t = threading.Thread(target=load)
            t.start()
            time.sleep(1.5)
            ups[2].kill()                      # a target dies under load
            killed_at = time.monotonic()
            gw.wait_log("marked down after 3 failures", timeout=5)
            down_after = time.monotonic() - killed_at
            time.sleep(1.5)
            ups[2] = Upstream(name="t2", fixed_ports=[victim_port]).__enter__()
            gw.wait_log("127.0.0.1:%d healthy again" % victim_port, timeout=5)
            t.join()
            back = ups[2].stats()["paths"].get("/x", 0)
        res = result["wrk"]
        print("wrk: %d requests, %d non-2xx while one of three targets was killed; "
              "marked down %.2fs after the kill; %d requests reached it after it came back"
              % (res.requests, int(res.values.get("non2xx", 0)), down_after, back))
        errors = int(res.values.get("non2xx", 0))
        # The threshold (3 in a row, shared by both workers), plus at most the
        # requests in flight to it when it died (8 connections).
        assert 1 <= errors <= 3 + 8 + 4, res.text
        assert back > 0, "the restored target got no traffic"
    finally:
        for u in ups:
            u.kill()


def accepted_now(sock, wait=0.3):
    """Accepts every connection waiting on `sock`; returns how many."""
    n = 0
    while True:
        r, _, _ = select.select([sock], [], [], wait)
        if not r:
            return n
        conn, _ = sock.accept()
        conn.close()
        n += 1
        wait = 0.05


def test_all_targets_down_answers_503_with_retry_after_at_once_without_connecting():
    owned = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        owned.bind(("127.0.0.1", 0))
        owned.listen(64)
        addr = "127.0.0.1:%d" % owned.getsockname()[1]
        conf = {"upstreams": {"only": upstream_conf(addr, passive={"failures": 1, "down_for": 60},
                                                    timeouts={"read": 0.3},
                                                    retries={"count": 0})},
                "routes": [route("/api/*", "only")]}
        with Gateway(conf) as gw:
            # The owned socket accepts (in the kernel) and never answers: the
            # read timeout counts as the one failure that takes it down.
            assert_gateway_error(request(gw.port, "GET", "/api/first"), 504)
            first = accepted_now(owned)
            assert first >= 1
            times = []
            with Client(gw.port) as c:
                for i in range(200):
                    t0 = time.perf_counter()
                    r = c.request("GET", "/api/x%d" % i)
                    times.append((time.perf_counter() - t0) * 1000)
                    assert_gateway_error(r, 503)
                    assert int(r.header("retry-after")) >= 1, r
                    assert r.json()["upstream"] == "only"
            later = accepted_now(owned)
        med = statistics.median(times)
        print("503 with all targets down: median %.2f ms, max %.2f ms over 200 requests; "
              "Retry-After %s; connections to the upstream: %d before, %d during"
              % (med, max(times), r.header("retry-after"), first, later))
        assert later == 0
        assert med < 5.0
    finally:
        owned.close()


def test_a_host_name_target_is_re_resolved_in_the_background_and_keeps_serving():
    with Upstream() as up:
        name = "localhost:%d" % up.port
        conf = {"log_level": "debug",
                "upstreams": {"n": upstream_conf(name, up.addr, dns_refresh=0.2)},
                "routes": [route("/*", "n")]}
        with Gateway(conf, workers=2) as gw:
            since = gw.log_size()
            gw.wait_log(r"worker 1: target %s: re-resolved, address unchanged" % name,
                        since=since, timeout=5)
            gw.wait_log(r"worker 2: target %s: re-resolved, address unchanged" % name,
                        since=since, timeout=5)
            with Client(gw.port) as c:
                for _ in range(20):
                    assert c.request("GET", "/x").status == 200
            # The name and the address are two targets (two pools): both used.
            assert up.stats()["connections"] >= 2
