-- lua/moongate/transform.lua (JSON operations, paths, templates, the JSON
-- codec that keeps empty arrays and long numbers) and the pure parts of
-- plugins/request-transform.lua (headers, query, body, schema checks).
-- The plugin on the real binary: tests/e2e/test_transform.py.

local T = require("moongate.transform")
local P = dofile("plugins/request-transform.lua")
local conf, refused = require("spec.helpers.plugin_conf")(P)

-- Decodes `text`, applies the operations of `spec`, returns the JSON text.
local function run(text, spec, values)
    local ops = assert(T.compile(spec))
    local doc = assert(T.decode(text))
    T.apply(doc, ops, function(source, name)
        return values and values[source] and values[source][name]
    end)
    return assert(T.encode(doc))
end

-- Compares JSON texts by value (key order is not defined).
local function same(expected, got)
    assert.same(assert(T.decode(expected)), assert(T.decode(got)))
end

describe("transform JSON codec", function()
    it("keeps empty arrays as arrays and empty objects as objects", function()
        local out = T.encode(assert(T.decode('{"a":[],"b":{},"c":[ ],"d":[[],{}]}')))
        assert.matches('"a":%[%]', out)
        assert.matches('"b":{}', out)
        assert.matches('"c":%[%]', out)
        assert.matches('"d":%[%[%],{}%]', out)
        assert.equal("[]", T.encode(T.decode("[]")))
    end)

    it("keeps numbers longer than 14 digits exactly as they were written", function()
        local out = T.encode(assert(T.decode('{"id":12345678901234567890,"f":-1234567.890123456e-3,"n":42}')))
        assert.matches('"id":12345678901234567890', out)
        assert.matches('"f":%-1234567.890123456e%-3', out)
        assert.matches('"n":42', out)
    end)

    it("leaves strings that look like arrays or numbers alone", function()
        local out = T.encode(assert(T.decode('{"s":"[]","t":"12345678901234567890","u":"a\\"[]"}')))
        same('{"s":"[]","t":"12345678901234567890","u":"a\\"[]"}', out)
        assert.matches('"s":"%[%]"', out)
    end)

    it("refuses invalid JSON, also when a marker would have made it valid", function()
        assert.is_nil(T.decode("{bad"))
        assert.is_nil(T.decode('{"a":123456789012345678-1}'))
        assert.is_nil(T.decode('{"a":0123456789012345678}'))
        assert.is_nil(T.decode('{"a":"unterminated [] '))
        assert.is_nil(T.decode(""))
    end)

    it("cannot be fooled by a client writing a marker-like string", function()
        local text = '{"a":"\\u0000mg0000[]"}'
        local out = T.encode(assert(T.decode(text)))
        assert.equal(text, out)
    end)

    it("writes JSON null for T.null", function()
        assert.equal('{"a":null}', T.encode({ a = T.null }))
        same('{"a":null,"b":[1,null]}', T.encode(T.decode('{"a":null,"b":[1,null]}')))
    end)
end)

describe("transform paths", function()
    it("parses fields, nested fields and [*]", function()
        assert.same({ "a" }, T.parse_path("a"))
        assert.same({ "a", "b", "c" }, T.parse_path("a.b.c"))
        assert.same({ "items", T.STAR, "id" }, T.parse_path("items[*].id"))
        assert.same({ "m", T.STAR, T.STAR, "v" }, T.parse_path("m[*][*].v"))
        assert.same({ T.STAR, "id" }, T.parse_path("[*].id"))
    end)

    it("refuses empty names, other brackets and a trailing [*]", function()
        for _, bad in ipairs({ "", "a..b", ".a", "a.", "a[0].b", "a[*]", "[*]", "a[*]x.b", "[*]x" }) do
            local segs, err = T.parse_path(bad)
            assert.is_nil(segs, bad)
            assert.is_string(err)
        end
    end)
end)

describe("transform templates", function()
    local values = { params = { id = "4 2" }, query = { q = "x/y" },
        headers = { ["x-foo"] = "bar" }, consumer = { id = 7, ["claims.tenant"] = "acme" } }
    local function lookup(s, n) return values[s][n] end

    it("renders references from params, query, headers and consumer", function()
        local tpl = assert(T.compile_template("/u/{params.id}?q={query.q}&h={headers.X-Foo}&c={consumer.id}"))
        assert.equal("/u/4 2?q=x/y&h=bar&c=7", T.render(tpl, lookup))
        assert.equal("/u/4%202?q=x%2Fy&h=bar&c=7", T.render(tpl, lookup, T.escape))
    end)

    it("keeps the type of a value when the template is one reference", function()
        assert.equal(7, T.render(assert(T.compile_template("{consumer.id}")), lookup))
        assert.equal("7", T.render(assert(T.compile_template("{consumer.id}")), lookup, T.escape))
        assert.equal("id 7", T.render(assert(T.compile_template("id {consumer.id}")), lookup))
    end)

    it("says which reference has no value", function()
        local v, missing = T.render(assert(T.compile_template("/x/{params.nope}")), lookup)
        assert.is_nil(v)
        assert.equal("{params.nope}", missing)
    end)

    it("treats {{ as a literal brace and text without references as text", function()
        assert.equal("{a} }", T.render(assert(T.compile_template("{{a} }")), lookup))
        assert.equal("plain", T.render(assert(T.compile_template("plain")), lookup))
        assert.equal("", T.render(assert(T.compile_template("")), lookup))
    end)

    it("refuses unknown sources, bad references and unclosed braces", function()
        local _, err = T.compile_template("/x/{user.id}")
        assert.matches('unknown template source "user"', err)
        _, err = T.compile_template("/x/{id}")
        assert.matches("bad reference {id}", err)
        _, err = T.compile_template("/x/{params.id")
        assert.matches("unclosed {", err)
    end)

    it("refuses dot segments as path values", function()
        local tpl = assert(T.compile_template("/a/{params.id}"))
        for _, v in ipairs({ ".", "..", "" }) do
            assert.is_nil(T.render(tpl, function() return v end, T.escape_path))
        end
        assert.equal("/a/..x", T.render(tpl, function() return "..x" end, T.escape_path))
    end)

    it("parses and builds query strings, decoding + and escapes", function()
        assert.same({ { "a", "1" }, { "b", "x y" }, { "c", "" }, { "a", "2/3" } },
            T.parse_query("a=1&b=x+y&c&a=2%2F3"))
        assert.equal("a=1&b=x%20y", T.build_query({ { "a", "1" }, { "b", "x y" } }))
    end)
end)

describe("transform operations", function()
    it("renames top-level fields (the legacy user)", function()
        same('{"id":1,"name":"Ada","email":"a@x"}',
            run('{"userId":1,"userName":"Ada","userEmail":"a@x"}',
                { rename = { userId = "id", userName = "name", userEmail = "email" } }))
    end)

    it("renames nested fields and fields of every array element", function()
        same('{"a":{"b":{"z":1}},"items":[{"code":1},{"code":2,"x":0},{"other":3}]}',
            run('{"a":{"b":{"c":1}},"items":[{"id":1},{"id":2,"x":0},{"other":3}]}',
                { rename = { ["a.b.c"] = "z", ["items[*].id"] = "code" } }))
    end)

    it("removes fields, nested and in arrays of arrays", function()
        same('{"u":{"name":"a"},"m":[[{"v":1}],[{"v":2}]]}',
            run('{"u":{"name":"a","password":"p"},"secret":1,"m":[[{"v":1,"w":0}],[{"v":2,"w":0}]]}',
                { remove = { "u.password", "secret", "m[*][*].w" } }))
    end)

    it("adds fields only where missing, creating objects on the way, with templates", function()
        same('{"a":1,"meta":{"by":7,"src":"gw:x"},"items":[{"t":"n"},{"t":"keep"}]}',
            run('{"a":1,"items":[{},{"t":"keep"}]}',
                { add = { a = 2, ["meta.by"] = "{consumer.id}", ["meta.src"] = "gw:{headers.h}",
                          ["items[*].t"] = "n" } },
                { consumer = { id = 7 }, headers = { h = "x" } }))
    end)

    it("adds literal tables and booleans as JSON values, a copy each time", function()
        local out = run('{"items":[{},{}]}', { add = { ["items[*].tags"] = { "a" }, ["flag"] = false } })
        same('{"items":[{"tags":["a"]},{"tags":["a"]}],"flag":false}', out)
    end)

    it("replaces only fields that exist, including ones that are null", function()
        same('{"a":"X","n":"X","items":[{"s":"X"},{}]}',
            run('{"a":1,"n":null,"items":[{"s":0},{}]}',
                { replace = { a = "X", n = "X", b = "X", ["items[*].s"] = "X" } }))
    end)

    it("skips an add or replace whose template has no value", function()
        same('{"a":1}', run('{"a":1}', { add = { b = "{consumer.id}" }, replace = { a = "{query.q}" } }))
    end)

    it("keeps only the listed paths, whole subtrees under a kept field", function()
        same('{"id":1,"user":{"name":"a","addr":{"city":"c","zip":"z"}},"items":[{"id":1},{"id":2}]}',
            run('{"id":1,"x":2,"user":{"name":"a","pw":"p","addr":{"city":"c","zip":"z"}},'
                .. '"items":[{"id":1,"price":3},{"id":2,"price":4}]}',
                { keep = { "id", "user.name", "user.addr", "items[*].id" } }))
    end)

    it("applies to every element of a top-level array", function()
        same('[{"id":1},{"id":2}]', run('[{"userId":1,"x":0},{"userId":2}]',
            { rename = { ["[*].userId"] = "id" }, remove = { "[*].x" } }))
    end)

    it("runs keep, remove, rename, replace, add in that order", function()
        -- keep sees the original names; add runs after the rename
        same('{"id":1,"name":"n","userId":"no"}', run('{"userId":1,"other":2}',
            { keep = { "userId" }, rename = { userId = "id" }, add = { name = "n", userId = "no" },
              remove = { "other" } }))
    end)

    it("treats missing fields and values of the wrong kind as no-ops", function()
        local text = '{"a":"str","b":[1,2],"c":null,"e":[],"o":{}}'
        same(text, run(text, {
            rename = { ["a.x"] = "y", ["b[*].id"] = "k", ["c.d"] = "z", ["nope"] = "n", ["e[*].id"] = "q" },
            remove = { "a.x.y", "b.id", "nope.deeper", "o[*].x" },
            replace = { ["c.d"] = "v", ["o.x"] = "v" },
            add = { ["a.x"] = "v", ["b.x"] = "v", ["c.x"] = "v", ["e[*].x"] = "v" },
        }))
        -- and the empty array stays an array
        assert.matches('"e":%[%]', run(text, { remove = { "nope" } }))
    end)

    it("names the field of a bad path or template", function()
        local _, err = T.compile({ rename = { ["a..b"] = "c" } })
        assert.matches("^json%.rename%.a%.%.b: empty field name", err)
        _, err = T.compile({ rename = { a = "b.c" } })
        assert.matches("^json%.rename%.a: the new name must be a field name", err)
        _, err = T.compile({ add = { x = "{secret.key}" } })
        assert.matches('^json%.add%.x: unknown template source "secret"', err)
        _, err = T.compile({ keep = { "a", "b[*]" } })
        assert.matches("^json%.keep%[2%]: a path must end with a field name", err)
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
    local ctx = { consumer = { id = 7, claims = { tenant = "acme", gone = T.null } } }
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
        local tpl = assert(T.compile_template("/x/{params.p}"))
        assert.equal("/x/a%2Fb", T.render(tpl, lookup, T.escape_path))
    end)
end)
