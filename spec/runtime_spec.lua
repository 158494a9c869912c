-- The plugin runner (lua/moongate/runtime.lua): building a generation's
-- chains from a config file, and running a request's phases in a coroutine
-- the way core/lua.c does. Fixture configs and plugins are under
-- spec/fixtures; fixture plugins record what runs in fixtures/trace.lua.
local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec"
local FIXTURES = SPEC_DIR .. "/fixtures"
package.path = FIXTURES .. "/?.lua;" .. package.path

local runtime = require("moongate.runtime")
local trace = require("trace")

local next_id = 1000

-- Loads a fixture config as a generation; returns its id and route masks,
-- or nil and the error text.
local function load(name)
    next_id = next_id + 1
    local masks, err = runtime.load_generation(next_id, FIXTURES .. "/" .. name)
    if not masks then return nil, err end
    return next_id, masks
end

local function error_lines(err)
    local lines = {}
    for line in (err .. "\n"):gmatch("(.-)\n") do lines[#lines + 1] = line end
    return lines
end

-- Runs one request through route `idx` as core/proxy.c does: start the
-- coroutine; after its decision ("proxy", or "respond" for an early exit
-- or a handler) resume it with "header_filter", then "log". Returns what
-- the first yield decided ({ "proxy" } or { "respond", status, body,
-- headers }) and the trace.
local function run(gen, idx)
    trace.reset()
    local co = coroutine.create(runtime.handle)
    local ok, what, status, body, headers = coroutine.resume(co, "task", gen, idx, "req")
    assert(ok, what)
    local decision = { what, status, body, headers }
    local ok2, next2 = coroutine.resume(co, "header_filter")
    assert(ok2, next2)
    assert.are.equal("next", next2)
    local ok3, done = coroutine.resume(co, "log")
    assert(ok3, done)
    assert.are.equal("done", done)
    assert.are.equal("dead", coroutine.status(co))
    return decision, trace.calls
end

-- The flat header list of an early exit as a name -> { values } table.
local function header_map(flat)
    local out = {}
    for i = 1, #flat, 2 do
        local list = out[flat[i]] or {}
        list[#list + 1] = flat[i + 1]
        out[flat[i]] = list
    end
    return out
end

local B = runtime.PHASE_BIT

describe("runtime constants", function()
    it("mirror the MG_LUA_* phase bits of core/lua.h", function()
        assert.are.same({ rewrite = 1, access = 2, header_filter = 4, body_filter = 8, log = 16 },
            runtime.PHASE_BIT)
        assert.are.equal(32, runtime.HANDLER_BIT)
    end)
end)

describe("runtime.load_generation chains", function()
    local gen, masks

    setup(function()
        gen, masks = load("chains.lua")
        assert(gen, masks)
    end)

    teardown(function()
        runtime.free_generation(gen)
    end)

    it("returns one mask per route", function()
        assert.are.equal(13, #masks)
    end)

    it("applies global plugins to a route that names none, by priority then name", function()
        local decision, calls = run(gen, 1)
        assert.are.same({ "proxy" }, decision)
        assert.are.same({
            "rewrite:gamma-global", "rewrite:p-alpha", "rewrite:p-beta",
            "access:gamma-global", "access:p-alpha", "access:p-beta",
            "header_filter:gamma-global", "header_filter:p-alpha", "header_filter:p-beta",
            "log:gamma-global", "log:p-alpha", "log:p-beta",
        }, calls)
    end)

    it("sets the mask bits of the phases the chain has", function()
        assert.are.equal(B.rewrite + B.access + B.header_filter + B.log, masks[1])
    end)

    it("lets a route's entry override the global config of the same name", function()
        local _, calls = run(gen, 2)
        assert.are.same({ "rewrite:gamma-route", "rewrite:p-alpha", "rewrite:p-beta" },
            { calls[1], calls[2], calls[3] })
    end)

    it("turns a global plugin off for a route whose entry is false", function()
        local _, calls = run(gen, 3)
        assert.are.same({
            "rewrite:gamma-global", "rewrite:p-alpha",
            "access:gamma-global", "access:p-alpha",
            "header_filter:gamma-global", "header_filter:p-alpha",
            "log:gamma-global", "log:p-alpha",
        }, calls)
    end)

    it("runs a route's order list first, in its order, then the rest by priority", function()
        local _, calls = run(gen, 4)
        assert.are.same({ "rewrite:p-beta", "rewrite:p-alpha", "rewrite:gamma-global" },
            { calls[1], calls[2], calls[3] })
        assert.are.same({ "log:p-beta", "log:p-alpha", "log:gamma-global" },
            { calls[10], calls[11], calls[12] })
    end)

    it("runs inline plugins with their own table as conf, at their priority (default 0)", function()
        local _, calls = run(gen, 5)
        assert.are.same({
            "access:gamma-global", "access:mine:hi", "access:p-alpha", "access:p-beta",
            "access:zero",
        }, { calls[4], calls[5], calls[6], calls[7], calls[8] })
        assert.are.same({ "log:gamma-global", "log:mine", "log:p-alpha", "log:p-beta" },
            { calls[12], calls[13], calls[14], calls[15] })
    end)

    it("marks a handler route with the handler bit", function()
        assert.are.equal(runtime.HANDLER_BIT, masks[6])
        assert.are.equal(B.rewrite + B.access + B.header_filter + B.log + runtime.HANDLER_BIT,
            masks[11])
    end)

    it("gives a route without plugins or handler an empty mask", function()
        assert.are.equal(0, masks[7])
    end)

    it("sets only the log bit for a chain that only logs", function()
        assert.are.equal(B.log, masks[13])
    end)

    it("answers with the handler's result, a table body as JSON", function()
        local decision, calls = run(gen, 6)
        assert.are.same({}, calls)
        assert.are.equal(runtime.HANDLER_BIT, masks[6])
        assert.are.equal("respond", decision[1])
        assert.are.equal(201, decision[2])
        assert.are.equal('{"created":true}\n', decision[3])
        assert.are.same({ ["Content-Type"] = { "application/json" } }, header_map(decision[4]))
    end)

    it("runs the handler after rewrite and access, a string body as text", function()
        local decision, calls = run(gen, 11)
        assert.are.same({ "respond", 200, "x" }, { decision[1], decision[2], decision[3] })
        assert.are.same({ ["Content-Type"] = { "text/plain; charset=utf-8" } },
            header_map(decision[4]))
        assert.are.same({
            "rewrite:gamma-global", "rewrite:p-alpha", "rewrite:p-beta",
            "access:gamma-global", "access:p-alpha", "access:p-beta",
            "handler",
            "header_filter:gamma-global", "header_filter:p-alpha", "header_filter:p-beta",
            "log:gamma-global", "log:p-alpha", "log:p-beta",
        }, calls)
    end)

    it("answers 200 with an empty body when the handler returns nothing", function()
        local decision = run(gen, 12)
        assert.are.same({ "respond", 200, "", {} }, decision)
    end)

    it("ends the request from rewrite: no access phase, log still runs", function()
        local decision, calls = run(gen, 8)
        assert.are.equal("respond", decision[1])
        assert.are.equal(403, decision[2])
        assert.are.equal('{"error":"denied in rewrite"}\n', decision[3])
        assert.are.same({ ["X-Exit"] = { "rewrite" }, ["Content-Type"] = { "application/json" } },
            header_map(decision[4]))
        assert.are.same({
            "rewrite:gamma-global", "rewrite:exit",
            "header_filter:gamma-global", "header_filter:p-alpha", "header_filter:p-beta",
            "log:gamma-global", "log:exit", "log:p-alpha", "log:p-beta",
        }, calls)
    end)

    it("ends the request from access after every rewrite ran", function()
        local decision, calls = run(gen, 9)
        assert.are.same({ "respond", 401 }, { decision[1], decision[2] })
        assert.are.equal('{"error":"denied in access"}\n', decision[3])
        assert.are.same({
            "rewrite:gamma-global", "rewrite:exit", "rewrite:p-alpha", "rewrite:p-beta",
            "access:gamma-global", "access:exit",
        }, { calls[1], calls[2], calls[3], calls[4], calls[5], calls[6] })
        assert.are.same({ "header_filter:gamma-global", "header_filter:p-alpha",
            "header_filter:p-beta", "log:gamma-global", "log:exit", "log:p-alpha", "log:p-beta" },
            { calls[7], calls[8], calls[9], calls[10], calls[11], calls[12], calls[13] })
        assert.are.equal(13, #calls)
    end)

    it("serves one request after another in one pooled coroutine (runner)", function()
        local co = coroutine.create(runtime.runner)
        local function serve(idx)
            trace.reset()
            -- The first resume starts runner; later ones return from its
            -- yield("park") with the next request's arguments.
            local ok, what = coroutine.resume(co, "task", gen, idx, "req")
            assert(ok, what)
            local decision = what
            assert(coroutine.resume(co, "header_filter"))
            local ok3, parked = coroutine.resume(co, "log")
            assert(ok3, parked)
            assert.are.equal("park", parked)
            return decision, trace.calls
        end
        local d1, c1 = serve(8)
        assert.are.equal("respond", d1)
        assert.are.equal("rewrite:exit", c1[2])
        local d2, c2 = serve(1)
        assert.are.equal("proxy", d2)
        assert.are.equal(12, #c2)
        assert.are.equal("suspended", coroutine.status(co))
    end)

    it("parks without a log phase when resumed with finish", function()
        local co = coroutine.create(runtime.runner)
        assert(coroutine.resume(co, "task", gen, 7, "req"))
        assert(coroutine.resume(co, "header_filter"))
        local ok, parked = coroutine.resume(co, "finish")
        assert(ok, parked)
        assert.are.equal("park", parked)
    end)

    it("raises a plugin's error out of the request coroutine, naming the file and line", function()
        local co = coroutine.create(runtime.handle)
        local ok, err = coroutine.resume(co, "task", gen, 10, "req")
        assert.is_false(ok)
        assert.matches("fixtures/plugins/boom%.lua:%d+: boom in access", err)
        assert.are.equal("dead", coroutine.status(co))
    end)

    it("keeps serving other requests after a plugin error", function()
        local co = coroutine.create(runtime.handle)
        assert.is_false((coroutine.resume(co, "task", gen, 10, "req")))
        local decision = run(gen, 1)
        assert.are.same({ "proxy" }, decision)
    end)
end)

describe("runtime early-exit responses", function()
    local dir = os.tmpname()
    local gen

    -- A one-route config whose handler returns exactly `ret` (Lua text).
    local function gen_with_handler(ret)
        local path = dir .. ".lua"
        local f = assert(io.open(path, "w"))
        f:write("return { routes = { { path = '/', handler = function(ctx) return "
            .. ret .. " end } } }\n")
        f:close()
        next_id = next_id + 1
        local masks, err = runtime.load_generation(next_id, path)
        os.remove(path)
        assert(masks, err)
        gen = next_id
        return next_id
    end

    after_each(function()
        if gen then runtime.free_generation(gen) end
        gen = nil
    end)

    teardown(function()
        os.remove(dir)
    end)

    it("keeps a Content-Type the headers give and repeats list values", function()
        local decision = run(gen_with_handler(
            [[200, "<b>x</b>", { ["content-type"] = "text/html", ["X-Multi"] = { "a", "b" } }]]), 1)
        assert.are.same({ "respond", 200, "<b>x</b>" }, { decision[1], decision[2], decision[3] })
        assert.are.same({ ["content-type"] = { "text/html" }, ["X-Multi"] = { "a", "b" } },
            header_map(decision[4]))
    end)

    it("sends a JSON array body", function()
        local decision = run(gen_with_handler([[200, { 1, 2, 3 }]]), 1)
        assert.are.equal("[1,2,3]\n", decision[3])
    end)

    it("turns header values into strings", function()
        local decision = run(gen_with_handler([[204, nil, { ["X-N"] = 7 }]]), 1)
        assert.are.same({ "respond", 204, "" }, { decision[1], decision[2], decision[3] })
        assert.are.same({ ["X-N"] = { "7" } }, header_map(decision[4]))
    end)

    for _, bad in ipairs({
        [[{ ["X-A"] = "a\r\nX-Injected: 1" }]],
        [[{ ["X-A"] = "a\nb" }]],
        [[{ ["X-A"] = "a\0b" }]],
        [[{ ["X-A\r\nX-Injected"] = "1" }]],
        [[{ ["Bad Name"] = "1" }]],
        [[{ [""] = "1" }]],
        [[{ ["X-List"] = { "ok", "bad\r\nX-Injected: 1" } }]],
    }) do
        it("refuses a header line a client would read differently: " .. bad, function()
            local co = coroutine.create(runtime.handle)
            local ok, err = coroutine.resume(co, "task", gen_with_handler('200, "x", ' .. bad), 1,
                "req")
            assert.is_false(ok)
            assert.matches("invalid response header", err, 1, true)
        end)
    end

    for _, bad in ipairs({ [["200"]], "99", "600", "true" }) do
        it("refuses a status that is not a number from 100 to 599: " .. bad, function()
            local co = coroutine.create(runtime.handle)
            local ok, err = coroutine.resume(co, "task", gen_with_handler(bad .. ', "x"'), 1, "req")
            assert.is_false(ok)
            assert.matches("a phase must return an HTTP status", err, 1, true)
        end)
    end
end)

describe("runtime plugin resolution", function()
    local saved_root

    before_each(function()
        saved_root = runtime.root
        runtime.root = FIXTURES .. "/builtin"
    end)

    after_each(function()
        runtime.root = saved_root
    end)

    it("finds a plugin in plugin_paths before the built-in directory", function()
        local gen, masks = load("shadowing.lua")
        assert(gen, masks)
        local _, calls = run(gen, 1)
        runtime.free_generation(gen)
        assert.are.same({ "access:shadow-from-plugin-paths" }, calls)
    end)

    it("searches plugin_paths entries in order, then the built-in directory", function()
        local gen, masks = load("shadowing.lua")
        assert(gen, masks)
        local _, builtin = run(gen, 2)
        local _, extra = run(gen, 3)
        runtime.free_generation(gen)
        assert.are.same({ "access:builtin-only" }, builtin)
        assert.are.same({ "access:extra" }, extra)
    end)

    it("uses the built-in plugin when no plugin_paths entry has the name", function()
        local gen, masks = load("no-paths.lua")
        assert(gen, masks)
        local _, calls = run(gen, 1)
        runtime.free_generation(gen)
        assert.are.same({ "access:shadow-built-in" }, calls)
    end)

    it("loads plugin files fresh for each generation", function()
        local dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir -p " .. dir .. "/plugins") == 0)
        local function write(name, text)
            local f = assert(io.open(dir .. "/" .. name, "w"))
            f:write(text)
            f:close()
        end
        local function plugin(version)
            write("plugins/fresh.lua", 'local trace = require("trace")\n'
                .. 'return { name = "fresh", priority = 1, schema = { fields = {} },\n'
                .. '  access = function() trace.add("' .. version .. '") end }\n')
        end
        write("conf.lua", 'return { plugin_paths = { "plugins" },\n'
            .. '  routes = { { path = "/", plugins = { fresh = {} } } } }\n')
        plugin("v1")
        assert(runtime.load_generation(2001, dir .. "/conf.lua"))
        plugin("v2")
        assert(runtime.load_generation(2002, dir .. "/conf.lua"))
        local _, old = run(2001, 1)
        local _, new = run(2002, 1)
        runtime.free_generation(2001)
        runtime.free_generation(2002)
        os.execute("rm -rf " .. dir)
        assert.are.same({ "v1" }, old)
        assert.are.same({ "v2" }, new)
    end)
end)

describe("runtime plugin config errors", function()
    local file = FIXTURES .. "/schema-errors.lua"

    it("names the file, the route and the field of every schema error", function()
        local gen, err = load("schema-errors.lua")
        assert.is_nil(gen)
        local at = function(i, path) return file .. ": routes[" .. i .. '] "' .. path .. '": ' end
        assert.are.same({
            at(1, "/missing") .. "plugins.limits.limit: required",
            at(2, "/types") .. "plugins.limits.by: expected string, got number",
            at(2, "/types") .. "plugins.limits.limit: expected integer, got string",
            at(3, "/ranges") .. "plugins.limits.limit: must be at least 1",
            at(4, "/enum") .. "plugins.limits.by: must be one of ip, consumer",
            at(5, "/nested") .. "plugins.limits.redis.hots: unknown field",
            at(5, "/nested") .. "plugins.limits.redis.port: expected integer, got string",
            at(6, "/unknown-field") .. "plugins.limits.limt: unknown field",
            at(7, "/integer") .. "plugins.limits.limit: expected an integer, got 2.5",
            at(8, "/too-big") .. "plugins.limits.limit: must be at most 1000",
        }, error_lines(err))
    end)

    it("reports a check() rule and a config that is not a table under the plugin's name", function()
        local gen, err = load("check-errors.lua")
        assert.is_nil(gen)
        local f = FIXTURES .. "/check-errors.lua"
        assert.are.same({
            f .. ': routes[1] "/check": plugins.limits: burst must not exceed limit',
            f .. ': routes[2] "/not-a-table": plugins.limits: expected a table, got number',
        }, error_lines(err))
    end)

    it("names plugins that cannot be loaded, and why", function()
        local gen, err = load("load-errors.lua")
        assert.is_nil(gen)
        local lines = error_lines(err)
        local f = FIXTURES .. "/load-errors.lua"
        local p = FIXTURES .. "/plugins/"
        assert.are.equal(f .. ': routes[1] "/unknown": plugins.no-such-plugin: '
            .. 'no plugin named "no-such-plugin"', lines[1])
        assert.are.equal(f .. ': routes[2] "/syntax": plugins.syntax-error: '
            .. p .. "syntax-error.lua:4: unexpected symbol near '='", lines[2])
        assert.are.equal(f .. ': routes[3] "/wrong-name": plugins.wrong-name: '
            .. p .. 'wrong-name.lua: name is "not-wrong-name", expected "wrong-name"', lines[3])
        assert.truthy(lines[4]:find('routes[4] "/raises": plugins.raises-at-load: ', 1, true),
            lines[4])
        assert.truthy(lines[4]:find("raises-at-load.lua:2: cannot start: missing secret", 1, true),
            lines[4])
        assert.are.equal(f .. ': routes[5] "/no-priority": plugins.no-priority: '
            .. p .. "no-priority.lua: priority must be a number", lines[5])
        assert.are.equal(f .. ': routes[6] "/bad-schema": plugins.bad-schema: '
            .. p .. "bad-schema.lua: limit: field spec needs a description", lines[6])
        assert.are.equal(f .. ': routes[7] "/bad-name": plugins.../plugins/boom: '
            .. 'invalid plugin name "../plugins/boom"', lines[7])
        assert.are.equal(f .. ': routes[8] "/bad-order": order: "absent" is not enabled here',
            lines[8])
        assert.are.equal(8, #lines)
    end)

    it("reports a config file that cannot run", function()
        local path = os.tmpname()
        local f = assert(io.open(path, "w"))
        f:write("return {\n  routes = {\n    { path = '/' ,, },\n  },\n}\n")
        f:close()
        local masks, err = runtime.load_generation(3001, path)
        os.remove(path)
        assert.is_nil(masks)
        assert.truthy(err:find(path .. ":3:", 1, true), err)
    end)
end)

describe("body_filter", function()
    -- Drives a proxied request's coroutine through body pieces the way
    -- core/proxy.c does; returns what each resume gave back.
    local function filter(idx, pieces)
        local gen = assert(load("body-filters.lua"))
        local co = coroutine.create(runtime.handle)
        local ok, what = coroutine.resume(co, "task", gen, idx, "req")
        assert(ok, what)
        assert.are.equal("proxy", what)
        assert(coroutine.resume(co, "header_filter"))
        local outs = {}
        for i, piece in ipairs(pieces) do
            local ok2, next2, out = coroutine.resume(co, "body_filter", piece, i == #pieces)
            if not ok2 then return nil, next2 end
            assert.are.equal("next", next2)
            outs[#outs + 1] = out
        end
        local ok3, done = coroutine.resume(co, "log")
        assert(ok3, done)
        assert.are.equal("done", done)
        return outs
    end

    it("passes each piece through the plugins in priority order", function()
        assert.are.same({ "[AB]", "[C]", "[!]" }, filter(1, { "ab", "c", "" }))
    end)

    it("refuses a return value that is not a string", function()
        local outs, err = filter(2, { "x" })
        assert.is_nil(outs)
        assert.matches("body_filter must return a string or nil, not a number", err)
    end)
end)
