-- plugins/request-transform.lua (headers, query, body, schema checks) and
-- lua/moongate/transform.lua (request_lookup, URL encoding, query strings).
-- The JSON work is json_ops' (spec/json_ops_spec.lua). The plugin on the
-- real binary: tests/e2e/test_transform.py.

local T = require("moongate.transform")
local J = require("moongate.json_ops")
local P = dofile("plugins/request-transform.lua")
local conf, refused = require("spec.helpers.plugin_conf")(P)

-- Compares JSON texts by value.
local function same(expected, got)
    assert.same(assert(J.decode(expected)), assert(J.decode(got)))
end

describe("transform query strings", function()
    it("parses and builds query strings, decoding + and escapes", function()
        assert.same({ { "a", "1" }, { "b", "x y" }, { "c", "" }, { "a", "2/3" } },
            T.parse_query("a=1&b=x+y&c&a=2%2F3"))
        assert.equal("a=1&b=x%20y", T.build_query({ { "a", "1" }, { "b", "x y" } }))
    end)
end)

describe("request-transform config", function()
    it("accepts the documented shape and fills max_body", function()
        local c = conf({ headers = { add = { ["X-User"] = "{consumer.id}" }, remove = { "Cookie" } },
            query = { rename = { q = "search" } }, path = "/v2/{params.id}",
            json = { rename = { userId = "id" } } })
        assert.equal(1048576, c.max_body)
    end)

    it("refuses bad fields with their names", function()
        refused({ json = { rename = { ["a[0]"] = "b" } } }, "json%.rename%.a%[0%]: only %[%*%]")
        refused({ headers = { add = { ["X-A"] = "{nope.x}" } } }, 'headers%.add%.X%-A: unknown template source "nope"')
        refused({ headers = { add = { ["Content-Length"] = "1" } } }, "set by the gateway")
        refused({ headers = { remove = { "bad header" } } }, "headers%.remove%[1%]: invalid header name")
        refused({ query = { add = { a = "{query" } } }, "query%.add%.a: unclosed")
        refused({ path = "v2/x" }, "path: must start with /")
        refused({ path = "/v2/a b" }, "path: no spaces")
        refused({ path = "/x/{body.id}" }, 'path: unknown template source "body"')
        refused({ json = { keep = "id" } }, "json%.keep: expected array")
        refused({ json = { drop = { "a" } } }, "json%.drop: unknown field")
        refused({ max_body = -1 }, "max_body: must be at least 0")
    end)
end)

describe("request-transform operations", function()
    local function lookup(values)
        return function(s, n) return values[s] and values[s][n] end
    end

    it("removes, renames, replaces and adds headers (add only when absent)", function()
        local c = assert(P.compile(conf({ headers = {
            remove = { "Cookie" }, rename = { ["X-Old"] = "X-New" },
            replace = { ["X-R"] = "r-{consumer.id}", ["X-Absent"] = "z" },
            add = { ["X-User"] = "{consumer.id}", ["X-Keep"] = "no" } } }))).headers
        local h = { cookie = "a=1", ["x-old"] = { "1", "2" }, ["x-r"] = "0", ["x-keep"] = "yes" }
        P.transform_headers(c, function(n) return h[n:lower()] end,
            function(n, v) h[n:lower()] = v end, lookup({ consumer = { id = 7 } }))
        assert.same({ ["x-new"] = { "1", "2" }, ["x-r"] = "r-7", ["x-keep"] = "yes", ["x-user"] = "7" }, h)
    end)

    it("drops a header value that would carry CR or LF", function()
        local c = assert(P.compile(conf({ headers = { add = { ["X-Q"] = "{query.q}" } } }))).headers
        local h = {}
        P.transform_headers(c, function(n) return h[n:lower()] end,
            function(n, v) h[n:lower()] = v end, lookup({ query = { q = "a\r\nX-Evil: 1" } }))
        assert.same({}, h)
    end)

    it("removes, renames, replaces and adds query parameters", function()
        local c = assert(P.compile(conf({ query = {
            remove = { "debug" }, rename = { q = "search" },
            replace = { page = "{params.p}" }, add = { limit = "20", search = "no" } } }))).query
        assert.equal("search=a%20b&x=1&page=3&limit=20",
            P.transform_query(c, "debug=1&q=a+b&x=1&page=1", lookup({ params = { p = "3" } })))
        assert.is_nil(P.transform_query(assert(P.compile(conf({ query = { remove = { "z" } } }))).query,
            "a=%7e", lookup({})), "nothing changed: the query is left as sent")
    end)

    it("transforms a JSON body and leaves invalid JSON and scalars alone", function()
        local c = assert(P.compile(conf({ json = { rename = { userId = "id" } } })))
        local out = assert(P.transform_body(c.json, '{"userId":1,"tags":[]}', lookup({})))
        same('{"id":1,"tags":[]}', out)
        assert.matches('"tags":%[%]', out)
        local none, why = P.transform_body(c.json, '{"userId":', lookup({}))
        assert.is_nil(none)
        assert.matches("^not valid JSON", why)
        none, why = P.transform_body(c.json, '"just a string"', lookup({}))
        assert.is_nil(none)
        assert.matches("not a JSON object or array", why)
    end)
end)

describe("transform request_lookup", function()
    local fake_gw = { request = {
        get_param = function(_, n) return ({ id = "u%207", p = "a%2Fb" })[n] end,
        get_header = function(_, n) return ({ ["x-tenant"] = "t1" })[n] end,
        get_query = function() return "q=a+b&q=second&e=%26" end,
    } }
    local ctx = { consumer = { id = 7, claims = { tenant = "acme", gone = J.null } } }
    local lookup = T.request_lookup(fake_gw, ctx)

    it("decodes route params and query values, first query value wins", function()
        assert.equal("u 7", lookup("params", "id"))
        assert.equal("a/b", lookup("params", "p"))
        assert.equal("a b", lookup("query", "q"))
        assert.equal("&", lookup("query", "e"))
        assert.is_nil(lookup("query", "nope"))
    end)

    it("reads headers and walks ctx.consumer, JSON null counting as missing", function()
        assert.equal("t1", lookup("headers", "x-tenant"))
        assert.equal(7, lookup("consumer", "id"))
        assert.equal("acme", lookup("consumer", "claims.tenant"))
        assert.is_nil(lookup("consumer", "claims.gone"))
        assert.is_nil(lookup("consumer", "id.deeper"))
        assert.is_nil(T.request_lookup(fake_gw, {})("consumer", "id"))
    end)

    it("re-encodes a decoded param for a path, so it stays one segment", function()
        local tpl = assert(J.compile_template("/x/{params.p}"))
        assert.equal("/x/a%2Fb", J.render(tpl, lookup, T.escape_path))
    end)
end)

describe("request-transform JSON bodies after the json_ops merge", function()
    it("says where invalid JSON broke, once", function()
        local c = assert(P.compile(conf({ json = { rename = { a = "b" } } })))
        local none, why = P.transform_body(c.json, '{"a":', function() end)
        assert.is_nil(none)
        assert.equal("not valid JSON (unexpected end at byte 6)", why)
    end)

    it("keeps member order, number spelling and null", function()
        local c = assert(P.compile(conf({ json = { rename = { userId = "id" } } })))
        assert.equal('{"z":null,"id":12345678901234567890,"f":1.10,"e":{}}',
            P.transform_body(c.json, '{"z":null,"userId":12345678901234567890,"f":1.10,"e":{}}',
                function() end))
    end)
end)
