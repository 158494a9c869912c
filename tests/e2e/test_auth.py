"""Authentication and authorization plugins end to end: jwt-auth, key-auth
and acl (the built-in plugins/ files) on the real binary, with the real
upstream echoing what it received.

Identity headers a client forges never reach the upstream; HS256 and RS256
tokens (signed here, with the keys in spec/fixtures/jwt/) give the upstream
X-User-ID / X-User-Roles; missing, bad, expired and oversized tokens get 401
with a Bearer challenge; acl answers 403 per path and method; key-auth maps
an API key to a consumer and does not forward the key. The verification
logic itself is covered in depth by spec/jwt_auth_spec.lua."""

import base64
import hashlib
import hmac
import json
import os
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from harness import ROOT, Upstream, hdr_values, lua, request, upstream_saw
from test_lua import conf_text, make_gateway

FIXTURES = os.path.join(ROOT, "spec", "fixtures", "jwt")
SECRET = "e2e-shared-secret-0123456789abcdef"
UP_KEY = "k-123-secret"


def _read(name):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(claims, alg="HS256", kid=None, secret=SECRET, header=None):
    h = {"alg": alg, "typ": "JWT"}
    if kid:
        h["kid"] = kid
    h.update(header or {})
    inp = b64u(json.dumps(h).encode()) + "." + b64u(json.dumps(claims).encode())
    if alg == "HS256":
        sig = hmac.new(secret.encode(), inp.encode(), hashlib.sha256).digest()
    elif alg == "RS256":
        key = serialization.load_pem_private_key(_read("rsa.pem"), None)
        sig = key.sign(inp.encode(), padding.PKCS1v15(), hashes.SHA256())
    else:
        sig = b""
    return inp + "." + b64u(sig)


def claims(sub="alice", roles=("user",), **kw):
    c = {"sub": sub, "roles": list(roles), "exp": int(time.time()) + 300}
    c.update(kw)
    return c


def bearer(token):
    return [("Authorization", "Bearer " + token)]


JWT_CONF = {
    "keys": {
        "hs-1": {"secret": SECRET, "algorithms": ["HS256"]},
        "rsa-1": {"public_key": _read("rsa.pub.pem").decode(), "algorithms": ["RS256"]},
    },
    "leeway": 5,
}


def routes():
    r = [
        {"path": "/open", "upstream": "up"},
        {"path": "/api/*", "upstream": "up", "plugins": {"jwt-auth": JWT_CONF}},
        {"path": "/admin/*", "upstream": "up", "plugins": {
            "jwt-auth": JWT_CONF,
            "acl": {"rules": [
                {"methods": ["GET"], "allow": ["user", "admin"]},
                {"methods": ["DELETE"], "allow": ["admin"]},
            ]},
        }},
        {"path": "/reports/*", "upstream": "up", "plugins": {
            "jwt-auth": JWT_CONF, "acl": {"allow": ["auditor"]}}},
        {"path": "/acl-only", "upstream": "up", "plugins": {"acl": {"allow": ["user"]}}},
        {"path": "/cookie", "upstream": "up", "plugins": {"jwt-auth": dict(
            JWT_CONF, header="", cookie="session", query="access_token")}},
        {"path": "/jwks", "upstream": "up", "plugins": {"jwt-auth": {
            "jwks": json.loads(_read("vectors.json"))["jwks"], "jwks_algorithms": ["RS256", "ES256", "EdDSA"]}}},
        {"path": "/key/*", "upstream": "up", "plugins": {
            "key-auth": {"query": "apikey", "keys": {
                UP_KEY: {"id": "svc-a", "roles": ["user"]},
                "k-admin": {"id": "svc-admin", "roles": ["admin", "user"]},
            }},
            "acl": {"rules": [{"methods": ["DELETE"], "allow": ["admin"]}], "allow": ["user"]},
        }},
    ]
    return ",\n".join(lua(x, 1) for x in r) + ","


def gateway(up):
    return make_gateway(conf_text(up, routes()))


def challenge(resp):
    return resp.header("www-authenticate") or ""


def test_a_forged_x_user_id_never_reaches_the_upstream_with_or_without_a_token():
    forged = [("X-User-ID", "admin"), ("X-User-Roles", "admin"), ("x-user-id", "root")]
    with Upstream() as up, gateway(up) as gw:
        desc = upstream_saw(request(gw.port, "GET", "/open", headers=forged))
        assert hdr_values(desc, "x-user-id") == [], desc
        assert hdr_values(desc, "x-user-roles") == [], desc
        before = up.stats()
        r = request(gw.port, "GET", "/api/x", headers=forged)
        assert r.status == 401, r
        r = request(gw.port, "GET", "/api/x", headers=forged + bearer(jwt(claims(), kid="hs-1") + "x"))
        assert r.status == 401, r
        assert up.stats()["requests"] == before["requests"], "a refused request reached the upstream"
        tok = jwt(claims(sub="bob", roles=["user"]), kid="hs-1")
        desc = upstream_saw(request(gw.port, "GET", "/api/x", headers=forged + bearer(tok)))
        assert hdr_values(desc, "x-user-id") == ["bob"], desc
        assert hdr_values(desc, "x-user-roles") == ["user"], desc
        # a token without roles: the forged roles header is gone, not kept
        tok = jwt({"sub": "carol", "exp": int(time.time()) + 60}, kid="hs-1")
        desc = upstream_saw(request(gw.port, "GET", "/api/x", headers=forged + bearer(tok)))
        assert hdr_values(desc, "x-user-id") == ["carol"], desc
        assert hdr_values(desc, "x-user-roles") == [], desc


def test_valid_hs256_and_rs256_tokens_pass_and_the_upstream_sees_the_identity():
    with Upstream() as up, gateway(up) as gw:
        for alg, kid in (("HS256", "hs-1"), ("RS256", "rsa-1")):
            tok = jwt(claims(sub="alice", roles=["user", "admin"]), alg=alg, kid=kid)
            desc = upstream_saw(request(gw.port, "GET", "/api/items?q=1", headers=bearer(tok)))
            assert hdr_values(desc, "x-user-id") == ["alice"], (alg, desc)
            assert hdr_values(desc, "x-user-roles") == ["user,admin"], (alg, desc)
            assert hdr_values(desc, "authorization") == ["Bearer " + tok], (alg, desc)
        # space-separated roles claim, lower-case scheme
        tok = jwt(claims(sub="dave", roles=[]) | {"roles": "ops user"}, kid="hs-1")
        desc = upstream_saw(request(gw.port, "GET", "/api/x",
                                    headers=[("Authorization", "bearer " + tok)]))
        assert hdr_values(desc, "x-user-roles") == ["ops,user"], desc


def test_missing_bad_and_expired_tokens_get_401_with_a_bearer_challenge():
    with Upstream() as up, gateway(up) as gw:
        r = request(gw.port, "GET", "/api/x")
        assert r.status == 401, r
        assert challenge(r) == "Bearer", r
        assert r.json()["error"] == "missing token", r
        r = request(gw.port, "GET", "/api/x", headers=[("Authorization", "Basic dTpw")])
        assert r.status == 401 and challenge(r) == "Bearer", r

        cases = [
            (jwt(claims(), kid="hs-1", secret="wrong-secret"), "signature mismatch"),
            (jwt(claims(exp=int(time.time()) - 60), kid="hs-1"), "token expired"),
            (jwt(claims(nbf=int(time.time()) + 600), kid="hs-1"), "token not yet valid"),
            (jwt(claims(), kid="../../etc/passwd"), "unknown kid"),
            (jwt(claims(), alg="none", kid="hs-1"), "malformed token"),
            (jwt(claims(), alg="HS256", kid="rsa-1", secret=_read("rsa.pub.pem").decode()),
             "algorithm not allowed for this key"),
            ("not.a.token!", "malformed token header"),
            ("a.b.c.d", "malformed token"),
        ]
        for tok, why in cases:
            r = request(gw.port, "GET", "/api/x", headers=bearer(tok))
            assert r.status == 401, (why, r)
            assert r.json() == {"error": why}, (why, r.body)
            assert challenge(r) == 'Bearer error="invalid_token", error_description="%s"' % why, r
        log = gw.log_text()
        assert "jwt-auth: token expired" in log, log[-2000:]
        for tok, _ in cases[:3]:
            assert tok.split(".")[2] not in log, "a token's signature was logged"


def test_an_oversized_token_is_refused_without_harm():
    with Upstream() as up, gateway(up) as gw:
        big = jwt(claims(pad="x" * 20000), kid="hs-1")
        r = request(gw.port, "GET", "/api/x", headers=bearer(big))
        assert r.status == 401 and r.json() == {"error": "token too large"}, r
        r = request(gw.port, "GET", "/api/x", headers=bearer("A" * 65536))
        assert r.status == 431, r  # over the core's header limit: refused before any plugin
        tok = jwt(claims(), kid="hs-1")
        assert request(gw.port, "GET", "/api/x", headers=bearer(tok)).status == 200


def test_tokens_are_also_taken_from_a_cookie_or_a_query_parameter():
    with Upstream() as up, gateway(up) as gw:
        tok = jwt(claims(sub="erin"), kid="rsa-1", alg="RS256")
        desc = upstream_saw(request(gw.port, "GET", "/cookie",
                                    headers=[("Cookie", "a=1; session=%s; b=2" % tok)]))
        assert hdr_values(desc, "x-user-id") == ["erin"], desc
        desc = upstream_saw(request(gw.port, "GET", "/cookie?access_token=" + tok))
        assert hdr_values(desc, "x-user-id") == ["erin"], desc
        # the route looks at no header: a Bearer header alone is not enough
        r = request(gw.port, "GET", "/cookie", headers=bearer(tok))
        assert r.status == 401, r


def test_acl_checks_roles_per_path_and_method():
    with Upstream() as up, gateway(up) as gw:
        user = jwt(claims(sub="u", roles=["user"]), kid="hs-1")
        admin = jwt(claims(sub="a", roles=["admin"]), kid="rsa-1", alg="RS256")
        assert request(gw.port, "GET", "/admin/x", headers=bearer(user)).status == 200
        r = request(gw.port, "DELETE", "/admin/x", headers=bearer(user))
        assert r.status == 403 and r.json() == {"error": "forbidden"}, r
        assert request(gw.port, "DELETE", "/admin/x", headers=bearer(admin)).status == 200
        r = request(gw.port, "POST", "/admin/x", headers=bearer(admin))
        assert r.status == 403, r  # no rule for POST: refused
        r = request(gw.port, "GET", "/reports/q", headers=bearer(admin))
        assert r.status == 403, r
        auditor = jwt(claims(roles=["auditor"]), kid="hs-1")
        assert request(gw.port, "GET", "/reports/q", headers=bearer(auditor)).status == 200
        r = request(gw.port, "DELETE", "/admin/x", headers=[("X-User-Roles", "admin")])
        assert r.status == 401, r  # no token: authentication answers first
        r = request(gw.port, "GET", "/acl-only", headers=[("X-User-ID", "a"), ("X-User-Roles", "user")])
        assert r.status == 401 and r.json() == {"error": "authentication required"}, r


def test_key_auth_maps_a_key_to_a_consumer_and_does_not_forward_it():
    with Upstream() as up, gateway(up) as gw:
        desc = upstream_saw(request(gw.port, "GET", "/key/x",
                                    headers=[("X-API-Key", UP_KEY), ("X-User-ID", "admin")]))
        assert hdr_values(desc, "x-user-id") == ["svc-a"], desc
        assert hdr_values(desc, "x-user-roles") == ["user"], desc
        assert hdr_values(desc, "x-api-key") == [], desc
        desc = upstream_saw(request(gw.port, "GET", "/key/x?a=1&apikey=%s&b=2" % UP_KEY))
        assert desc["path"] == "/key/x?a=1&b=2", desc
        assert hdr_values(desc, "x-user-id") == ["svc-a"], desc
        for hdrs, path in (([("X-API-Key", "k-124-secret")], "/key/x"), ([], "/key/x"),
                           ([], "/key/x?apikey=nope")):
            r = request(gw.port, "GET", path, headers=hdrs)
            assert r.status == 401, r
            assert r.json()["error"] in ("invalid API key", "missing API key"), r
        r = request(gw.port, "DELETE", "/key/x", headers=[("X-API-Key", UP_KEY)])
        assert r.status == 403, r
        r = request(gw.port, "DELETE", "/key/x", headers=[("X-API-Key", "k-admin")])
        assert r.status == 200, r
        assert "k-124-secret" not in gw.log_text()


def test_an_inline_jwks_verifies_tokens_by_kid():
    with Upstream() as up, gateway(up) as gw:
        tok = jwt(claims(sub="frank", roles=["user"]), alg="RS256", kid="rsa-1")
        desc = upstream_saw(request(gw.port, "GET", "/jwks", headers=bearer(tok)))
        assert hdr_values(desc, "x-user-id") == ["frank"], desc
        r = request(gw.port, "GET", "/jwks", headers=bearer(jwt(claims(), alg="RS256", kid="nope")))
        assert r.status == 401 and r.json() == {"error": "unknown kid"}, r
        r = request(gw.port, "GET", "/jwks", headers=bearer(jwt(claims(), alg="RS256")))
        assert r.status == 401 and r.json() == {"error": "missing kid"}, r
