-- plugins/key-auth.lua: the key lookup (P.lookup), query handling
-- (P.from_query) and config checks. Header/query removal and the identity
-- headers upstream are exercised in tests/e2e/test_auth.py.

local P = dofile("plugins/key-auth.lua")

local conf, refused = require("spec.helpers.plugin_conf")(P)

local KEYS = {
    ["k-123"] = { id = "svc-a", roles = { "user" } },
    ["k-456"] = { id = "svc-b" },
}

describe("key-auth lookup", function()
    local c = conf({ keys = KEYS })

    it("maps a configured key to its consumer and roles", function()
        local who = assert(P.lookup(c, "k-123"))
        assert.are.equal("svc-a", who.id)
        assert.are.same({ "user" }, who.roles)
        who = assert(P.lookup(c, "k-456"))
        assert.are.equal("svc-b", who.id)
        assert.are.same({}, who.roles)
    end)

    it("refuses unknown, near-miss, empty and missing keys", function()
        for _, k in ipairs({ "k-124", "k-12", "k-1234", "K-123", " k-123", "svc-a" }) do
            local who, err = P.lookup(c, k)
            assert.is_nil(who)
            assert.are.equal("invalid API key", err)
        end
        assert.are.equal("missing API key", select(2, P.lookup(c, "")))
        assert.are.equal("missing API key", select(2, P.lookup(c, nil)))
        assert.are.equal("invalid API key", select(2, P.lookup(c, string.rep("k", 65536))))
    end)

    it("hands out a copy of the roles, so a request cannot change the config", function()
        local who = assert(P.lookup(c, "k-123"))
        who.roles[1] = "admin"
        assert.are.same({ "user" }, assert(P.lookup(c, "k-123")).roles)
    end)
end)

describe("key-auth query parameters", function()
    it("finds the key and returns the query without it", function()
        local k, rest = P.from_query("a=1&apikey=k-123&b=2", "apikey")
        assert.are.equal("k-123", k)
        assert.are.equal("a=1&b=2", rest)
    end)

    it("decodes percent-escapes and removes every copy of the parameter", function()
        local k, rest = P.from_query("api%6Bey=k%2D123&apikey=other&x", "apikey")
        assert.are.equal("k-123", k)
        assert.are.equal("x", rest)
    end)

    it("returns nil when the parameter is absent", function()
        local k, rest = P.from_query("a=1", "apikey")
        assert.is_nil(k)
        assert.are.equal("a=1", rest)
        assert.is_nil((P.from_query("", "apikey")))
    end)
end)

describe("key-auth config checks", function()
    it("fills in the defaults", function()
        local c = conf({ keys = KEYS })
        assert.are.equal("X-API-Key", c.header)
        assert.is_true(c.hide_credentials)
        assert.are.equal("X-User-ID", c.id_header)
    end)

    it("refuses no keys, consumers without id, and ids or roles that cannot be headers", function()
        refused({}, "keys: required")
        refused({ keys = {} }, "keys must not be empty")
        refused({ keys = { k = { roles = { "x" } } } }, "id: required")
        refused({ keys = { k = { id = "a\r\nb" } } }, "does not match")
        refused({ keys = { k = { id = "a", roles = { "a,b" } } } }, "does not match")
        refused({ keys = KEYS, header = "" }, "no place to look")
    end)
end)
