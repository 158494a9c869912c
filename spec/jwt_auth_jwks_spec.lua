-- plugins/jwt-auth.lua: JWK Sets from a file (jwks_file) and from a URL or
-- an upstream (jwks_url, jwks_upstream). The remote part runs with the
-- plugin's fetch function (P.fetch_jwks, a gw.http GET) replaced by one that
-- serves programmed JWK Sets and counts its calls, in the real runtime
-- (gw.now, gw.sleep, gw.timer). `moongate lua` has no shared dicts, so this
-- exercises the per-worker cache; the shared-dict path, real HTTP and two
-- workers are covered end to end in tests/e2e/test_jwks.py.
local gw = require("moongate.gw")
local schema = require("moongate.schema")

local json = gw.json
local concat = table.concat
local P = dofile("plugins/jwt-auth.lua")

local DIR = "spec/fixtures/jwt/"
local function read(name)
    local f = assert(io.open(DIR .. name, "rb"))
    local s = f:read("*a")
    f:close()
    return s
end
local V = assert(json.decode(read("vectors.json")))
local T = V.tokens
local NOW = 1800000000
local RSA, EC, ED = V.jwks.keys[1], V.jwks.keys[2], V.jwks.keys[3] -- rsa-1, ec-1, ed-1
local ALGS = { "RS256", "ES256", "EdDSA" }

local function conf(c)
    local out, errs = schema.validate(P.schema, c)
    assert(out, errs and concat(errs, "; "))
    return out
end

local function refused(c, pattern)
    local out, errs = schema.validate(P.schema, c)
    assert.is_nil(out)
    assert.matches(pattern, concat(errs, "; "))
end

local function write(path, text)
    local f = assert(io.open(path, "wb"))
    f:write(text)
    f:close()
end

describe("jwt-auth jwks_file", function()
    local tmp = os.tmpname()
    local dir = tmp:match("^(.*)/[^/]*$")
    local name = tmp:match("[^/]*$")
    after_each(function()
        os.remove(tmp)
        local rt = package.loaded["moongate.runtime"]
        if rt then rt.config_dir = nil end
    end)

    it("reads a JWK Set file and verifies tokens by kid", function()
        write(tmp, json.encode(V.jwks))
        local c = conf({ jwks_file = tmp, jwks_algorithms = ALGS })
        for _, t in ipairs({ "kid_rsa", "kid_ec", "kid_ed" }) do
            local claims, err = P.verify(c, T[t], NOW)
            assert.is_nil(err)
            assert.are.equal("alice", claims.sub)
        end
        local _, err = P.verify(c, T.kid_rsa_signed_by_other, NOW)
        assert.are.equal("signature mismatch", err)
    end)

    it("reads the file once, when the config is checked, not per request", function()
        write(tmp, json.encode(V.jwks))
        local c = conf({ jwks_file = tmp, jwks_algorithms = ALGS })
        os.remove(tmp)
        assert.is_table(P.verify(c, T.kid_ec, NOW))
    end)

    it("takes a relative path from the config file's directory", function()
        write(tmp, json.encode({ keys = { EC } }))
        require("moongate.runtime").config_dir = dir
        local c = conf({ jwks_file = name, jwks_algorithms = { "ES256" } })
        assert.is_table(P.verify(c, T.kid_ec, NOW))
    end)

    it("refuses a missing, non-JSON or bad file, naming jwks_file", function()
        refused({ jwks_file = tmp .. ".nope", jwks_algorithms = ALGS }, "jwks_file: cannot read .*%.nope")
        write(tmp, "{ not json")
        refused({ jwks_file = tmp, jwks_algorithms = ALGS }, "jwks_file .*: not JSON")
        write(tmp, "[1, 2]")
        refused({ jwks_file = tmp, jwks_algorithms = ALGS }, "jwks_file .*: is not a JWK Set")
        write(tmp, json.encode({ keys = { { kty = "RSA", kid = "p", n = RSA.n, e = "AQAB", d = "AAAA" } } }))
        refused({ jwks_file = tmp, jwks_algorithms = ALGS },
            "jwks_file .*: keys%[1%]: private or symmetric key material")
        write(tmp, json.encode({ keys = {} }))
        refused({ jwks_file = tmp, jwks_algorithms = ALGS }, "jwks_file .*: keys must not be empty")
        write(tmp, string.rep(" ", 256 * 1024 + 1))
        refused({ jwks_file = tmp, jwks_algorithms = ALGS }, "larger than")
    end)
end)

describe("jwt-auth remote JWKS config", function()
    it("needs jwks_algorithms, public-key algorithms only", function()
        refused({ jwks_url = "http://127.0.0.1:9/jwks.json" }, "jwks_algorithms is required")
        refused({ jwks_url = "http://127.0.0.1:9/jwks.json", jwks_algorithms = { "HS256" } },
            "HS256 is not a public%-key algorithm")
        refused({ jwks_upstream = "idp", jwks_algorithms = { "none" } }, "none is not a public%-key")
    end)

    it("takes only URLs gw.http can reach, and one key source", function()
        refused({ jwks_url = "http://idp.example/jwks.json", jwks_algorithms = ALGS }, "must be http://IP")
        refused({ jwks_url = "https://127.0.0.1/jwks.json", jwks_algorithms = ALGS }, "jwks_url")
        refused({ jwks_url = "http://127.0.0.1:9", jwks_algorithms = ALGS }, "must be http://IP")
        refused({ jwks_path = "/keys", jwks_url = "http://127.0.0.1:9/k", jwks_algorithms = ALGS },
            "jwks_path goes with jwks_upstream")
        refused({ jwks_url = "http://127.0.0.1:9/k", jwks_upstream = "idp", jwks_algorithms = ALGS },
            "exactly one of")
        refused({ jwks_url = "http://127.0.0.1:9/k", jwks_algorithms = ALGS, jwks_refresh_interval = 0.5 },
            "jwks_refresh_interval")
        assert.is_table(conf({ jwks_url = "http://[::1]:8080/k", jwks_algorithms = ALGS }))
        assert.is_table(conf({ jwks_upstream = "idp", jwks_path = "/keys", jwks_algorithms = ALGS }))
    end)
end)

describe("jwt-auth remote JWKS", function()
    local real_fetch = P.fetch_jwks
    local serve, calls, delay
    local n = 0

    before_each(function()
        serve, calls, delay = { keys = { RSA } }, 0, 0
        P.fetch_jwks = function()
            calls = calls + 1
            if delay > 0 then gw.sleep(delay) end
            if type(serve) == "string" then return nil, serve end -- a failure
            return json.encode(serve)
        end
    end)
    after_each(function() P.fetch_jwks = real_fetch end)

    -- A fresh source per test: the per-worker cache is keyed by it.
    local function remote(extra)
        n = n + 1
        local c = { jwks_url = "http://127.0.0.1:9/jwks-" .. n .. ".json", jwks_algorithms = ALGS,
            jwks_refresh_interval = 1, jwks_max_age = 60 }
        for k, v in pairs(extra or {}) do c[k] = v end
        return conf(c)
    end

    local function ok(c, token)
        local claims, err = P.verify(c, token, NOW)
        assert.is_nil(err)
        assert.are.equal("alice", claims.sub)
    end
    local function no(c, token, want)
        local claims, err = P.verify(c, token, NOW)
        assert.is_nil(claims)
        assert.are.equal(want, err)
    end

    it("fetches the set on first use, once for many tokens and routes of the source", function()
        local c = remote({ verified_cache = 0 })
        for _ = 1, 20 do ok(c, T.kid_rsa) end
        assert.are.equal(1, calls)
        local again = conf({ jwks_url = c.jwks_url, jwks_algorithms = ALGS, jwks_refresh_interval = 1 })
        ok(again, T.kid_rsa)
        assert.are.equal(1, calls)
    end)

    it("refetches for an unknown kid at most once per jwks_refresh_interval", function()
        local c = remote()
        ok(c, T.kid_rsa)
        assert.are.equal(1, calls)
        no(c, T.kid_ec, "unknown kid") -- within the interval of the first fetch: refused, no fetch
        no(c, T.kid_ed, "unknown kid")
        assert.are.equal(1, calls)
        gw.sleep(1.05)
        no(c, T.kid_ec, "unknown kid") -- one refetch; the set still lacks it
        assert.are.equal(2, calls)
        for _ = 1, 10 do no(c, T.kid_ec, "unknown kid") end
        assert.are.equal(2, calls)
    end)

    it("picks up a rotated set for the new kid and then refuses the old one, cached or not", function()
        local c = remote()
        ok(c, T.kid_rsa)
        ok(c, T.kid_rsa) -- now in the verified-token cache
        serve = { keys = { EC, ED } }
        gw.sleep(1.05)
        ok(c, T.kid_ec)
        assert.are.equal(2, calls)
        ok(c, T.kid_ed)
        no(c, T.kid_rsa, "unknown kid")
        assert.are.equal(2, calls)
    end)

    it("keeps the last good keys when a fetch fails, and logs it", function()
        local c = remote({ jwks_max_age = 1 })
        ok(c, T.kid_rsa)
        serve = "connection refused"
        gw.sleep(1.05)
        ok(c, T.kid_rsa) -- stale: a refresh starts in a timer, the request goes on
        gw.sleep(0.05)
        assert.are.equal(2, calls)
        ok(c, T.kid_rsa)
        no(c, T.kid_ec, "unknown kid") -- rate limited: the failed refresh was this interval's fetch
        assert.are.equal(2, calls)
        gw.sleep(1.05)
        no(c, T.kid_ec, "unknown kid")
        assert.are.equal(3, calls)
        ok(c, T.kid_rsa)
        serve = "status 503"
        gw.sleep(1.05)
        no(c, T.kid_ec, "unknown kid")
        ok(c, T.kid_rsa)
    end)

    it("answers signing keys unavailable while no fetch has worked, retrying once per interval", function()
        serve = "timeout"
        local c = remote()
        no(c, T.kid_rsa, "signing keys unavailable")
        no(c, T.kid_rsa, "signing keys unavailable")
        assert.are.equal(1, calls)
        serve = { keys = { RSA } }
        gw.sleep(1.05)
        ok(c, T.kid_rsa)
        assert.are.equal(2, calls)
    end)

    it("fetches again after jwks_max_age, in the background", function()
        local c = remote({ jwks_max_age = 1 })
        ok(c, T.kid_rsa)
        serve = { keys = { RSA, EC } }
        gw.sleep(1.05)
        ok(c, T.kid_rsa)
        gw.sleep(0.05)
        assert.are.equal(2, calls)
        ok(c, T.kid_ec) -- known from the background refresh, no fetch of its own
        assert.are.equal(2, calls)
    end)

    it("lets concurrent requests for an unknown kid share one fetch", function()
        local c = remote()
        delay = 0.2
        local results, done = {}, 0
        for i = 1, 5 do
            assert(gw.timer.at(0, function()
                local claims, err = P.verify(c, T.kid_rsa, NOW)
                results[i] = claims and claims.sub or err
                done = done + 1
            end))
        end
        local t0 = gw.now()
        while done < 5 and gw.now() - t0 < 5 do gw.sleep(0.02) end
        assert.are.same({ "alice", "alice", "alice", "alice", "alice" }, results)
        assert.are.equal(1, calls)
    end)

    it("uses only the public signing keys of a fetched set", function()
        serve = { keys = {
            { kty = "RSA", kid = "priv", n = RSA.n, e = "AQAB", d = "AAAA" },
            { kty = "oct", kid = "sym", k = "c2VjcmV0" },
            { kty = "RSA", kid = "rsa-1", use = "enc", n = RSA.n, e = "AQAB" },
            { kty = "EC", kid = "bad", crv = "P-256", x = "AA", y = "AA" },
            { kid = "nokty" },
            "not a key",
            EC,
            { kty = "EC", kid = "ec-1", crv = "P-256", x = EC.x, y = EC.y }, -- a duplicate kid
        } }
        local c = remote()
        ok(c, T.kid_ec)
        no(c, T.kid_rsa, "unknown kid") -- rsa-1 was only there as an encryption key
        assert.are.equal(1, calls)
    end)

    it("holds fetched keys to jwks_algorithms and to their own alg", function()
        serve = { keys = { RSA, EC, ED } }
        local c = remote({ jwks_algorithms = { "ES256" } })
        ok(c, T.kid_ec)
        no(c, T.kid_rsa, "unknown kid") -- RS256 is not in the list: rsa-1 left out
        no(c, T.kid_ed, "unknown kid")
    end)

    it("treats a set without usable keys, or not a set at all, as a failed fetch", function()
        local c = remote()
        ok(c, T.kid_rsa)
        serve = { keys = { { kty = "oct", kid = "sym", k = "c2VjcmV0" } } }
        gw.sleep(1.05)
        no(c, T.kid_ec, "unknown kid")
        ok(c, T.kid_rsa)
        serve = { nokeys = true }
        gw.sleep(1.05)
        no(c, T.kid_ec, "unknown kid")
        ok(c, T.kid_rsa)
        assert.are.equal(3, calls)
    end)
end)
