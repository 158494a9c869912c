"""Hostile load against the real binary (issue 11): slow senders, many idle
connections, a flood of unique rate-limit keys. Each test prints its
figures (run.py shows a test's output) and asserts a bound.

- slowloris: 750 connections trickle a request head one byte at a time
  and 250 trickle a POST body (to a handler that reads the body), all on
  ONE worker, while a normal client makes 200 sequential requests, each on
  a new connection, through the proxy, one every ~10 ms, while every slow
  connection gets a byte every 100 ms (10,000 slow events a second). The
  normal client's p99 must stay under 50 ms: the acceptance bound of
  issue 11, and the one wall-clock assertion here (typically 1-15 ms, on
  a loaded machine too). The slow connections must still be open at the
  end: header_timeout and body_timeout are raised to 60 s and
  max_connections to 4000, so the gateway holds them instead of timing
  them out (with the defaults, 10 s / 10 s / 10000, the header timeout
  would cut them at 10 s: a defence, but not the subject here). The slow
  senders run in a child process so their work does not share this
  process's interpreter with the measuring client.
- idle: 10,000 connections that send nothing, on one worker
  (max_connections 12000); the worker's RSS is read before and after they
  are all accepted (the worker's fd count shows it), and the RSS per
  connection is printed and must stay under 16 KiB, the size of one read
  buffer: an idle connection holds its mg_conn_t, its timer and a 16 KiB
  read buffer that is malloc'ed at accept but touched only at its start
  until bytes arrive, plus libuv's share; so it must cost less than a
  full buffer (about 5 KiB in the release build, 12 KiB under ASan).
  Kernel socket memory is not in RSS and not counted. The gateway must
  still answer while they are open.
- key flood: rate-limit by header in a 64 KiB shared zone (the smallest);
  12,000 requests with unique keys. The zone's capacity is fixed (it is a
  fixed-size shared mapping); the count of entries must level off, the
  earliest keys must have been evicted (a key that was at its limit gets
  200 again), and a hot key that is at its limit stays limited (429) all
  through the flood because it is used often enough to stay in the LRU.
  (Cache-key floods: there is no cache plugin yet, so nothing to flood.)
- fd exhaustion: a gateway started with RLIMIT_NOFILE 256 sheds the
  connections it has no descriptor for (libuv accepts and closes them),
  keeps serving the open ones, and serves new ones once they close.

The file-descriptor limit: the test raises its own soft RLIMIT_NOFILE to
the hard limit; the gateway, started by it, inherits that (moongate does
not change its limit). A test that cannot get enough descriptors fails
saying so.
"""

import os
import resource
import socket
import subprocess
import time

from harness import (PYTHON, Client, Gateway, Upstream, _readline_timeout, request,
                     rss_kb, spawn, wait_until)


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    assert soft >= need, ("this test needs %d file descriptors; RLIMIT_NOFILE is %d "
                          "(raise the hard limit: ulimit -Hn)" % (need, soft))


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def percentile(sorted_values, p):
    i = min(len(sorted_values) - 1, int(round(p / 100.0 * (len(sorted_values) - 1))))
    return sorted_values[i]


# ------------------------------------------------------------ slowloris

# The slow senders, run as a child process: opens HEADS + BODIES
# connections, sends each an incomplete start, prints "ready N", then sends
# one more byte on every connection every PERIOD seconds until stdin closes
# (or "stop"), then prints "held N" (connections the gateway did not close)
# and exits.
SLOW_CLIENT = r'''
import resource, select, socket, sys, time
port, heads, bodies, period = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
conns = []
head_rest = b"Host: slow\r\nUser-Agent: slowloris\r\nX-Pad: " + b"a" * 4000 + b"\r\n\r\n"
for i in range(heads + bodies):
    s = socket.create_connection(("127.0.0.1", port))
    if i < heads:
        s.sendall(b"GET /slow/%d HTTP/1.1\r\n" % i)
        conns.append([s, head_rest, 0])
    else:
        s.sendall(b"POST /body HTTP/1.1\r\nHost: slow\r\nContent-Length: 4000\r\n\r\n")
        conns.append([s, b"b" * 4000, 0])
    s.setblocking(False)
print("ready %d" % len(conns), flush=True)
closed = 0
while True:
    r, _, _ = select.select([sys.stdin], [], [], period)
    if r:
        break
    for c in conns:
        s, rest, pos = c
        if s is None or pos >= len(rest):
            continue
        try:
            s.send(rest[pos:pos + 1])
            c[2] = pos + 1
        except OSError:
            c[0] = None
            closed += 1
held = 0
for c in conns:
    s = c[0]
    if s is None:
        continue
    try:
        data = s.recv(1, socket.MSG_PEEK)
        if data:           # answered (a 408, say): not held
            print("answered %r" % data, flush=True)
        # b"": closed by the gateway
    except BlockingIOError:
        held += 1
    except OSError:
        pass
print("held %d" % held, flush=True)
'''

SLOW_CONF = """return {
  listen = { "@LISTEN@" }, workers = 1,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  limits = { header_timeout = 60, body_timeout = 60, keepalive_timeout = 60,
             max_connections = 4000 },
  upstreams = { up = { targets = { "%s" } } },
  routes = {
    { path = "/users/*", upstream = "up" },
    { path = "/body", handler = function(ctx)
        local gw = require("moongate.gw")
        local body = gw.request.get_body(ctx)
        return 200, { got = body and #body or -1 }
      end },
  },
}
"""


def test_slowloris_and_slow_bodies_do_not_starve_a_normal_client():
    heads, bodies, requests = 750, 250, 200
    raise_nofile(heads + bodies + 200)
    with Upstream() as up, Gateway(SLOW_CONF % up.addr) as gw:
        # Warm up the path (first connection to the upstream, Lua VM).
        for _ in range(20):
            assert request(gw.port, "GET", "/users/1").status == 200
        slow = spawn([PYTHON, "-c", SLOW_CLIENT, str(gw.port), str(heads), str(bodies), "0.1"],
                     "slow clients", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            line = _readline_timeout(slow.stdout, 30)
            assert line == b"ready %d\n" % (heads + bodies), line
            worker = gw.worker_pids()[0]
            # Every slow connection accepted (and a trickle round sent).
            wait_until(lambda: fd_count(worker) >= heads + bodies, 15,
                       what="the worker to accept %d connections" % (heads + bodies))
            time.sleep(1.0)
            times = []
            for i in range(requests):
                t0 = time.perf_counter()
                r = request(gw.port, "GET", "/users/%d" % i, timeout=5)
                times.append((time.perf_counter() - t0) * 1000.0)
                assert r.status == 200, r
                time.sleep(0.01)  # spread over ~2 s of trickling
            times.sort()
            p50, p99 = percentile(times, 50), percentile(times, 99)
            print("slowloris: %d slow heads + %d slow bodies open on 1 worker; normal client "
                  "%d requests: p50 %.2f ms, p99 %.2f ms, max %.2f ms"
                  % (heads, bodies, requests, p50, p99, times[-1]))
            slow.stdin.write(b"stop\n")
            slow.stdin.close()
            out = []
            while True:
                line = _readline_timeout(slow.stdout, 15)
                if not line:
                    break
                out.append(line.decode().strip())
                if line.startswith(b"held "):
                    break
            print("slowloris: slow clients report %s" % out)
            assert out and out[-1] == "held %d" % (heads + bodies), \
                "the gateway closed or answered slow connections it should hold: %s" % out
            assert p99 < 50.0, "normal client's p99 %.2f ms >= 50 ms" % p99
        finally:
            slow.kill()
            slow.wait()
            for f in (slow.stdin, slow.stdout):
                try:
                    f.close()
                except (OSError, ValueError):
                    pass


test_slowloris_and_slow_bodies_do_not_starve_a_normal_client.timeout = 90

# ------------------------------------------------------------ idle connections

IDLE_CONF = """return {
  listen = { "@LISTEN@" }, workers = 1,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  limits = { header_timeout = 60, keepalive_timeout = 60, max_connections = 12000 },
  routes = {
    { path = "/ok", handler = function(ctx) return 200, "ok" end },
  },
}
"""

IDLE_BOUND_KB = 16


def test_ten_thousand_idle_connections_cost_bounded_memory():
    n = 10000
    raise_nofile(n + 500)
    socks = []
    with Gateway(IDLE_CONF) as gw:
        worker = gw.worker_pids()[0]
        # Warm up: the first requests allocate the Lua side, arenas, etc.
        with Client(gw.port) as c:
            for _ in range(50):
                assert c.request("GET", "/ok").status == 200
        time.sleep(0.2)
        before_kb = rss_kb(worker)
        fds_before = fd_count(worker)
        try:
            for _ in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(True)
                s.connect(("127.0.0.1", gw.port))
                socks.append(s)
            wait_until(lambda: fd_count(worker) >= fds_before + n, 20, interval=0.1,
                       what="the worker to accept %d connections" % n)
            time.sleep(0.5)
            after_kb = rss_kb(worker)
            per_conn = (after_kb - before_kb) * 1024.0 / n
            print("idle: worker RSS %d KiB before, %d KiB with %d idle connections: "
                  "%.0f bytes per connection (bound %d KiB)"
                  % (before_kb, after_kb, n, per_conn, IDLE_BOUND_KB))
            # Still serving, on a fresh connection, with all of them open.
            r = request(gw.port, "GET", "/ok", timeout=5)
            assert r.status == 200 and r.body == b"ok", r
            still = fd_count(worker) - fds_before
            assert still >= n, "the worker closed idle connections: %d of %d left" % (still, n)
            assert per_conn < IDLE_BOUND_KB * 1024, \
                "%.0f bytes per idle connection >= %d KiB" % (per_conn, IDLE_BOUND_KB)
        finally:
            for s in socks:
                s.close()


test_ten_thousand_idle_connections_cost_bounded_memory.timeout = 90

# ------------------------------------------------------------ key flood

FLOOD_CONF = """local gw = require("moongate.gw")
return {
  listen = { "@LISTEN@" }, workers = 1,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  shared = { limits = "64k" },
  routes = {
    { path = "/k", handler = function(ctx) return 200, "ok" end,
      plugins = { ["rate-limit"] = { limit = 3, window = 600, by = "header",
                                      header = "X-Key" } } },
    { path = "/stats", handler = function(ctx) return 200, gw.shared.limits:stats() end },
  },
}
"""


def test_unique_rate_limit_keys_evict_and_a_hot_key_stays_limited():
    flood, hot_every = 12000, 40
    with Gateway(FLOOD_CONF) as gw, Client(gw.port) as c:
        worker = gw.worker_pids()[0]

        def get(key):
            return c.request("GET", "/k", headers=[("X-Key", key)]).status

        def stats():
            return c.request("GET", "/stats").json()

        # The first flood keys, each taken to its limit before the flood.
        early = ["early-%d" % i for i in range(20)]
        for k in early:
            assert [get(k) for _ in range(4)] == [200, 200, 200, 429], k
        assert [get("hot") for _ in range(4)] == [200, 200, 200, 429]
        s0 = stats()
        rss0 = rss_kb(worker)
        counts = []
        hot = {"429": 0, "other": 0}
        flood_ok = 0
        for i in range(flood):
            st = get("flood-%d" % i)
            flood_ok += st == 200
            if i % hot_every == 0:
                hs = get("hot")
                hot["429" if hs == 429 else "other"] += 1
            if i % 2000 == 1999:
                counts.append(stats()["count"])
        s1 = stats()
        rss1 = rss_kb(worker)
        readmitted = sum(get(k) == 200 for k in early)
        print("key flood: zone capacity %d bytes; before: %d entries, %d free; after %d unique "
              "keys: %d entries, %d free; entry count every 2000 keys: %s"
              % (s0["capacity"], s0["count"], s0["free"], flood, s1["count"], s1["free"], counts))
        print("key flood: %d/%d flood requests admitted; hot key (at its limit): %d x 429, "
              "%d other; %d/%d early keys (at their limit before) admitted again after the "
              "flood (evicted); worker RSS %d -> %d KiB"
              % (flood_ok, flood, hot["429"], hot["other"], readmitted, len(early), rss0, rss1))
        assert s1["capacity"] == s0["capacity"] == 64 * 1024
        # Far fewer entries than keys: the rest were evicted. Each entry is
        # at least 16 bytes (shdict.c), so the count can never pass cap/16.
        assert s1["count"] < flood // 4 and s1["count"] <= s1["capacity"] // 16, s1
        assert max(counts) - min(counts) <= max(counts) // 2, \
            "the entry count did not level off: %s" % counts
        assert flood_ok == flood, "a fresh key was refused"
        assert hot["other"] == 0, "the hot key was let through during the flood: %s" % hot
        assert readmitted == len(early), "early keys were not evicted"
        # The worker's RSS is printed, not asserted: the counters are in the
        # fixed zone, and what the worker's heap does meanwhile is Lua's GC
        # (about 2 MiB here) or, under ASan, its quarantine of freed blocks
        # (tens of MiB). Growth over time is the soak test's job.


test_unique_rate_limit_keys_evict_and_a_hot_key_stays_limited.timeout = 120

# ------------------------------------------------------------ fd exhaustion

FD_LIMIT = 256


def test_at_its_file_descriptor_limit_the_gateway_sheds_new_connections_and_recovers():
    # The master raises its soft RLIMIT_NOFILE toward what max_connections
    # needs; the test lowers the worker's to 256 afterwards (prlimit), so it
    # runs out of descriptors long before max_connections. libuv then
    # accepts and closes what it cannot keep (its EMFILE reserve
    # descriptor); the connections already open keep working and, once
    # they close, new ones are served again.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    socks = []
    try:
        with Gateway(IDLE_CONF) as gw:
            worker = gw.worker_pids()[0]
            _, worker_hard = resource.prlimit(worker, resource.RLIMIT_NOFILE)
            resource.prlimit(worker, resource.RLIMIT_NOFILE, (FD_LIMIT, worker_hard))
            with Client(gw.port) as first:
                assert first.request("GET", "/ok").status == 200
                for _ in range(FD_LIMIT + 150):
                    socks.append(socket.create_connection(("127.0.0.1", gw.port)))
                wait_until(lambda: fd_count(worker) >= FD_LIMIT, 10,
                           what="the worker to reach its fd limit")
                time.sleep(0.3)
                shed = 0
                for s in socks:
                    s.setblocking(False)
                    try:
                        if s.recv(1, socket.MSG_PEEK) == b"":
                            shed += 1
                    except BlockingIOError:
                        pass
                    except OSError:
                        shed += 1
                print("fd limit: worker at %d descriptors (limit %d); %d of %d new "
                      "connections shed" % (fd_count(worker), FD_LIMIT, shed, len(socks)))
                assert shed > 0, "no connection was shed beyond the fd limit"
                # An open keep-alive connection is still served at the limit.
                assert first.request("GET", "/ok").status == 200
                for s in socks:
                    s.close()
                socks = []
                r = wait_until(lambda: _try_ok(gw.port), 10, interval=0.1,
                               what="a new connection to be served again")
                assert r.status == 200 and gw.worker_pids() == [worker]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for s in socks:
            s.close()


def _try_ok(port):
    try:
        r = request(port, "GET", "/ok", timeout=2)
        return r if r.status == 200 else None
    except Exception:  # noqa: BLE001 - shed: try again
        return None
