-- JSON transformation and templating shared by request-transform,
-- aggregate and (once the core filters response bodies) response-transform.
-- Pure: no request, no I/O. Values the templates read come through a
-- `lookup(source, name)` function the caller supplies, so everything here
-- is testable with plain tables.
--
--   local T = require("moongate.transform")
--   local ops = assert(T.compile({ rename = { userId = "id" }, remove = { "password" } }))
--   local doc = T.decode('{"userId":1,"password":"x"}')
--   T.apply(doc, ops, lookup)               -- in place; returns the (new) root
--   T.encode(doc)                            -- '{"id":1}'
--
-- Paths: "a.b.c" walks objects; "items[*].id" walks every element of the
-- array `items` ("[*].id" when the document itself is an array). A path
-- ends with a field name. A missing field, or a value of the wrong kind on
-- the way, makes the operation a no-op for that place.
--
-- Templates: "{params.id}", "{query.page}", "{headers.x-foo}",
-- "{consumer.id}" (a dotted path into ctx.consumer); "{{" is a literal "{".
--
-- JSON: Debian 12's lua-cjson (2.1.0) decodes `[]` to the same empty table
-- as `{}` and prints numbers with 14 significant digits, so decoding and
-- re-encoding would turn `"tags":[]` into `"tags":{}` and round large ids.
-- decode() therefore swaps empty arrays and numbers longer than 14 digits
-- for marker strings (carrying a per-process random nonce, so a client
-- cannot forge one) that encode() turns back into the original text. Use
-- this module's decode/encode pair, not gw.json, for documents that are
-- passed on.
local cjson = require("cjson.safe").new() -- own instance: settings stay ours
local crypto = require("moongate.crypto")

local type, pairs, ipairs, tostring, tonumber = type, pairs, ipairs, tostring, tonumber
local find, sub, gsub, match, byte, char, format = string.find, string.sub, string.gsub,
    string.match, string.byte, string.char, string.format
local concat, sort = table.concat, table.sort

local _M = {}

local STAR = {} -- the "[*]" path segment
_M.STAR = STAR

-- Template sources a reference may name.
_M.SOURCES = { params = true, query = true, headers = true, consumer = true }

_M.null = cjson.null

-- --------------------------------------------------------------- JSON

local NONCE = gsub(crypto.random(6), ".", function(c) return format("%02x", byte(c)) end)
local MARK = "\0mg" .. NONCE           -- as a Lua string in a decoded doc
local MARK_JSON = "\\u0000mg" .. NONCE -- as cjson writes it
local EMPTY_ARRAY = MARK .. "[]"
_M.EMPTY_ARRAY = EMPTY_ARRAY
local MAX_DIGITS = 14

-- Replaces empty arrays and long numbers outside strings by markers.
local function protect(s)
    if not find(s, "%[[ \t\r\n]*%]") and not find(s, "%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d") then
        return s
    end
    local out, n, pos, last = {}, 0, 1, 1
    while true do
        local i = find(s, '["%[%-%d]', pos)
        if not i then break end
        local c = byte(s, i)
        if c == 34 then -- a string: skip to its closing quote
            local j = i + 1
            while true do
                local k = find(s, '["\\]', j)
                if not k then return s end -- unterminated: the decoder will say so
                if byte(s, k) == 92 then
                    j = k + 2
                else
                    pos = k + 1
                    break
                end
            end
        elseif c == 91 then -- "["
            local e = match(s, "^%[[ \t\r\n]*%]()", i)
            if e then
                out[n + 1], out[n + 2], n = sub(s, last, i - 1), '"' .. MARK_JSON .. '[]"', n + 2
                last = e
                pos = e
            else
                pos = i + 1
            end
        else -- a number (as JSON spells one), or invalid text the decoder refuses
            local e = match(s, "^%-?0()", i) or match(s, "^%-?[1-9]%d*()", i)
            if not e then
                pos = i + 1
            else
                e = match(s, "^%.%d+()", e) or e
                e = match(s, "^[eE][-+]?%d+()", e) or e
                local tok = sub(s, i, e - 1)
                local digits = gsub(gsub(match(tok, "^[^eE]*"), "%D", ""), "^0+", "")
                local nxt = sub(s, e, e)
                if #digits > MAX_DIGITS and (nxt == "" or find(nxt, "^[%s,%]}]")) then
                    out[n + 1], out[n + 2], n = sub(s, last, i - 1), '"' .. MARK_JSON .. "#" .. tok .. '"', n + 2
                    last = e
                end
                pos = e
            end
        end
    end
    if n == 0 then return s end
    out[n + 1] = sub(s, last)
    return concat(out)
end

--- T.decode(text) -> value, or nil, err. JSON null is T.null.
function _M.decode(text)
    if type(text) ~= "string" then return nil, "expected a string" end
    return cjson.decode(protect(text))
end

local MARK_PATTERN = '"' .. MARK_JSON .. "([#%[][^\"]*)\""

--- T.encode(value) -> text, or nil, err: JSON, markers restored.
function _M.encode(value)
    local text, err = cjson.encode(value)
    if not text then return nil, err end
    if find(text, MARK_JSON, 1, true) then
        text = gsub(text, MARK_PATTERN, function(m)
            if m == "[]" then return "[]" end
            return sub(m, 2)
        end)
    end
    return text
end

-- ---------------------------------------------------------------- paths

--- T.parse_path("items[*].id") -> { "items", T.STAR, "id" }, or nil, why.
function _M.parse_path(path)
    if type(path) ~= "string" or path == "" then return nil, "a path must be a non-empty string" end
    local segs = {}
    local rest = path
    if sub(rest, 1, 3) == "[*]" then
        segs[1] = STAR
        rest = sub(rest, 4)
        if rest ~= "" then
            if sub(rest, 1, 1) ~= "." then return nil, "expected \".\" after [*] in " .. path end
            rest = sub(rest, 2)
        end
    end
    if rest ~= "" then
        for part in (rest .. "."):gmatch("([^.]*)%.") do
            local name, stars = match(part, "^([^%[%]]*)(.*)$")
            if name == "" then return nil, "empty field name in " .. path end
            segs[#segs + 1] = name
            while stars ~= "" do
                if sub(stars, 1, 3) ~= "[*]" then
                    return nil, "only [*] may follow a field name in " .. path
                end
                segs[#segs + 1] = STAR
                stars = sub(stars, 4)
            end
        end
    end
    if segs[#segs] == STAR then return nil, "a path must end with a field name: " .. path end
    return segs
end

-- ------------------------------------------------------------ templates

--- T.compile_template("/users/{consumer.id}") -> template, or nil, why.
-- A template is a list of literal strings and { source =, name = } refs.
function _M.compile_template(s, sources)
    sources = sources or _M.SOURCES
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
            if not j then return nil, "unclosed { in \"" .. s .. "\"" end
            local ref = sub(s, i + 1, j - 1)
            local source, name = match(ref, "^([%w_]+)%.(.+)$")
            if not source then
                return nil, "bad reference {" .. ref .. "} in \"" .. s
                    .. "\" (expected {source.name}; \"{{\" for a literal {)"
            end
            if not sources[source] then
                local names = {}
                for k in pairs(sources) do names[#names + 1] = k end
                sort(names)
                return nil, "unknown template source \"" .. source .. "\" in {" .. ref
                    .. "} (sources: " .. concat(names, ", ") .. ")"
            end
            local l = concat(lit)
            if l ~= "" then parts[#parts + 1] = l end
            lit = {}
            parts[#parts + 1] = { source = source, name = source == "headers" and name:lower() or name }
            pos = j + 1
        end
    end
    local l = concat(lit)
    if l ~= "" or #parts == 0 then parts[#parts + 1] = l end
    return parts
end

--- T.render(template, lookup[, encode]) -> value, or nil, "{source.name}"
-- (the first reference without a value). A template that is exactly one
-- reference keeps the value's type (a number stays a number) unless
-- `encode` is given; otherwise values are turned into strings, each
-- passed through encode(s) when given (e.g. T.escape_path).
function _M.render(tpl, lookup, encode)
    if #tpl == 1 and type(tpl[1]) == "table" and not encode then
        local v = lookup(tpl[1].source, tpl[1].name)
        if v == nil then return nil, "{" .. tpl[1].source .. "." .. tpl[1].name .. "}" end
        return v
    end
    local out = {}
    for i, p in ipairs(tpl) do
        if type(p) == "string" then
            out[i] = p
        else
            local v = lookup(p.source, p.name)
            if v == nil or type(v) == "table" then return nil, "{" .. p.source .. "." .. p.name .. "}" end
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

--- T.escape("a b/c") -> "a%20b%2Fc": every byte but unreserved ones.
function _M.escape(s)
    return (gsub(s, "[^%w%-._~]", function(c) return format("%%%02X", byte(c)) end))
end

--- T.escape_path(v): T.escape for a path segment; "." and ".." (which the
-- gateway's path normalization would treat as dot segments) are refused.
function _M.escape_path(v)
    if v == "." or v == ".." or v == "" then return nil end
    return _M.escape(v)
end

local function unescape(s)
    s = gsub(s, "+", " ")
    return (gsub(s, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end
_M.unescape = unescape

--- T.parse_query("a=1&b=x%20y&a=2") -> { { "a", "1" }, { "b", "x y" }, { "a", "2" } }
-- (decoded names and values, in order; a name without "=" has value "").
function _M.parse_query(q)
    local out = {}
    for pair in (q or ""):gmatch("[^&]+") do
        local k, v = match(pair, "^([^=]*)=(.*)$")
        if not k then k, v = pair, "" end
        out[#out + 1] = { unescape(k), unescape(v) }
    end
    return out
end

--- T.build_query(list) -> "a=1&b=x%20y" from { { name, value }, ... }.
function _M.build_query(list)
    local out = {}
    for i, kv in ipairs(list) do out[i] = _M.escape(kv[1]) .. "=" .. _M.escape(kv[2]) end
    return concat(out, "&")
end

-- ------------------------------------------------------- JSON operations

-- The config of a JSON transformation, for plugin schemas.
local PATHS = { type = "array", items = { type = "string", min_len = 1,
    description = "a path: a.b.c, items[*].id" }, description = "paths" }
_M.JSON_SCHEMA = {
    type = "table",
    description = "JSON body operations, applied in the order keep, remove, rename, replace, add",
    fields = {
        keep = { type = "array", items = PATHS.items,
            description = "keep only these paths (and what is below them); everything else goes" },
        remove = { type = "array", items = PATHS.items, description = "paths to remove" },
        rename = { type = "map", values = { type = "string", min_len = 1,
            description = "the new field name" },
            description = "path -> new name of its last field (in the same object)" },
        replace = { type = "map", values = { type = "any", description = "value or template" },
            description = "path -> new value, only where the field exists" },
        add = { type = "map", values = { type = "any", description = "value or template" },
            description = "path -> value, only where the field is missing (objects on the way are created)" },
    },
}

local function sorted_keys(t)
    local keys = {}
    for k in pairs(t or {}) do keys[#keys + 1] = k end
    sort(keys)
    return keys
end

local function compile_value(v, field)
    if type(v) == "string" then
        local tpl, err = _M.compile_template(v)
        if not tpl then return nil, field .. ": " .. err end
        return { tpl = tpl }
    end
    return { literal = v }
end

--- T.compile(spec[, prefix]) -> ops, or nil, "json.rename.userId: why".
-- `spec` is a config checked against T.JSON_SCHEMA; `prefix` names it in
-- errors (default "json").
function _M.compile(spec, prefix)
    prefix = prefix or "json"
    local ops = {}
    local function path_of(p, field)
        local segs, err = _M.parse_path(p)
        if not segs then return nil, field .. ": " .. err end
        return segs
    end
    if spec.keep then
        local tree = {}
        for i, p in ipairs(spec.keep) do
            local segs, err = path_of(p, prefix .. ".keep[" .. i .. "]")
            if not segs then return nil, err end
            local node = tree
            for j, seg in ipairs(segs) do
                if node[seg] == true then break end
                if j == #segs then
                    node[seg] = true
                else
                    node[seg] = node[seg] or {}
                    node = node[seg]
                end
            end
        end
        ops[#ops + 1] = { op = "keep", tree = tree }
    end
    for i, p in ipairs(spec.remove or {}) do
        local segs, err = path_of(p, prefix .. ".remove[" .. i .. "]")
        if not segs then return nil, err end
        ops[#ops + 1] = { op = "remove", segs = segs }
    end
    for _, p in ipairs(sorted_keys(spec.rename)) do
        local field = prefix .. ".rename." .. p
        local segs, err = path_of(p, field)
        if not segs then return nil, err end
        local to = spec.rename[p]
        if find(to, "[.%[%]]") then
            return nil, field .. ": the new name must be a field name (renames stay in the same object)"
        end
        ops[#ops + 1] = { op = "rename", segs = segs, to = to }
    end
    for _, kind in ipairs({ "replace", "add" }) do
        for _, p in ipairs(sorted_keys(spec[kind])) do
            local field = prefix .. "." .. kind .. "." .. p
            local segs, err = path_of(p, field)
            if not segs then return nil, err end
            local val, verr = compile_value(spec[kind][p], field)
            if not val then return nil, verr end
            ops[#ops + 1] = { op = kind, segs = segs, value = val }
        end
    end
    return ops
end

local function is_array(t) return t[1] ~= nil end
local function is_object(t) return type(t) == "table" and t[1] == nil end

-- Calls fn(parent, key) for every place the path reaches; with `create`,
-- missing objects on the way are created.
local function each(node, segs, i, fn, create)
    if type(node) ~= "table" then return end
    local seg = segs[i]
    if seg == STAR then
        if not is_array(node) then return end
        for k = 1, #node do each(node[k], segs, i + 1, fn, create) end
        return
    end
    if not is_object(node) then return end
    if i == #segs then return fn(node, seg) end
    local nxt = node[seg]
    if nxt == nil and create and segs[i + 1] ~= STAR then
        nxt = {}
        node[seg] = nxt
    end
    return each(nxt, segs, i + 1, fn, create)
end

local function prune(node, tree)
    if type(node) ~= "table" then return end
    if is_array(node) then
        local t = tree[STAR]
        if t and t ~= true then
            for k = 1, #node do prune(node[k], t) end
        end
        return
    end
    for k, v in pairs(node) do
        local t = tree[k]
        if t == nil then
            node[k] = nil -- clearing an existing field during pairs() is allowed
        elseif t ~= true then
            prune(v, t)
        end
    end
end

local function deep_copy(v)
    if type(v) ~= "table" then return v end
    local out = {}
    for k, x in pairs(v) do out[k] = deep_copy(x) end
    return out
end

local function value_of(val, lookup)
    if val.literal ~= nil then return deep_copy(val.literal) end
    local v = _M.render(val.tpl, lookup)
    if type(v) == "table" then return deep_copy(v) end
    return v
end

local function no_lookup() return nil end

--- T.apply(doc, ops[, lookup]) -> doc. Changes `doc` in place (the root
-- itself is never replaced). lookup(source, name) gives template values;
-- a template with a missing value leaves its field alone.
function _M.apply(doc, ops, lookup)
    lookup = lookup or no_lookup
    for _, o in ipairs(ops) do
        local kind = o.op
        if kind == "keep" then
            prune(doc, o.tree)
        elseif kind == "remove" then
            each(doc, o.segs, 1, function(p, k) p[k] = nil end)
        elseif kind == "rename" then
            local to = o.to
            each(doc, o.segs, 1, function(p, k)
                local v = p[k]
                if v ~= nil and k ~= to then
                    p[k] = nil
                    p[to] = v
                end
            end)
        elseif kind == "replace" then
            each(doc, o.segs, 1, function(p, k)
                if p[k] ~= nil then
                    local v = value_of(o.value, lookup)
                    if v ~= nil then p[k] = v end
                end
            end)
        else -- add
            each(doc, o.segs, 1, function(p, k)
                if p[k] == nil then
                    local v = value_of(o.value, lookup)
                    if v ~= nil then p[k] = v end
                end
            end, true)
        end
    end
    return doc
end

--- T.select(doc, "data.items") -> the value at a path without [*], or nil.
function _M.select(doc, segs)
    local node = doc
    for _, seg in ipairs(segs) do
        if not is_object(node) then return nil end
        node = node[seg]
    end
    return node
end

_M.is_object = is_object

--- T.request_lookup(gw, ctx) -> lookup(source, name) reading the request:
-- decoded route params, decoded query parameters (the first of a name), request
-- headers, and ctx.consumer (a dotted path; JSON null counts as missing).
-- gw is passed in so this module stays free of the runtime.
function _M.request_lookup(gw, ctx)
    local query
    return function(source, name)
        if source == "params" then
            -- The core gives the segment as in the normalized path (reserved
            -- characters still escaped): a template wants the value.
            local v = gw.request.get_param(ctx, name)
            return v and (gsub(v, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
        elseif source == "headers" then
            return gw.request.get_header(ctx, name)
        elseif source == "query" then
            if not query then
                query = {}
                for _, kv in ipairs(_M.parse_query(gw.request.get_query(ctx))) do
                    if query[kv[1]] == nil then query[kv[1]] = kv[2] end
                end
            end
            return query[name]
        elseif source == "consumer" then
            local node = ctx.consumer
            for part in name:gmatch("[^.]+") do
                if type(node) ~= "table" then return nil end
                node = node[part]
            end
            if node == cjson.null then return nil end
            return node
        end
    end
end

return _M
