-- aggregate: a backend-for-frontend route. The access phase calls several
-- upstreams in parallel (gw.http.request_multi: the same pools and balancer
-- as proxied traffic) and answers with one JSON document composed of their
-- answers; the route's own upstream or handler is never reached.
--
--   aggregate = {
--       parts = {
--           user = { upstream = "users", path = "/users/{consumer.id}" },
--           recent_orders = { upstream = "orders", path = "/orders",
--                             query = { user = "{consumer.id}", limit = "5" } },
--           recommendations = { upstream = "recs", path = "/recommendations/{consumer.id}",
--                               optional = true, timeout = 0.5 },
--       },
--       merge = "nested",        -- or "top": objects merged into the top level
--   }
--
-- A part that fails (transport error, timeout, non-2xx, invalid JSON, a
-- template without a value) makes the answer 502 naming it, unless it is
-- optional: then it is null and listed in an "errors" member. See
-- docs/plugins/aggregate.md.
local gw = require("moongate.gw")
local T = require("moongate.transform")
local J = require("moongate.json_ops")

local type, pairs, ipairs, setmetatable, getmetatable, tostring = type, pairs, ipairs, setmetatable,
    getmetatable, tostring
local find, sub = string.find, string.sub

local TEMPLATES = { type = "map", values = { type = "string", description = "a template" },
    description = "name -> value (a template)" }

local PART = {
    type = "table", description = "one upstream call",
    fields = {
        upstream = { type = "string", min_len = 1, description = "an upstream of the config (or url)" },
        url = { type = "string", min_len = 1,
            description = "http://ip:port/path, the path a template (or upstream)" },
        method = { type = "string", default = "GET", pattern = "^%u+$", description = "HTTP method" },
        path = { type = "string", default = "/", description = "with upstream: the path, a template" },
        query = TEMPLATES,
        headers = TEMPLATES,
        body = { type = "any",
            description = "a string template, or a table sent as JSON (string values are templates)" },
        timeout = { type = "number", default = 5, min = 0.001, description = "seconds for this call" },
        optional = { type = "boolean", default = false,
            description = "a failure makes this part null (listed in errors) instead of a 502" },
        select = { type = "string", min_len = 1,
            description = "use only this field of the answer (a path: data.items)" },
    },
}

local compiled = setmetatable({}, { __mode = "k" })

local function compile_body(v, field, cache)
    if type(v) == "string" then
        if not cache[v] then
            local tpl, err = J.compile_template(v)
            if not tpl then return nil, field .. ": " .. err end
            cache[v] = tpl
        end
        return true
    elseif type(v) == "table" then
        for k, x in pairs(v) do
            local ok, err = compile_body(x, field .. "." .. tostring(k), cache)
            if not ok then return nil, err end
        end
    end
    return true
end

local sorted = J.sorted_keys

-- conf -> { parts = { { name =, ... compiled } }, merge = } or nil, err
local function compile(conf)
    local c = { merge = conf.merge, parts = {} }
    local names = sorted(conf.parts)
    if #names == 0 then return nil, "parts: at least one part is needed" end
    for _, name in ipairs(names) do
        local p, f = conf.parts[name], "parts." .. name
        if not find(name, "^[%a_][%w_-]*$") then
            return nil, f .. ": a part name is a letter or _ then letters, digits, _ or -"
        end
        if name == "errors" then return nil, f .. ": \"errors\" is the name of the failures member" end
        if (p.upstream == nil) == (p.url == nil) then
            return nil, f .. ": needs exactly one of upstream and url"
        end
        local cp = { name = name, upstream = p.upstream, method = p.method, timeout = p.timeout,
            optional = p.optional, query = {}, headers = {}, body = p.body, body_tpls = {} }
        local src, sfield = p.path, f .. ".path"
        if p.url then
            if not find(p.url, "^http://[^/{}]+/") and not find(p.url, "^http://[^/{}]+$") then
                return nil, f .. ".url: must be http://ip:port/path (templates only in the path)"
            end
            src, sfield = p.url, f .. ".url"
        elseif sub(p.path, 1, 1) ~= "/" then
            return nil, f .. ".path: must start with /"
        end
        if find(src, "[%s%z]") then return nil, sfield .. ": no spaces or control characters" end
        local tpl, err = J.compile_template(src)
        if not tpl then return nil, sfield .. ": " .. err end
        cp.target = tpl
        for _, q in ipairs(sorted(p.query)) do
            local qt, qerr = J.compile_template(p.query[q])
            if not qt then return nil, f .. ".query." .. q .. ": " .. qerr end
            cp.query[#cp.query + 1] = { q, qt }
        end
        for _, h in ipairs(sorted(p.headers)) do
            if not find(h, "^[%w!#$%%&'*+.^_`|~-]+$") then return nil, f .. ".headers." .. h .. ": invalid name" end
            local l = h:lower()
            if l == "content-length" or l == "transfer-encoding" or l == "connection" then
                return nil, f .. ".headers." .. h .. ": set by the gateway"
            end
            local ht, herr = J.compile_template(p.headers[h])
            if not ht then return nil, f .. ".headers." .. h .. ": " .. herr end
            cp.headers[#cp.headers + 1] = { h, ht }
        end
        if p.body ~= nil then
            if type(p.body) ~= "string" and type(p.body) ~= "table" then
                return nil, f .. ".body: expected a string or a table"
            end
            local ok, berr = compile_body(p.body, f .. ".body", cp.body_tpls)
            if not ok then return nil, berr end
        end
        if p.select then
            local segs, serr = J.parse_path(p.select)
            if not segs then return nil, f .. ".select: " .. serr end
            for _, s in ipairs(segs) do
                if s == J.STAR then return nil, f .. ".select: [*] cannot be selected" end
            end
            cp.select = segs
        end
        c.parts[#c.parts + 1] = cp
    end
    return c
end

local P = {
    name = "aggregate",
    priority = 100, -- last in access: after authentication, acl, rate limits, transforms
    schema = {
        fields = {
            parts = { type = "map", required = true, values = PART,
                description = "name -> upstream call; the answer has one member per part" },
            merge = { type = "string", default = "nested", enum = { "nested", "top" },
                description = "nested: each part under its name; top: objects merged at the top level" },
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

local function render_body(v, tpls, lookup)
    if type(v) == "string" then return J.render(tpls[v], lookup) end
    if type(v) ~= "table" then return v end
    local out = {}
    for k, x in pairs(v) do
        local r, missing = render_body(x, tpls, lookup)
        if r == nil then return nil, missing end
        out[k] = r
    end
    return setmetatable(out, getmetatable(v)) -- json_ops.EMPTY_ARRAY stays `[]`
end

-- The gw.http request of a part, or nil, why it cannot be made.
local function build(cp, lookup, request_id)
    local target, missing = J.render(cp.target, lookup, T.escape_path)
    if not target then return nil, "no usable value for " .. missing end
    local req = { method = cp.method, timeout = cp.timeout, headers = {} }
    if cp.upstream then
        req.upstream, req.path = cp.upstream, target
    else
        req.url = target
    end
    if #cp.query > 0 then
        local q = {}
        for _, e in ipairs(cp.query) do
            local v, m = J.render(e[2], lookup)
            if v == nil then return nil, "no usable value for " .. m end
            q[#q + 1] = { e[1], tostring(v) }
        end
        local qs = T.build_query(q)
        req.path = nil
        if req.url then
            req.url = req.url .. (find(req.url, "?", 1, true) and "&" or "?") .. qs
        else
            req.path = target .. (find(target, "?", 1, true) and "&" or "?") .. qs
        end
    end
    local has_id = false
    for _, e in ipairs(cp.headers) do
        local v, m = J.render(e[2], lookup)
        if v == nil then return nil, "no usable value for " .. m end
        v = tostring(v)
        if find(v, "[\r\n%z]") then return nil, "header " .. e[1] .. ": value with CR, LF or NUL" end
        req.headers[e[1]] = v
        has_id = has_id or e[1]:lower() == "x-request-id"
    end
    if request_id and not has_id then req.headers["X-Request-Id"] = request_id end
    if cp.body ~= nil then
        local b, m = render_body(cp.body, cp.body_tpls, lookup)
        if b == nil then return nil, "no usable value for " .. m end
        if type(b) == "table" then
            local text, err = J.encode(b)
            if not text then return nil, "body: " .. tostring(err) end
            b = text
            local has_type = false
            for _, e in ipairs(cp.headers) do has_type = has_type or e[1]:lower() == "content-type" end
            if not has_type then req.headers["Content-Type"] = "application/json" end
        end
        req.body = tostring(b)
    end
    return req
end

-- A part's value from its response, or nil, why it failed.
local function value_of(cp, res, err)
    if not res then return nil, tostring(err or "failed") end
    if res.status < 200 or res.status > 299 then return nil, "status " .. res.status end
    if res.status == 204 or res.body == "" then return J.null end
    local doc, derr = J.decode(res.body)
    if doc == nil then return nil, derr end -- "invalid JSON: why at byte N"
    if cp.select then
        doc = J.select(doc, cp.select)
        if doc == nil then doc = J.null end
    end
    return doc
end

--- P.run(c, lookup, request_multi[, request_id]) -> status, body (JSON
-- text), headers. `c` is a compiled config (P.compile), lookup(source,
-- name) feeds the templates, request_multi is gw.http.request_multi (or a
-- fake in specs).
function P.run(c, lookup, request_multi, request_id)
    local reqs, idx, failed = {}, {}, {}
    for i, cp in ipairs(c.parts) do
        local req, why = build(cp, lookup, request_id)
        if req then
            reqs[#reqs + 1] = req
            idx[#reqs] = i
        else
            failed[i] = why
        end
    end
    local responses, errs = {}, {}
    if #reqs > 0 then
        local res, e = request_multi(reqs)
        if not res then
            for n = 1, #reqs do failed[idx[n]] = tostring(e or "cannot start requests") end
        else
            for n = 1, #reqs do responses[idx[n]], errs[idx[n]] = res[n], e and e[n] end
        end
    end
    local values, errors, any_error, first_required = {}, {}, false, nil
    for i, cp in ipairs(c.parts) do
        local v, why
        if failed[i] then
            why = failed[i]
        else
            v, why = value_of(cp, responses[i], errs[i])
        end
        if v == nil then
            errors[cp.name], any_error = why, true
            values[i] = J.null
            if not cp.optional and not first_required then first_required = cp end
        else
            values[i] = v
        end
    end
    local headers = { ["Content-Type"] = "application/json" }
    if first_required then
        local name = first_required.name
        local body = J.encode({ error = "part " .. name .. " failed: " .. errors[name],
            part = name, reason = errors[name], errors = errors })
        return 502, body .. "\n", headers
    end
    local out = {}
    for i, cp in ipairs(c.parts) do
        local v = values[i]
        if c.merge == "top" and J.is_object(v) then
            for k, x in pairs(v) do out[k] = x end
        else
            out[cp.name] = v
        end
    end
    if any_error then out.errors = errors end
    local body, err = J.encode(out)
    if not body then error("aggregate: cannot encode the answer: " .. tostring(err), 0) end
    return 200, body .. "\n", headers
end

function P.access(conf, ctx)
    local c = compiled[conf]
    if not c then
        c = assert(compile(conf))
        compiled[conf] = c
    end
    local status, body, headers = P.run(c, T.request_lookup(gw, ctx), gw.http.request_multi,
        gw.request.get_id(ctx))
    if status ~= 200 then
        gw.log("warn", "aggregate: ", ctx.route and ctx.route.name or "?", ": ", body:sub(1, 300))
    end
    return status, body, headers
end

return P
