-- The gw API (lua/moongate/gw.lua) as far as it works without a live
-- request: gw.json, gw.now, gw.sleep on the runtime's event loop, gw.log,
-- misuse errors of the request/response calls, and the FFI declarations
-- (lua/moongate/cdef.lua) against the functions the binary exports.
-- Calls on a real request are exercised end to end in tests/e2e/test_lua.py.
local ffi = require("ffi")
local gw = require("moongate.gw")
local cdef = require("moongate.cdef")

local function busy(seconds)
    local t0 = os.clock()
    while os.clock() - t0 < seconds do end
end

describe("gw.json", function()
    it("round-trips nested tables, arrays, strings and numbers", function()
        local v = {
            name = "moongate", n = 42, pi = 3.25, yes = true, no = false,
            list = { 1, "two", { three = 3 } },
            nested = { deeper = { deepest = "x" } },
            text = "quote \" backslash \\ newline \n tab \t unicode \u{e9}\u{1F600}",
        }
        local s = assert(gw.json.encode(v))
        assert.are.equal("string", type(s))
        assert.are.same(v, gw.json.decode(s))
    end)

    it("encodes an empty table as an object and decodes null as gw.json.null", function()
        assert.are.equal("{}", gw.json.encode({}))
        local t = gw.json.decode('{"a":null,"b":[1,null]}')
        assert.are.equal(gw.json.null, t.a)
        assert.are.equal(gw.json.null, t.b[2])
        assert.are.equal('{"a":null}', gw.json.encode({ a = gw.json.null }))
    end)

    it("decodes scalars at the top level", function()
        assert.are.equal(5, gw.json.decode("5"))
        assert.are.equal("s", gw.json.decode('"s"'))
    end)

    it("returns nil and a reason for text that is not JSON", function()
        local v, err = gw.json.decode("{not json")
        assert.is_nil(v)
        assert.are.equal("string", type(err))
    end)

    it("returns nil and a reason for a value JSON cannot carry", function()
        local v, err = gw.json.encode({ f = print })
        assert.is_nil(v)
        assert.are.equal("string", type(err))
    end)
end)

describe("gw.now", function()
    it("is the wall clock in seconds", function()
        assert.is_true(math.abs(gw.now() - os.time()) <= 1)
    end)

    it("has millisecond resolution", function()
        local a = gw.now()
        busy(0.02)
        local d = gw.now() - a
        assert.is_true(d >= 0.015 and d < 1, "elapsed " .. d)
        assert.are_not.equal(math.floor(d), d)
    end)
end)

describe("gw.sleep", function()
    it("returns true after waiting", function()
        assert.is_true(gw.sleep(0))
    end)

    it("waits at least the time asked for", function()
        local t0 = gw.now()
        gw.sleep(0.05)
        local d = gw.now() - t0
        assert.is_true(d >= 0.049, "slept " .. d .. " s for 0.05 s")
    end)

    it("waits the time asked for when the script was busy before its first sleep", function()
        -- A fresh `moongate lua` process works for 0.1 s, then sleeps
        -- 0.05 s: the sleep must not be shortened by the time the event
        -- loop's cached clock is behind.
        local script = os.tmpname()
        local f = assert(io.open(script, "w"))
        f:write([[
local gw = require("moongate.gw")
local t0 = os.clock()
while os.clock() - t0 < 0.1 do end
local t1 = gw.now()
gw.sleep(0.05)
io.write(string.format("%.3f", gw.now() - t1))
]])
        f:close()
        local pid = assert(io.open("/proc/self/stat")):read("*n")
        local p = assert(io.popen("/proc/" .. pid .. "/exe lua " .. script .. " 2>&1"))
        local out = p:read("*a")
        p:close()
        os.remove(script)
        local d = tonumber(out)
        assert.is_number(d, "the script printed: " .. out)
        assert.is_true(d >= 0.049, "slept " .. out .. " s for 0.05 s")
    end)

    it("refuses a negative or non-number duration", function()
        assert.has_error(function() gw.sleep(-1) end, "seconds must be a non-negative number")
        assert.has_error(function() gw.sleep("1") end, "seconds must be a non-negative number")
    end)

    it("refuses to wait in a coroutine the runtime does not run", function()
        local co = coroutine.create(function() return gw.sleep(0.01) end)
        local ok, err = coroutine.resume(co)
        assert.is_false(ok)
        assert.matches("gw.sleep cannot wait here", err, 1, true)
    end)
end)

describe("gw.log", function()
    it("accepts the four levels and any values", function()
        for _, level in ipairs({ "error", "warn", "info", "debug" }) do
            assert.has_no.errors(function() gw.log(level, "spec ", level, " ", 1, nil, true) end)
        end
    end)

    it("refuses an unknown level", function()
        assert.has_error(function() gw.log("loud", "x") end,
            "log level must be error, warn, info or debug")
    end)
end)

describe("gw request and response calls", function()
    local calls = {
        { "request", "get_method" }, { "request", "get_path" }, { "request", "get_query" },
        { "request", "get_host" }, { "request", "get_client_ip" }, { "request", "get_id" },
        { "request", "get_scheme" },
        { "request", "get_param", "id" }, { "request", "get_header", "host" },
        { "request", "get_headers" }, { "request", "set_header", "a", "b" },
        { "request", "add_header", "a", "b" }, { "request", "clear_header", "a" },
        { "request", "set_path", "/x" }, { "request", "set_query", "a=1" },
        { "response", "get_status" }, { "response", "set_status", 200 },
        { "response", "get_header", "a" }, { "response", "get_headers" },
        { "response", "set_header", "a", "b" }, { "response", "add_header", "a", "b" },
        { "response", "clear_header", "a" },
    }

    for _, c in ipairs(calls) do
        local fn = gw[c[1]][c[2]]
        local label = "gw." .. c[1] .. "." .. c[2]

        it(label .. " raises without the request's ctx", function()
            assert.is_function(fn)
            assert.has_error(function() fn(nil, c[3], c[4]) end,
                "expected the request's ctx as first argument")
            assert.has_error(function() fn({}, c[3], c[4]) end,
                "expected the request's ctx as first argument")
        end)

        it(label .. " raises once the request has ended", function()
            assert.has_error(function() fn({ _req = {}, _done = true }, c[3], c[4]) end,
                "the request has ended")
        end)
    end
end)

describe("gw FFI declarations", function()
    it("match the version the binary exports", function()
        assert.are.equal(cdef.version, ffi.C.mg_ffi_version())
        assert.are.equal(cdef.version, gw.version)
    end)

    it("resolve every declared mg_ffi_* function in the binary", function()
        local src = assert(io.open(package.searchpath("moongate.cdef", package.path))):read("*a")
        local n = 0
        for name in src:gmatch("(mg_ffi_[%w_]+)%(") do
            local ok, fn = pcall(function() return ffi.C[name] end)
            assert.is_true(ok, name .. " is not exported: " .. tostring(fn))
            n = n + 1
        end
        assert.is_true(n >= 20, "found only " .. n .. " declarations")
    end)
end)
