"""A small deterministic mutation fuzz of request heads and chunked bodies.
Each mutated request goes on its own connection; whatever the gateway
makes of it, it must answer with well-formed HTTP or close, never crash
(the worker keeps its pid), never hang (each exchange has a timeout), and
never forward anything malformed (the strict upstream counts errors; the
proxied() helper fails the test on any). Seeds are fixed, so a failure is
reproducible: the failing case's bytes are printed."""

import random
import socket

from harness import Client, ProtocolError, build_request, chunked, proxied, route

SEEDS = (1, 2, 3)
CASES_PER_SEED = 150

BASES = [
    build_request("GET", "/users/1?x=1", headers=[("Accept", "*/*"), ("X-A", "b")]),
    build_request("POST", "/users/2", headers=[("Content-Type", "text/plain")], body=b"hello"),
    build_request("POST", "/users/3", headers=[("Transfer-Encoding", "chunked")])
    + chunked(b"abc", b"defgh", ext="e=1", trailers=["X-T: 1"]),
    build_request("PUT", "/users/%2e%2e/x", headers=[("Expect", "100-continue")], body=b"12345"),
    build_request("GET", "/users/a", version="1.0", host=None),
]
INSERTS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b"%", b"%2", b"\\",
           b"\r\n ", b"\r\nTransfer-Encoding: chunked", b"\r\nContent-Length: 3",
           b"\r\nHost: y", b"0\r\n\r\n", b"\xff", b"/..", b"?", b"HTTP/1.1"]


def mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(5)
        i = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(i, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[i:i] = rng.choice(INSERTS)
        elif op == 2 and data:
            del data[i:i + rng.randint(1, 4)]
        elif op == 3:
            j = rng.randrange(len(data) + 1)
            a, b = sorted((i, j))
            data[a:a] = data[a:b][:64]
        else:
            data = data[:i]
    return bytes(data)


def exchange(port, data):
    """Sends `data`, half-closes, reads until close. Returns a summary."""
    with Client(port, timeout=3) as c:
        try:
            c.send(data)
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        statuses = []
        while True:
            try:
                r = c.read_response(head=data.startswith(b"HEAD"))
            except ProtocolError as e:
                if c.eof and not c.buf:
                    break
                raise AssertionError("malformed or hung exchange: %s" % e)
            statuses.append(r.status)
            if len(statuses) > 10:
                raise AssertionError("too many responses")
        return statuses


def run_seed(seed):
    rng = random.Random(seed)
    with proxied([route("/users/*", max_body="1k")]) as (gw, up):
        pids = gw.worker_pids()
        for n in range(CASES_PER_SEED):
            data = mutate(rng, rng.choice(BASES))
            try:
                statuses = exchange(gw.port, data)
            except AssertionError as e:
                raise AssertionError("seed %d case %d: %s\n    sent %r" % (seed, n, e, data))
            for s in statuses:
                assert 100 <= s <= 599, (seed, n, s, data)
            assert gw.worker_pids() == pids, \
                "seed %d case %d: the worker died (pids %s -> %s)\n    sent %r" % (
                    seed, n, pids, gw.worker_pids(), data)


def _make(seed):
    def t():
        run_seed(seed)
    return t


for _seed in SEEDS:
    _fn = _make(_seed)
    _fn.__name__ = _fn.__qualname__ = "test_mutated_requests_with_seed_%d_never_crash_or_hang" % _seed
    globals()[_fn.__name__] = _fn
del _seed, _fn
