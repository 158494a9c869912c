-- plugins/aggregate.lua: config checks (part names, templates, targets,
-- select), the requests built from templates, and how answers are
-- composed: nested and top-level merges, select, optional parts failing to
-- null with an "errors" member, required parts failing to a 502 naming
-- them. gw.http.request_multi is replaced by a fake here; the real
-- parallel calls to real upstreams are in tests/e2e/test_aggregate.py.

local P = dofile("plugins/aggregate.lua")
local J = require("moongate.json_ops")
local conf, refused = require("spec.helpers.plugin_conf")(P)

local DASHBOARD = {
    parts = {
        user = { upstream = "users", path = "/users/{consumer.id}" },
        recent_orders = { upstream = "orders", path = "/orders",
                          query = { user = "{consumer.id}", limit = "5" } },
        recommendations = { upstream = "recs", path = "/recommendations/{consumer.id}",
                            optional = true, timeout = 0.5 },
    },
}

local function lookup(values)
    return function(s, n) return values[s] and values[s][n] end
end

-- A fake request_multi: answers[i] is { status, body } or { false, err }
-- for the i-th request (parts in name order); records the requests.
local function fake(answers)
    local f = { calls = 0 }
    f.multi = function(reqs)
        f.calls = f.calls + 1
        f.reqs = reqs
        local res, errs = {}, {}
        for i = 1, #reqs do
            local a = answers[i] or { 200, "{}" }
            if a[1] then
                res[i] = { status = a[1], headers = {}, body = a[2] }
            else
                res[i], errs[i] = false, a[2]
            end
        end
        return res, errs
    end
    return f
end

local function run(c, answers, values)
    local f = fake(answers)
    local status, body, headers = P.run(P.compile(conf(c)), lookup(values or {}), f.multi, "rid-1")
    return status, body and J.decode(body), f, body, headers
end

describe("aggregate config", function()
    it("accepts the dashboard and fills the defaults", function()
        local c = conf(DASHBOARD)
        assert.equal("nested", c.merge)
        assert.equal("GET", c.parts.user.method)
        assert.equal(5, c.parts.user.timeout)
        assert.is_false(c.parts.user.optional)
        assert.is_true(c.parts.recommendations.optional)
    end)

    it("refuses templates with unknown sources, naming the field", function()
        refused({ parts = { a = { upstream = "u", path = "/x/{user.id}" } } },
            'parts%.a%.path: unknown template source "user"')
        refused({ parts = { a = { upstream = "u", query = { q = "{body.x}" } } } },
            'parts%.a%.query%.q: unknown template source "body"')
        refused({ parts = { a = { upstream = "u", headers = { ["X-A"] = "{id}" } } } },
            "parts%.a%.headers%.X%-A: bad reference {id}")
        refused({ parts = { a = { upstream = "u", body = { n = { m = "{nope.x}" } } } } },
            'parts%.a%.body%.n%.m: unknown template source "nope"')
    end)

    it("refuses bad part names, targets and selects", function()
        refused({ parts = { ["1a"] = { upstream = "u" } } }, "parts%.1a: a part name")
        refused({ parts = { errors = { upstream = "u" } } }, 'parts%.errors: "errors" is the name')
        refused({ parts = { a = { path = "/x" } } }, "parts%.a: needs exactly one of upstream and url")
        refused({ parts = { a = { upstream = "u", url = "http://127.0.0.1:1/" } } }, "exactly one")
        refused({ parts = { a = { url = "https://x/" } } }, "parts%.a%.url: must be http://")
        refused({ parts = { a = { url = "http://{headers.host}/" } } }, "parts%.a%.url: must be http://")
        refused({ parts = { a = { upstream = "u", path = "x" } } }, "parts%.a%.path: must start with /")
        refused({ parts = { a = { upstream = "u", path = "/a b" } } }, "parts%.a%.path: no spaces")
        refused({ parts = { a = { url = "http://127.0.0.1:1/a\tb" } } }, "parts%.a%.url: no spaces")
        refused({ parts = { a = { upstream = "u", select = "items[*].id" } } }, "parts%.a%.select: %[%*%]")
        refused({ parts = { a = { upstream = "u", headers = { Connection = "x" } } } }, "set by the gateway")
        refused({ parts = { a = { upstream = "u", method = "get" } } }, "parts%.a%.method: does not match")
        refused({ parts = { a = { upstream = "u", timeout = 0 } } }, "parts%.a%.timeout: must be at least")
        refused({ parts = { a = { upstream = "u", extra = 1 } } }, "parts%.a%.extra: unknown field")
        refused({ parts = {} }, "at least one part")
        refused({ merge = "deep", parts = { a = { upstream = "u" } } }, "merge: must be one of")
        refused({}, "parts: required")
    end)
end)

describe("aggregate requests", function()
    it("makes one parallel call with every part, templates filled and encoded", function()
        local _, _, f = run(DASHBOARD, {}, { consumer = { id = "a b/c" } })
        assert.equal(1, f.calls)
        assert.equal(3, #f.reqs)
        -- parts in name order: recent_orders, recommendations, user
        assert.equal("orders", f.reqs[1].upstream)
        assert.equal("/orders?limit=5&user=a%20b%2Fc", f.reqs[1].path)
        assert.equal("/recommendations/a%20b%2Fc", f.reqs[2].path)
        assert.equal(0.5, f.reqs[2].timeout)
        assert.equal("/users/a%20b%2Fc", f.reqs[3].path)
        assert.equal(5, f.reqs[3].timeout)
        assert.equal("GET", f.reqs[3].method)
        assert.equal("rid-1", f.reqs[3].headers["X-Request-Id"])
    end)

    it("fills url, method, headers and a JSON body from params, query and headers", function()
        local _, _, f = run({ parts = { a = { url = "http://127.0.0.1:9/items/{params.id}",
            method = "POST", headers = { ["X-Tenant"] = "{headers.x-tenant}" },
            query = { q = "{query.q}" },
            body = { id = "{params.id}", n = 1, tags = { "x" } } } } }, {},
            { params = { id = "42" }, query = { q = "a&b" }, headers = { ["x-tenant"] = "t1" } })
        local r = f.reqs[1]
        assert.equal("http://127.0.0.1:9/items/42?q=a%26b", r.url)
        assert.is_nil(r.upstream)
        assert.equal("POST", r.method)
        assert.equal("t1", r.headers["X-Tenant"])
        assert.equal("application/json", r.headers["Content-Type"])
        assert.same({ id = "42", n = 1, tags = { "x" } }, J.decode(r.body))
    end)

    it("fails a part whose template has no value without calling it", function()
        local status, doc, f = run({ parts = {
            a = { upstream = "u", path = "/a/{consumer.id}", optional = true },
            b = { upstream = "u", path = "/b" } } }, { { 200, '{"b":1}' } })
        assert.equal(200, status)
        assert.equal(1, #f.reqs)
        assert.equal("/b", f.reqs[1].path)
        assert.equal(J.null, doc.a)
        assert.same({ a = "no usable value for {consumer.id}" }, doc.errors)
    end)

    it("refuses dot segments and CR/LF coming from the client", function()
        local status, doc, f = run({ parts = {
            a = { upstream = "u", path = "/a/{query.p}", optional = true },
            b = { upstream = "u", headers = { ["X-Q"] = "{query.h}" }, optional = true } } }, {},
            { query = { p = "..", h = "x\r\nEvil: 1" } })
        assert.equal(200, status)
        assert.equal(0, f.calls)
        assert.matches("no usable value for {query.p}", doc.errors.a)
        assert.matches("CR, LF", doc.errors.b)
    end)
end)

describe("aggregate answers", function()
    it("nests every part under its name", function()
        local status, doc, _, raw, headers = run(DASHBOARD, {
            { 200, '{"orders":[{"id":1}],"empty":[]}' }, { 200, '["r1","r2"]' },
            { 200, '{"id":"7","name":"Ada"}' } }, { consumer = { id = "7" } })
        assert.equal(200, status)
        assert.equal("application/json", headers["Content-Type"])
        assert.same({ id = "7", name = "Ada" }, doc.user)
        assert.same({ "r1", "r2" }, doc.recommendations)
        assert.same({ { id = 1 } }, doc.recent_orders.orders)
        assert.is_nil(doc.errors)
        assert.matches('"empty":%[%]', raw)
    end)

    it("merges objects at the top level in name order; other values stay nested", function()
        local status, doc = run({ merge = "top", parts = {
            a = { upstream = "u" }, b = { upstream = "u" }, c = { upstream = "u" } } },
            { { 200, '{"x":1,"y":1}' }, { 200, '{"y":2,"z":2}' }, { 200, "[1,2]" } })
        assert.equal(200, status)
        assert.same({ x = 1, y = 2, z = 2, c = { 1, 2 } }, doc)
    end)

    it("selects a sub-field, null when it is missing", function()
        local _, doc = run({ parts = { a = { upstream = "u", select = "data.items" },
            b = { upstream = "u", select = "data.nope" } } },
            { { 200, '{"data":{"items":[1,2],"total":2}}' }, { 200, '{"data":{}}' } })
        assert.same({ 1, 2 }, doc.a)
        assert.equal(J.null, doc.b)
    end)

    it("turns each kind of failure of an optional part into null and an errors entry", function()
        local opt = { upstream = "u", optional = true }
        local status, doc, _, raw = run({ parts = { a = opt, b = opt, c = opt, d = opt, e = { upstream = "u" } } },
            { { false, "timeout" }, { false, "connection refused" }, { 503, "{}" }, { 200, "<html>" },
              { 200, '{"ok":true}' } })
        assert.equal(200, status)
        assert.equal(J.null, doc.a)
        assert.equal(J.null, doc.d)
        assert.same({ ok = true }, doc.e)
        assert.equal("timeout", doc.errors.a)
        assert.equal("connection refused", doc.errors.b)
        assert.equal("status 503", doc.errors.c)
        assert.matches("^invalid JSON", doc.errors.d)
        assert.matches('"a":null', raw)
    end)

    it("answers 502 naming the first failed required part and why", function()
        local status, doc = run(DASHBOARD, { { 500, "{}" }, { false, "timeout" }, { false, "connection refused" } },
            { consumer = { id = 7 } })
        assert.equal(502, status)
        assert.equal("recent_orders", doc.part)
        assert.equal("status 500", doc.reason)
        assert.equal("part recent_orders failed: status 500", doc.error)
        assert.same({ recent_orders = "status 500", recommendations = "timeout",
            user = "connection refused" }, doc.errors)
    end)

    it("takes an empty 2xx answer as null", function()
        local status, doc = run({ parts = { a = { upstream = "u" } } }, { { 204, "" } })
        assert.equal(200, status)
        assert.equal(J.null, doc.a)
    end)
end)

describe("aggregate bodies after the json_ops merge", function()
    it("sends json_ops.EMPTY_ARRAY in a body as []", function()
        local _, _, f = run({ parts = { a = { upstream = "u", method = "POST",
            body = { tags = J.EMPTY_ARRAY, n = { J.EMPTY_ARRAY } } } } }, {})
        assert.equal('{"n":[[]],"tags":[]}', f.reqs[1].body)
    end)

    it("says why a part's answer is not JSON once", function()
        local _, doc = run({ parts = { a = { upstream = "u", optional = true } } }, { { 200, "{x" } })
        assert.matches("^invalid JSON: expected a member name at byte 2$", doc.errors.a)
    end)
end)
