-- plugins/cors.lua: origin matching (exact, "*." subdomains, Lua patterns,
-- "*"), the Access-Control-Allow-Origin decision, preflight answer headers,
-- and configs the schema check refuses. The phases (preflight without an
-- upstream hit, header_filter, Vary) run in tests/e2e/test_everyday_plugins.py.

local P = dofile("plugins/cors.lua")

local conf, refused = require("spec.helpers.plugin_conf")(P)

describe("cors origin matching", function()
    it("allows exact origins, case-insensitively, and nothing close to them", function()
        local c = conf({ origins = { "https://app.example.com", "http://localhost:3000" } })
        assert.is_true(P.origin_allowed(c, "https://app.example.com"))
        assert.is_true(P.origin_allowed(c, "HTTPS://APP.example.com"))
        assert.is_true(P.origin_allowed(c, "http://localhost:3000"))
        assert.is_false(P.origin_allowed(c, "http://app.example.com"))
        assert.is_false(P.origin_allowed(c, "https://app.example.com:8443"))
        assert.is_false(P.origin_allowed(c, "https://app.example.com.evil.test"))
        assert.is_false(P.origin_allowed(c, "http://localhost:30000"))
        assert.is_false(P.origin_allowed(c, "null"))
        assert.is_false(P.origin_allowed(c, ""))
        assert.is_false(P.origin_allowed(c, nil))
    end)

    it("allows any subdomain for a \"*.\" entry but not the bare domain or look-alikes", function()
        local c = conf({ origins = { "*.example.com" } })
        assert.is_true(P.origin_allowed(c, "https://a.example.com"))
        assert.is_true(P.origin_allowed(c, "http://a.b.example.com"))
        assert.is_false(P.origin_allowed(c, "https://example.com"))
        assert.is_false(P.origin_allowed(c, "https://evilexample.com"))
        assert.is_false(P.origin_allowed(c, "https://a.example.com.evil.test"))
        assert.is_false(P.origin_allowed(c, "https://a.example.com:8443"))
        assert.is_false(P.origin_allowed(c, "ftp://a.example.com"))
        assert.is_false(P.origin_allowed(c, "https://a.example.com/path"))
    end)

    it("keeps the scheme and port of a \"*.\" entry that names them", function()
        local c = conf({ origins = { "https://*.example.com:8443" } })
        assert.is_true(P.origin_allowed(c, "https://a.example.com:8443"))
        assert.is_false(P.origin_allowed(c, "http://a.example.com:8443"))
        assert.is_false(P.origin_allowed(c, "https://a.example.com"))
    end)

    it("matches Lua patterns against the whole origin", function()
        local c = conf({ origin_patterns = { "https://pr%-%d+%.preview%.example%.net" } })
        assert.is_true(P.origin_allowed(c, "https://pr-12.preview.example.net"))
        assert.is_false(P.origin_allowed(c, "https://pr-12.preview.example.net.evil.test"))
        assert.is_false(P.origin_allowed(c, "evil://https://pr-12.preview.example.net"))
    end)

    it("allows any origin with \"*\"", function()
        assert.is_true(P.origin_allowed(conf({ origins = { "*" } }), "https://whoever.test"))
    end)
end)

describe("cors Access-Control-Allow-Origin", function()
    it("sends \"*\" for a \"*\" config without credentials", function()
        assert.are.equal("*", P.allow_origin_value(conf({ origins = { "*" } }), "https://x.test"))
    end)

    it("reflects an allowed origin and nothing for others, with credentials", function()
        local c = conf({ origins = { "https://app.example.com" }, credentials = true })
        assert.are.equal("https://app.example.com",
            P.allow_origin_value(c, "https://app.example.com"))
        assert.is_nil(P.allow_origin_value(c, "https://evil.test"))
        assert.is_nil(P.allow_origin_value(c, "null"))
    end)
end)

describe("cors preflight headers", function()
    it("grants an allowed origin its methods, headers, max age and credentials", function()
        local c = conf({ origins = { "https://a.test" }, methods = { "get", "PUT" },
            headers = { "Authorization" }, credentials = true, max_age = 60 })
        local h = P.preflight_headers(c, "https://a.test", "PUT", "X-Other")
        assert.are.same({
            Vary = "Origin",
            ["Access-Control-Allow-Origin"] = "https://a.test",
            ["Access-Control-Allow-Methods"] = "GET,PUT",
            ["Access-Control-Allow-Headers"] = "Authorization",
            ["Access-Control-Max-Age"] = "60",
            ["Access-Control-Allow-Credentials"] = "true",
        }, h)
    end)

    it("echoes the requested headers when none are configured, and varies on them", function()
        local h = P.preflight_headers(conf({ origins = { "https://a.test" } }),
            "https://a.test", "POST", "content-type, x-b")
        assert.are.equal("content-type, x-b", h["Access-Control-Allow-Headers"])
        assert.are.equal("Origin, Access-Control-Request-Headers", h.Vary)
        assert.is_nil(h["Access-Control-Allow-Credentials"])
    end)

    it("grants nothing to an origin that is not allowed", function()
        local h = P.preflight_headers(conf({ origins = { "https://a.test" }, credentials = true }),
            "https://evil.test", "POST")
        assert.are.same({ Vary = "Origin" }, h)
    end)
end)

describe("cors config check", function()
    it("refuses origins \"*\" together with credentials", function()
        refused({ origins = { "*" }, credentials = true }, "cannot be combined with credentials")
        refused({ origins = { "https://a.test", "*" }, credentials = true }, "credentials")
    end)

    it("refuses a \"*\" that is not a leading \"*.\" label", function()
        refused({ origins = { "https://a*.example.com" } }, "leading")
        refused({ origins = { "*example.com" } }, "leading")
    end)

    it("refuses a Lua pattern that does not compile", function()
        refused({ origin_patterns = { "https://[a-" } }, "bad pattern")
        refused({ origin_patterns = { "https://(%w+" } }, "bad pattern")
        refused({ origin_patterns = { "https://x%" } }, "bad pattern")
        assert.is_true(P.check_pattern("https://[%w%-]+%.example%.com"))
    end)

    it("needs origins or origin_patterns", function()
        refused({}, "needs origins or origin_patterns")
    end)
end)
