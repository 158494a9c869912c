"""The access log: one JSON object per line per request, with every field,
for proxied, handler-answered, refused and failed requests; reopened on
SIGUSR1 (logrotate)."""

import json
import os
import signal
import time

from harness import Client, proxied, request, route, wait_until

FIELDS = {"time", "request_id", "client_ip", "method", "path", "query", "status",
          "route", "consumer", "upstream", "bytes_in", "bytes_out", "latency_ms", "upstream_ms"}


def lines_of(path):
    """The log's lines, less the harness's readiness probes."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [json.loads(line) for line in f.read().splitlines()]
    return [l for l in lines if l["path"] != "/__never__"]


def wait_lines(path, n):
    # The log is flushed once a second (or when its buffer fills).
    return wait_until(lambda: len(lines_of(path)) >= n and lines_of(path), 5,
                      what="%d access-log lines in %s" % (n, path))


def test_every_request_gets_one_json_line_with_every_field():
    with proxied([route("/x/*")], workers=2, access_log="@DIR@/access.log") as (gw, up):
        path = os.path.join(gw.dir, "access.log")
        r = request(gw.port, "GET", "/x/a?q=1")
        assert r.status == 200, r
        rid = r.header("x-request-id")
        r = request(gw.port, "POST", "/x/b", body=b"hello")
        assert r.status == 200, r
        assert request(gw.port, "GET", "/nope").status == 404
        assert request(gw.port, "GET", "/x/%2F").status == 400
        lines = wait_lines(path, 4)
        for line in lines:
            assert set(line) == FIELDS, line
            assert line["time"].endswith("Z") and line["client_ip"] == "127.0.0.1", line
            assert isinstance(line["latency_ms"], float), line
        by_path = {l["path"]: l for l in lines}
        a = by_path["/x/a"]
        assert a["request_id"] == rid and a["query"] == "q=1" and a["status"] == 200, a
        assert a["route"] == "/x/*" and a["upstream"].startswith("127.0.0.1:"), a
        assert a["bytes_out"] > 0 and a["upstream_ms"] is not None, a
        assert by_path["/x/b"]["bytes_in"] == 5 and by_path["/x/b"]["method"] == "POST"
        nope = by_path["/nope"]
        assert nope["status"] == 404 and nope["route"] is None and nope["upstream"] is None
        assert nope["request_id"] and nope["upstream_ms"] is None, nope
        assert [l for l in lines if l["status"] == 400], lines


def test_sigusr1_reopens_the_access_log_after_a_rotation():
    with proxied([route("/x/*")], access_log="@DIR@/access.log") as (gw, up):
        path = os.path.join(gw.dir, "access.log")
        with Client(gw.port) as c:
            assert c.request("GET", "/x/before").status == 200
            wait_lines(path, 1)
            os.rename(path, path + ".1")
            gw.signal(signal.SIGUSR1)
            time.sleep(0.3)
            # The same keep-alive connection goes on; its next line lands in
            # the new file, not the rotated one.
            assert c.request("GET", "/x/after").status == 200
        lines = wait_lines(path, 1)
        assert [l["path"] for l in lines] == ["/x/after"], lines
        assert [l["path"] for l in lines_of(path + ".1")] == ["/x/before"]


def test_an_unopenable_access_log_is_an_error_line_not_a_crash():
    with proxied([route("/x/*")], access_log="/nonexistent-dir/access.log") as (gw, up):
        assert request(gw.port, "GET", "/x/a").status == 200
        gw.wait_log(r"access log /nonexistent-dir/access.log: No such file")


def test_the_consumer_an_auth_plugin_found_is_logged():
    routes = [route("/k/*", plugins={"key-auth": {"keys": {"k-123": {"id": "svc-a",
                                                                      "roles": ["user"]}}}})]
    with proxied(routes, access_log="@DIR@/access.log") as (gw, up):
        path = os.path.join(gw.dir, "access.log")
        assert request(gw.port, "GET", "/k/a", headers=[("X-API-Key", "k-123")]).status == 200
        assert request(gw.port, "GET", "/k/b").status == 401
        lines = {l["path"]: l for l in wait_lines(path, 2)}
        assert lines["/k/a"]["consumer"] == "svc-a", lines
        assert lines["/k/b"]["consumer"] is None and lines["/k/b"]["status"] == 401, lines
