-- moongate.json_ops: the JSON operations of the transform plugins
-- (request-transform, response-transform, aggregate): paths, templates,
-- and rename, remove, replace, add and keep on nested paths and array
-- elements, over moongate.json's values.
--
-- Pure: no gw, no I/O; unit-tested by spec/json_ops_spec.lua. The request
-- values templates read (route params, query, headers, consumer) come from
-- lua/moongate/transform.lua's request_lookup.
--
-- The codec is moongate.json (lua/moongate/json.lua: `[]`, big numbers and
-- member order survive); its functions are re-exported here.
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
local json = require("moongate.json")

local type, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, error =
    type, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, error
local sub, find, format, gsub, concat, sort =
    string.sub, string.find, string.format, string.gsub, table.concat, table.sort
local match, gmatch, lower = string.match, string.gmatch, string.lower

local ARRAY, NUMBER = json.ARRAY, json.NUMBER
local typed, copy, rename_key, append_key = json.typed, json.copy, json.rename_member,
    json.append_member

local _M = {}
for _, name in ipairs({ "null", "MAX_DEPTH", "array", "object", "is_array", "is_object",
                        "tonumber", "decode", "encode", "EMPTY_ARRAY" }) do
    _M[name] = json[name]
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

local function value_of(val, lookup)
    local tpl = val.tpl
    if not tpl then return copy(val.literal) end
    local v = _M.render(tpl, lookup)
    if type(v) == "table" then return typed(v) end
    return v
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
