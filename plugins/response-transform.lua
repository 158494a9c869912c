-- response-transform: changes the response's headers (header_filter) and
-- its JSON body (body_filter) on the way to the client.
--
--   ["response-transform"] = {
--       header_remove = { "Server" },  header_add = { ["X-Via"] = "moongate" },
--       json_rename = { userId = "id", userName = "name", userEmail = "email" },
--       json_remove = { "password", "items[*].internal" },
--       json_add = { ["meta.consumer"] = "{consumer.id}" },
--   }
--
-- Headers: remove, then rename, then replace (only present ones), then add
-- (only absent ones). JSON: remove, rename, replace, add, then keep (see
-- lua/moongate/json_ops.lua for paths: `a.b.c`, `items[*].id`; a name that
-- meets an array applies to each element). String values may hold
-- templates: {consumer.id}, {consumer.claims.sub}, {header.x-tenant} (the
-- request's), {param.id} (a route parameter), {query.page}; an unknown one
-- is "" (json_ops' loose templates, transform.request_lookup's values).
--
-- The JSON body is held back until it is complete (up to max_body_size),
-- then transformed and sent with chunked framing. gzip and br bodies are
-- decoded, transformed and encoded again with the same coding. Whatever
-- cannot be transformed goes out exactly as the upstream sent it, with a
-- log line: a type that is not JSON, another Content-Encoding, a body over
-- max_body_size (from Content-Length, while it streams, or once decoded),
-- invalid JSON or corrupt compressed data.
local gw = require("moongate.gw")
local J = require("moongate.json_ops")
local T = require("moongate.transform")
local zlib = require("moongate.zlib")
local brotli = require("moongate.brotli")

local type, pairs, ipairs, tonumber, tostring, setmetatable, error = type, pairs, ipairs,
    tonumber, tostring, setmetatable, error
local find, lower, match, gsub, sub, concat = string.find, string.lower, string.match,
    string.gsub, string.sub, table.concat

local TOKEN = "^[!#$%%&'*+.^_`|~%w-]+$" -- an HTTP header name
local STRINGS = { type = "array", items = { type = "string", min_len = 1 } }
local STRING_MAP = { type = "map", values = { type = "string" } }

local P, header_plan -- the schema's check uses P.json_ops and header_plan
P = {
    name = "response-transform",
    -- Above compression (-1000): it transforms the body before anything
    -- compresses it, and clears Content-Length before compression decides.
    priority = 800,
    schema = {
        fields = {
            header_remove = { type = "array", items = STRINGS.items, default = {},
                description = "response headers to remove" },
            header_rename = { type = "map", values = STRINGS.items, default = {},
                description = "response headers to rename: old name -> new name" },
            header_replace = { type = "map", values = STRING_MAP.values, default = {},
                description = "response headers to replace, when the upstream sent them: "
                    .. "name -> value (templates allowed)" },
            header_add = { type = "map", values = STRING_MAP.values, default = {},
                description = "response headers to add, when the upstream did not send them: "
                    .. "name -> value (templates allowed)" },
            json_remove = { type = "array", items = STRINGS.items, default = {},
                description = "JSON paths to remove" },
            json_rename = { type = "map", values = STRINGS.items, default = {},
                description = "JSON paths to rename: path -> new member name" },
            json_replace = { type = "map", values = { type = "any", description = "new value" },
                default = {},
                description = "JSON paths to replace where present: path -> value" },
            json_add = { type = "map", values = { type = "any", description = "value" },
                default = {},
                description = "JSON paths to add where absent: path -> value" },
            json_keep = { type = "array", items = STRINGS.items,
                description = "if set, only these JSON paths are kept (applied last)" },
            types = { type = "array", items = STRINGS.items,
                default = { "application/json", "application/*+json" },
                description = "media types whose body is transformed (\"*\" matches within "
                    .. "a part)" },
            statuses = { type = "array", items = { type = "integer", min = 100, max = 599 },
                description = "if set, only responses with these statuses get their JSON body "
                    .. "transformed (header operations apply to all)" },
            max_body_size = { type = "integer", default = 1024 * 1024, min = 1,
                description = "bodies over this many bytes (compressed or decoded) pass "
                    .. "untouched" },
        },
        check = function(conf)
            local ops, err = P.json_ops(conf)
            if not ops then return nil, err end
            header_plan(conf) -- loose templates cannot fail
            for name, to in pairs(conf.header_rename) do
                if not find(name, TOKEN) or not find(to, TOKEN) then
                    return nil, "header_rename: not a header name: " .. name .. " -> " .. to
                end
            end
            return true
        end,
    },
}

local sorted_keys = J.sorted_keys

-- The documented order of the JSON operations; paths in json_ops' spread
-- dialect (a name that meets an array applies to each element, `*` also
-- walks an object's members), templates loose ({header.x}, {param.id};
-- a missing value is "").
local JSON_ORDER = { "remove", "rename", "replace", "add", "keep" }
local JSON_OPTS = { spread = true, loose = true }

local compiled = setmetatable({}, { __mode = "k" })

--- P.json_ops(conf) -> the compiled json_ops plan for a config, or nil,
-- err naming the field (json_rename.a..b: ...). Cached per config.
function P.json_ops(conf)
    local c = compiled[conf]
    if c then return c end
    local ops, err = J.compile_groups({ remove = conf.json_remove, rename = conf.json_rename,
        replace = conf.json_replace, add = conf.json_add, keep = conf.json_keep },
        JSON_ORDER, "json_", JSON_OPTS)
    if not ops then return nil, err end
    compiled[conf] = ops
    return ops
end

-- The header templates of a config, compiled once: { name, template }
-- lists in name order.
local header_plans = setmetatable({}, { __mode = "k" })

function header_plan(conf)
    local h = header_plans[conf]
    if h then return h end
    h = { rename = sorted_keys(conf.header_rename), replace = {}, add = {} }
    for _, kind in ipairs({ "replace", "add" }) do
        local map = conf["header_" .. kind]
        for _, name in ipairs(sorted_keys(map)) do
            h[kind][#h[kind] + 1] = { name, assert(J.compile_template(map[name], true)) }
        end
    end
    header_plans[conf] = h
    return h
end

-- ------------------------------------------------------------ matching

local type_patterns = setmetatable({}, { __mode = "k" })

--- P.type_matches(conf, content_type) -> true when the media type (before
-- any parameter) matches an entry of conf.types.
function P.type_matches(conf, ctype)
    if type(ctype) ~= "string" then return false end
    local mt = lower(match(ctype, "^%s*([^;%s]+)") or "")
    local pats = type_patterns[conf]
    if not pats then
        pats = {}
        for i, t in ipairs(conf.types) do
            pats[i] = "^" .. gsub(gsub(lower(t), "[%^%$%(%)%%%.%[%]%+%-%?]", "%%%0"), "%*", "[^/]*")
                .. "$"
        end
        type_patterns[conf] = pats
    end
    for _, p in ipairs(pats) do
        if find(mt, p) then return true end
    end
    return false
end

local status_sets = setmetatable({}, { __mode = "k" })

--- P.status_listed(conf, status) -> true when conf.statuses lists it.
function P.status_listed(conf, status)
    local set = status_sets[conf]
    if not set then
        set = {}
        for _, s in ipairs(conf.statuses or {}) do set[s] = true end
        status_sets[conf] = set
    end
    return set[status] == true
end

local CODINGS = { gzip = "gzip", ["x-gzip"] = "gzip", br = "br" }

-- A header value from a template: the request's own bytes (a query
-- parameter decodes to anything) must not smuggle CR, LF or NUL into the
-- response head, and must not turn into a 500 either: they are dropped.
local function header_value(tpl, lookup)
    return (gsub(J.render(tpl, lookup), "[%z\r\n]", ""))
end

local function note(level, ctx, what)
    gw.log(level, "response-transform: route ", ctx.route and ctx.route.name or "?", ": ",
        what, "; body passed untouched")
end

-- ------------------------------------------------------------ phases

local function header_ops(conf, ctx)
    local R = gw.response
    local plan = header_plan(conf)
    for _, name in ipairs(conf.header_remove) do R.clear_header(ctx, name) end
    local lookup
    for _, old in ipairs(plan.rename) do
        local v = R.get_headers(ctx)[lower(old)]
        if v ~= nil then
            R.clear_header(ctx, old)
            if type(v) == "table" then
                for _, x in ipairs(v) do R.add_header(ctx, conf.header_rename[old], x) end
            else
                R.set_header(ctx, conf.header_rename[old], v)
            end
        end
    end
    for _, e in ipairs(plan.replace) do
        if R.get_header(ctx, e[1]) ~= nil then
            lookup = lookup or T.request_lookup(gw, ctx)
            R.set_header(ctx, e[1], header_value(e[2], lookup))
        end
    end
    for _, e in ipairs(plan.add) do
        if R.get_header(ctx, e[1]) == nil then
            lookup = lookup or T.request_lookup(gw, ctx)
            R.set_header(ctx, e[1], header_value(e[2], lookup))
        end
    end
end

function P.header_filter(conf, ctx)
    header_ops(conf, ctx)
    local ops = P.json_ops(conf)
    if #ops == 0 then return end
    local status = gw.response.get_status(ctx)
    if gw.request.get_method(ctx) == "HEAD" or status < 200 or status == 204 or status == 304 then
        return
    end
    if conf.statuses and not P.status_listed(conf, status) then return end
    local h = gw.response.get_headers(ctx)
    if status == 206 or h["content-range"] then return end
    local ctype = h["content-type"]
    if type(ctype) == "table" then ctype = ctype[1] end
    if not P.type_matches(conf, ctype) then
        note("info", ctx, "not JSON (Content-Type " .. tostring(ctype) .. ")")
        return
    end
    local ce, coding = h["content-encoding"], nil
    if type(ce) == "table" then ce = concat(ce, ", ") end
    if ce and lower(ce) ~= "identity" then
        coding = CODINGS[lower(match(ce, "^%s*(.-)%s*$"))]
        if not coding then
            note("warn", ctx, "Content-Encoding " .. ce .. " is not gzip or br")
            return
        end
    end
    local len = tonumber(h["content-length"] or nil)
    if len and len > conf.max_body_size then
        note("warn", ctx, "body of " .. len .. " bytes is over max_body_size")
        return
    end
    gw.response.clear_header(ctx, "Content-Length")
    gw.response.clear_header(ctx, "Accept-Ranges")
    local etag = h["etag"]
    if type(etag) == "string" and sub(etag, 1, 2) ~= "W/" then
        gw.response.set_header(ctx, "ETag", "W/" .. etag)
    end
    ctx.var.response_transform = { parts = {}, n = 0, size = 0, coding = coding }
end

--- P.transform_body(conf, body, coding, lookup) -> new body, or nil, why
-- (then the original goes out).
function P.transform_body(conf, body, coding, lookup)
    local text, err = body, nil
    if coding == "gzip" then
        text, err = zlib.gunzip(body, conf.max_body_size)
    elseif coding == "br" then
        text, err = brotli.decompress(body, conf.max_body_size)
    end
    if not text then
        if err and find(err, "output too large", 1, true) then
            return nil, "decoded body is over max_body_size"
        end
        return nil, "cannot decode the " .. coding .. " body: " .. tostring(err)
    end
    local doc
    doc, err = J.decode(text)
    if doc == nil then return nil, err end
    doc, err = J.apply(doc, P.json_ops(conf), lookup)
    if doc == nil then return nil, err end
    local out
    out, err = J.encode(doc)
    if not out then return nil, "cannot encode the result: " .. err end
    if coding == "gzip" then
        out, err = zlib.gzip(out, 6)
    elseif coding == "br" then
        out, err = brotli.compress(out, 5)
    end
    if not out then return nil, "cannot encode the result as " .. coding .. ": " .. err end
    return out
end

function P.body_filter(conf, ctx, chunk, eof)
    local st = ctx.var.response_transform
    if not st or st.passthrough then return nil end
    st.size = st.size + #chunk
    if st.size > conf.max_body_size then
        -- Too big to hold: send what was held back and the rest as it comes.
        note("warn", ctx, "body over max_body_size (" .. conf.max_body_size .. " bytes)")
        st.passthrough = true
        local held = concat(st.parts, "", 1, st.n) .. chunk
        st.parts = nil
        return held
    end
    st.n = st.n + 1
    st.parts[st.n] = chunk
    if not eof then return "" end
    local body = concat(st.parts, "", 1, st.n)
    ctx.var.response_transform = nil
    if body == "" then return "" end
    local out, why = P.transform_body(conf, body, st.coding, T.request_lookup(gw, ctx))
    if not out then
        note("warn", ctx, why)
        return body
    end
    return out
end

return P
