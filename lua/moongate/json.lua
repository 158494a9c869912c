-- moongate.json: the JSON codec of the transform plugins' operations
-- (moongate.json_ops), which gives back what it was given.
--
-- Why not lua-cjson: a transform must not change what it was not asked to
-- change, and cjson 2.1.0 (Debian 12) turns `[]` into `{}`, prints
-- integers above 10^14 as 1.2345678901235e+16 and loses the members'
-- order. Here an object or array remembers what it was (json.is_array /
-- is_object), an object keeps its members' order, and a number keeps its
-- spelling unless it was replaced. `null` is json.null (cjson.null, as
-- gw.json.null). Pure: no gw, no I/O; unit-tested by spec/json_ops_spec.lua.
local null = require("cjson.safe").null
local strbuf = require("string.buffer")

local type, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, error, pcall =
    type, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, error, pcall
local byte, sub, find, format, gsub, char, concat, sort, floor, huge =
    string.byte, string.sub, string.find, string.format, string.gsub, string.char,
    table.concat, table.sort, math.floor, math.huge
local tremove = table.remove

local _M = { null = null, MAX_DEPTH = 200 }

-- The marks (metatables) of decoded values, exported for the operations'
-- type tests: getmetatable(v) == json.ARRAY.
local ARRAY = { __name = "json array" }
local OBJECT = { __name = "json object" }
local NUMBER = { __name = "json number" } -- { text } : a number as the upstream spelled it
_M.ARRAY, _M.OBJECT, _M.NUMBER = ARRAY, OBJECT, NUMBER
-- Members' order per object (weak keys: dies with the object).
local order = setmetatable({}, { __mode = "k" })

--- json.array([t]) / json.object([t]): mark a table as a JSON array
-- or object (an empty Lua table is otherwise an object).
function _M.array(t) return setmetatable(t or {}, ARRAY) end

function _M.object(t) return setmetatable(t or {}, OBJECT) end

function _M.is_array(v) return type(v) == "table" and getmetatable(v) == ARRAY end

function _M.is_object(v)
    return type(v) == "table" and getmetatable(v) ~= ARRAY and getmetatable(v) ~= NUMBER
end

--- json.tonumber(v) -> the Lua number of a decoded number (decoded
-- numbers that a double cannot hold exactly stay boxed), or nil.
function _M.tonumber(v)
    if type(v) == "number" then return v end
    if type(v) == "table" and getmetatable(v) == NUMBER then return tonumber(v[1]) end
end

-- ------------------------------------------------------------ decoding

local ESCAPES = { [34] = '"', [92] = "\\", [47] = "/", [98] = "\b", [102] = "\f",
    [110] = "\n", [114] = "\r", [116] = "\t" }

local function utf8(cp)
    if cp < 0x80 then return char(cp) end
    if cp < 0x800 then return char(0xC0 + floor(cp / 64), 0x80 + cp % 64) end
    if cp < 0x10000 then
        return char(0xE0 + floor(cp / 4096), 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
    end
    return char(0xF0 + floor(cp / 262144), 0x80 + floor(cp / 4096) % 64,
        0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
end

local function fail(s, i, what)
    error({ json_error = what .. " at byte " .. i }, 0)
end

-- Scanning is done byte by byte: LuaJIT compiles these loops, while
-- string.find with a pattern would send every call to the interpreter.
local function skip(s, i)
    local c = byte(s, i)
    while c == 32 or c == 10 or c == 13 or c == 9 do
        i = i + 1
        c = byte(s, i)
    end
    return i
end

local decode_value

local function hex4(s, k)
    local v = 0
    for j = k, k + 3 do
        local c = byte(s, j)
        if not c then return nil end
        if c >= 48 and c <= 57 then
            v = v * 16 + c - 48
        elseif c >= 97 and c <= 102 then
            v = v * 16 + c - 87
        elseif c >= 65 and c <= 70 then
            v = v * 16 + c - 55
        else
            return nil
        end
    end
    return v
end

local function decode_string(s, i) -- i at the opening quote
    local j = i + 1
    local start = j
    local parts, n = nil, 0
    while true do
        local c = byte(s, j)
        if c == 34 then
            if not parts then return sub(s, start, j - 1), j + 1 end
            n = n + 1
            parts[n] = sub(s, start, j - 1)
            return concat(parts, "", 1, n), j + 1
        elseif c == 92 then
            parts = parts or {}
            n = n + 1
            parts[n] = sub(s, start, j - 1)
            local e = byte(s, j + 1)
            if e == 117 then -- \uXXXX, maybe a surrogate pair
                local cp = hex4(s, j + 2)
                if not cp then fail(s, j, "bad \\u escape") end
                j = j + 6
                if cp >= 0xD800 and cp <= 0xDBFF and byte(s, j) == 92 and byte(s, j + 1) == 117 then
                    local lo = hex4(s, j + 2)
                    if lo and lo >= 0xDC00 and lo <= 0xDFFF then
                        cp = 0x10000 + (cp - 0xD800) * 1024 + (lo - 0xDC00)
                        j = j + 6
                    end
                end
                n = n + 1
                parts[n] = utf8(cp)
            else
                local r = e and ESCAPES[e]
                if not r then fail(s, j, "bad escape") end
                n = n + 1
                parts[n] = r
                j = j + 2
            end
            start = j
        elseif c == nil then
            fail(s, i, "unterminated string")
        elseif c < 32 then
            fail(s, j, "control character in string")
        else
            j = j + 1
        end
    end
end

local function digits(s, i) -- index after a run of digits starting at i
    local c = byte(s, i)
    while c and c >= 48 and c <= 57 do
        i = i + 1
        c = byte(s, i)
    end
    return i
end

local function decode_number(s, i)
    local j = i
    if byte(s, j) == 45 then j = j + 1 end
    local d = byte(s, j)
    if not d or d < 48 or d > 57 then fail(s, i, "unexpected character") end
    local e = digits(s, j)
    if d == 48 and e > j + 1 then fail(s, i, "leading zero in number") end
    local int_len = e - i
    local plain = true
    if byte(s, e) == 46 then
        local f = digits(s, e + 1)
        if f == e + 1 then fail(s, e, "bad number") end
        e, plain = f, false
    end
    local c = byte(s, e)
    if c == 101 or c == 69 then
        local k = e + 1
        c = byte(s, k)
        if c == 43 or c == 45 then k = k + 1 end
        local f = digits(s, k)
        if f == k then fail(s, e, "bad number") end
        e, plain = f, false
    end
    local text = sub(s, i, e - 1)
    -- Integers a double holds exactly become Lua numbers; anything else
    -- keeps its spelling (1.50, 1e3, 12345678901234567890) for the encoder.
    if plain and int_len <= 15 then return tonumber(text), e end
    return setmetatable({ text }, NUMBER), e
end

local function decode_array(s, i, depth)
    local arr, n = setmetatable({}, ARRAY), 0
    i = skip(s, i + 1)
    if byte(s, i) == 93 then return arr, i + 1 end
    while true do
        local v
        v, i = decode_value(s, i, depth)
        n = n + 1
        arr[n] = v
        i = skip(s, i)
        local c = byte(s, i)
        if c == 93 then return arr, i + 1 end
        if c ~= 44 then fail(s, i, "expected , or ]") end
        i = skip(s, i + 1)
    end
end

local function decode_object(s, i, depth)
    local obj, keys, n = setmetatable({}, OBJECT), {}, 0
    order[obj] = keys
    i = skip(s, i + 1)
    if byte(s, i) == 125 then return obj, i + 1 end
    while true do
        if byte(s, i) ~= 34 then fail(s, i, "expected a member name") end
        local k
        k, i = decode_string(s, i)
        i = skip(s, i)
        if byte(s, i) ~= 58 then fail(s, i, "expected :") end
        local v
        v, i = decode_value(s, skip(s, i + 1), depth)
        if obj[k] == nil then
            n = n + 1
            keys[n] = k
        end
        obj[k] = v -- a repeated name: the last one wins (as in most parsers)
        i = skip(s, i)
        local c = byte(s, i)
        if c == 125 then return obj, i + 1 end
        if c ~= 44 then fail(s, i, "expected , or }") end
        i = skip(s, i + 1)
    end
end

decode_value = function(s, i, depth)
    local c = byte(s, i)
    if c == 123 or c == 91 then
        if depth >= _M.MAX_DEPTH then fail(s, i, "nested too deeply") end
        if c == 123 then return decode_object(s, i, depth + 1) end
        return decode_array(s, i, depth + 1)
    elseif c == 34 then
        return decode_string(s, i)
    elseif c == 116 and sub(s, i, i + 3) == "true" then
        return true, i + 4
    elseif c == 102 and sub(s, i, i + 4) == "false" then
        return false, i + 5
    elseif c == 110 and sub(s, i, i + 3) == "null" then
        return null, i + 4
    elseif c == nil then
        fail(s, i, "unexpected end")
    end
    return decode_number(s, i)
end

local function decode_all(text)
    local v, i = decode_value(text, skip(text, 1), 0)
    return v, skip(text, i)
end

--- json.decode(text) -> value, or nil, "invalid JSON: why at byte N".
-- Objects keep their members' order, arrays stay arrays (also empty ones),
-- `null` is json.null, numbers keep their spelling.
function _M.decode(text)
    if type(text) ~= "string" then return nil, "invalid JSON: not a string" end
    local ok, v, i = pcall(decode_all, text)
    if not ok then
        if type(v) == "table" and v.json_error then return nil, "invalid JSON: " .. v.json_error end
        return nil, "invalid JSON: " .. tostring(v)
    end
    if i <= #text then return nil, "invalid JSON: trailing data at byte " .. i end
    return v
end

-- ------------------------------------------------------------ encoding

local ESC_OUT = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
    ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }

local function escape_char(c) return ESC_OUT[c] or format("\\u%04x", byte(c)) end

-- Puts the JSON string of s between `open` and `close` (quotes included:
-- '"' or ',"' and '"' or '":'): a string without anything to escape is
-- copied into the buffer as it is, no new Lua string.
local function put_string(buf, s, open, close)
    for j = 1, #s do
        local c = byte(s, j)
        if c < 32 or c == 34 or c == 92 or c == 127 then
            s = gsub(s, '[%z\1-\31"\\\127]', escape_char)
            break
        end
    end
    buf:put(open, s, close)
end

local function encode_number(x)
    if x ~= x or x == huge or x == -huge then
        error({ json_error = "number not JSON: " .. tostring(x) }, 0)
    end
    if floor(x) == x and x > -1e15 and x < 1e15 then return format("%d", x) end
    local s = format("%.14g", x)
    if tonumber(s) ~= x then s = format("%.17g", x) end
    return s
end

local encode_value

-- The members of an object in order: decoded ones as they came, then any
-- added ones sorted by name (deterministic output).
local function members(obj)
    local keys, seen, out, n = order[obj], {}, {}, 0
    if keys then
        for _, k in ipairs(keys) do
            if obj[k] ~= nil and not seen[k] then
                seen[k] = true
                n = n + 1
                out[n] = k
            end
        end
    end
    local extra = {}
    for k in pairs(obj) do
        if not seen[k] then
            if type(k) ~= "string" then
                error({ json_error = "object key is not a string: " .. tostring(k) }, 0)
            end
            extra[#extra + 1] = k
        end
    end
    sort(extra)
    for _, k in ipairs(extra) do
        n = n + 1
        out[n] = k
    end
    return out
end

local function is_sequence(t)
    local n = #t
    if n == 0 then return false end
    local count = 0
    for _ in pairs(t) do count = count + 1 end
    return count == n
end

local function encode_object(v, buf, depth, keys)
    local first = true
    for i = 1, #keys do
        local k = keys[i]
        local x = v[k]
        if x ~= nil then
            put_string(buf, k, first and '{"' or ',"', '":')
            first = false
            encode_value(x, buf, depth + 1)
        end
    end
    buf:put(first and "{}" or "}")
end

-- Puts v's JSON into buf (a string.buffer).
encode_value = function(v, buf, depth)
    local t = type(v)
    if t == "string" then
        put_string(buf, v, '"', '"')
    elseif t == "number" then
        buf:put(encode_number(v))
    elseif t == "boolean" then
        buf:put(v and "true" or "false")
    elseif v == null or v == nil then
        buf:put("null")
    elseif t == "table" then
        if depth > _M.MAX_DEPTH then error({ json_error = "nested too deeply" }, 0) end
        local mt = getmetatable(v)
        if mt == NUMBER then
            buf:put(v[1])
        elseif mt == ARRAY or (mt ~= OBJECT and is_sequence(v)) then
            buf:put("[")
            for i = 1, #v do
                if i > 1 then buf:put(",") end
                encode_value(v[i], buf, depth + 1)
            end
            buf:put("]")
        else
            -- Fast path: the decoded order lists every member once (the
            -- operations keep it so); otherwise the general members().
            local keys = order[v]
            if keys then
                local listed, present = 0, 0
                for i = 1, #keys do
                    if v[keys[i]] ~= nil then listed = listed + 1 end
                end
                for _ in pairs(v) do present = present + 1 end
                if listed ~= present then keys = members(v) end
            else
                keys = members(v)
            end
            encode_object(v, buf, depth, keys)
        end
    else
        error({ json_error = "cannot encode a " .. t }, 0)
    end
end

-- One buffer per VM, reused: encode never yields. A very large document
-- does not keep its memory once written.
local out_buf = strbuf.new()
local KEEP_BUF = 256 * 1024

--- json.encode(value) -> compact JSON text, or nil, err.
function _M.encode(v)
    out_buf:reset()
    local ok, err = pcall(encode_value, v, out_buf, 0)
    local text = ok and out_buf:tostring()
    if #out_buf > KEEP_BUF or (text and #text > KEEP_BUF) then out_buf:free() end
    out_buf:reset()
    if not ok then
        return nil, type(err) == "table" and err.json_error or tostring(err)
    end
    return text
end

-- ------------------------------------------------------------ values

--- json.EMPTY_ARRAY: `[]` in a config value (an empty Lua table is `{}`).
_M.EMPTY_ARRAY = _M.array()

--- json.typed(v): a config value as a JSON value, once per config: tables are marked as
-- arrays (keys 1..n) or objects so the operations see what JSON will.
function _M.typed(v)
    if type(v) ~= "table" then return v end
    local mt = getmetatable(v)
    if mt == NUMBER then return v end
    local out = {}
    for k, x in pairs(v) do out[k] = _M.typed(x) end
    if mt ~= ARRAY and mt ~= OBJECT then mt = is_sequence(v) and ARRAY or OBJECT end
    return setmetatable(out, mt)
end

--- json.copy(v): a copy of a typed value: each place a value goes gets its own tables.
function _M.copy(v)
    if type(v) ~= "table" then return v end
    local mt = getmetatable(v)
    if mt == NUMBER then return v end -- never changed in place
    local out = {}
    for k, x in pairs(v) do out[k] = _M.copy(x) end
    return setmetatable(out, mt)
end

--- json.rename_member(obj, from, to): keeps an object's member order when `from` becomes `to` (absent before):
-- `to` takes `from`'s place, and an old entry of `to` (a member removed
-- earlier) is dropped so the list names each member once.
function _M.rename_member(obj, from, to)
    local keys = order[obj]
    if not keys then return end
    local at, old
    for i = 1, #keys do
        if keys[i] == from then at = i elseif keys[i] == to then old = i end
    end
    if at then keys[at] = to end
    if old and at then tremove(keys, old) end
end

--- json.append_member(obj, key): appends `key` to an object's member order unless it is listed already.
function _M.append_member(obj, key)
    local keys = order[obj]
    if not keys then return end
    for i = 1, #keys do
        if keys[i] == key then return end
    end
    keys[#keys + 1] = key
end

return _M
