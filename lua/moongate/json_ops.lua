-- moongate.json_ops: the one JSON module of the transform plugins
-- (request-transform, response-transform, aggregate): a JSON codec that
-- gives back what it was given, paths, templates, and the operations
-- rename, remove, replace, add and keep on nested paths and array elements.
--
-- Pure: no gw, no I/O; unit-tested by spec/json_ops_spec.lua. The request
-- values templates read (route params, query, headers, consumer) come from
-- lua/moongate/transform.lua's request_lookup.
--
-- Why its own JSON codec and not lua-cjson: a transform must not change
-- what it was not asked to change, and cjson 2.1.0 (Debian 12) turns `[]`
-- into `{}`, prints integers above 10^14 as 1.2345678901235e+16 and loses
-- the members' order. Here an object or array remembers what it was
-- (json_ops.is_array / is_object), an object keeps its members' order, and
-- a number keeps the upstream's spelling unless an operation replaced it.
--
-- Paths: names separated by dots, `a.b.c`; `[*]` is every element of an
-- array: `items[*].id`, `m[*][*].v`, `[*].id` (a top-level array). Two
-- dialects, because the plugins document two (compile's `spread` option):
--   strict (request-transform, aggregate's select): a name applies only
--     to an object, `[*]` only to an array; a
--     value of another kind is a no-op at that place; a path ends with a
--     field name; `*` alone is a plain field name.
--   spread (response-transform, the default of compile): a name that meets
--     an array applies to each element; `*` (or `[*]`) is every element of
--     an array or every member of an object; remove, replace and keep may
--     end in `[*]` (`tags[*]` empties the array).
-- A member whose name contains `.`, `[` or `]` cannot be addressed.
--
-- Operations (a list, applied in order):
--   { op = "rename",  path = "a.userId", to = "id" }   -- same parent, new name
--   { op = "remove",  path = "a.secret" }
--   { op = "replace", path = "a.b", value = v }        -- only where present
--   { op = "add",     path = "a.b", value = v }        -- only where absent;
--                                                       -- missing objects created
--   { op = "keep",    paths = { "id", "a.b" } }        -- everything else removed
-- A string value is a template (see compile_template): `{consumer.id}`.
local null = require("cjson.safe").null
local strbuf = require("string.buffer")

local type, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, error, pcall =
    type, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, error, pcall
local byte, sub, find, format, gsub, char, concat, sort, floor, huge =
    string.byte, string.sub, string.find, string.format, string.gsub, string.char,
    table.concat, table.sort, math.floor, math.huge
local match, gmatch, lower, tremove = string.match, string.gmatch, string.lower, table.remove

local _M = { null = null, MAX_DEPTH = 200 }

local ARRAY = { __name = "json array" }
local OBJECT = { __name = "json object" }
local NUMBER = { __name = "json number" } -- { text } : a number as the upstream spelled it
-- Members' order per object (weak keys: dies with the object).
local order = setmetatable({}, { __mode = "k" })

--- json_ops.array([t]) / json_ops.object([t]): mark a table as a JSON array
-- or object (an empty Lua table is otherwise an object).
function _M.array(t) return setmetatable(t or {}, ARRAY) end

function _M.object(t) return setmetatable(t or {}, OBJECT) end

function _M.is_array(v) return type(v) == "table" and getmetatable(v) == ARRAY end

function _M.is_object(v)
    return type(v) == "table" and getmetatable(v) ~= ARRAY and getmetatable(v) ~= NUMBER
end

--- json_ops.tonumber(v) -> the Lua number of a decoded number (decoded
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

--- json_ops.decode(text) -> value, or nil, "invalid JSON: why at byte N".
-- Objects keep their members' order, arrays stay arrays (also empty ones),
-- `null` is json_ops.null, numbers keep their spelling.
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

--- json_ops.encode(value) -> compact JSON text, or nil, err.
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

-- ------------------------------------------------------------ paths

local STAR = {} -- the `[*]` path segment (and `*` in the spread dialect)
_M.STAR = STAR

local MUST_END = "a path must end with a field name (it cannot end in [*]): "

--- json_ops.parse_path("items[*].id"[, spread]) -> { "items", json_ops.STAR, "id" },
-- or nil, why. With `spread` a lone `*` segment is json_ops.STAR too and a
-- path may end in one (compile refuses that for rename and add).
function _M.parse_path(path, spread)
    if type(path) ~= "string" or path == "" then return nil, "a path must be a non-empty string" end
    local segs, n, rest = {}, 0, path
    if sub(rest, 1, 3) == "[*]" then
        segs[1], n = STAR, 1
        rest = sub(rest, 4)
        if rest ~= "" and sub(rest, 1, 1) ~= "." then
            return nil, "expected \".\" after [*] in " .. path
        end
    else
        rest = "." .. rest
    end
    if rest ~= "" then
        for part in gmatch(sub(rest, 2) .. ".", "([^.]*)%.") do
            local name, stars = match(part, "^([^%[%]]*)(.*)$")
            if name == "" then return nil, "empty field name in " .. path end
            n = n + 1
            segs[n] = (spread and name == "*") and STAR or name
            while stars ~= "" do
                if sub(stars, 1, 3) ~= "[*]" then
                    return nil, "only [*] may follow a field name in " .. path
                end
                n = n + 1
                segs[n] = STAR
                stars = sub(stars, 4)
            end
        end
    end
    if segs[n] == STAR and not spread then return nil, MUST_END .. path end
    return segs
end

--- json_ops.select(doc, segs) -> the value at a path without [*] (objects
-- only on the way), or nil.
function _M.select(doc, segs)
    local node = doc
    for i = 1, #segs do
        if type(node) ~= "table" then return nil end
        local mt = getmetatable(node)
        if mt == ARRAY or mt == NUMBER then return nil end
        node = node[segs[i]]
    end
    return node
end

-- ------------------------------------------------------------ templates

-- The sources a strict template may name.
_M.SOURCES = { params = true, query = true, headers = true, consumer = true }

local function source_list()
    local names = {}
    for k in pairs(_M.SOURCES) do names[#names + 1] = k end
    sort(names)
    return concat(names, ", ")
end

--- json_ops.compile_template(s[, loose]) -> template, or nil, why. Once per
-- config. A template is a list of literal strings and { source =, name = }
-- references; "{{" is a literal "{".
-- Strict (request-transform, aggregate): every "{...}" must be
-- "{source.name}" with a source of json_ops.SOURCES (params, query,
-- headers, consumer), anything else is refused.
-- Loose (response-transform's documented dialect): "{ns.key}" is a
-- reference whatever ns is (the lookup knows it or not), other text in
-- braces stays as written; render gives "" for a reference without value.
function _M.compile_template(s, loose)
    if type(s) ~= "string" then return nil, "a template must be a string" end
    local parts, pos, lit = {}, 1, {}
    while true do
        local i = find(s, "{", pos, true)
        if not i then
            lit[#lit + 1] = sub(s, pos)
            break
        end
        lit[#lit + 1] = sub(s, pos, i - 1)
        if sub(s, i + 1, i + 1) == "{" then
            lit[#lit + 1] = "{"
            pos = i + 2
        else
            local j = find(s, "}", i, true)
            local ref = j and sub(s, i + 1, j - 1)
            local source, name
            if loose then
                if ref then source, name = match(ref, "^([%a_][%w_]*)%.([^{}]+)$") end
                if not source then
                    lit[#lit + 1] = "{"
                    pos = i + 1
                end
            else
                if not j then return nil, "unclosed { in \"" .. s .. "\"" end
                source, name = match(ref, "^([%w_]+)%.(.+)$")
                if not source then
                    return nil, "bad reference {" .. ref .. "} in \"" .. s
                        .. "\" (expected {source.name}; \"{{\" for a literal {)"
                end
                if not _M.SOURCES[source] then
                    return nil, "unknown template source \"" .. source .. "\" in {" .. ref
                        .. "} (sources: " .. source_list() .. ")"
                end
            end
            if source then
                local l = concat(lit)
                if l ~= "" then parts[#parts + 1] = l end
                lit = {}
                if source == "headers" or source == "header" then name = lower(name) end
                parts[#parts + 1] = { source = source, name = name }
                pos = j + 1
            end
        end
    end
    local l = concat(lit)
    if l ~= "" or #parts == 0 then parts[#parts + 1] = l end
    parts.loose = loose or nil
    return parts
end

--- json_ops.render(template, lookup[, encode]) -> value, or nil,
-- "{source.name}" (the first reference without a value; never for a loose
-- template, where it is ""). lookup(source, name) gives the values. A
-- strict template that is exactly one reference keeps the value's type (a
-- number stays a number, a table is a table) unless `encode` is given;
-- otherwise values become strings, each passed through encode(s) when
-- given (e.g. transform.escape_path; nil from it: no usable value).
function _M.render(tpl, lookup, encode)
    local loose, n = tpl.loose, #tpl
    local first = tpl[1]
    if n == 1 then
        if type(first) == "string" then return first end
        if not encode and not loose then
            local v = lookup(first.source, first.name)
            if v == nil then return nil, "{" .. first.source .. "." .. first.name .. "}" end
            return v
        end
    end
    local out = {}
    for i = 1, n do
        local p = tpl[i]
        if type(p) == "string" then
            out[i] = p
        else
            local v = lookup(p.source, p.name)
            if v == nil or type(v) == "table" then
                if not loose then return nil, "{" .. p.source .. "." .. p.name .. "}" end
                v = ""
            end
            v = tostring(v)
            if encode then
                v = encode(v)
                if v == nil then return nil, "{" .. p.source .. "." .. p.name .. "}" end
            end
            out[i] = v
        end
    end
    return concat(out)
end

-- ------------------------------------------------------------ operations

-- The `json` table of request-transform's config, for plugin schemas.
local PATH = { type = "string", min_len = 1, description = "a path: a.b.c, items[*].id" }
_M.JSON_SCHEMA = {
    type = "table",
    description = "JSON body operations, applied in the order keep, remove, rename, replace, add",
    fields = {
        keep = { type = "array", items = PATH,
            description = "keep only these paths (and what is below them); everything else goes" },
        remove = { type = "array", items = PATH, description = "paths to remove" },
        rename = { type = "map", values = { type = "string", min_len = 1,
            description = "the new field name" },
            description = "path -> new name of its last field (in the same object)" },
        replace = { type = "map", values = { type = "any", description = "value or template" },
            description = "path -> new value, only where the field exists" },
        add = { type = "map", values = { type = "any", description = "value or template" },
            description = "path -> value, only where the field is missing "
                .. "(objects on the way are created)" },
    },
}

--- json_ops.EMPTY_ARRAY: `[]` in a config value (an empty Lua table is `{}`).
_M.EMPTY_ARRAY = _M.array()

-- A config value as a JSON value, once per config: tables are marked as
-- arrays (keys 1..n) or objects so the operations see what JSON will.
local function typed(v)
    if type(v) ~= "table" then return v end
    local mt = getmetatable(v)
    if mt == NUMBER then return v end
    local out = {}
    for k, x in pairs(v) do out[k] = typed(x) end
    if mt ~= ARRAY and mt ~= OBJECT then mt = is_sequence(v) and ARRAY or OBJECT end
    return setmetatable(out, mt)
end

-- A copy of a typed value: each place a value goes gets its own tables.
local function copy(v)
    if type(v) ~= "table" then return v end
    local mt = getmetatable(v)
    if mt == NUMBER then return v end -- never changed in place
    local out = {}
    for k, x in pairs(v) do out[k] = copy(x) end
    return setmetatable(out, mt)
end

local function value_of(val, lookup)
    local tpl = val.tpl
    if not tpl then return copy(val.literal) end
    local v = _M.render(tpl, lookup)
    if type(v) == "table" then return typed(v) end
    return v
end

-- Keeps an object's member order when `from` becomes `to` (absent before):
-- `to` takes `from`'s place, and an old entry of `to` (a member removed
-- earlier) is dropped so the list names each member once.
local function rename_key(obj, from, to)
    local keys = order[obj]
    if not keys then return end
    local at, old
    for i = 1, #keys do
        if keys[i] == from then at = i elseif keys[i] == to then old = i end
    end
    if at then keys[at] = to end
    if old and at then tremove(keys, old) end
end

-- Appends `key` to an object's member order unless it is listed already.
local function append_key(obj, key)
    local keys = order[obj]
    if not keys then return end
    for i = 1, #keys do
        if keys[i] == key then return end
    end
    keys[#keys + 1] = key
end

-- The operation `op` at parent[key].
local function leaf(op, parent, key, lookup)
    local kind = op.op
    if kind == "remove" then
        parent[key] = nil -- in an array only by a trailing [*]: every element goes
    elseif kind == "rename" then
        local v, to = parent[key], op.to
        if v == nil or key == to then return end
        -- a member already called `to` is replaced, in its old place
        if parent[to] == nil then rename_key(parent, key, to) end
        parent[key] = nil
        parent[to] = v
    elseif kind == "replace" then
        if parent[key] ~= nil then -- JSON null counts as present
            local v = value_of(op.value, lookup)
            if v ~= nil then parent[key] = v end
        end
    elseif parent[key] == nil then -- add
        local v = value_of(op.value, lookup)
        if v ~= nil then
            parent[key] = v
            append_key(parent, key)
        end
    end
end

-- Applies `op` at every place its path names from segment i on. No
-- closures: this runs per request.
local function walk(node, op, i, lookup)
    if type(node) ~= "table" then return end -- also null, strings, numbers
    local mt = getmetatable(node)
    if mt == NUMBER then return end
    local segs = op.segs
    local seg, last = segs[i], i == op.n
    if seg == STAR then
        if mt == ARRAY then
            for j = 1, #node do
                if last then leaf(op, node, j, lookup) else walk(node[j], op, i + 1, lookup) end
            end
        elseif op.spread then -- every member of an object
            for k, v in pairs(node) do -- only existing members change: allowed in pairs
                if last then leaf(op, node, k, lookup) else walk(v, op, i + 1, lookup) end
            end
        end
        return
    end
    if mt == ARRAY then -- a name meeting an array: each element, when spreading
        if op.spread then
            for j = 1, #node do walk(node[j], op, i, lookup) end
        end
        return
    end
    if last then return leaf(op, node, seg, lookup) end
    local child = node[seg]
    if child == nil and op.create and segs[i + 1] ~= STAR then
        child = _M.object()
        node[seg] = child
        append_key(node, seg)
    end
    if child ~= nil then return walk(child, op, i + 1, lookup) end
end

-- keep: removes what the tree { [name] = subtree or true } does not name.
local function prune(node, tree, spread)
    if type(node) ~= "table" then return end
    local mt = getmetatable(node)
    if mt == NUMBER then return end
    local star = tree[STAR]
    if mt == ARRAY then
        if star == true then return end
        local t = star or (spread and tree) -- strict: an array [*] does not name stays whole
        if t then
            for i = 1, #node do prune(node[i], t, spread) end
        end
        return
    end
    if not spread then star = nil end
    for k, v in pairs(node) do
        local t = tree[k] or star
        if t == nil then
            node[k] = nil -- clearing an existing member during pairs() is allowed
        elseif t ~= true then
            prune(v, t, spread)
        end
    end
end

local OPS = { rename = true, remove = true, replace = true, add = true, keep = true }

local function compile_value(v, loose)
    if type(v) == "string" then
        local tpl, err = _M.compile_template(v, loose)
        if not tpl then return nil, err end
        return { tpl = tpl }
    end
    return { literal = typed(v) }
end

--- json_ops.compile(list[, opts]) -> the plan of a list of operations (do
-- it once per config), or nil, err naming the bad entry (its `field`, or
-- "operation N (op)"). opts.spread (default true): the spread dialect of
-- paths, else the strict one (see the top). opts.loose (default: as
-- spread): loose templates in string values, else strict ones.
function _M.compile(list, opts)
    local spread = not opts or opts.spread ~= false
    local loose = spread
    if opts and opts.loose ~= nil then loose = opts.loose end
    local out = { compiled = true }
    for i, op in ipairs(list) do
        local kind = op.op
        if not OPS[kind] then return nil, "operation " .. i .. ": unknown op " .. tostring(kind) end
        local where = op.field or ("operation " .. i .. " (" .. kind .. ")")
        local c = { op = kind, spread = spread }
        if kind == "keep" then
            local tree = {}
            for j, p in ipairs(op.paths or {}) do
                local segs, err = _M.parse_path(p, spread)
                if not segs then
                    return nil, (op.field and (op.field .. "[" .. j .. "]") or where) .. ": " .. err
                end
                local node = tree
                for k = 1, #segs do
                    local seg = segs[k]
                    if node[seg] == true then break end -- a shorter path keeps it all
                    if k == #segs then
                        node[seg] = true
                    else
                        node[seg] = node[seg] or {}
                        node = node[seg]
                    end
                end
            end
            c.tree = tree
        else
            local segs, err = _M.parse_path(op.path, spread)
            if not segs then return nil, where .. ": " .. err end
            if (kind == "rename" or kind == "add") and segs[#segs] == STAR then
                return nil, where .. ": " .. MUST_END .. op.path
            end
            if kind == "rename" then
                if type(op.to) ~= "string" or op.to == "" then
                    return nil, where .. ": needs a new name in `to`"
                end
                if find(op.to, "[.%[%]]") then
                    return nil, where .. ": the new name must be a field name "
                        .. "(renames stay in the same object)"
                end
                c.to = op.to
            elseif kind == "replace" or kind == "add" then
                if op.value == nil then return nil, where .. ": needs a value" end
                local val, verr = compile_value(op.value, loose)
                if not val then return nil, where .. ": " .. verr end
                c.value = val
            end
            c.segs, c.n, c.create = segs, #segs, kind == "add"
        end
        out[i] = c
    end
    return out
end

--- json_ops.sorted_keys(map or nil) -> its keys in name order: the order
-- a config map's entries apply in (the plugins use it for theirs too).
local function sorted_keys(t)
    local keys = {}
    for k in pairs(t or {}) do keys[#keys + 1] = k end
    sort(keys)
    return keys
end
_M.sorted_keys = sorted_keys

--- json_ops.compile_groups(groups, order, prefix[, opts]) -> plan, or nil,
-- "json.rename.a..b: why". groups = { keep = {paths}, remove = {paths},
-- rename = {path = new name}, replace = {path = value}, add = {path =
-- value} } (any may be missing); order lists the kinds in the order they
-- apply; a map's entries apply in path order. prefix names the config
-- fields in errors: "json." gives json.keep[2], json.rename.userId.
function _M.compile_groups(groups, order_of_kinds, prefix, opts)
    local list = {}
    for _, kind in ipairs(order_of_kinds) do
        local g = groups[kind]
        if g == nil then -- luacheck: ignore 542
        elseif kind == "keep" then
            list[#list + 1] = { op = "keep", paths = g, field = prefix .. "keep" }
        elseif kind == "remove" then
            for i, p in ipairs(g) do
                list[#list + 1] = { op = "remove", path = p,
                    field = prefix .. "remove[" .. i .. "]" }
            end
        else
            for _, p in ipairs(sorted_keys(g)) do
                local e = { op = kind, path = p, field = prefix .. kind .. "." .. p }
                if kind == "rename" then e.to = g[p] else e.value = g[p] end
                list[#list + 1] = e
            end
        end
    end
    return _M.compile(list, opts)
end

local function no_lookup() return nil end

--- json_ops.apply(doc, plan[, lookup]) -> doc (changed in place; the root
-- itself is never replaced), or nil, err for a list that does not compile.
-- `plan` is from compile/compile_groups (a plain list is compiled on each
-- call: specs only). lookup(source, name) gives template values. Targets
-- that are missing, or of the wrong kind, are skipped.
function _M.apply(doc, ops, lookup)
    if not ops.compiled then
        local err
        ops, err = _M.compile(ops)
        if not ops then return nil, err end
    end
    lookup = lookup or no_lookup
    for i = 1, #ops do
        local op = ops[i]
        if op.op == "keep" then
            prune(doc, op.tree, op.spread)
        else
            walk(doc, op, 1, lookup)
        end
    end
    return doc
end

return _M
