-- plugins/acl.lua: the role decision as a pure function (P.allowed) and the
-- config checks. The 401/403 answers are exercised in tests/e2e/test_auth.py.

local P = dofile("plugins/acl.lua")

local conf, refused = require("spec.helpers.plugin_conf")(P)

describe("acl allow and deny lists", function()
    it("lets a consumer through when one of its roles is allowed", function()
        local c = conf({ allow = { "user", "admin" } })
        assert.is_true(P.allowed(c, "GET", { "user" }))
        assert.is_true(P.allowed(c, "POST", { "guest", "admin" }))
    end)

    it("refuses a consumer without an allowed role, or without roles", function()
        local c = conf({ allow = { "admin" } })
        assert.is_nil(P.allowed(c, "GET", { "user" }))
        assert.is_nil(P.allowed(c, "GET", {}))
        assert.is_nil(P.allowed(c, "GET", nil))
    end)

    it("lets deny win over allow", function()
        local c = conf({ allow = { "user" }, deny = { "banned" } })
        assert.is_true(P.allowed(c, "GET", { "user" }))
        local ok, why = P.allowed(c, "GET", { "user", "banned" })
        assert.is_nil(ok)
        assert.are.equal("role denied", why)
    end)

    it("with only deny, lets every other consumer through", function()
        local c = conf({ deny = { "banned" } })
        assert.is_true(P.allowed(c, "GET", {}))
        assert.is_nil(P.allowed(c, "GET", { "banned" }))
    end)

    it("treats * in allow as any authenticated consumer", function()
        local c = conf({ allow = { "*" } })
        assert.is_true(P.allowed(c, "GET", {}))
        assert.is_nil(P.allowed(conf({ allow = { "*" }, deny = { "x" } }), "GET", { "x" }))
    end)

    it("compares role names exactly (case and whitespace matter)", function()
        local c = conf({ allow = { "admin" } })
        assert.is_nil(P.allowed(c, "GET", { "Admin" }))
        assert.is_nil(P.allowed(c, "GET", { "admin " }))
    end)
end)

describe("acl per-method rules", function()
    local c = conf({ rules = {
        { methods = { "GET", "head" }, allow = { "user", "admin" } },
        { methods = { "DELETE" }, allow = { "admin" } },
    } })

    it("lets users read and only admins delete", function()
        assert.is_true(P.allowed(c, "GET", { "user" }))
        assert.is_true(P.allowed(c, "HEAD", { "user" }))
        assert.is_nil(P.allowed(c, "DELETE", { "user" }))
        assert.is_true(P.allowed(c, "DELETE", { "admin" }))
        assert.is_true(P.allowed(c, "get", { "user" }))
    end)

    it("refuses a method no rule names when there is no top-level list (fail closed)", function()
        local ok, why = P.allowed(c, "POST", { "admin" })
        assert.is_nil(ok)
        assert.are.equal("method not allowed for any role", why)
    end)

    it("falls back to the top-level lists for other methods", function()
        local c2 = conf({ rules = { { methods = { "DELETE" }, allow = { "admin" } } }, allow = { "user", "admin" } })
        assert.is_true(P.allowed(c2, "POST", { "user" }))
        assert.is_nil(P.allowed(c2, "DELETE", { "user" }))
    end)

    it("lets the first matching rule decide, and a rule without methods match all", function()
        local c3 = conf({ rules = {
            { methods = { "GET" }, deny = { "blocked" } },
            { allow = { "admin" } },
        } })
        assert.is_true(P.allowed(c3, "GET", { "user" }))
        assert.is_nil(P.allowed(c3, "GET", { "blocked", "admin" }))
        assert.is_nil(P.allowed(c3, "PUT", { "user" }))
        assert.is_true(P.allowed(c3, "PUT", { "admin" }))
    end)
end)

describe("acl config checks", function()
    it("refuses a config that allows or denies nothing", function()
        refused({}, "needs allow, deny or rules")
        refused({ rules = { { methods = { "GET" } } } }, "needs allow or deny")
    end)

    it("refuses unknown fields and empty role names", function()
        refused({ allow = { "a" }, roles = { "x" } }, "unknown field")
        refused({ allow = { "" } }, "at least 1")
    end)

    it("runs after the authentication plugins", function()
        assert.is_true(P.priority < dofile("plugins/jwt-auth.lua").priority)
        assert.is_true(P.priority < dofile("plugins/key-auth.lua").priority)
    end)
end)
