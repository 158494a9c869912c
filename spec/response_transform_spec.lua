-- plugins/response-transform.lua: how a config becomes JSON operations
-- (order, paths), the body transform for plain, gzip and br bodies, what
-- passes untouched (invalid JSON, corrupt data, too large once decoded),
-- content-type matching, consumer templates and the config checks. The
-- phases on the wire are in tests/e2e/test_response_transform.py.

local P = dofile("plugins/response-transform.lua")
local J = require("moongate.json_ops")
local T = require("moongate.transform")
local zlib = require("moongate.zlib")
local brotli = require("moongate.brotli")

local conf, refused = require("spec.helpers.plugin_conf")(P)

local LEGACY = { json_rename = { userId = "id", userName = "name", userEmail = "email" } }
local USER = '{"userId":1,"userName":"Ada Lovelace","userEmail":"ada@example.com"}'
local USER_NEW = '{"id":1,"name":"Ada Lovelace","email":"ada@example.com"}'

describe("response-transform body", function()
    it("renames the seed's legacy user fields", function()
        assert.are.equal(USER_NEW, assert(P.transform_body(conf(LEGACY), USER)))
    end)

    it("decodes gzip and br bodies and encodes the result the same way", function()
        local c = conf(LEGACY)
        local out = assert(P.transform_body(c, assert(zlib.gzip(USER)), "gzip"))
        assert.are.equal("\31\139", out:sub(1, 2))
        assert.are.equal(USER_NEW, assert(zlib.gunzip(out)))
        out = assert(P.transform_body(c, assert(brotli.compress(USER)), "br"))
        assert.are.equal(USER_NEW, assert(brotli.decompress(out)))
    end)

    it("refuses invalid JSON, corrupt compressed data and bodies too large once decoded", function()
        local c = conf(LEGACY)
        local out, why = P.transform_body(c, '{"userId":1,', nil)
        assert.is_nil(out)
        assert.matches("invalid JSON", why)
        out, why = P.transform_body(c, "not gzip at all", "gzip")
        assert.is_nil(out)
        assert.matches("cannot decode the gzip body", why)
        out, why = P.transform_body(c, assert(zlib.gzip(USER)):sub(1, 20), "gzip")
        assert.is_nil(out)
        assert.matches("truncated", why)
        local small = conf({ json_rename = { a = "b" }, max_body_size = 1000 })
        local big = '{"a":"' .. string.rep("x", 5000) .. '"}'
        out, why = P.transform_body(small, assert(zlib.gzip(big)), "gzip")
        assert.is_nil(out)
        assert.matches("decoded body is over max_body_size", why)
        out, why = P.transform_body(small, assert(brotli.compress(big)), "br")
        assert.is_nil(out)
        assert.matches("over max_body_size", why)
    end)

    it("applies remove, rename, replace, add, keep in that order", function()
        local c = conf({
            json_remove = { "secret", "items[*].internal" },
            json_rename = { userId = "id", ["items[*].n"] = "name" },
            json_replace = { status = "redacted" },
            json_add = { ["meta.by"] = "{consumer.id}", id = 999 },
            json_keep = { "id", "status", "items", "meta" },
        })
        local body = '{"userId":5,"secret":"s","status":"x","noise":1,' ..
            '"items":[{"n":"a","internal":1},{"n":"b"}]}'
        local lookup = function(ns, key)
            if ns == "consumer" and key == "id" then return "c1" end
        end
        assert.are.equal('{"id":5,"status":"redacted","items":[{"name":"a"},{"name":"b"}],' ..
            '"meta":{"by":"c1"}}', assert(P.transform_body(c, body, nil, lookup)))
    end)

    it("leaves arrays, member order and big numbers as the upstream wrote them", function()
        local body = '{"z":[],"userId":12345678901234567890,"a":{},"f":1.10}'
        assert.are.equal('{"z":[],"id":12345678901234567890,"a":{},"f":1.10}',
            assert(P.transform_body(conf(LEGACY), body)))
    end)
end)

describe("response-transform helpers", function()
    it("matches JSON media types, +json types and configured globs", function()
        local c = conf({})
        for _, t in ipairs({ "application/json", "Application/JSON; charset=utf-8",
            "application/problem+json", "application/vnd.api+json" }) do
            assert.is_true(P.type_matches(c, t), t)
        end
        for _, t in ipairs({ "text/html", "application/jsonx", "application/json-seq",
            "text/json", "application/x+json/y" }) do
            assert.is_false(P.type_matches(c, t), t)
        end
        assert.is_false(P.type_matches(c, nil))
        assert.is_true(P.type_matches(conf({ types = { "text/*" } }), "text/plain"))
    end)

    it("looks templates up in the consumer, nested claims included", function()
        -- the plugin's lookup is transform.request_lookup; its templates are loose
        local consumer = { id = "u1", claims = { sub = "s9", org = { id = 3 } } }
        local lookup = T.request_lookup({}, { consumer = consumer })
        local function render(s) return J.render(assert(J.compile_template(s, true)), lookup) end
        assert.are.equal("u1", render("{consumer.id}"))
        assert.are.equal("s9", render("{consumer.claims.sub}"))
        assert.are.equal("3", render("{consumer.claims.org.id}")) -- always a string
        assert.are.equal("", render("{consumer.claims.org}")) -- a table is not a value
        assert.are.equal("", render("{consumer.nope.deeper}"))
        assert.are.equal("", J.render(assert(J.compile_template("{consumer.id}", true)),
            T.request_lookup({}, {})))
    end)

    it("compiles the config's maps in name order, once", function()
        local c = conf({ json_rename = { b = "x", a = "y" }, json_remove = { "r" } })
        local ops = P.json_ops(c)
        assert.are.equal("remove", ops[1].op)
        assert.are.same({ "a" }, ops[2].segs)
        assert.are.same({ "b" }, ops[3].segs)
        assert.are.equal(ops, P.json_ops(c))
        assert.are.equal(0, #P.json_ops(conf({})))
    end)

    it("lists statuses when configured", function()
        local c = conf({ statuses = { 200, 201 } })
        assert.is_true(P.status_listed(c, 200))
        assert.is_false(P.status_listed(c, 401))
        refused({ statuses = { 99 } }, "statuses")
    end)

    it("refuses bad paths, header names and sizes", function()
        refused({ json_rename = { ["a..b"] = "c" } }, "json_rename%.a%.%.b: empty field name")
        refused({ json_rename = { ["a.*"] = "c" } }, "cannot end in")
        refused({ json_remove = { "a[0]" } }, "only %[%*%]")
        refused({ header_rename = { ["X-A"] = "bad name" } }, "not a header name")
        refused({ max_body_size = 0 }, "max_body_size")
        refused({ json_rename = { a = 5 } }, "expected string")
        refused({ json = {} }, "unknown field")
    end)
end)

describe("response-transform after the json_ops merge", function()
    it("names the config field of a bad path", function()
        refused({ json_remove = { "a", "b[0]" } }, "json_remove%[2%]: only %[%*%]")
        refused({ json_keep = { "a..b" } }, "json_keep%[1%]: empty field name")
        refused({ json_rename = { a = "b.c" } }, "json_rename%.a: the new name must be a field name")
    end)

    it("decodes a route parameter for a template", function()
        local fake_gw = { request = { get_param = function() return "a%2Fb" end } }
        local c = conf({ json_add = { p = "{param.id}" } })
        assert.are.equal('{"p":"a/b"}',
            assert(P.transform_body(c, "{}", nil, T.request_lookup(fake_gw, {}))))
    end)
end)
