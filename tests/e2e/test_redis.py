"""gw.redis end to end: a real redis-server on a free port (temp dir, no
persistence), the real gateway with handler routes that call Redis, real
clients.

Commands and reply types, pipelines and MULTI/EXEC, EVALSHA with the
per-worker script cache (checked in Redis's INFO commandstats), AUTH and
SELECT, settings changed by a reload, calls that cannot wait, the four ways
Redis fails (SECURITY.md point 10: killed, hung, slow, answering errors)
with reconnection when it comes back, 200 concurrent INCRs, and `moongate
lua` scripts."""

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time

from harness import ROOT, SANITIZER_MARKS, Client, Gateway, free_port, moongate_bin, request, \
    spawn, wait_until


# ------------------------------------------------------------------ redis


class RedisError(Exception):
    pass


def resp_read(f):
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("connection closed by redis")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2].decode()
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [resp_read(f) for _ in range(n)]
    raise OSError("bad RESP line %r" % line)


class RedisServer:
    """redis-server on a free (or given) port, in a temp dir, no
    persistence. .cmd(...) talks RESP over a fresh socket."""

    def __init__(self, port=None, password=None):
        self.port = port or free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="mg-redis-")
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        return False

    def start(self):
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.dir,
                "--enable-debug-command", "yes", "--loglevel", "warning"]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = spawn(argv, "redis-server", stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up():
            try:
                return self.cmd("PING") == "PONG"
            except (OSError, RedisError):
                return False
        wait_until(up, 10, what="redis-server to answer")

    def cmd(self, *args, db=None, timeout=5):
        """One command on a fresh connection (after AUTH, SELECT db)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            f = s.makefile("rb")
            cmds = [("AUTH", self.password)] if self.password else []
            cmds += [("SELECT", db)] if db is not None else []
            cmds.append(args)
            out = b""
            for c in cmds:
                parts = [str(a).encode() for a in c]
                out += b"*%d\r\n" % len(parts)
                out += b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
            s.sendall(out)
            for _ in cmds[:-1]:
                resp_read(f)
            return resp_read(f)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(5)

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def commandstats(self):
        """{"eval": {"calls": n, "failed_calls": n, ...}, ...}"""
        text = self.cmd("INFO", "commandstats")
        out = {}
        for line in text.splitlines():
            if line.startswith("cmdstat_"):
                name, _, fields = line[len("cmdstat_"):].partition(":")
                out[name] = {k: float(v) for k, v in
                             (kv.split("=") for kv in fields.split(","))}
        return out


# ------------------------------------------------------------------ gateway

# Handler routes over gw.redis. /cmd?SET/k/v runs one command (arguments
# separated by "/"); every answer is JSON { v = reply or null, err = ... }.
ROUTES = r"""
local gw = require("moongate.gw")
local NULL = gw.json.null
local function out(v, err)
    if v == nil then v = NULL end
    return 200, { v = v, err = err or NULL }
end
local function args_of(ctx)
    local a = {}
    for part in gw.request.get_query(ctx):gmatch("[^/]+") do
        a[#a + 1] = (part:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
    end
    return a
end
local SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
-- A batched script (gw.redis.eval_batched): INCRBY per call, in order;
-- ARGV[2] of a call "fail" makes the whole script fail, "short" makes it
-- answer one element too few, "flat" two elements per call laid flat.
local BATCHED = [[
local n, out, ki, ai = tonumber(ARGV[1]), {}, 0, 1 + 2 * tonumber(ARGV[1])
for i = 1, n do
  local nk, na = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  if ARGV[ai + 2] == "fail" then return redis.error_reply("ERR asked to fail") end
  out[i] = { redis.call('INCRBY', KEYS[ki + 1], ARGV[ai + 1]), KEYS[ki + 1], nk, na }
  ki, ai = ki + nk, ai + na
end
if ARGV[1 + 2 * n + 2] == "short" then out[n] = nil end
if ARGV[1 + 2 * n + 2] == "flat" then
  local flat = {}
  for i = 1, n do flat[2 * i - 1], flat[2 * i] = out[i][1], out[i][2] end
  return flat
end
return out
]]
-- /batched?N/mode: N timers, started together, each make one batched call
-- (timers due in the same millisecond run in the same turn of the loop).
local function batched(ctx)
    local n, mode = gw.request.get_query(ctx):match("^(%d+)/?(.*)$")
    local results, done = {}, 0
    for i = 1, tonumber(n) do
        gw.timer.at(0, function()
            local v, err = gw.redis.eval_batched(BATCHED, { "bk" }, { i, mode })
            results[i] = { v = v or NULL, err = err or NULL }
            done = done + 1
        end)
    end
    for _ = 1, 300 do
        if done == tonumber(n) then break end
        gw.sleep(0.01)
    end
    return 200, { done = done, results = results }
end
gw.redis.configure(@REDIS@)
return {
  listen = { "@LISTEN@" }, workers = @WORKERS@,
  pid_file = "@PID_FILE@", error_log = "@ERROR_LOG@", log_level = "info",
  routes = {
    { path = "/cmd", handler = function(ctx) return out(gw.redis.command(unpack(args_of(ctx)))) end },
    { path = "/pipeline", handler = function(ctx)
        local replies, errors = gw.redis.pipeline({
            { "INCR", "pl" }, { "EXPIRE", "pl", 100 }, { "GET", "pl:missing" },
            { "HGET", "pl", "field" }, { "MGET", "pl", "pl:missing" },
        })
        return out(replies, errors)
    end },
    { path = "/txn", handler = function(ctx)
        return out(gw.redis.pipeline({ { "MULTI" }, { "INCR", "tx" }, { "INCR", "tx" }, { "EXEC" } }))
    end },
    { path = "/eval", handler = function(ctx)
        return out(gw.redis.eval(SCRIPT, { "ev" }, { 5 }))
    end },
    { path = "/batched", handler = batched },
    { path = "/misuse", handler = function(ctx)
        local what = gw.request.get_query(ctx)
        local ok, err
        if what == "coroutine" then
            -- Not the request's coroutine: nothing would resume it.
            ok, err = pcall(coroutine.wrap(function() return gw.redis.command("PING") end))
        elseif what == "subscribe" then
            ok, err = pcall(gw.redis.command, "SUBSCRIBE", "c")
        elseif what == "multi" then
            ok, err = pcall(gw.redis.command, "MULTI")
        else
            ok, err = pcall(gw.redis.command, "SET", "k", {})
        end
        return 200, { ok = ok, err = tostring(err) }
    end },
    { path = "/plain", handler = function(ctx) return 200, "plain" end },
  },
}
"""


def config(redis_port, timeout=1.0, workers=1, extra=""):
    settings = '{ url = "redis://127.0.0.1:%d", timeout = %s, connect_timeout = 1 %s }' \
        % (redis_port, timeout, extra)
    return ROUTES.replace("@REDIS@", settings).replace("@WORKERS@", str(workers))


def call(port, target, client=None, timeout=10):
    """GET target -> (json body, seconds)."""
    t0 = time.monotonic()
    if client:
        r = client.request("GET", target)
    else:
        r = request(port, "GET", target, timeout=timeout)
    took = time.monotonic() - t0
    assert r.status == 200, r
    return r.json(), took


def ping_ok(gw):
    return call(gw.port, "/cmd?PING")[0] == {"v": "PONG", "err": None}


# ------------------------------------------------------------------ tests


def test_commands_round_trip_with_every_reply_type():
    with RedisServer() as rs, Gateway(config(rs.port)) as gw:
        with Client(gw.port) as c:
            assert call(gw.port, "/cmd?SET/greeting/hello", c)[0] == {"v": "OK", "err": None}
            assert call(gw.port, "/cmd?GET/greeting", c)[0] == {"v": "hello", "err": None}
            assert rs.cmd("GET", "greeting") == "hello"
            assert call(gw.port, "/cmd?INCR/n", c)[0] == {"v": 1, "err": None}
            assert call(gw.port, "/cmd?INCRBY/n/41", c)[0] == {"v": 42, "err": None}
            # A nil reply: no value and no error.
            assert call(gw.port, "/cmd?GET/missing", c)[0] == {"v": None, "err": None}
            # An array with a nil element: gw.redis.null keeps its place.
            assert call(gw.port, "/cmd?MGET/greeting/missing/n", c)[0] == \
                {"v": ["hello", None, "42"], "err": None}
            # A Redis error reply: nil and Redis's message.
            body = call(gw.port, "/cmd?LPUSH/greeting/x", c)[0]
            assert body["v"] is None and body["err"].startswith("WRONGTYPE"), body
            body = call(gw.port, "/cmd?NOSUCHCOMMAND", c)[0]
            assert body["v"] is None and body["err"].startswith("ERR unknown command"), body
            # Binary-safe arguments (here: spaces and a percent sign).
            assert call(gw.port, "/cmd?SET/sp/a%20b%25c", c)[0]["v"] == "OK"
            assert rs.cmd("GET", "sp") == "a b%c"
            assert call(gw.port, "/cmd?DEL/greeting/n/sp", c)[0] == {"v": 3, "err": None}
            assert rs.cmd("EXISTS", "greeting") == 0


def test_pipeline_returns_every_reply_in_order_with_errors_beside_them():
    with RedisServer() as rs, Gateway(config(rs.port)) as gw:
        rs.cmd("HSET", "pl:h", "a", "b")
        body = call(gw.port, "/pipeline")[0]
        # INCR, EXPIRE, GET missing (null), HGET on a string (error), MGET
        replies, errors = body["v"], body["err"]
        assert replies[:3] == [1, 1, None], body
        assert replies[3] is False and replies[4] == ["1", None], body
        # errors has only index 4 (JSON fills the holes before it with null)
        assert errors[:3] == [None, None, None] and len(errors) == 4, body
        assert errors[3].startswith("WRONGTYPE"), body
        assert 0 < rs.cmd("TTL", "pl") <= 100
        body = call(gw.port, "/pipeline")[0]
        assert body["v"][0] == 2, body
        # MULTI ... EXEC inside one pipeline is a transaction.
        body = call(gw.port, "/txn")[0]
        assert body["v"] == ["OK", "QUEUED", "QUEUED", [1, 2]], body


def test_eval_loads_a_script_once_then_uses_evalsha():
    with RedisServer() as rs, Gateway(config(rs.port)) as gw:
        rs.cmd("CONFIG", "RESETSTAT")
        assert call(gw.port, "/eval")[0] == {"v": 5, "err": None}
        assert call(gw.port, "/eval")[0] == {"v": 10, "err": None}
        assert call(gw.port, "/eval")[0] == {"v": 15, "err": None}
        st = rs.commandstats()
        # First call: EVALSHA (NOSCRIPT) then EVAL; later calls: EVALSHA only.
        assert st["eval"]["calls"] == 1, st
        assert st["evalsha"]["calls"] == 3, st
        assert st["evalsha"].get("failed_calls", 1) == 1, st
        sha = rs.cmd("SCRIPT", "LOAD", "return redis.call('INCRBY', KEYS[1], ARGV[1])")
        assert rs.cmd("SCRIPT", "EXISTS", sha) == [1]
        # Redis forgets its scripts: the next call sends it again by itself.
        rs.cmd("SCRIPT", "FLUSH")
        assert call(gw.port, "/eval")[0] == {"v": 20, "err": None}
        assert rs.commandstats()["eval"]["calls"] == 2


def test_batched_evals_of_one_turn_go_to_redis_as_one_evalsha_in_order():
    with RedisServer() as rs, Gateway(config(rs.port)) as gw:
        body = call(gw.port, "/batched?1")[0]  # loads the script (NOSCRIPT, EVAL)
        assert body["results"] == [{"v": [1, "bk", 1, 2], "err": None}], body
        rs.cmd("CONFIG", "RESETSTAT")
        body = call(gw.port, "/batched?50")[0]
        assert body["done"] == 50, body
        # Each call got its own element: INCRBY by i, applied in call order.
        totals = [r["v"][0] for r in body["results"]]
        assert totals == [1 + sum(range(1, i + 1)) for i in range(1, 51)], totals
        assert all(r["err"] is None and r["v"][1:] == ["bk", 1, 2] for r in body["results"])
        assert rs.cmd("GET", "bk") == str(1 + sum(range(1, 51)))
        st = rs.commandstats()
        assert st["evalsha"]["calls"] == 1, st  # 50 calls, one round trip
        assert "eval" not in st, st
        # Redis forgets the script: the batch is sent again with EVAL.
        rs.cmd("SCRIPT", "FLUSH")
        body = call(gw.port, "/batched?3")[0]
        assert [r["err"] for r in body["results"]] == [None] * 3, body
        assert rs.commandstats()["eval"]["calls"] == 1
        # More calls than one batch holds (256): two EVALSHAs, all answered.
        rs.cmd("CONFIG", "RESETSTAT")
        body = call(gw.port, "/batched?300")[0]
        assert body["done"] == 300 and all(r["err"] is None for r in body["results"]), body
        assert rs.commandstats()["evalsha"]["calls"] == 2
        # k elements per call laid flat: each call gets its k as a list.
        rs.cmd("SET", "bk", 0)
        body = call(gw.port, "/batched?4/flat")[0]
        assert [r["v"] for r in body["results"]] == [[1, "bk"], [3, "bk"], [6, "bk"], [10, "bk"]], body


def test_a_failing_or_malformed_batched_script_fails_every_call_of_its_batch():
    with RedisServer() as rs, Gateway(config(rs.port)) as gw:
        body = call(gw.port, "/batched?5/fail")[0]
        errs = [r["err"] for r in body["results"]]
        assert body["done"] == 5 and all(e and "asked to fail" in e for e in errs), body
        body = call(gw.port, "/batched?4/short")[0]
        errs = [r["err"] for r in body["results"]]
        assert all(e and "not one element per call" in e for e in errs), body
        # Redis down: every call of the batch fails at once, then recovers.
        rs.kill()
        body = call(gw.port, "/batched?5")[0]
        errs = [r["err"] for r in body["results"]]
        assert body["done"] == 5 and all(e in ("connection refused", "closed") for e in errs), body
        rs.start()
        wait_until(lambda: call(gw.port, "/batched?2")[0]["results"][0]["err"] is None, 10,
                   what="batched calls to work again")
        assert ping_ok(gw)


def test_misuse_raises_lua_errors():
    with RedisServer() as rs, Gateway(config(rs.port)) as gw:
        body = call(gw.port, "/misuse?coroutine")[0]
        assert body["ok"] is False and "cannot wait here" in body["err"], body
        body = call(gw.port, "/misuse?subscribe")[0]
        assert body["ok"] is False and "SUBSCRIBE is not supported" in body["err"], body
        body = call(gw.port, "/misuse?multi")[0]
        assert body["ok"] is False and "pipeline" in body["err"], body
        body = call(gw.port, "/misuse?badarg")[0]
        assert body["ok"] is False and "argument #3" in body["err"], body
        # The worker is fine afterwards.
        assert ping_ok(gw)


def test_auth_and_select_come_from_the_settings():
    with RedisServer(password="s3cret") as rs:
        conf = config(rs.port, extra=', password = "s3cret", db = 2')
        with Gateway(conf) as gw:
            assert call(gw.port, "/cmd?SET/where/db2")[0] == {"v": "OK", "err": None}
            assert rs.cmd("GET", "where", db=2) == "db2"
            assert rs.cmd("GET", "where") is None
            gw.reload(config(rs.port, extra=', password = "wrong"'))
            body = call(gw.port, "/cmd?PING")[0]
            assert body == {"v": None, "err": "auth failed"}, body
            assert "auth failed" in gw.error_log_text()


def test_a_reload_with_other_settings_moves_the_client_to_the_new_server():
    with RedisServer() as a, RedisServer() as b, Gateway(config(a.port)) as gw:
        assert call(gw.port, "/cmd?SET/k/on-a")[0]["v"] == "OK"
        gw.reload(config(b.port))
        assert call(gw.port, "/cmd?GET/k")[0] == {"v": None, "err": None}
        assert call(gw.port, "/cmd?SET/k/on-b")[0]["v"] == "OK"
        assert a.cmd("GET", "k") == "on-a" and b.cmd("GET", "k") == "on-b"


def test_killed_redis_fails_calls_at_once_and_they_succeed_again_once_it_is_back():
    with RedisServer() as rs, Gateway(config(rs.port, timeout=2)) as gw:
        assert ping_ok(gw)
        # A call in flight when Redis dies.
        result = {}

        def slow():
            result["body"], result["took"] = call(gw.port, "/cmd?DEBUG/SLEEP/1")
        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.3)
        rs.kill()
        t.join(10)
        assert result["body"]["v"] is None, result
        assert result["body"]["err"] in ("closed", "connection reset"), result
        assert result["took"] < 1.5, result
        # Every call now fails at once, well inside the 2 s timeout.
        with Client(gw.port) as c:
            for _ in range(20):
                body, took = call(gw.port, "/cmd?INCR/x", c)
                assert body["v"] is None and body["err"] in ("connection refused", "closed"), body
                assert took < 0.5, took
            # The gateway keeps serving everything else.
            r = c.request("GET", "/plain")
            assert r.status == 200 and r.body == b"plain", r
        assert "connection refused" in gw.error_log_text()
        # Redis comes back on the same port: calls succeed again (the
        # backoff is at most 5 s).
        rs.start()
        wait_until(lambda: ping_ok(gw), 10, interval=0.1, what="gw.redis to reconnect")
        assert call(gw.port, "/cmd?INCR/x")[0] == {"v": 1, "err": None}


test_killed_redis_fails_calls_at_once_and_they_succeed_again_once_it_is_back.timeout = 90


def test_hung_redis_fails_calls_with_timeout_and_the_worker_keeps_serving():
    with RedisServer() as rs, Gateway(config(rs.port, timeout=0.5)) as gw:
        assert ping_ok(gw)
        rs.pause()  # SIGSTOP: the kernel still accepts, nothing answers
        try:
            body, took = call(gw.port, "/cmd?PING")
            assert body == {"v": None, "err": "timeout"}, body
            assert 0.4 <= took < 2.0, took
            # Many calls at once: each ends within its timeout, and the
            # worker answers other routes meanwhile (nothing blocks).
            results = []

            def one():
                results.append(call(gw.port, "/cmd?INCR/hung"))
            threads = [threading.Thread(target=one) for _ in range(10)]
            for t in threads:
                t.start()
            r0 = time.monotonic()
            r = request(gw.port, "GET", "/plain")
            assert r.status == 200 and time.monotonic() - r0 < 0.3, r
            for t in threads:
                t.join(10)
            assert len(results) == 10
            for body, took in results:
                assert body == {"v": None, "err": "timeout"}, body
                assert took < 2.0, took
        finally:
            rs.resume()
        wait_until(lambda: ping_ok(gw), 10, interval=0.1, what="gw.redis to recover")
        assert "timeout" in gw.error_log_text()


test_hung_redis_fails_calls_with_timeout_and_the_worker_keeps_serving.timeout = 90


def test_slow_redis_answers_within_the_timeout_or_times_out():
    with RedisServer() as rs, Gateway(config(rs.port, timeout=0.6)) as gw:
        body, took = call(gw.port, "/cmd?DEBUG/SLEEP/0.2")
        assert body == {"v": "OK", "err": None} and 0.15 < took < 0.6, (body, took)
        body, took = call(gw.port, "/cmd?DEBUG/SLEEP/2")
        assert body == {"v": None, "err": "timeout"}, body
        assert 0.5 <= took < 1.5, took
        wait_until(lambda: ping_ok(gw), 10, interval=0.1, what="gw.redis to recover")


def test_redis_answering_errors_gives_its_errors_and_does_not_count_as_down():
    with RedisServer() as rs, Gateway(config(rs.port)) as gw:
        rs.cmd("CONFIG", "SET", "maxmemory-policy", "noeviction")
        rs.cmd("CONFIG", "SET", "maxmemory", "1")
        try:
            for _ in range(3):
                body, took = call(gw.port, "/cmd?SET/big/value")
                assert body["v"] is None and body["err"].startswith("OOM"), body
                assert took < 0.5
            # Reads still work: Redis is up, it only refuses writes.
            assert ping_ok(gw)
        finally:
            rs.cmd("CONFIG", "SET", "maxmemory", "0")
        assert call(gw.port, "/cmd?SET/big/value")[0] == {"v": "OK", "err": None}


def reset(client):
    """Closes with a TCP RST (a FIN would be a half-close: the gateway
    still answers)."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def test_a_client_leaving_while_its_call_waits_does_not_disturb_the_worker():
    # A reset connection frees the request's task while its command is in
    # flight; the reply that comes later is dropped (under ASan: without
    # touching freed memory) and the connection goes on serving.
    with RedisServer() as rs, Gateway(config(rs.port, timeout=2)) as gw:
        # A blocked BLPOP: reset once Redis shows it waiting, then answered.
        c = Client(gw.port)
        c.send("GET /cmd?BLPOP/q/5 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: "blocked_clients:1" in rs.cmd("INFO", "clients"), 10,
                   what="the gateway's BLPOP to block")
        reset(c)
        time.sleep(0.1)
        rs.cmd("LPUSH", "q", "x")
        wait_until(lambda: rs.cmd("LLEN", "q") == 0, 5, what="BLPOP to take the element")
        # A pipeline and an EVALSHA (answered NOSCRIPT, then EVAL) whose
        # requests are gone before Redis gets to them.
        busy = threading.Thread(target=rs.cmd, args=("DEBUG", "SLEEP", "1"))
        busy.start()
        time.sleep(0.1)
        for target in ("/pipeline", "/eval"):
            c = Client(gw.port)
            c.send("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
            time.sleep(0.3)
            reset(c)
        busy.join(10)
        wait_until(lambda: rs.cmd("GET", "pl") == "1" and rs.cmd("GET", "ev") == "5", 5,
                   what="the orphaned pipeline and eval to run")
        # One whose command times out after its task is gone.
        rs.pause()
        try:
            c = Client(gw.port)
            c.send("GET /cmd?PING HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)
            reset(c)
            time.sleep(2.5)
        finally:
            rs.resume()
        wait_until(lambda: ping_ok(gw), 10, interval=0.1, what="gw.redis to answer")
        assert request(gw.port, "GET", "/plain").status == 200


def test_200_concurrent_incrs_over_20_connections_count_exactly_200():
    with RedisServer() as rs, Gateway(config(rs.port, workers=2)) as gw:
        failures = []

        def worker():
            try:
                with Client(gw.port, timeout=10) as c:
                    for _ in range(10):
                        body, _ = call(gw.port, "/cmd?INCR/counter", c)
                        if not isinstance(body["v"], int) or body["err"] is not None:
                            failures.append(body)
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))
        threads = [threading.Thread(target=worker) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not failures, failures[:5]
        assert rs.cmd("GET", "counter") == "200"


SCRIPT = r"""
local gw = require("moongate.gw")
local redis = gw.redis
assert(not pcall(redis.command, "PING"))      -- not configured yet
redis.configure{ host = "127.0.0.1", port = tonumber(arg[1]), timeout = 1 }
assert(redis.command("SET", "script:k", "v") == "OK")
assert(redis.command("GET", "script:k") == "v")
local v, err = redis.command("GET", "script:missing")
assert(v == nil and err == nil)
local r = redis.pipeline({ { "INCR", "script:n" }, { "INCR", "script:n" } })
assert(r[1] == 1 and r[2] == 2)
assert(redis.eval("return ARGV[1] .. KEYS[1]", { "k" }, { "a" }) == "ak")
-- Calls from timers wait too.
local got = 0
for i = 1, 5 do
    gw.timer.at(0, function()
        local v = redis.command("INCR", "script:t")  -- (not `got + call()`: got is read first)
        got = got + v
    end)
end
gw.sleep(0.3)
assert(got == 1 + 2 + 3 + 4 + 5, got)
-- Nothing listens there: refused at once.
redis.configure{ port = tonumber(arg[2]) }
local t0 = gw.now()
v, err = redis.command("PING")
assert(v == nil and err == "connection refused", err)
assert(gw.now() - t0 < 0.5)
-- A timer still waiting on Redis when the script ends is told "closed";
-- the program does not wait for BLPOP's 5 s.
redis.configure{ port = tonumber(arg[1]) }
gw.timer.at(0, function()
    local v, e = redis.command("BLPOP", "script:never", 5)
    print("timer woke: " .. tostring(e))
end)
gw.sleep(0.1)
print("script ok")
"""


def test_moongate_lua_scripts_can_use_gw_redis():
    with RedisServer() as rs:
        d = tempfile.mkdtemp(prefix="mg-redis-script-")
        try:
            path = os.path.join(d, "s.lua")
            with open(path, "w") as f:
                f.write(SCRIPT)
            p = spawn([moongate_bin(), "lua", path, str(rs.port), str(free_port())],
                      "moongate lua", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      stdin=subprocess.DEVNULL, cwd=str(ROOT))
            t0 = time.monotonic()
            out, err = p.communicate(timeout=30)
            text = out.decode() + err.decode()
            assert p.returncode == 0 and "script ok" in text, text
            assert "timer woke: closed" in text and time.monotonic() - t0 < 4, text
            for mark in SANITIZER_MARKS:
                assert mark not in text, text
            assert rs.cmd("GET", "script:t") == "5"
        finally:
            shutil.rmtree(d, ignore_errors=True)


def test_the_config_redis_table_configures_the_client():
    # The config's `redis = { url = ... }` reaches gw.redis through the
    # runtime (gw.redis.use_config in load_generation).
    with RedisServer() as rs:
        conf = config(rs.port).replace("gw.redis.configure(", "local _ = (")
        conf = conf.replace("  routes = {", '  redis = { url = "redis://127.0.0.1:%d/3" },\n'
                            '  routes = {' % rs.port, 1)
        with Gateway(conf) as gw:
            assert call(gw.port, "/cmd?SET/cfg/yes")[0] == {"v": "OK", "err": None}
            assert rs.cmd("GET", "cfg", db=3) == "yes"
