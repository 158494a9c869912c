-- plugins/jwt-auth.lua: token verification as a pure function (P.verify),
-- against the published JWS vectors (RFC 7515 A.1-A.3, RFC 8037 A.4) and
-- tokens signed by spec/fixtures/jwt/gen.py, plus the attacks SECURITY.md
-- point 8 names. The request-facing part (headers, 401 answers, identity
-- headers upstream) is exercised end to end in tests/e2e/test_auth.py.
local gw = require("moongate.gw")
local schema = require("moongate.schema")

local crypto, json = gw.crypto, gw.json
local P = dofile("plugins/jwt-auth.lua")

local DIR = "spec/fixtures/jwt/"
local function read(name)
    local f = assert(io.open(DIR .. name, "rb"))
    local s = f:read("*a")
    f:close()
    return s
end
local V = assert(json.decode(read("vectors.json")))
local RFC, T = V.rfc, V.tokens
local RFC_NOW = 1300819000 -- before the RFC tokens' exp (1300819380)
local NOW = 1800000000

local function conf(c)
    local out, errs = schema.validate(P.schema, c)
    assert(out, errs and table.concat(errs, "; "))
    return out
end

local function b64(s) return crypto.base64url_encode(s) end
local function enc(t) return b64(assert(json.encode(t))) end

-- An HS256 token over arbitrary header/payload tables (or raw strings).
local function hs(secret, header, payload, alg)
    local h = type(header) == "string" and header or enc(header)
    local p = type(payload) == "string" and payload or enc(payload)
    local mac = crypto.hmac(({ HS256 = "sha256", HS384 = "sha384", HS512 = "sha512" })[alg or "HS256"],
        secret, h .. "." .. p)
    return h .. "." .. p .. "." .. b64(mac)
end

local SECRET = "a-long-enough-shared-secret-for-tests"
local CLAIMS = { sub = "alice", roles = { "user" }, exp = NOW + 60 }
local hs_conf = conf({ key = { secret = SECRET, algorithms = { "HS256", "HS384", "HS512" } } })

describe("jwt-auth published vectors", function()
    it("verifies RFC 7515 A.1 (HS256, the JWK k as base64url secret)", function()
        local c = conf({ key = { secret = RFC.a1_hs256_k, secret_is_base64url = true,
            algorithms = { "HS256" } } })
        local claims, err = P.verify(c, RFC.a1_hs256_token, RFC_NOW)
        assert.is_nil(err)
        assert.are.equal("joe", claims.iss)
        assert.is_true(claims["http://example.com/is_root"])
    end)

    it("verifies RFC 7515 A.2 (RS256, the JWK n/e as PEM)", function()
        local c = conf({ key = { public_key = RFC.a2_rs256_pem, algorithms = { "RS256" } } })
        local claims, err = P.verify(c, RFC.a2_rs256_token, RFC_NOW)
        assert.is_nil(err)
        assert.are.equal("joe", claims.iss)
    end)

    it("verifies RFC 7515 A.3 (ES256, the JWK x/y as PEM)", function()
        local c = conf({ key = { public_key = RFC.a3_es256_pem, algorithms = { "ES256" } } })
        local claims, err = P.verify(c, RFC.a3_es256_token, RFC_NOW)
        assert.is_nil(err)
        assert.are.equal("joe", claims.iss)
    end)

    it("verifies the RFC 8037 A.4 Ed25519 signature (its payload is not JSON, so the token is refused after)", function()
        local key = assert(crypto.load_public_key(RFC.rfc8037_a4_pem))
        local h, p, s = RFC.rfc8037_a4_token:match("^([^.]+)%.([^.]+)%.([^.]+)$")
        assert.is_true(crypto.verify(key, "EdDSA", h .. "." .. p, crypto.base64url_decode(s)))
        assert.is_false(crypto.verify(key, "EdDSA", h .. "." .. p .. "x", crypto.base64url_decode(s)))
        local c = conf({ key = { public_key = RFC.rfc8037_a4_pem, algorithms = { "EdDSA" } },
            exp_required = false })
        local claims, err = P.verify(c, RFC.rfc8037_a4_token, RFC_NOW)
        assert.is_nil(claims)
        assert.are.equal("malformed token payload", err)
    end)

    it("refuses the RFC A.1 token once its exp has passed", function()
        local c = conf({ key = { secret = RFC.a1_hs256_k, secret_is_base64url = true,
            algorithms = { "HS256" } } })
        local claims, err = P.verify(c, RFC.a1_hs256_token, 1300819381)
        assert.is_nil(claims)
        assert.are.equal("token expired", err)
    end)
end)

describe("jwt-auth algorithm families", function()
    local PEMS = {
        RS256 = "rsa", RS384 = "rsa", RS512 = "rsa", PS256 = "rsa", PS384 = "rsa", PS512 = "rsa",
        ES256 = "ec256", ES384 = "ec384", EdDSA = "ed25519",
    }
    for alg, key in pairs(PEMS) do
        it("verifies a generated " .. alg .. " token with the " .. key .. " public key", function()
            local c = conf({ key = { public_key = read(key .. ".pub.pem"), algorithms = { alg } },
                issuers = { "https://issuer.test" }, audiences = { "moongate" } })
            local claims, err = P.verify(c, T[alg], NOW)
            assert.is_nil(err)
            assert.are.equal("alice", claims.sub)
        end)
    end

    it("verifies HS256, HS384 and HS512 tokens with the shared secret", function()
        for _, alg in ipairs({ "HS256", "HS384", "HS512" }) do
            local claims, err = P.verify(hs_conf, hs(SECRET, { alg = alg, typ = "JWT" }, CLAIMS, alg), NOW)
            assert.is_nil(err)
            assert.are.equal("alice", claims.sub)
        end
    end)

    it("refuses an algorithm the key's allowlist does not name (PS256 token, RS256-only key)", function()
        local c = conf({ key = { public_key = read("rsa.pub.pem"), algorithms = { "RS256" } } })
        local claims, err = P.verify(c, T.PS256, NOW)
        assert.is_nil(claims)
        assert.are.equal("algorithm not allowed for this key", err)
    end)

    it("refuses a token signed by another key of the same type", function()
        local c = conf({ key = { public_key = read("rsa_other.pub.pem"), algorithms = { "RS256" } } })
        local claims, err = P.verify(c, T.RS256, NOW)
        assert.is_nil(claims)
        assert.are.equal("signature mismatch", err)
    end)
end)

describe("jwt-auth config checks", function()
    local function refused(c, pattern)
        local out, errs = schema.validate(P.schema, c)
        assert.is_nil(out)
        assert.matches(pattern, table.concat(errs, "; "))
    end

    it("refuses an HMAC secret with an RS algorithm and a PEM key with an HS algorithm", function()
        refused({ key = { secret = SECRET, algorithms = { "RS256" } } }, "cannot be used with a secret")
        refused({ key = { public_key = read("rsa.pub.pem"), algorithms = { "HS256" } } },
            "cannot be used with a public key")
    end)

    it("refuses none in the allowlist, in any spelling", function()
        for _, alg in ipairs({ "none", "None", "NONE" }) do
            refused({ key = { secret = SECRET, algorithms = { alg } } }, "cannot be used")
            refused({ key = { public_key = read("rsa.pub.pem"), algorithms = { alg } } }, "cannot be used")
        end
    end)

    it("refuses an algorithm that does not fit the key's type or curve", function()
        refused({ key = { public_key = read("rsa.pub.pem"), algorithms = { "ES256" } } }, "does not fit")
        refused({ key = { public_key = read("ec256.pub.pem"), algorithms = { "ES384" } } }, "does not fit")
        refused({ key = { public_key = read("ed25519.pub.pem"), algorithms = { "RS256" } } }, "does not fit")
    end)

    it("refuses RSA keys under 2048 bits, bad PEM, and key and keys both or neither", function()
        refused({ key = { public_key = read("rsa1024.pub.pem"), algorithms = { "RS256" } } }, "2048")
        refused({ key = { public_key = "-----BEGIN PUBLIC KEY-----\nxx\n", algorithms = { "RS256" } } },
            "not a PEM")
        refused({}, "exactly one of key, keys, jwks")
        refused({ key = { secret = SECRET, algorithms = { "HS256" } },
            keys = { a = { secret = SECRET, algorithms = { "HS256" } } } }, "exactly one of key, keys, jwks")
        refused({ key = { secret = SECRET, public_key = read("rsa.pub.pem"), algorithms = { "HS256" } } },
            "exactly one of secret and public_key")
    end)
end)

describe("jwt-auth attacks", function()
    local rs_conf = conf({ keys = {
        ["rsa-1"] = { public_key = read("rsa.pub.pem"), algorithms = { "RS256" } },
        ["hs-1"] = { secret = SECRET, algorithms = { "HS256" } },
    } })

    local function refuses(c, token, want)
        local claims, err = P.verify(c, token, NOW)
        assert.is_nil(claims)
        if want then assert.are.equal(want, err) end
        return err
    end

    it("refuses alg none in any spelling, with or without a signature", function()
        for _, alg in ipairs({ "none", "None", "NONE", "nOnE" }) do
            local t = enc({ alg = alg }) .. "." .. enc(CLAIMS) .. "."
            refuses(hs_conf, t, "malformed token")
            refuses(hs_conf, t .. "AAAA", "alg none refused")
            refuses(rs_conf, enc({ alg = alg, kid = "hs-1" }) .. "." .. enc(CLAIMS) .. ".AAAA",
                "alg none refused")
        end
    end)

    it("refuses RS256 -> HS256 confusion (the public key PEM used as the HMAC secret)", function()
        local pem = read("rsa.pub.pem")
        local single = conf({ key = { public_key = pem, algorithms = { "RS256" } } })
        refuses(single, hs(pem, { alg = "HS256" }, CLAIMS), "algorithm not allowed for this key")
        refuses(rs_conf, hs(pem, { alg = "HS256", kid = "rsa-1" }, CLAIMS),
            "algorithm not allowed for this key")
        -- and an HMAC key's kid with an RS token is not verified with anything
        refuses(rs_conf, hs(pem, { alg = "RS256", kid = "hs-1" }, CLAIMS),
            "algorithm not allowed for this key")
    end)

    it("treats kid only as a lookup key: path traversal, SQL and odd keys match nothing", function()
        for _, kid in ipairs({ "../../etc/passwd", "/dev/null", "' OR '1'='1", "rsa-1' --",
            "__index", "", "rsa-1\0", "RSA-1" }) do
            refuses(rs_conf, hs(SECRET, { alg = "HS256", kid = kid }, CLAIMS), "unknown kid")
        end
        refuses(rs_conf, hs(SECRET, { alg = "HS256", kid = { "hs-1" } }, CLAIMS), "missing kid")
        refuses(rs_conf, hs(SECRET, { alg = "HS256" }, CLAIMS), "missing kid")
        local ok = P.verify(rs_conf, hs(SECRET, { alg = "HS256", kid = "hs-1" }, CLAIMS), NOW)
        assert.is_table(ok)
    end)

    it("refuses a token whose kid names a key other than the one that signed it", function()
        refuses(rs_conf, T.kid_rsa_signed_by_other, "signature mismatch")
        assert.is_table(P.verify(rs_conf, T.kid_rsa, NOW))
        refuses(rs_conf, hs(SECRET, { alg = "HS256", kid = "rsa-1" }, CLAIMS),
            "algorithm not allowed for this key")
    end)

    it("ignores jku, x5u and jwk headers: the configured key verifies, nothing is fetched", function()
        local claims, err = P.verify(rs_conf, T.jku_x5u, NOW)
        assert.is_nil(err)
        assert.are.equal("alice", claims.sub)
    end)

    it("refuses the ECDSA psychic signature (r = s = 0) for ES256 and ES384", function()
        local c = conf({ keys = {
            e256 = { public_key = read("ec256.pub.pem"), algorithms = { "ES256" } },
            e384 = { public_key = read("ec384.pub.pem"), algorithms = { "ES384" } },
        } })
        for kid, size in pairs({ e256 = 32, e384 = 48 }) do
            local alg = kid == "e256" and "ES256" or "ES384"
            local t = enc({ alg = alg, kid = kid }) .. "." .. enc(CLAIMS) .. "."
            refuses(c, t .. b64(string.rep("\0", 2 * size)), "signature mismatch")
            refuses(c, t .. b64(string.rep("\0", size) .. string.rep("\1", size)), "signature mismatch")
        end
    end)

    it("refuses malformed base64url in any segment", function()
        local good = hs(SECRET, { alg = "HS256" }, CLAIMS)
        local h, p, s = good:match("^([^.]+)%.([^.]+)%.([^.]+)$")
        refuses(hs_conf, h .. "=" .. "." .. p .. "." .. s, "malformed token header")
        refuses(hs_conf, "e+J." .. p .. "." .. s, "malformed token header")
        refuses(hs_conf, h .. "." .. p .. "." .. s .. "!", "malformed signature")
        refuses(hs_conf, h .. "." .. p .. "." .. "A", "malformed signature")
        -- a payload that is not base64url is refused (the MAC covers it, so either check may fire)
        refuses(hs_conf, h .. ".e%30." .. s)
        refuses(hs_conf, hs(SECRET, { alg = "HS256" }, "e%30"), "malformed token payload")
    end)

    it("refuses header or payload that is not a JSON object", function()
        refuses(hs_conf, hs(SECRET, b64("{\"alg\":"), CLAIMS), "malformed token header")
        refuses(hs_conf, hs(SECRET, b64("[\"HS256\"]"), CLAIMS), "malformed token header")
        refuses(hs_conf, hs(SECRET, { alg = "HS256" }, b64("{\"sub\":")), "malformed token payload")
        refuses(hs_conf, hs(SECRET, { alg = "HS256" }, b64("\"alice\"")), "malformed token payload")
        refuses(hs_conf, hs(SECRET, { alg = "HS256" }, b64("[1,2]")), "malformed token payload")
        refuses(hs_conf, hs(SECRET, { typ = "JWT" }, CLAIMS), "missing alg")
        refuses(hs_conf, hs(SECRET, { alg = 256 }, CLAIMS), "missing alg")
    end)

    it("refuses the wrong number of segments and empty segments", function()
        local good = hs(SECRET, { alg = "HS256" }, CLAIMS)
        refuses(hs_conf, good .. ".x", "malformed token")
        refuses(hs_conf, good .. ".", "malformed token")
        refuses(hs_conf, good:match("^[^.]+%.[^.]+"), "malformed token")
        refuses(hs_conf, "abc", "malformed token")
        refuses(hs_conf, "..", "malformed token")
        refuses(hs_conf, "", "missing token")
        refuses(hs_conf, nil, "missing token")
    end)

    it("refuses a 64 KB token before decoding it", function()
        local big = hs(SECRET, { alg = "HS256" }, { sub = "a", exp = NOW + 60, pad = string.rep("x", 65536) })
        refuses(hs_conf, big, "token too large")
        refuses(hs_conf, string.rep("A", 65536), "token too large")
    end)

    it("refuses a tampered payload and a signature from the wrong secret", function()
        local good = hs(SECRET, { alg = "HS256" }, CLAIMS)
        local h, _, s = good:match("^([^.]+)%.([^.]+)%.([^.]+)$")
        refuses(hs_conf, h .. "." .. enc({ sub = "admin", exp = NOW + 60 }) .. "." .. s, "signature mismatch")
        refuses(hs_conf, hs(SECRET .. "x", { alg = "HS256" }, CLAIMS), "signature mismatch")
    end)
end)

describe("jwt-auth claims", function()
    local function check(c, claims, now)
        return P.verify(c, hs(SECRET, { alg = "HS256" }, claims), now or NOW)
    end

    it("requires exp by default and can be told not to", function()
        local ok, err = check(hs_conf, { sub = "a" })
        assert.is_nil(ok)
        assert.are.equal("missing exp claim", err)
        local c = conf({ key = { secret = SECRET, algorithms = { "HS256" } }, exp_required = false })
        assert.is_table(check(c, { sub = "a" }))
    end)

    it("refuses expired tokens, honouring the leeway", function()
        local _, err = check(hs_conf, { sub = "a", exp = NOW - 1 })
        assert.are.equal("token expired", err)
        assert.is_table(check(hs_conf, { sub = "a", exp = NOW }))
        local c = conf({ key = { secret = SECRET, algorithms = { "HS256" } }, leeway = 30 })
        assert.is_table(check(c, { sub = "a", exp = NOW - 29 }))
        _, err = check(c, { sub = "a", exp = NOW - 31 })
        assert.are.equal("token expired", err)
        _, err = check(hs_conf, { sub = "a", exp = "2100-01-01" })
        assert.are.equal("exp is not a number", err)
    end)

    it("remembers a verified token but still checks its exp every time", function()
        local c = conf({ key = { secret = SECRET, algorithms = { "HS256" } } })
        local token = hs(SECRET, { alg = "HS256" }, { sub = "a", exp = NOW + 10 })
        assert.is_table(P.verify(c, token, NOW))
        -- The second verification comes from the cache: a forged variant
        -- of the same token is still refused (it is another string)...
        assert.is_table(P.verify(c, token, NOW + 5))
        local i = #token - 10 -- inside the signature, away from its padding bits
        local forged = token:sub(1, i - 1) .. (token:sub(i, i) == "A" and "B" or "A")
            .. token:sub(i + 1)
        local _, err = P.verify(c, forged, NOW)
        assert.are.equal("signature mismatch", err)
        -- ...and the cached token expires on time.
        _, err = P.verify(c, token, NOW + 11)
        assert.are.equal("token expired", err)
        local off = conf({ key = { secret = SECRET, algorithms = { "HS256" } }, verified_cache = 0 })
        assert.is_table(P.verify(off, token, NOW))
    end)

    it("refuses tokens not yet valid (nbf) and issued in the future (iat)", function()
        local _, err = check(hs_conf, { sub = "a", exp = NOW + 60, nbf = NOW + 10 })
        assert.are.equal("token not yet valid", err)
        assert.is_table(check(hs_conf, { sub = "a", exp = NOW + 60, nbf = NOW }))
        _, err = check(hs_conf, { sub = "a", exp = NOW + 60, iat = NOW + 10 })
        assert.are.equal("token issued in the future", err)
        local c = conf({ key = { secret = SECRET, algorithms = { "HS256" } }, leeway = 30 })
        assert.is_table(check(c, { sub = "a", exp = NOW + 60, nbf = NOW + 10, iat = NOW + 10 }))
    end)

    it("checks iss and aud (string or list) when configured", function()
        local c = conf({ key = { secret = SECRET, algorithms = { "HS256" } },
            issuers = { "https://a.test" }, audiences = { "api", "web" } })
        assert.is_table(check(c, { exp = NOW + 9, iss = "https://a.test", aud = "api" }))
        assert.is_table(check(c, { exp = NOW + 9, iss = "https://a.test", aud = { "x", "web" } }))
        local _, err = check(c, { exp = NOW + 9, iss = "https://evil.test", aud = "api" })
        assert.are.equal("issuer not accepted", err)
        _, err = check(c, { exp = NOW + 9, aud = "api" })
        assert.are.equal("issuer not accepted", err)
        _, err = check(c, { exp = NOW + 9, iss = "https://a.test", aud = "other" })
        assert.are.equal("audience not accepted", err)
        _, err = check(c, { exp = NOW + 9, iss = "https://a.test", aud = { "x" } })
        assert.are.equal("audience not accepted", err)
        _, err = check(c, { exp = NOW + 9, iss = "https://a.test" })
        assert.are.equal("audience not accepted", err)
    end)

    it("refuses a token missing a required claim", function()
        local c = conf({ key = { secret = SECRET, algorithms = { "HS256" } }, required_claims = { "tenant" } })
        local _, err = check(c, { exp = NOW + 9 })
        assert.are.equal("missing tenant claim", err)
        assert.is_table(check(c, { exp = NOW + 9, tenant = "acme" }))
    end)
end)

describe("jwt-auth consumer", function()
    it("takes the id from sub and the roles from a list or a space-separated string", function()
        local c = hs_conf
        local who = assert(P.consumer_of(c, { sub = "alice", roles = { "user", "admin" } }))
        assert.are.equal("alice", who.id)
        assert.are.same({ "user", "admin" }, who.roles)
        who = assert(P.consumer_of(c, { sub = "bob", roles = "user  ops" }))
        assert.are.same({ "user", "ops" }, who.roles)
        who = assert(P.consumer_of(c, { sub = 42 }))
        assert.are.equal("42", who.id)
        assert.are.same({}, who.roles)
    end)

    it("uses the configured claims and drops roles that cannot be a header item", function()
        local c = conf({ key = { secret = SECRET, algorithms = { "HS256" } },
            consumer_claim = "uid", roles_claim = "scope" })
        local who = assert(P.consumer_of(c, { uid = "u1", sub = "x", scope = { "a", "b,c", "d\r\ne", 5 } }))
        assert.are.equal("u1", who.id)
        assert.are.same({ "a" }, who.roles)
    end)

    it("refuses a missing or unsafe id", function()
        assert.is_nil(P.consumer_of(hs_conf, { roles = { "user" } }))
        assert.is_nil(P.consumer_of(hs_conf, { sub = "a\r\nX-Evil: 1" }))
        assert.is_nil(P.consumer_of(hs_conf, { sub = { "a" } }))
        assert.is_nil(P.consumer_of(hs_conf, { sub = "" }))
    end)
end)

describe("jwt-auth inline JWKS", function()
    it("turns the RFC JWKs (RSA n/e, EC x/y, OKP x) into the same PEM as OpenSSL", function()
        assert.are.equal(RFC.a2_rs256_pem, assert(P.jwk_to_pem(RFC.a2_jwk)))
        assert.are.equal(RFC.a3_es256_pem, assert(P.jwk_to_pem(RFC.a3_jwk)))
        assert.are.equal(RFC.rfc8037_a4_pem, assert(P.jwk_to_pem(RFC.rfc8037_a4_jwk)))
        for i, jwk in ipairs(V.jwks.keys) do
            local pem = read(({ "rsa", "ec256", "ed25519" })[i] .. ".pub.pem")
            assert.are.equal(pem, assert(P.jwk_to_pem(jwk)))
        end
    end)

    it("verifies RFC 7515 A.2 and A.3 with keys built from their JWKs", function()
        local c = conf({ key = { public_key = P.jwk_to_pem(RFC.a2_jwk), algorithms = { "RS256" } } })
        assert.is_table(P.verify(c, RFC.a2_rs256_token, RFC_NOW))
        c = conf({ key = { public_key = P.jwk_to_pem(RFC.a3_jwk), algorithms = { "ES256" } } })
        assert.is_table(P.verify(c, RFC.a3_es256_token, RFC_NOW))
    end)

    local jc = conf({ jwks = V.jwks, jwks_algorithms = { "RS256", "ES256", "EdDSA" } })

    it("verifies tokens by kid against an inline JWK Set", function()
        for _, name in ipairs({ "kid_rsa", "kid_ec", "kid_ed" }) do
            local claims, err = P.verify(jc, T[name], NOW)
            assert.is_nil(err)
            assert.are.equal("alice", claims.sub)
        end
        local _, err = P.verify(jc, T.RS256, NOW)
        assert.are.equal("missing kid", err)
        _, err = P.verify(jc, T.kid_rsa_signed_by_other, NOW)
        assert.are.equal("signature mismatch", err)
    end)

    it("holds a JWK to its own alg and to jwks_algorithms", function()
        -- rsa-1 says alg RS256: a PS256 token with kid rsa-1 is refused
        local t = T.PS256
        local h, rest = t:match("^([^.]+)(%..*)$")
        local hdr = json.decode(crypto.base64url_decode(h))
        hdr.kid = "rsa-1"
        local _, err = P.verify(jc, enc(hdr) .. rest, NOW)
        assert.are.equal("algorithm not allowed for this key", err)
        -- ec-1 has no alg: those of jwks_algorithms that fit the key; none fitting is an error
        local out, errs = schema.validate(P.schema, { jwks = V.jwks, jwks_algorithms = { "RS256" } })
        assert.is_nil(out)
        assert.matches("no algorithm in jwks_algorithms fits", table.concat(errs, "; "))
    end)

    it("refuses JWKs without kid, with private or symmetric material, or of unknown types", function()
        local function refused(keys, pattern)
            local out, errs = schema.validate(P.schema, { jwks = { keys = keys }, jwks_algorithms = { "RS256", "HS256" } })
            assert.is_nil(out)
            assert.matches(pattern, table.concat(errs, "; "))
        end
        refused({ RFC.a2_jwk }, "needs a kid")
        refused({ { kty = "oct", kid = "s", k = "AAAA" } }, "does not belong")
        refused({ { kty = "RSA", kid = "p", n = RFC.a2_jwk.n, e = "AQAB", d = "AAAA" } }, "does not belong")
        refused({ { kty = "EC", kid = "e", crv = "secp256k1", x = "AA", y = "AA" } }, "unsupported EC curve")
        refused({ { kty = "EC", kid = "e", crv = "P-256", x = "AA", y = "AA" } }, "x and y")
        refused({ { kty = "RSA", kid = "a", n = RFC.a2_jwk.n, e = "AQAB" },
            { kty = "RSA", kid = "a", n = RFC.a2_jwk.n, e = "AQAB" } }, "duplicate kid")
        refused({}, "must not be empty")
        local out, errs = schema.validate(P.schema, { jwks = { keys = { { kty = "RSA", kid = "a",
            n = RFC.a2_jwk.n, e = "AQAB" } } } })
        assert.is_nil(out)
        assert.matches("no alg and jwks_algorithms", table.concat(errs, "; "))
    end)
end)

describe("jwt-auth Authorization parsing", function()
    it("takes the token of a Bearer scheme, case-insensitive, trimmed", function()
        assert.are.equal("abc.def.ghi", P.bearer_token("Bearer abc.def.ghi"))
        assert.are.equal("abc", P.bearer_token("bearer abc"))
        assert.are.equal("abc", P.bearer_token("  BEARER \t  abc  "))
        assert.are.equal("abc", P.bearer_token("Bearer\tabc"))
    end)
    it("refuses anything else", function()
        for _, v in ipairs({ "", "Bearer", "Bearer ", "Bearer   ", "Bearerabc", "Basic abc",
                             "Bearer a b", "Bearer a\tb", "Bear abc", "xBearer abc" }) do
            assert.is_nil(P.bearer_token(v), v)
        end
    end)
end)
