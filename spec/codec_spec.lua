-- lua/moongate/zlib.lua and lua/moongate/brotli.lua: streaming round trips
-- (tiny, empty and multi-megabyte inputs, fed whole and in odd pieces),
-- gzip output that the gzip format's own fields vouch for, bounded output
-- on decompression bombs, corrupt and truncated input, and deterministic
-- release of the library state.

local zlib = require("moongate.zlib")
local brotli = require("moongate.brotli")

-- Deterministic pseudo-random bytes (an LCG): incompressible data.
local function noise(n, seed)
    local x = seed or 12345
    local t = {}
    for i = 1, n do
        x = (x * 16807) % 2147483647 -- Park-Miller: exact in doubles
        t[i] = string.char(x % 256)
    end
    return table.concat(t)
end

-- JSON-ish text that compresses well.
local function text(n)
    local unit = '{"userId":42,"userName":"Ada Lovelace","tags":["a","b"],"ok":true},\n'
    return (unit:rep(math.ceil(n / #unit))):sub(1, n)
end

-- Feeds `data` to `stream` in pieces of `step` bytes (a list of sizes
-- cycled), then finishes; returns the concatenated output or nil, err.
local function feed(stream, data, steps)
    local out, i, k = {}, 1, 1
    while i <= #data do
        local step = steps[k]
        k = k % #steps + 1
        local piece, err = stream:write(data:sub(i, i + step - 1))
        if not piece then return nil, err end
        out[#out + 1] = piece
        i = i + step
    end
    local last, err = stream:finish()
    if not last then return nil, err end
    out[#out + 1] = last
    return table.concat(out)
end

local CODECS = {
    gzip = {
        enc = function(o) return zlib.deflate({ level = o and o.level }) end,
        dec = function(max) return zlib.inflate({ max_output = max }) end,
    },
    br = {
        enc = function(o) return brotli.encoder({ quality = o and o.level }) end,
        dec = function(max) return brotli.decoder({ max_output = max }) end,
    },
}

for name, codec in pairs(CODECS) do
    describe(name .. " streams", function()
        it("round-trip the empty body, one byte and a short string", function()
            for _, input in ipairs({ "", "x", "hello, moongate" }) do
                local packed = assert(feed(codec.enc(), input, { 1 }))
                assert.is_true(#packed > 0)
                assert.are.equal(input, assert(feed(codec.dec(), packed, { 1 })))
            end
        end)

        it("round-trip 3 MB of text and 1 MB of noise fed in odd pieces", function()
            for _, input in ipairs({ text(3 * 1024 * 1024), noise(1024 * 1024) }) do
                local packed = assert(feed(codec.enc({ level = 1 }), input,
                    { 7, 65536, 1000, 300001 }))
                local back = assert(feed(codec.dec(), packed, { 1, 13, 4096, 70000 }))
                assert.are.equal(#input, #back)
                assert.is_true(input == back)
            end
        end)

        it("compress text well and noise hardly at all", function()
            local t = text(100000)
            assert.is_true(#assert(feed(codec.enc({ level = 1 }), t, { 4096 })) < #t / 10)
            local n = noise(100000)
            assert.is_true(#assert(feed(codec.enc({ level = 1 }), n, { 4096 })) > #n * 0.95)
        end)

        it("hand out output while a long body streams in, not only at the end", function()
            local s = codec.enc({ level = 1 })
            local seen = 0
            for _ = 1, 64 do
                seen = seen + #assert(s:write(noise(16384, _)))
            end
            assert.is_true(seen > 512 * 1024, "only " .. seen .. " bytes before finish")
            assert(s:finish())
        end)

        it("flush makes everything written so far decodable", function()
            local s = codec.enc()
            local a = assert(s:write("first part "))
            local b = assert(s:flush())
            local d = codec.dec()
            assert.are.equal("first part ", assert(d:write(a .. b)))
            local c = assert(s:finish("second"))
            assert.are.equal("second", assert(d:finish(c)))
        end)

        it("refuse output past max_output (a decompression bomb) with an error", function()
            local zeros = string.rep("\0", 20 * 1024 * 1024)
            local bomb = assert(feed(codec.enc({ level = 9 }), zeros, { 1048576 }))
            assert.is_true(#bomb < 100 * 1024)
            local d = codec.dec(1024 * 1024)
            local out, err
            for i = 1, #bomb, 4096 do
                out, err = d:write(bomb:sub(i, i + 4095))
                if not out then break end
            end
            assert.is_nil(out)
            assert.matches("output too large", err)
            assert.is_true(d.closed)
            assert.is_true(d.total_out <= 1024 * 1024 + 64 * 1024)
            -- under the limit the same data decodes
            assert.are.equal(20 * 1024 * 1024, #assert(codec.dec(20 * 1024 * 1024):finish(bomb)))
        end)

        it("report truncated data at finish", function()
            local packed = assert(feed(codec.enc(), text(50000), { 50000 }))
            local out, err = codec.dec():finish(packed:sub(1, #packed - 5))
            assert.is_nil(out)
            assert.matches("truncated", err)
        end)

        it("report corrupt data and data after the end", function()
            -- noise is refused, early (a bad header) or at the latest at the end
            local out, err = codec.dec():finish(noise(2000, 7))
            assert.is_nil(out)
            assert.is_truthy(err:find("invalid compressed data") or err:find("truncated"))
            local packed = assert(feed(codec.enc(), "abc", { 3 }))
            out, err = codec.dec():finish(packed .. "garbage!")
            assert.is_nil(out)
            assert.matches("invalid compressed data", err)
        end)

        it("are closed by finish and refuse further use; close is idempotent", function()
            local s = codec.enc()
            assert(s:finish("x"))
            assert.is_true(s.closed)
            local out, err = s:write("y")
            assert.is_nil(out)
            assert.matches("closed", err)
            s:close()
            s:close()
            local d = codec.dec()
            d:close()
            assert.is_nil((d:write("z")))
        end)

        it("free their state when dropped unclosed (the GC safety net)", function()
            for _ = 1, 2000 do
                local s = codec.enc({ level = 1 })
                s:write(text(1000))
            end
            collectgarbage()
            collectgarbage()
            -- thousands of 256 KiB+ states would be hundreds of MB if leaked
            local status = io.open("/proc/self/status"):read("*a")
            local rss = tonumber(status:match("VmRSS:%s+(%d+)"))
            assert.is_true(rss < 400 * 1024, "RSS " .. rss .. " kB")
        end)
    end)
end

describe("gzip state reuse", function()
    it("hands a finished state to the next stream of its level, which round-trips", function()
        local a = zlib.deflate({ level = 3 })
        local box = a.box
        assert(a:finish(text(5000)))
        local b = zlib.deflate({ level = 3 })
        assert.are.equal(box, b.box)
        local packed = assert(feed(b, text(70000), { 999 }))
        assert.are.equal(text(70000), assert(zlib.gunzip(packed)))
        assert.are_not.equal(box, zlib.deflate({ level = 4 }).box)
    end)

    it("never reuses a state abandoned half way", function()
        local a = zlib.deflate({ level = 2 })
        local box = a.box
        assert(a:write(text(5000)))
        a:close()
        local b = zlib.deflate({ level = 2 })
        assert.are_not.equal(box, b.box)
        assert.are.equal("x", assert(zlib.gunzip(assert(b:finish("x")))))
    end)
end)

describe("gzip format", function()
    it("writes the gzip header and a CRC-32 and length trailer", function()
        local input = text(12345)
        local packed = assert(zlib.gzip(input, 1))
        assert.are.equal("\31\139\8", packed:sub(1, 3)) -- magic, deflate
        local b1, b2, b3, b4 = packed:byte(-4, -1)
        assert.are.equal(#input, b1 + b2 * 256 + b3 * 65536 + b4 * 16777216)
    end)

    it("inflates zlib-wrapped data and several gzip members in a row", function()
        local a, b = assert(zlib.gzip("one,")), assert(zlib.gzip("two"))
        assert.are.equal("one,two", assert(zlib.gunzip(a .. b)))
        -- a zlib stream (78 01 header, stored block) of "hi"
        local zdata = "\120\1\1\2\0\253\255hi\1\59\0\210"
        assert.are.equal("hi", assert(zlib.gunzip(zdata)))
    end)

    it("refuses levels out of range", function()
        assert.has_error(function() zlib.deflate({ level = 0 }) end)
        assert.has_error(function() zlib.deflate({ level = 10 }) end)
        assert.has_error(function() brotli.encoder({ quality = 12 }) end)
    end)
end)
