"""The response-transform plugin end to end: the real binary and upstream.
The seed's legacy user transform (userId/userName/userEmail -> id/name/
email) on single records, lists, handler answers; header operations;
templates from the consumer, route parameters, query and request headers;
gzip- and br-encoded upstream JSON decoded, transformed and encoded again;
transform then compression; and everything that must pass untouched with
a log line: non-JSON, invalid JSON, oversized bodies (by Content-Length,
while streaming, once decoded)."""

import gzip
import hashlib
import json
import re
import subprocess

from harness import Client, Upstream, pattern_bytes, request
from test_lua import conf_text, make_gateway

LEGACY = 'json_rename = { userId = "id", userName = "name", userEmail = "email" }'

ROUTES = r"""
    { path = "/legacy/*", upstream = "up", plugins = { ["response-transform"] = { %(legacy)s,
        header_remove = { "X-Drop" }, header_rename = { ["X-Old"] = "X-New" },
        header_replace = { ["X-Rep"] = "replaced" }, header_add = { ["X-Added"] = "yes" } } } },
    { path = "/both/*", upstream = "up", plugins = { ["response-transform"] = { %(legacy)s },
        compression = { min_length = 0 } } },
    { path = "/small/*", upstream = "up", plugins = { ["response-transform"] = { %(legacy)s,
        max_body_size = 2000 } } },
    { path = "/tmpl/{id}", upstream = "up", plugins = {
        auth = { priority = 2000, access = function(conf, ctx)
            ctx.consumer = { id = "c-7", claims = { org = "acme" } }
        end },
        ["response-transform"] = {
            json_add = { ["meta.consumer"] = "{consumer.id}",
                         ["meta.org"] = "{consumer.claims.org}",
                         ["meta.param"] = "{param.id}", ["meta.q"] = "{query.q}",
                         ["meta.tenant"] = "{header.x-tenant}", ["profile.added"] = true },
            json_remove = { "[*].userEmail", "profile.tags" },
            json_keep = { "userId", "profile", "meta" },
            header_add = { ["X-Consumer"] = "{consumer.id}", ["X-Q"] = "q={query.q}" } } } },
    { path = "/only200/*", upstream = "up", plugins = {
        ["response-transform"] = { %(legacy)s, json_keep = { "id" }, statuses = { 200 } },
        gate = { access = function(conf, ctx)
            if ctx.route and require("moongate.gw").request.get_query(ctx):find("deny") then
                return 401, { error = "unauthorized", userId = 0 }
            end
        end } } },
    { path = "/handler/me", handler = function(ctx)
        return 200, { userId = 1, userName = "Ada Lovelace", userEmail = "ada@example.com" }
    end, plugins = { ["response-transform"] = { %(legacy)s } } },
""" % {"legacy": LEGACY}


def gateway(up):
    return make_gateway(conf_text(up, ROUTES))


def unbrotli(data):
    p = subprocess.run(["brotli", "-d", "-c"], input=data, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout


def renamed(user):
    out = {}
    for k, v in user.items():
        out[{"userId": "id", "userName": "name", "userEmail": "email"}.get(k, k)] = v
    return out


def legacy_one():
    return {"userId": 1, "userName": "User 1", "userEmail": "u1@example.com",
            "profile": {"userId": 1, "tags": ["t1"], "empty": []}}


def test_the_legacy_user_record_is_renamed_with_header_operations():
    with Upstream() as up, gateway(up) as gw:
        r = request(gw.port, "GET", "/legacy/me?legacy=one&hdr=X-Drop:1&hdr=X-Old:v"
                    "&hdr=X-Rep:orig&hdr=ETag:%22e1%22")
        assert r.status == 200, r
        doc = r.json()
        # json_rename paths are top-level names: the nested profile.userId stays
        assert doc == {"id": 1, "name": "User 1", "email": "u1@example.com",
                       "profile": {"userId": 1, "tags": ["t1"], "empty": []}}, doc
        assert r.body.startswith(b'{"id":1,"name":"User 1","email":'), r.body  # order kept
        assert b'"empty":[]' in r.body
        assert r.chunked and not r.has_header("content-length"), r
        assert r.header("etag") == 'W/"e1"', r
        assert not r.has_header("x-drop") and r.header("x-new") == "v", r
        assert not r.has_header("x-old"), r
        assert r.header("x-rep") == "replaced" and r.header("x-added") == "yes", r


def test_every_record_of_a_list_is_renamed_for_every_upstream_framing():
    with Upstream() as up, gateway(up) as gw:
        for framing in ("", "&chunked=1", "&nolen=1"):
            r = request(gw.port, "GET", "/legacy/users?legacy=200" + framing)
            assert r.status == 200, (framing, r)
            doc = r.json()
            assert len(doc) == 200 and doc[199]["id"] == 200, framing
            assert all(set(u) == {"id", "name", "email", "profile"} for u in doc), framing


def test_a_handler_answer_is_transformed():
    with Upstream() as up, gateway(up) as gw:
        r = request(gw.port, "GET", "/handler/me")
        assert r.status == 200, r
        assert r.json() == {"id": 1, "name": "Ada Lovelace", "email": "ada@example.com"}, r


def test_statuses_limit_the_body_transform_to_the_listed_ones():
    with Upstream() as up, gateway(up) as gw:
        r = request(gw.port, "GET", "/only200/x?legacy=one")
        assert r.status == 200 and r.json() == {"id": 1}, r
        r = request(gw.port, "GET", "/only200/x?legacy=one&status=404")
        assert r.status == 404 and r.json() == legacy_one(), r
        r = request(gw.port, "GET", "/only200/x?deny=1")  # an early exit's error
        assert r.status == 401 and r.json() == {"error": "unauthorized", "userId": 0}, r


def test_templates_nested_paths_arrays_and_keep():
    with Upstream() as up, gateway(up) as gw:
        r = request(gw.port, "GET", "/tmpl/42?legacy=one&q=a%20b",
                    headers={"X-Tenant": "t-9"})
        assert r.status == 200, r
        assert r.json() == {
            "userId": 1,
            "profile": {"userId": 1, "empty": [], "added": True},
            "meta": {"consumer": "c-7", "org": "acme", "param": "42", "q": "a b",
                     "tenant": "t-9"},
        }, r.json()
        assert r.header("x-consumer") == "c-7" and r.header("x-q") == "q=a b", r
        # a template that decodes to CR/LF cannot split the head (nor fail)
        r = request(gw.port, "GET", "/tmpl/1?legacy=one&q=x%0d%0aEvil:%201%00")
        assert r.status == 200 and r.header("x-q") == "q=xEvil: 1", r
        assert not r.has_header("evil"), r
        r = request(gw.port, "GET", "/tmpl/1?legacy=3")  # a list: each element
        doc = r.json()
        assert [u["userId"] for u in doc] == [1, 2, 3], doc
        assert all(set(u) == {"userId", "profile", "meta"} for u in doc), doc
        assert doc[0]["meta"]["tenant"] == "" and doc[0]["meta"]["q"] == "", doc


def test_gzip_and_br_upstream_json_is_decoded_transformed_and_encoded_again():
    with Upstream() as up, gateway(up) as gw:
        want = [renamed({"userId": i, "userName": "User %d" % i,
                         "userEmail": "u%d@example.com" % i,
                         "profile": {"userId": i, "tags": ["t%d" % i], "empty": []}})
                for i in range(1, 51)]
        r = request(gw.port, "GET", "/legacy/x?legacy=50&encode=gzip",
                    headers={"Accept-Encoding": "gzip"})
        assert r.status == 200 and r.header("content-encoding") == "gzip", r
        assert json.loads(gzip.decompress(r.body)) == want
        r = request(gw.port, "GET", "/legacy/x?legacy=50&encode=br&chunked=1",
                    headers={"Accept-Encoding": "br"})
        assert r.status == 200 and r.header("content-encoding") == "br", r
        assert json.loads(unbrotli(r.body)) == want
        # curl decodes it too (what a client sees)
        p = subprocess.run(["curl", "-s", "-m", "10", "--compressed",
                            "http://127.0.0.1:%d/legacy/x?legacy=50&encode=gzip" % gw.port],
                           capture_output=True, timeout=20)
        assert json.loads(p.stdout) == want


def test_transform_then_compression_on_the_same_route():
    with Upstream() as up, gateway(up) as gw:
        for ae, dec in (("gzip", gzip.decompress), ("br", unbrotli)):
            r = request(gw.port, "GET", "/both/x?legacy=20", headers={"Accept-Encoding": ae})
            assert r.header("content-encoding") == ae, r
            doc = json.loads(dec(r.body))
            assert len(doc) == 20 and doc[0]["id"] == 1 and "userId" not in doc[0], doc[0]
        # an upstream gzip body on a compression route: transformed, still gzip, once
        r = request(gw.port, "GET", "/both/x?legacy=20&encode=gzip",
                    headers={"Accept-Encoding": "gzip, br"})
        assert r.header_all("content-encoding") == ["gzip"], r
        assert json.loads(gzip.decompress(r.body))[0]["id"] == 1


def test_non_json_and_invalid_json_pass_untouched_with_a_log_line():
    with Upstream() as up, gateway(up) as gw:
        r = request(gw.port, "GET", "/legacy/x?size=5000&ctype=text/plain")
        assert r.status == 200 and r.body == pattern_bytes(5000), r
        assert r.header("content-length") == "5000", r
        gw.wait_log(re.escape("not JSON (Content-Type text/plain); body passed untouched"))
        r = request(gw.port, "GET", "/legacy/x?size=5000&ctype=application/json")
        assert r.status == 200 and r.body == pattern_bytes(5000), r
        gw.wait_log(re.escape("invalid JSON"))
        # corrupt gzip: passed on as it came, still labelled gzip
        r = request(gw.port, "GET", "/legacy/x?size=3000&ctype=application/json"
                    "&hdr=Content-Encoding:gzip")
        assert r.status == 200 and r.body == pattern_bytes(3000), r
        gw.wait_log(re.escape("cannot decode the gzip body"))
        # another coding: untouched
        r = request(gw.port, "GET", "/legacy/x?legacy=one&hdr=Content-Encoding:zstd")
        assert json.loads(r.body) == legacy_one(), r
        gw.wait_log(re.escape("Content-Encoding zstd is not gzip or br"))
        # HEAD: the header operations only
        r = request(gw.port, "HEAD", "/legacy/x?legacy=one&hdr=X-Drop:1")
        assert r.status == 200 and r.body == b"" and not r.has_header("x-drop"), r
        assert r.header("x-added") == "yes", r


def test_oversized_bodies_pass_untouched_whole_and_with_a_log_line():
    with Upstream() as up, gateway(up) as gw:
        # known by Content-Length: streamed through, length kept
        r = request(gw.port, "GET", "/small/x?legacy=100")
        assert r.status == 200 and r.header("content-length") == str(len(r.body)), r
        assert json.loads(r.body)[0]["userId"] == 1, r
        gw.wait_log(re.escape("bytes is over max_body_size"))
        # chunked: found out while streaming; what was held back goes out first
        r = request(gw.port, "GET", "/small/x?legacy=100&chunked=1")
        doc = json.loads(r.body)
        assert len(doc) == 100 and doc[0]["userId"] == 1, r
        gw.wait_log(re.escape("body over max_body_size (2000 bytes)"))
        # a large streamed body: byte-exact after the switch to pass-through
        r = request(gw.port, "GET", "/small/x?size=3000000&chunked=1&ctype=application/json",
                    timeout=20)
        assert hashlib.sha256(r.body).digest() == hashlib.sha256(pattern_bytes(3000000)).digest()
        # small compressed, large once decoded
        r = request(gw.port, "GET", "/small/x?legacy=100&encode=gzip")
        assert r.header("content-encoding") == "gzip", r
        assert json.loads(gzip.decompress(r.body))[0]["userId"] == 1
        gw.wait_log(re.escape("decoded body is over max_body_size"))
        # under the limit the same route transforms
        r = request(gw.port, "GET", "/small/x?legacy=3")
        assert r.json()[2]["id"] == 3, r


def test_transformed_responses_keep_the_connection_alive():
    with Upstream() as up, gateway(up) as gw:
        with Client(gw.port) as c:
            for i in range(5):
                r = c.request("GET", "/legacy/k%d?legacy=%d" % (i, i + 1))
                assert r.status == 200 and len(r.json()) == i + 1, r
                assert r.json()[i]["id"] == i + 1
