"""request-transform end to end: the real binary and the real (strict)
upstream echoing what it received.

The seed's legacy user transform (the client sends userId/userName/
userEmail, the upstream sees id/name/email) with Content-Length fixed up,
also for a chunked client body; headers, query parameters and the path
rewritten from templates; bodies that are not JSON, invalid JSON or over
max_body passed on byte for byte with a log line. Every JSON operation is
covered by spec/transform_spec.lua."""

import json

from harness import Upstream, chunked, hdr_values, request, upstream_saw, Gateway

LEGACY = {"json": {"rename": {"userId": "id", "userName": "name", "userEmail": "email"},
                   "remove": ["internal"]},
          "max_body": 200}


def gateway(up, routes):
    return Gateway({"upstreams": {"up": {"targets": [up.addr]}}, "routes": routes})


ROUTES = [
    {"path": "/legacy/users", "upstream": "up", "plugins": {"request-transform": LEGACY}},
    {"path": "/v1/users/{id}", "upstream": "up", "plugins": {"request-transform": {
        "path": "/api/v2/users/{params.id}",
        "headers": {"remove": ["Cookie"], "rename": {"X-Old": "X-New"},
                    "replace": {"X-Env": "prod"},
                    "add": {"X-Client-Id": "{headers.x-client}", "X-Env": "never"}},
        "query": {"remove": ["debug"], "rename": {"q": "search"},
                  "add": {"limit": "20", "by": "{params.id}"}},
    }}},
]


def send_json(gw, path, obj_or_text, ctype="application/json", extra=()):
    body = obj_or_text if isinstance(obj_or_text, bytes) else json.dumps(obj_or_text).encode()
    return request(gw.port, "POST", path, headers=[("Content-Type", ctype)] + list(extra), body=body)


def test_legacy_user_fields_are_renamed_before_the_upstream_sees_them():
    with Upstream() as up, gateway(up, ROUTES) as gw:
        sent = {"userId": 1, "userName": "Ada Lovelace", "userEmail": "ada@example.com",
                "internal": "x", "tags": [], "big": 12345678901234567890}
        desc = upstream_saw(send_json(gw, "/legacy/users", sent))
        assert desc["framing"] == "length", desc
        got = json.loads(desc["body"])
        assert got == {"id": 1, "name": "Ada Lovelace", "email": "ada@example.com",
                       "tags": [], "big": 12345678901234567890}, desc["body"]
        assert hdr_values(desc, "content-length") == [str(len(desc["body"]))], desc
        assert desc["body_len"] == len(desc["body"].encode("latin-1"))


def test_a_chunked_json_body_is_transformed_and_sent_with_a_content_length():
    with Upstream() as up, gateway(up, ROUTES) as gw:
        raw = (b"POST /legacy/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               + chunked(b'{"userId":2,', b'"userName":"Alan"}'))
        from harness import Client
        with Client(gw.port) as c:
            c.send(raw)
            resp = c.read_response()
        desc = upstream_saw(resp)
        assert desc["framing"] == "length", desc
        assert json.loads(desc["body"]) == {"id": 2, "name": "Alan"}, desc


def test_bodies_that_are_not_transformable_pass_untouched_with_a_log_line():
    with Upstream() as up, gateway(up, ROUTES) as gw:
        # invalid JSON
        bad = b'{"userId": 1, "userName": '
        desc = upstream_saw(send_json(gw, "/legacy/users", bad))
        assert desc["body"] == bad.decode(), desc
        assert gw.wait_log(r"request-transform: body passed untouched: not valid JSON")
        # over max_body (200 bytes): untouched, logged
        big = json.dumps({"userId": 3, "pad": "p" * 300}).encode()
        desc = upstream_saw(send_json(gw, "/legacy/users", big))
        assert desc["body"] == big.decode(), desc
        assert gw.wait_log(r"request-transform: body passed untouched: \d+ bytes, over max_body 200")
        # not JSON by its Content-Type: untouched (a form, say)
        form = b'{"userId": 4}'
        desc = upstream_saw(send_json(gw, "/legacy/users", form, ctype="text/plain"))
        assert desc["body"] == form.decode(), desc
        # +json media types are JSON
        desc = upstream_saw(send_json(gw, "/legacy/users", {"userId": 5},
                                      ctype="application/vnd.api+json; charset=utf-8"))
        assert json.loads(desc["body"]) == {"id": 5}, desc


def test_headers_query_and_path_are_rewritten_from_templates():
    with Upstream() as up, gateway(up, ROUTES) as gw:
        resp = request(gw.port, "GET", "/v1/users/u%207?q=a+b&debug=1&x=%7e", headers=[
            ("Cookie", "s=1"), ("X-Old", "o1"), ("X-Env", "dev"), ("X-Client", "c-9")])
        desc = upstream_saw(resp)
        path, _, query = desc["path"].partition("?")
        assert path == "/api/v2/users/u%207", desc["path"]
        assert query == "search=a%20b&x=~&by=u%207&limit=20", desc["path"]
        assert hdr_values(desc, "cookie") == [], desc
        assert hdr_values(desc, "x-old") == [] and hdr_values(desc, "x-new") == ["o1"], desc
        assert hdr_values(desc, "x-env") == ["prod"], desc
        assert hdr_values(desc, "x-client-id") == ["c-9"], desc
        # without X-Client the add has no value: no header, no error
        desc = upstream_saw(request(gw.port, "GET", "/v1/users/8"))
        assert hdr_values(desc, "x-client-id") == [], desc
        assert desc["path"] == "/api/v2/users/8?by=8&limit=20", desc


def test_check_names_the_field_of_a_bad_path():
    import subprocess
    from harness import moongate_bin
    with Upstream() as up:
        gw = gateway(up, [{"path": "/x", "upstream": "up", "plugins": {"request-transform": {
            "json": {"rename": {"a[0].b": "c"}}}}}])
        out = subprocess.run([moongate_bin(), "check", "-c", gw.conf_path],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1, out
        assert 'routes[1] "/x": plugins.request-transform: json.rename.a[0].b: only [*]' \
            in out.stdout + out.stderr, out
