"""The circuit breaker across workers, against a target that hangs (accepts,
reads, never answers): timeouts trip it, after the cool-down exactly K probes
reach the target (counted there), and once it answers again the breaker
closes. Retries: to another target, never for a non-idempotent request that
failed mid-way (it reaches the upstream exactly once)."""

import threading
import time

from harness import Gateway, Upstream, assert_gateway_error, free_port, request, route, \
    upstream_conf, upstream_saw


class Load:
    """`n` threads sending GET /x through the gateway until stopped."""

    def __init__(self, port, n=6):
        self.port = port
        self.n = n
        self.stop_flag = threading.Event()
        self.statuses = {}
        self.lock = threading.Lock()
        self.threads = []

    def _run(self):
        while not self.stop_flag.is_set():
            try:
                st = request(self.port, "GET", "/x", timeout=5).status
            except OSError:
                st = "error"
            with self.lock:
                self.statuses[st] = self.statuses.get(st, 0) + 1

    def __enter__(self):
        for _ in range(self.n):
            t = threading.Thread(target=self._run)
            t.start()
            self.threads.append(t)
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        for t in self.threads:
            t.join()
        return False


def hang(up, on):
    assert request(up.port, "POST", "/__mode?hang=%d" % (1 if on else 0)).status == 200


def test_a_hung_target_trips_the_breaker_then_exactly_k_probes_reach_it_then_it_closes():
    good, hung = Upstream(name="good"), Upstream(name="hung")
    with good, hung:
        open_for, probes = 2.0, 2
        conf = {"upstreams": {"u": upstream_conf(
                    good.addr, hung.addr, timeouts={"read": 0.3},
                    breaker={"failures": 3, "failure_ratio": 0, "open_for": open_for,
                             "half_open_probes": probes},
                    retries={"count": 0})},
                "routes": [route("/*", "u")]}
        with Gateway(conf, workers=2) as gw:
            hang(hung, True)
            since = gw.log_size()
            with Load(gw.port) as trip_load:
                gw.wait_log(r"target %s: breaker open" % hung.addr, since=since, timeout=10)
                opened = time.monotonic()
            print("while tripping:", trip_load.statuses)
            time.sleep(0.5)  # requests already at the hung target time out
            hung.reset()
            since = gw.log_size()
            # Load through the cool-down and past it, but not past the next
            # cool-down (the probes fail by timeout and reopen it).
            with Load(gw.port) as probe_load:
                time.sleep(max(0.0, opened + open_for + 1.0 - time.monotonic()))
            reached = hung.stats()["requests"]
            print("after the %.0fs cool-down, %d requests from 2 workers: %d reached the hung "
                  "target (half_open_probes = %d); statuses %r"
                  % (open_for, sum(probe_load.statuses.values()), reached, probes,
                     probe_load.statuses))
            assert reached == probes
            gw.wait_log(r"target %s: breaker open" % hung.addr, since=since, timeout=2)

            # It answers again: after the next cool-down the probes pass.
            hang(hung, False)
            since = gw.log_size()
            with Load(gw.port):
                gw.wait_log(r"target %s: breaker closed" % hung.addr, since=since,
                            timeout=open_for * 2 + 3)
                time.sleep(0.3)
            assert hung.stats()["requests"] > probes
            assert request(gw.port, "GET", "/x").status == 200


def test_a_failed_post_reaches_the_upstream_once_and_a_get_is_retried_elsewhere():
    with Upstream(ports=2) as up:
        conf = {"upstreams": {"r": upstream_conf(*up.addrs(), retries={
                    "count": 2, "on": ["connect", "timeout", 502, 503]})},
                "routes": [route("/*", "r")]}
        with Gateway(conf) as gw:
            up.reset()
            # The upstream reads the whole POST, then resets the connection.
            assert_gateway_error(request(gw.port, "POST", "/order?reset=1", body=b"pay 10"), 502)
            posts = up.stats()["requests"]
            up.reset()
            assert_gateway_error(request(gw.port, "GET", "/item?reset=1"), 502)
            gets = up.stats()
            up.reset()
            r = request(gw.port, "GET", "/busy?status=503")
            busy = up.stats()
        print("reset mid-way: POST reached the upstream %d time(s), GET %d (ports %r); "
              "a 503 GET %d" % (posts, gets["requests"], gets["ports"], busy["requests"]))
        assert posts == 1
        # Both targets tried; at most count + 1 = 3 deliveries (a pooled
        # connection that dies is retried once on a fresh one, and that
        # counts as a try).
        assert 2 <= gets["requests"] <= 3 and len(gets["ports"]) == 2
        assert r.status == 503 and 2 <= busy["requests"] <= 3


def test_a_refused_connection_is_retried_on_another_target_by_default():
    with Upstream() as up:
        dead = "127.0.0.1:%d" % free_port()
        conf = {"upstreams": {"r": upstream_conf(dead, up.addr)},
                "routes": [route("/*", "r")]}
        with Gateway(conf) as gw:
            for i in range(10):
                r = request(gw.port, "POST", "/p%d" % i, body=b"x" * 100)
                assert r.status == 200, r
                assert upstream_saw(r)["body_len"] == 100
