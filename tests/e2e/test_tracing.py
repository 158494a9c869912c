"""The request-id plugin's OTLP span exporter end to end: the real binary,
the real upstream, and a collector stand-in (a small standard-library HTTP
server in this process, on a free port) that records every export request.

The span a collector receives keeps the client's trace id, has the
client's span id as parent and, as its own id, the span id the gateway sent
upstream in traceparent; a malformed traceparent gives a new root span; a
collector that refuses connections or never answers costs the requests
nothing, and the failure and the drops are logged. Span building, the JSON
encoding and the queue are covered in depth by spec/tracing_spec.lua."""

import json
import re
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from harness import Raw, Upstream, free_port, hdr_values, lua, request, upstream_saw, wait_until
from test_lua import conf_text, make_gateway

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TP_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


class Collector:
    """An OTLP/HTTP collector stand-in: answers every POST with `status`
    and keeps (path, headers, parsed JSON body) of each."""

    def __init__(self, status=200):
        self.status = status
        self.exports = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                self.wfile.flush()
                # Recorded once answered: see settle()
                with outer.lock:
                    outer.exports.append((self.path, dict(self.headers), json.loads(body)))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    @property
    def url(self):
        return "http://127.0.0.1:%d/v1/traces" % self.port

    def spans(self):
        with self.lock:
            exports = list(self.exports)
        out = []
        for _, _, doc in exports:
            for rs in doc["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    out.extend(ss["spans"])
        return out

    def settle(self):
        """Gives the gateway time to read the last answer before the test
        stops it. An export still in flight when a worker exits trips a
        core bug (its literal target is freed under it: a use-after-free
        under ASan, a worker that never exits in a release build)."""
        time.sleep(0.3)

    def wait_spans(self, trace_id, count, timeout=10):
        """The spans of `trace_id`, once `count` of them arrived."""
        def got():
            s = [x for x in self.spans() if x["traceId"] == trace_id]
            return s if len(s) >= count else None
        return wait_until(got, timeout, interval=0.05, what="%d spans of %s" % (count, trace_id))


def gateway(up, exporter, extra_route_plugins=None):
    rid = {"request-id": {"exporter": exporter}}
    routes = [
        {"path": "/t", "upstream": "up", "plugins": rid},
        {"path": "/slow", "upstream": "up",
         "plugins": {"request-id": {"exporter": dict(exporter, plugin_spans=True)},
                     "slowpoke": {"access": Raw("function() require('moongate.gw').sleep(0.05) end")}}},
    ]
    text = ",\n".join(lua(r, 1) for r in routes) + ","
    return make_gateway(conf_text(up, text))


def attrs(span):
    out = {}
    for a in span.get("attributes", []):
        v = a["value"]
        out[a["key"]] = v.get("stringValue", v.get("intValue", v.get("doubleValue")))
    return out


def by_kind(spans):
    server = [s for s in spans if s["kind"] == 2]
    assert len(server) == 1, spans
    return server[0], [s for s in spans if s["kind"] != 2]


def test_the_collector_gets_the_span_of_a_continued_trace():
    with Upstream() as up, Collector() as col, \
            gateway(up, {"url": col.url, "flush_interval": 0.1,
                         "service_name": "edge", "headers": {"X-Api-Key": "k1"}}) as gw:
        r = request(gw.port, "GET", "/t?q=1", headers=[("traceparent", VALID), ("tracestate", "k=v")])
        [sent] = hdr_values(upstream_saw(r), "traceparent")
        m = TP_RE.match(sent)
        assert m and m.group(1) == "4bf92f3577b34da6a3ce929d0e0e4736", sent
        spans = col.wait_spans(m.group(1), 2)
        server, children = by_kind(spans)
        assert server["spanId"] == m.group(2), (server, sent)
        assert server["parentSpanId"] == "00f067aa0ba902b7", server
        assert server["traceState"] == "k=v", server
        assert server["name"] == "GET /t", server
        start, end = int(server["startTimeUnixNano"]), int(server["endTimeUnixNano"])
        assert 0 < end - start < 60 * 10**9 and abs(start / 1e9 - time.time()) < 60, server
        a = attrs(server)
        assert a["http.request.method"] == "GET" and a["http.route"] == "/t", a
        assert a["http.response.status_code"] == "200" and a["url.path"] == "/t", a
        assert a["client.address"] == "127.0.0.1", a
        assert a["moongate.request_id"] == r.header("x-request-id"), (a, r)
        assert a["moongate.upstream_ms"] >= 0, a
        [upstream] = children
        assert upstream["name"] == "upstream" and upstream["parentSpanId"] == m.group(2), upstream
        assert upstream["spanId"] not in (m.group(2), "00f067aa0ba902b7"), upstream
        assert start <= int(upstream["startTimeUnixNano"]) <= int(upstream["endTimeUnixNano"]) <= end
        path, headers, doc = col.exports[0]
        assert path == "/v1/traces", path
        assert headers.get("Content-Type") == "application/json", headers
        assert headers.get("X-Api-Key") == "k1", headers
        res = {a["key"]: a["value"]["stringValue"] for a in doc["resourceSpans"][0]["resource"]["attributes"]}
        assert res == {"service.name": "edge"}, res
        col.settle()


def test_a_malformed_traceparent_gives_a_new_root_span():
    with Upstream() as up, Collector() as col, \
            gateway(up, {"url": col.url, "flush_interval": 0.1}) as gw:
        r = request(gw.port, "GET", "/t", headers=[("traceparent", VALID.upper())])
        [sent] = hdr_values(upstream_saw(r), "traceparent")
        m = TP_RE.match(sent)
        assert m and m.group(1) != "4bf92f3577b34da6a3ce929d0e0e4736", sent
        server, _ = by_kind(col.wait_spans(m.group(1), 2))
        assert server["spanId"] == m.group(2), (server, sent)
        assert "parentSpanId" not in server and "traceState" not in server, server
        col.settle()


def test_plugin_spans_time_each_plugin_call():
    with Upstream() as up, Collector() as col, \
            gateway(up, {"url": col.url, "flush_interval": 0.1}) as gw:
        r = request(gw.port, "GET", "/slow", headers=[("traceparent", VALID)])
        assert r.status == 200, r
        # gateway, upstream, and request-id's rewrite, header_filter and
        # log, and slowpoke's access
        spans = col.wait_spans("4bf92f3577b34da6a3ce929d0e0e4736", 6)
        server, children = by_kind(spans)
        names = sorted(s["name"] for s in children)
        assert names == ["access slowpoke", "header_filter request-id", "log request-id",
                         "rewrite request-id", "upstream"], names
        [slow] = [s for s in children if s["name"] == "access slowpoke"]
        took = int(slow["endTimeUnixNano"]) - int(slow["startTimeUnixNano"])
        assert took >= 50 * 10**6, slow     # it slept 50 ms
        assert all(s["parentSpanId"] == server["spanId"] for s in children), children
        col.settle()


def test_many_requests_arrive_in_batches():
    with Upstream() as up, Collector() as col, \
            gateway(up, {"url": col.url, "flush_interval": 0.2, "batch_size": 10}) as gw:
        ids = set()
        for _ in range(25):
            r = request(gw.port, "GET", "/t")
            [sent] = hdr_values(upstream_saw(r), "traceparent")
            ids.add(TP_RE.match(sent).group(1))

        def all_there():
            got = {s["traceId"] for s in col.spans() if s["kind"] == 2}
            return ids <= got or None
        wait_until(all_there, 10, what="25 gateway spans")
        for _, _, doc in col.exports:
            n = sum(1 for s in doc["resourceSpans"][0]["scopeSpans"][0]["spans"] if s["kind"] == 2)
            assert 1 <= n <= 10, n
        col.settle()


def test_a_dead_collector_costs_the_requests_nothing_and_is_logged():
    port = free_port()          # nothing listens there: connection refused
    with Upstream() as up, gateway(up, {"url": "http://127.0.0.1:%d/v1/traces" % port,
                                        "flush_interval": 0.05, "batch_size": 5,
                                        "max_queue": 5}) as gw:
        for _ in range(30):
            r = request(gw.port, "GET", "/t")
            assert r.status == 200, r
        gw.wait_log(r"request-id exporter http://127\.0\.0\.1:%d/v1/traces: \d+ export\(s\) "
                    r"failed \(last: connection refused\)" % port)
        gw.wait_log(r"request-id exporter .*, [1-9]\d* span\(s\) dropped \(queue full: 5\)")


def test_a_hung_collector_does_not_hold_up_requests():
    hung = socket.socket()      # accepts connections (backlog), never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    try:
        url = "http://127.0.0.1:%d/v1/traces" % hung.getsockname()[1]
        with Upstream() as up, gateway(up, {"url": url, "flush_interval": 0.05,
                                            "batch_size": 1, "timeout": 20}) as gw:
            worst = 0
            t_end = time.monotonic() + 1.5
            n = 0
            while time.monotonic() < t_end or n < 10:
                t0 = time.monotonic()
                r = request(gw.port, "GET", "/t")
                worst = max(worst, time.monotonic() - t0)
                assert r.status == 200, r
                n += 1
            # An export waits up to 20 s; a request that waited for one
            # would take that long. The margin absorbs a busy machine.
            assert worst < 5, "a request took %.2f s" % worst
            # Reset the export still waiting, or stopping the gateway would
            # wait for it (draining)
            hung.close()
    finally:
        hung.close()


def test_moongate_check_names_the_route_and_field_of_a_bad_exporter():
    from test_lua import run_cli
    cases = [
        ({"url": "http://127.0.0.1:4318/v1/traces", "max_queue": 0},
         r'moongate\.lua: routes\[1\] "/t": plugins\.request-id\.exporter\.max_queue: '
         r'must be at least 1'),
        ({"url": "http://otel.example.com:4318/v1/traces"},
         r'moongate\.lua: routes\[1\] "/t": plugins\.request-id: exporter\.url: the host '
         r'must be an IP literal or localhost'),
    ]
    with Upstream() as up:
        for exporter, pattern in cases:
            gw = gateway(up, exporter)
            try:
                code, out, err = run_cli("check", "-c", gw.conf_path)
            finally:
                shutil.rmtree(gw.dir, ignore_errors=True)
            assert code == 1 and re.search(pattern, out + err), (code, out + err)
