-- lua/moongate/json_ops.lua, the one JSON module of request-transform,
-- response-transform and aggregate: the codec that gives back what it was
-- given (arrays, member order, number spelling, long numbers, null), path
-- parsing in both dialects, templates (strict and loose), and every
-- operation (rename, remove, replace, add, keep) on top-level, nested and
-- array paths, with missing fields, templates and invalid JSON.

local J = require("moongate.json_ops")
local T = require("moongate.transform")

-- decode, apply, encode: the way response-transform uses the module
-- (spread dialect, loose templates: compile's defaults).
local function run(text, ops, lookup)
    local doc = assert(J.decode(text))
    doc = assert(J.apply(doc, ops, lookup))
    return assert(J.encode(doc))
end

-- request-transform's shape: a `json` table, strict dialect, its order.
local STRICT_ORDER = { "keep", "remove", "rename", "replace", "add" }
local function compile_strict(spec)
    return J.compile_groups(spec, STRICT_ORDER, "json.", { spread = false })
end

-- Decodes `text`, applies the operations of a request-transform `json`
-- table, returns the JSON text.
local function run_strict(text, spec, values)
    local ops = assert(compile_strict(spec))
    local doc = assert(J.decode(text))
    J.apply(doc, ops, function(source, name)
        return values and values[source] and values[source][name]
    end)
    return assert(J.encode(doc))
end

-- Compares JSON texts by value.
local function same(expected, got)
    assert.same(assert(J.decode(expected)), assert(J.decode(got)))
end

describe("json_ops codec", function()
    it("re-encodes what it decoded byte for byte when it is compact", function()
        for _, s in ipairs({
            '{"b":1,"a":[],"c":{},"d":[1,2,{"x":null}],"e":"t\\"q\\\\\\n","f":true,"g":false}',
            '[]', '{}', '"str"', '0', '-12', 'null', '[[],[[]],{}]',
            '{"big":12345678901234567890,"f":1.50,"e":1e3,"neg":-0.0,"n":123456789012345}',
            '{"u":"\\u0001 é ☃ 😀"}',
        }) do
            assert.are.equal(s:gsub("\\u0001", "\\u0001"), J.encode(assert(J.decode(s))))
        end
    end)

    it("decodes escapes, surrogate pairs and whitespace", function()
        local v = assert(J.decode(' { "a" : "\\u00e9\\ud83d\\ude00\\/\\t" , "b" : [ 1 , 2 ] } '))
        assert.are.equal("é😀/\t", v.a)
        assert.is_true(J.is_array(v.b))
        assert.are.equal('{"a":"é😀/\\t","b":[1,2]}', J.encode(v))
    end)

    it("keeps member order and appends added members sorted", function()
        local v = assert(J.decode('{"z":1,"a":2,"m":3}'))
        v.y, v.b = 4, 5
        assert.are.equal('{"z":1,"a":2,"m":3,"b":5,"y":4}', J.encode(v))
    end)

    it("refuses invalid JSON with the byte where it broke", function()
        for _, s in ipairs({ "", "{", '{"a":}', "[1,]", "{'a':1}", '{"a":1}x', "01", "1.",
            '"\1"', '"abc', "nul", '{"a" 1}', "[1 2]", "-", "1e" }) do
            local v, err = J.decode(s)
            assert.is_nil(v, s)
            assert.matches("^invalid JSON: ", err)
        end
        local _, err = J.decode('{"a":1,}')
        assert.matches("byte 8", err)
    end)

    it("refuses nesting deeper than MAX_DEPTH instead of overflowing the stack", function()
        local v, err = J.decode(string.rep("[", 10000) .. string.rep("]", 10000))
        assert.is_nil(v)
        assert.matches("nested too deeply", err)
    end)

    it("encodes plain Lua tables from configs as arrays or objects", function()
        assert.are.equal('{"a":[1,2],"b":{"c":"d"},"e":{}}',
            J.encode({ a = { 1, 2 }, b = { c = "d" }, e = {} }))
        assert.are.equal("[]", J.encode(J.array()))
        assert.are.equal("0.1", J.encode(0.1))
        local v, err = J.encode({ x = 0 / 0 })
        assert.is_nil(v)
        assert.matches("not JSON", err)
    end)
end)

describe("json_ops member order under operations", function()
    it("names every member once after remove-then-add and rename onto a removed name", function()
        assert.are.equal('{"a":2,"b":1}', run('{"a":1,"b":1}', {
            { op = "remove", path = "a" }, { op = "add", path = "a", value = 2 } }))
        assert.are.equal('{"id":1,"z":0}', run('{"id":0,"userId":1,"z":0}', {
            { op = "remove", path = "id" }, { op = "rename", path = "userId", to = "id" } }))
        assert.are.equal('{"x":1,"id":5}', run('{"x":1,"id":0}', {
            { op = "remove", path = "id" }, { op = "add", path = "id", value = 5 },
            { op = "rename", path = "nothing", to = "id" } }))
    end)

    it("round-trips generated documents to the same values lua-cjson reads", function()
        local cjson = require("cjson")
        local seed = 7
        local function rnd(n) seed = (seed * 16807) % 2147483647 return seed % n end
        local function gen(depth)
            local k = rnd(depth > 3 and 4 or 6)
            if k == 0 then return tostring(rnd(100000) - 50000)
            elseif k == 1 then return '"s' .. rnd(1000) .. '\\n\\u00e9"'
            elseif k == 2 then return ({ "true", "false", "null", "1.5e3" })[rnd(4) + 1]
            elseif k == 3 then return '"plain"'
            elseif k == 4 then
                local t = {}
                for i = 1, rnd(5) do t[i] = gen(depth + 1) end
                return "[" .. table.concat(t, ",") .. "]"
            end
            local t = {}
            for i = 1, rnd(5) do t[i] = '"k' .. i .. '":' .. gen(depth + 1) end
            return "{" .. table.concat(t, ",") .. "}"
        end
        for _ = 1, 300 do
            local text = gen(0)
            local doc, err = J.decode(text)
            assert(doc ~= nil, tostring(err) .. " in " .. text)
            local out = assert(J.encode(doc))
            assert.are.equal((text:gsub("\\u00e9", "é")), out) -- \u escapes come out as UTF-8
            assert.are.same(cjson.decode(text), cjson.decode(out))
        end
    end)
end)

describe("json_ops paths, spread dialect", function()
    it("parse dots, [*] and *", function()
        assert.are.same({ "a", "b", "c" }, J.parse_path("a.b.c"))
        assert.are.same({ "items", J.STAR, "id" }, J.parse_path("items[*].id", true))
        assert.are.same({ "items", J.STAR, "id" }, J.parse_path("items.*.id", true))
        assert.are.same({ J.STAR, "id" }, J.parse_path("[*].id", true))
    end)

    it("refuse empty segments and other brackets", function()
        assert.is_nil(J.parse_path(""))
        assert.is_nil(J.parse_path("a..b"))
        assert.is_nil(J.parse_path("a."))
        assert.is_nil(J.parse_path("a[0].b"))
        local ops, err = J.compile({ { op = "rename", path = "a..b", to = "x" } })
        assert.is_nil(ops)
        assert.matches("operation 1 %(rename%): empty field name", err)
        assert.is_nil(J.compile({ { op = "frobnicate", path = "a" } }))
        assert.is_nil(J.compile({ { op = "rename", path = "a" } }))
        assert.is_nil(J.compile({ { op = "add", path = "a" } }))
    end)
end)

describe("json_ops rename", function()
    local legacy = {
        { op = "rename", path = "userId", to = "id" },
        { op = "rename", path = "userName", to = "name" },
        { op = "rename", path = "userEmail", to = "email" },
    }

    it("renames the seed's legacy user fields in place", function()
        assert.are.equal('{"id":1,"name":"Ada Lovelace","email":"ada@example.com","x":true}',
            run('{"userId":1,"userName":"Ada Lovelace","userEmail":"ada@example.com",'
                .. '"x":true}', legacy))
    end)

    it("renames in every element of a top-level array", function()
        assert.are.equal('[{"id":1,"name":"A"},{"id":2,"name":"B"},"s",[]]',
            run('[{"userId":1,"userName":"A"},{"userId":2,"userName":"B"},"s",[]]', legacy))
    end)

    it("renames on nested paths and through arrays with [*]", function()
        assert.are.equal('{"data":{"user":{"id":7}},"list":[{"id":1},{"id":2,"k":0},{}]}',
            run('{"data":{"user":{"userId":7}},"list":[{"userId":1},{"userId":2,"k":0},{}]}', {
                { op = "rename", path = "data.user.userId", to = "id" },
                { op = "rename", path = "list[*].userId", to = "id" },
            }))
    end)

    it("leaves documents without the field alone", function()
        assert.are.equal('{"a":{"b":1}}', run('{"a":{"b":1}}', {
            { op = "rename", path = "a.c", to = "x" },
            { op = "rename", path = "q.r.s", to = "x" },
            { op = "rename", path = "a.b.c", to = "x" }, -- a number has no members
        }))
        assert.are.equal('"str"', run('"str"', legacy))
        assert.are.equal("null", run("null", legacy))
    end)

    it("replaces a member that already has the new name", function()
        assert.are.equal('{"id":"new","z":1}', run('{"id":"old","userId":"new","z":1}', legacy))
    end)
end)

describe("json_ops remove", function()
    it("removes top-level, nested and per-element members; missing ones are no-ops", function()
        assert.are.equal('{"a":{"keep":1},"items":[{"id":1},{"id":2}]}',
            run('{"secret":"s","a":{"keep":1,"pw":"x"},"items":[{"id":1,"t":1},{"id":2}]}', {
                { op = "remove", path = "secret" },
                { op = "remove", path = "a.pw" },
                { op = "remove", path = "items[*].t" },
                { op = "remove", path = "nope.nothing" },
            }))
    end)

    it("empties an array with [*] and removes every member with *", function()
        assert.are.equal('{"a":[],"o":{}}', run('{"a":[1,2,3],"o":{"x":1,"y":2}}', {
            { op = "remove", path = "a[*]" }, { op = "remove", path = "o.*" } }))
    end)
end)

describe("json_ops replace", function()
    it("replaces present values only, deep-copying table values", function()
        local ops = J.compile({
            { op = "replace", path = "a.b", value = { x = 1 } },
            { op = "replace", path = "missing", value = 1 },
            { op = "replace", path = "list[*].v", value = "z" },
        })
        local text = '{"a":{"b":1},"list":[{"v":1},{"w":2}]}'
        local doc1 = assert(J.apply(assert(J.decode(text)), ops))
        assert.are.equal('{"a":{"b":{"x":1}},"list":[{"v":"z"},{"w":2}]}', J.encode(doc1))
        local doc2 = assert(J.apply(assert(J.decode('{"a":{"b":2}}')), ops))
        assert.are_not.equal(doc1.a.b, doc2.a.b)
    end)
end)

describe("json_ops add", function()
    it("adds absent members, creating missing objects, and never overwrites", function()
        assert.are.equal('{"a":1,"meta":{"v":2,"gw":"moongate"},"n":{"e":{"w":true}}}',
            run('{"a":1,"meta":{"v":2}}', {
                { op = "add", path = "a", value = 99 },
                { op = "add", path = "meta.gw", value = "moongate" },
                { op = "add", path = "n.e.w", value = true },
            }))
    end)

    it("adds to every element of an array", function()
        assert.are.equal('[{"id":1,"kind":"user"},{"id":2,"kind":"admin"}]',
            run('[{"id":1},{"id":2,"kind":"admin"}]',
                { { op = "add", path = "kind", value = "user" } }))
    end)

    it("expands templates from the lookup function; unknown ones become empty", function()
        local function lookup(ns, key)
            if ns == "consumer" and key == "id" then return "u-42" end
            if ns == "header" and key == "x-tenant" then return "acme" end
            if ns == "param" and key == "id" then return 7 end
        end
        assert.are.equal('{"by":"u-42","t":"acme/7","none":"[]","lit":"{notatemplate}"}',
            run('{}', {
                { op = "add", path = "by", value = "{consumer.id}" },
                { op = "add", path = "t", value = "{header.x-tenant}/{param.id}" },
                { op = "add", path = "none", value = "[{query.q}]" },
                { op = "add", path = "lit", value = "{notatemplate}" },
            }, lookup))
    end)
end)

describe("json_ops keep", function()
    it("keeps only the listed paths, nested and through arrays", function()
        assert.are.equal('{"id":1,"profile":{"name":"A"},"orders":[{"id":5},{"id":6}]}',
            run('{"id":1,"pw":"x","profile":{"name":"A","ssn":"1"},' ..
                '"orders":[{"id":5,"card":"c"},{"id":6}],"extra":[]}', {
                    { op = "keep", paths = { "id", "profile.name", "orders[*].id" } } }))
    end)

    it("keeps whole subtrees and applies to each element of a top-level array", function()
        assert.are.equal('[{"id":1,"a":{"x":1,"y":2}},{"id":2}]',
            run('[{"id":1,"a":{"x":1,"y":2},"b":3},{"id":2,"b":4}]', {
                { op = "keep", paths = { "id", "a" } } }))
    end)

    it("composes with rename in order", function()
        assert.are.equal('{"id":1}', run('{"userId":1,"other":2}', {
            { op = "rename", path = "userId", to = "id" },
            { op = "keep", paths = { "id" } } }))
    end)
end)

describe("json_ops codec: empty arrays, long numbers, null", function()
    it("keeps empty arrays as arrays and empty objects as objects", function()
        local out = J.encode(assert(J.decode('{"a":[],"b":{},"c":[ ],"d":[[],{}]}')))
        assert.matches('"a":%[%]', out)
        assert.matches('"b":{}', out)
        assert.matches('"c":%[%]', out)
        assert.matches('"d":%[%[%],{}%]', out)
        assert.equal("[]", J.encode(J.decode("[]")))
    end)

    it("keeps numbers longer than 14 digits exactly as they were written", function()
        local out = J.encode(assert(J.decode('{"id":12345678901234567890,"f":-1234567.890123456e-3,"n":42}')))
        assert.matches('"id":12345678901234567890', out)
        assert.matches('"f":%-1234567.890123456e%-3', out)
        assert.matches('"n":42', out)
    end)

    it("leaves strings that look like arrays or numbers alone", function()
        local out = J.encode(assert(J.decode('{"s":"[]","t":"12345678901234567890","u":"a\\"[]"}')))
        same('{"s":"[]","t":"12345678901234567890","u":"a\\"[]"}', out)
        assert.matches('"s":"%[%]"', out)
    end)

    it("refuses invalid JSON next to long numbers, [] and strings", function()
        assert.is_nil(J.decode("{bad"))
        assert.is_nil(J.decode('{"a":123456789012345678-1}'))
        assert.is_nil(J.decode('{"a":0123456789012345678}'))
        assert.is_nil(J.decode('{"a":"unterminated [] '))
        assert.is_nil(J.decode(""))
    end)

    it("writes back a string holding NUL and [] as it came", function()
        local text = '{"a":"\\u0000mg0000[]"}'
        local out = J.encode(assert(J.decode(text)))
        assert.equal(text, out)
    end)

    it("writes JSON null for J.null", function()
        assert.equal('{"a":null}', J.encode({ a = J.null }))
        same('{"a":null,"b":[1,null]}', J.encode(J.decode('{"a":null,"b":[1,null]}')))
    end)
end)

describe("json_ops paths, strict dialect", function()
    it("parses fields, nested fields and [*]", function()
        assert.same({ "a" }, J.parse_path("a"))
        assert.same({ "a", "b", "c" }, J.parse_path("a.b.c"))
        assert.same({ "items", J.STAR, "id" }, J.parse_path("items[*].id"))
        assert.same({ "m", J.STAR, J.STAR, "v" }, J.parse_path("m[*][*].v"))
        assert.same({ J.STAR, "id" }, J.parse_path("[*].id"))
    end)

    it("refuses empty names, other brackets and a trailing [*]", function()
        for _, bad in ipairs({ "", "a..b", ".a", "a.", "a[0].b", "a[*]", "[*]", "a[*]x.b", "[*]x" }) do
            local segs, err = J.parse_path(bad)
            assert.is_nil(segs, bad)
            assert.is_string(err)
        end
    end)
end)

describe("json_ops templates, strict", function()
    local values = { params = { id = "4 2" }, query = { q = "x/y" },
        headers = { ["x-foo"] = "bar" }, consumer = { id = 7, ["claims.tenant"] = "acme" } }
    local function lookup(s, n) return values[s][n] end

    it("renders references from params, query, headers and consumer", function()
        local tpl = assert(J.compile_template("/u/{params.id}?q={query.q}&h={headers.X-Foo}&c={consumer.id}"))
        assert.equal("/u/4 2?q=x/y&h=bar&c=7", J.render(tpl, lookup))
        assert.equal("/u/4%202?q=x%2Fy&h=bar&c=7", J.render(tpl, lookup, T.escape))
    end)

    it("keeps the type of a value when the template is one reference", function()
        assert.equal(7, J.render(assert(J.compile_template("{consumer.id}")), lookup))
        assert.equal("7", J.render(assert(J.compile_template("{consumer.id}")), lookup, T.escape))
        assert.equal("id 7", J.render(assert(J.compile_template("id {consumer.id}")), lookup))
    end)

    it("says which reference has no value", function()
        local v, missing = J.render(assert(J.compile_template("/x/{params.nope}")), lookup)
        assert.is_nil(v)
        assert.equal("{params.nope}", missing)
    end)

    it("treats {{ as a literal brace and text without references as text", function()
        assert.equal("{a} }", J.render(assert(J.compile_template("{{a} }")), lookup))
        assert.equal("plain", J.render(assert(J.compile_template("plain")), lookup))
        assert.equal("", J.render(assert(J.compile_template("")), lookup))
    end)

    it("refuses unknown sources, bad references and unclosed braces", function()
        local _, err = J.compile_template("/x/{user.id}")
        assert.matches('unknown template source "user"', err)
        _, err = J.compile_template("/x/{id}")
        assert.matches("bad reference {id}", err)
        _, err = J.compile_template("/x/{params.id")
        assert.matches("unclosed {", err)
    end)

    it("refuses dot segments as path values", function()
        local tpl = assert(J.compile_template("/a/{params.id}"))
        for _, v in ipairs({ ".", "..", "" }) do
            assert.is_nil(J.render(tpl, function() return v end, T.escape_path))
        end
        assert.equal("/a/..x", J.render(tpl, function() return "..x" end, T.escape_path))
    end)

end)

describe("json_ops operations, strict dialect (request-transform)", function()
    it("renames top-level fields (the legacy user)", function()
        same('{"id":1,"name":"Ada","email":"a@x"}',
            run_strict('{"userId":1,"userName":"Ada","userEmail":"a@x"}',
                { rename = { userId = "id", userName = "name", userEmail = "email" } }))
    end)

    it("renames nested fields and fields of every array element", function()
        same('{"a":{"b":{"z":1}},"items":[{"code":1},{"code":2,"x":0},{"other":3}]}',
            run_strict('{"a":{"b":{"c":1}},"items":[{"id":1},{"id":2,"x":0},{"other":3}]}',
                { rename = { ["a.b.c"] = "z", ["items[*].id"] = "code" } }))
    end)

    it("removes fields, nested and in arrays of arrays", function()
        same('{"u":{"name":"a"},"m":[[{"v":1}],[{"v":2}]]}',
            run_strict('{"u":{"name":"a","password":"p"},"secret":1,"m":[[{"v":1,"w":0}],[{"v":2,"w":0}]]}',
                { remove = { "u.password", "secret", "m[*][*].w" } }))
    end)

    it("adds fields only where missing, creating objects on the way, with templates", function()
        same('{"a":1,"meta":{"by":7,"src":"gw:x"},"items":[{"t":"n"},{"t":"keep"}]}',
            run_strict('{"a":1,"items":[{},{"t":"keep"}]}',
                { add = { a = 2, ["meta.by"] = "{consumer.id}", ["meta.src"] = "gw:{headers.h}",
                          ["items[*].t"] = "n" } },
                { consumer = { id = 7 }, headers = { h = "x" } }))
    end)

    it("adds literal tables and booleans as JSON values, a copy each time", function()
        local out = run_strict('{"items":[{},{}]}', { add = { ["items[*].tags"] = { "a" }, ["flag"] = false } })
        same('{"items":[{"tags":["a"]},{"tags":["a"]}],"flag":false}', out)
    end)

    it("replaces only fields that exist, including ones that are null", function()
        same('{"a":"X","n":"X","items":[{"s":"X"},{}]}',
            run_strict('{"a":1,"n":null,"items":[{"s":0},{}]}',
                { replace = { a = "X", n = "X", b = "X", ["items[*].s"] = "X" } }))
    end)

    it("skips an add or replace whose template has no value", function()
        same('{"a":1}', run_strict('{"a":1}', { add = { b = "{consumer.id}" }, replace = { a = "{query.q}" } }))
    end)

    it("keeps only the listed paths, whole subtrees under a kept field", function()
        same('{"id":1,"user":{"name":"a","addr":{"city":"c","zip":"z"}},"items":[{"id":1},{"id":2}]}',
            run_strict('{"id":1,"x":2,"user":{"name":"a","pw":"p","addr":{"city":"c","zip":"z"}},'
                .. '"items":[{"id":1,"price":3},{"id":2,"price":4}]}',
                { keep = { "id", "user.name", "user.addr", "items[*].id" } }))
    end)

    it("applies to every element of a top-level array", function()
        same('[{"id":1},{"id":2}]', run_strict('[{"userId":1,"x":0},{"userId":2}]',
            { rename = { ["[*].userId"] = "id" }, remove = { "[*].x" } }))
    end)

    it("runs keep, remove, rename, replace, add in that order", function()
        -- keep sees the original names; add runs after the rename
        same('{"id":1,"name":"n","userId":"no"}', run_strict('{"userId":1,"other":2}',
            { keep = { "userId" }, rename = { userId = "id" }, add = { name = "n", userId = "no" },
              remove = { "other" } }))
    end)

    it("treats missing fields and values of the wrong kind as no-ops", function()
        local text = '{"a":"str","b":[1,2],"c":null,"e":[],"o":{}}'
        same(text, run_strict(text, {
            rename = { ["a.x"] = "y", ["b[*].id"] = "k", ["c.d"] = "z", ["nope"] = "n", ["e[*].id"] = "q" },
            remove = { "a.x.y", "b.id", "nope.deeper", "o[*].x" },
            replace = { ["c.d"] = "v", ["o.x"] = "v" },
            add = { ["a.x"] = "v", ["b.x"] = "v", ["c.x"] = "v", ["e[*].x"] = "v" },
        }))
        -- and the empty array stays an array
        assert.matches('"e":%[%]', run_strict(text, { remove = { "nope" } }))
    end)

    it("names the field of a bad path or template", function()
        local _, err = compile_strict({ rename = { ["a..b"] = "c" } })
        assert.matches("^json%.rename%.a%.%.b: empty field name", err)
        _, err = compile_strict({ rename = { a = "b.c" } })
        assert.matches("^json%.rename%.a: the new name must be a field name", err)
        _, err = compile_strict({ add = { x = "{secret.key}" } })
        assert.matches('^json%.add%.x: unknown template source "secret"', err)
        _, err = compile_strict({ keep = { "a", "b[*]" } })
        assert.matches("^json%.keep%[2%]: a path must end with a field name", err)
    end)
end)


describe("json_ops dialects: the same document, strict and spread", function()
    local doc = '{"items":[{"id":1,"x":0},{"id":2}],"o":{"a":{"x":1},"b":{"x":2}},"*":{"x":3}}'

    it("a name meeting an array is a no-op when strict, each element when spreading", function()
        assert.are.equal(doc, run_strict(doc, { remove = { "items.x" } }))
        assert.are.equal('{"items":[{"id":1},{"id":2}],"o":{"a":{"x":1},"b":{"x":2}},"*":{"x":3}}',
            run(doc, { { op = "remove", path = "items.x" } }))
    end)

    it("[*] on an object is a no-op when strict, every member when spreading", function()
        assert.are.equal(doc, run_strict(doc, { replace = { ["o[*].x"] = 0 } }))
        assert.are.equal(
            '{"items":[{"id":1,"x":0},{"id":2}],"o":{"a":{"x":0},"b":{"x":0}},"*":{"x":3}}',
            run(doc, { { op = "replace", path = "o[*].x", value = 0 } }))
    end)

    it("a lone * is a field name when strict", function()
        assert.are.same({ "*", "x" }, J.parse_path("*.x"))
        assert.are.same({ J.STAR, "x" }, J.parse_path("*.x", true))
        assert.are.equal('{"items":[{"id":1,"x":0},{"id":2}],"o":{"a":{"x":1},"b":{"x":2}},"*":{}}',
            run_strict(doc, { remove = { "*.x" } }))
    end)

    it("keep: strict leaves an array [*] does not name whole, spread reaches into it", function()
        assert.are.equal('{"items":[{"id":1,"x":0},{"id":2}]}',
            run_strict(doc, { keep = { "items.id" } }))
        assert.are.equal('{"items":[{"id":1},{"id":2}]}',
            run(doc, { { op = "keep", paths = { "items.id" } } }))
    end)

    it("refuses a trailing [*] when strict; spreading, only for rename and add", function()
        local _, err = compile_strict({ remove = { "items[*]" } })
        assert.matches("^json%.remove%[1%]: a path must end with a field name", err)
        assert.is_truthy(J.compile({ { op = "remove", path = "items[*]" } }))
        _, err = J.compile({ { op = "add", path = "items[*]", value = 1 } })
        assert.matches("cannot end in %[%*%]", err)
    end)

    it("refuses a leading dot, [*] followed by text and [*]. in both dialects", function()
        for _, spread in ipairs({ false, true }) do
            for _, bad in ipairs({ ".a", "[*]x", "[*].", "a.[*]", "a[*]x" }) do
                assert.is_nil(J.parse_path(bad, spread), bad)
            end
        end
    end)
end)

describe("json_ops choices where the two old modules differed", function()
    it("keeps a whole subtree when a shorter path names it, in either order", function()
        local text = '{"a":{"x":1,"y":2},"b":2}'
        for _, paths in ipairs({ { "a", "a.x" }, { "a.x", "a" } }) do
            assert.are.equal('{"a":{"x":1,"y":2}}', run(text, { { op = "keep", paths = paths } }))
            assert.are.equal('{"a":{"x":1,"y":2}}', run_strict(text, { keep = paths }))
        end
    end)

    it("does not create an object that only [*] would walk", function()
        assert.are.equal("{}", run("{}", { { op = "add", path = "x[*].y", value = 1 } }))
        assert.are.equal("{}", run_strict("{}", { add = { ["x[*].y"] = 1 } }))
    end)

    it("refuses a new name that looks like a path, in both dialects", function()
        local _, err = J.compile({ { op = "rename", path = "a", to = "b.c" } })
        assert.matches("the new name must be a field name", err)
        _, err = compile_strict({ rename = { a = "x[*]" } })
        assert.matches("the new name must be a field name", err)
    end)

    it("writes json_ops.EMPTY_ARRAY (transform.EMPTY_ARRAY too) as [], a copy each", function()
        assert.are.equal(J.EMPTY_ARRAY, T.EMPTY_ARRAY)
        local out = run_strict('{"items":[{},{}]}', { add = { ["items[*].tags"] = J.EMPTY_ARRAY } })
        assert.are.equal('{"items":[{"tags":[]},{"tags":[]}]}', out)
        local ops = assert(J.compile({ { op = "add", path = "t", value = J.EMPTY_ARRAY } }))
        local a = J.apply(assert(J.decode("{}")), ops)
        local b = J.apply(assert(J.decode("{}")), ops)
        assert.are_not.equal(a.t, b.t)
        assert.are_not.equal(J.EMPTY_ARRAY, a.t)
        assert.are.equal(0, #J.EMPTY_ARRAY)
    end)

    it("treats config tables as the JSON they will be written as", function()
        -- a Lua list added from a config is an array for the operations after it
        assert.are.equal('{"m":{"tags":[{"k":1},{"k":2}]}}',
            run('{"m":{}}', {
                { op = "add", path = "m.tags", value = { { k = 1, z = 0 }, { k = 2 } } },
                { op = "keep", paths = { "m.tags[*].k" } } }))
    end)

    it("inserts a copy of a table a strict one-reference template names", function()
        local claims = { roles = { "a", "b" }, org = "acme" }
        local out = run_strict("{}", { add = { who = "{consumer.claims}" } },
            { consumer = { claims = claims } })
        assert.are.equal('{"who":{"org":"acme","roles":["a","b"]}}', out)
    end)

    it("keeps member order and number spelling for the strict dialect too", function()
        assert.are.equal('{"z":1.50,"id":12345678901234567890,"a":[]}',
            run_strict('{"z":1.50,"userId":12345678901234567890,"a":[]}',
                { rename = { userId = "id" } }))
    end)
end)

describe("json_ops loose templates (response-transform)", function()
    local function render(s, values)
        return J.render(assert(J.compile_template(s, true)), function(ns, key)
            return values and values[ns] and values[ns][key]
        end)
    end

    it("gives a string, \"\" for unknown or missing references and tables", function()
        local v = { consumer = { id = 7, t = {} }, header = { ["x-a"] = "A" } }
        assert.are.equal("7", render("{consumer.id}", v))
        assert.are.equal("A/", render("{header.X-A}/{nope.x}", v))
        assert.are.equal("", render("{consumer.t}", v))
        assert.are.equal("", render("{consumer.missing}", v))
    end)

    it("leaves other braces as written; {{ is a literal {", function()
        assert.are.equal("{x} {a b.c} {", render("{x} {a b.c} {"))
        assert.are.equal("{consumer.id}", render("{{consumer.id}"))
        assert.are.equal("{a 7", render("{a {consumer.id}", { consumer = { id = 7 } }))
    end)
end)
