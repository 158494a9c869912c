-- lua/moongate/json_ops.lua: the JSON codec that gives back what it was
-- given (arrays, member order, number spelling), path parsing, and every
-- operation (rename, remove, replace, add, keep) on top-level, nested and
-- array paths, with missing fields, templates and invalid JSON.

local J = require("moongate.json_ops")

-- decode, apply, encode: the way the transform plugin uses the module.
local function run(text, ops, lookup)
    local doc = assert(J.decode(text))
    doc = assert(J.apply(doc, ops, lookup))
    return assert(J.encode(doc))
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

describe("json_ops paths", function()
    it("parse dots, [*] and *", function()
        assert.are.same({ "a", "b", "c" }, J.parse_path("a.b.c"))
        assert.are.same({ "items", "*", "id" }, J.parse_path("items[*].id"))
        assert.are.same({ "items", "*", "id" }, J.parse_path("items.*.id"))
        assert.are.same({ "*", "id" }, J.parse_path("[*].id"))
    end)

    it("refuse empty segments and other brackets", function()
        assert.is_nil(J.parse_path(""))
        assert.is_nil(J.parse_path("a..b"))
        assert.is_nil(J.parse_path("a."))
        assert.is_nil(J.parse_path("a[0].b"))
        local ops, err = J.compile({ { op = "rename", path = "a..b", to = "x" } })
        assert.is_nil(ops)
        assert.matches("operation 1 %(rename%): empty segment", err)
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
