-- request-transform: changes the request before it goes upstream: headers,
-- query parameters, the path, and JSON bodies (lua/moongate/json_ops.lua
-- does the JSON work, strict dialect; lua/moongate/transform.lua reads the
-- request for templates). Runs in access,
-- after the authentication plugins, so templates can use {consumer.id}.
--
--   ["request-transform"] = {
--       headers = { add = { ["X-User"] = "{consumer.id}" }, remove = { "Cookie" } },
--       query = { rename = { q = "search" }, add = { limit = "20" } },
--       path = "/api/v2/users/{params.id}",
--       json = { rename = { userId = "id", userName = "name", userEmail = "email" } },
--   }
--
-- Each group runs remove, rename, replace (only what exists), add (only
-- what is missing). A body is transformed only when its Content-Type says
-- JSON; a body over max_body or one that is not valid JSON goes upstream
-- untouched, with a log line. docs/plugins/transform.md has the details.
local gw = require("moongate.gw")
local T = require("moongate.transform")
local J = require("moongate.json_ops")

local type, pairs, ipairs, setmetatable, tostring = type, pairs, ipairs, setmetatable, tostring
local find, lower, gsub = string.find, string.lower, string.gsub

local NAMES = { type = "array", items = { type = "string", min_len = 1, description = "a name" },
    description = "names to remove" }
local RENAMES = { type = "map", values = { type = "string", min_len = 1, description = "the new name" },
    description = "old name -> new name" }
local VALUES = { type = "map", values = { type = "string", description = "a template" },
    description = "name -> value (a template)" }

local function group(what)
    return { type = "table", description = what .. " operations: remove, rename, replace, add",
        fields = {
            remove = NAMES, rename = RENAMES,
            replace = { type = "map", values = VALUES.values,
                description = "name -> new value, only when present (a template)" },
            add = { type = "map", values = VALUES.values,
                description = "name -> value, only when absent (a template)" },
        } }
end

local TOKEN = "^[%w!#$%%&'*+.^_`|~-]+$"
local GATEWAY_HEADERS = { ["content-length"] = true, ["transfer-encoding"] = true,
    connection = true }

-- The documented order of the json operations, and their path dialect:
-- a name applies to objects only, [*] to arrays only (json_ops "strict").
local JSON_ORDER = { "keep", "remove", "rename", "replace", "add" }
local JSON_OPTS = { spread = false }

local compiled = setmetatable({}, { __mode = "k" })

-- conf -> { headers = {...}, query = {...}, path = tpl, json = ops } or nil, err
local function compile(conf)
    local c = { }
    for _, kind in ipairs({ "headers", "query" }) do
        local g = conf[kind]
        if g then
            local out = { remove = g.remove or {}, rename = {}, replace = {}, add = {} }
            local function name_ok(name, field)
                if kind == "headers" then
                    if not find(name, TOKEN) then return nil, field .. ": invalid header name" end
                    if GATEWAY_HEADERS[lower(name)] then
                        return nil, field .. ": " .. name .. " is set by the gateway"
                    end
                end
                return true
            end
            for i, name in ipairs(out.remove) do
                local ok, err = name_ok(name, kind .. ".remove[" .. i .. "]")
                if not ok then return nil, err end
            end
            for old, new in pairs(g.rename or {}) do
                local ok, err = name_ok(old, kind .. ".rename." .. old)
                if ok then ok, err = name_ok(new, kind .. ".rename." .. old) end
                if not ok then return nil, err end
                out.rename[#out.rename + 1] = { old, new }
            end
            table.sort(out.rename, function(a, b) return a[1] < b[1] end)
            for _, op in ipairs({ "replace", "add" }) do
                for name, v in pairs(g[op] or {}) do
                    local field = kind .. "." .. op .. "." .. name
                    local ok, err = name_ok(name, field)
                    if not ok then return nil, err end
                    local tpl, terr = J.compile_template(v)
                    if not tpl then return nil, field .. ": " .. terr end
                    out[op][#out[op] + 1] = { name, tpl }
                end
                table.sort(out[op], function(a, b) return a[1] < b[1] end)
            end
            c[kind] = out
        end
    end
    if conf.path then
        if conf.path:sub(1, 1) ~= "/" then return nil, "path: must start with /" end
        if find(conf.path, "[%s%z]") then return nil, "path: no spaces or control characters" end
        local tpl, err = J.compile_template(conf.path)
        if not tpl then return nil, "path: " .. err end
        c.path = tpl
    end
    if conf.json then
        local ops, err = J.compile_groups(conf.json, JSON_ORDER, "json.", JSON_OPTS)
        if not ops then return nil, err end
        c.json = ops
    end
    return c
end

local function compiled_of(conf)
    local c = compiled[conf]
    if not c then
        c = assert(compile(conf))
        compiled[conf] = c
    end
    return c
end

local P = {
    name = "request-transform",
    priority = 800, -- after authentication (1000+), acl (900), rate-limit (910)
    schema = {
        fields = {
            headers = group("request header"),
            query = group("query parameter"),
            path = { type = "string", min_len = 1,
                description = "new upstream path, a template (\"/v2/users/{params.id}\")" },
            json = J.JSON_SCHEMA,
            max_body = { type = "integer", default = 1048576, min = 0,
                description = "bytes: a larger body is passed on untouched (logged)" },
        },
        check = function(conf)
            local c, err = compile(conf)
            if not c then return nil, err end
            compiled[conf] = c
            return true
        end,
    },
    compile = compile,
}

local function bad_header_value(v)
    return find(v, "[\r\n%z]") ~= nil
end

--- P.transform_headers(c, get, set, lookup): the header operations over
-- get(name) -> value|list|nil and set(name, value|list|nil). Pure.
function P.transform_headers(c, get, set, lookup)
    for _, name in ipairs(c.remove) do set(name, nil) end
    for _, r in ipairs(c.rename) do
        local v = get(r[1])
        if v ~= nil then
            set(r[1], nil)
            set(r[2], v)
        end
    end
    for _, op in ipairs({ "replace", "add" }) do
        for _, e in ipairs(c[op]) do
            local present = get(e[1]) ~= nil
            if present == (op == "replace") then
                local v, missing = J.render(e[2], lookup)
                if v == nil then
                    gw.log("debug", "request-transform: headers.", op, ".", e[1], ": no value for ", missing)
                else
                    v = tostring(v)
                    if bad_header_value(v) then
                        gw.log("info", "request-transform: headers.", op, ".", e[1],
                            ": value with CR, LF or NUL dropped")
                    else
                        set(e[1], v)
                    end
                end
            end
        end
    end
end

--- P.transform_query(c, query, lookup) -> new query string, or nil when
-- nothing changed. Pure.
function P.transform_query(c, query, lookup)
    local list = T.parse_query(query)
    local changed = false
    local function drop(name)
        local out = {}
        for _, kv in ipairs(list) do
            if kv[1] == name then changed = true else out[#out + 1] = kv end
        end
        list = out
    end
    local function has(name)
        for _, kv in ipairs(list) do if kv[1] == name then return true end end
        return false
    end
    for _, name in ipairs(c.remove) do drop(name) end
    for _, r in ipairs(c.rename) do
        for _, kv in ipairs(list) do
            if kv[1] == r[1] then kv[1], changed = r[2], true end
        end
    end
    for _, e in ipairs(c.replace) do
        if has(e[1]) then
            local v = J.render(e[2], lookup)
            if v ~= nil then
                drop(e[1])
                list[#list + 1] = { e[1], tostring(v) }
            end
        end
    end
    for _, e in ipairs(c.add) do
        if not has(e[1]) then
            local v = J.render(e[2], lookup)
            if v ~= nil then
                list[#list + 1] = { e[1], tostring(v) }
                changed = true
            end
        end
    end
    if not changed then return nil end
    return T.build_query(list)
end

--- P.transform_body(ops, body, lookup) -> new body, or nil, why it was
-- left alone. Pure.
function P.transform_body(ops, body, lookup)
    local doc, err = J.decode(body)
    if doc == nil then return nil, "not valid JSON (" .. gsub(err, "^invalid JSON: ", "") .. ")" end
    if type(doc) ~= "table" or not (J.is_array(doc) or J.is_object(doc)) then
        return nil, "not a JSON object or array"
    end
    J.apply(doc, ops, lookup)
    local out, eerr = J.encode(doc)
    if not out then return nil, "cannot encode: " .. tostring(eerr) end
    return out
end

local function is_json(ctype)
    if not ctype then return false end
    ctype = lower(ctype)
    return find(ctype, "^application/json") ~= nil or find(ctype, "^[%w.-]+/[%w.-]+%+json") ~= nil
end

local function note(ctx, why)
    gw.log("info", "request-transform: body passed untouched: ", why,
        " (route ", ctx.route and ctx.route.name or "?", ", request ", gw.request.get_id(ctx), ")")
end

local function do_body(conf, c, ctx, lookup)
    if not is_json(gw.request.get_header(ctx, "content-type")) then return end
    local n, chunked = gw.request.get_content_length(ctx)
    if n == nil and not chunked then return end
    if n == 0 then return end
    if n and n > conf.max_body then
        return note(ctx, n .. " bytes, over max_body " .. conf.max_body)
    end
    local body, err = gw.request.get_body(ctx)
    if not body then return note(ctx, "cannot read it: " .. tostring(err)) end
    if #body > conf.max_body then
        return note(ctx, #body .. " bytes, over max_body " .. conf.max_body)
    end
    if body == "" then return end
    local out, why = P.transform_body(c.json, body, lookup)
    if not out then return note(ctx, why) end
    local ok, serr = gw.request.set_body(ctx, out)
    if not ok then return note(ctx, "cannot set it: " .. tostring(serr)) end
end

function P.access(conf, ctx)
    local c = compiled_of(conf)
    local lookup = T.request_lookup(gw, ctx)
    -- The body first: its Content-Type is the client's, before any header op.
    if c.json then do_body(conf, c, ctx, lookup) end
    if c.path then
        local path, missing = J.render(c.path, lookup, T.escape_path)
        if not path or not gw.request.set_path(ctx, path) then
            gw.log("info", "request-transform: cannot build the path: ",
                missing and ("no usable value for " .. missing) or "invalid path")
            return 400, { error = "bad request" }
        end
    end
    if c.query then
        local q = P.transform_query(c.query, gw.request.get_query(ctx), lookup)
        if q then gw.request.set_query(ctx, q) end
    end
    if c.headers then
        P.transform_headers(c.headers,
            function(name)
                local all = gw.request.get_headers(ctx)[lower(name)]
                return all
            end,
            function(name, v)
                if v == nil then return gw.request.clear_header(ctx, name) end
                if type(v) == "table" then
                    gw.request.clear_header(ctx, name)
                    for _, x in ipairs(v) do gw.request.add_header(ctx, name, x) end
                else
                    gw.request.set_header(ctx, name, v)
                end
            end,
            lookup)
    end
end

return P
