-- cors: Cross-Origin Resource Sharing. Answers preflight requests (OPTIONS
-- with Origin and Access-Control-Request-Method) itself with 204 from
-- access, without reaching the upstream; on other requests from an allowed
-- Origin adds Access-Control-Allow-Origin (and credentials, exposed
-- headers) in header_filter. Vary: Origin is always added.
--
--   cors = { origins = { "https://app.example.com", "*.example.com" },
--            credentials = true, expose_headers = { "X-Total" }, max_age = 600 }
--
-- origins entries: "*" (any origin; refused together with credentials),
-- an exact origin ("https://a.example.com:8443"), or "*.example.com" /
-- "https://*.example.com" (any subdomain, not example.com itself; without a
-- scheme http and https both match; a port must then be given to match).
-- origin_patterns: Lua patterns matched against the whole Origin.
-- An Origin that matches nothing gets no CORS headers at all: the gateway
-- never reflects an arbitrary Origin, with or without credentials.
local gw = require("moongate.gw")

local type, ipairs, pcall, setmetatable, tostring = type, ipairs, pcall, setmetatable, tostring
local find, sub, lower, upper, concat, gsub = string.find, string.sub, string.lower,
    string.upper, table.concat, string.gsub

local STRINGS = { type = "array", items = { type = "string", min_len = 1 } }

--- check_pattern(p) (P.check_pattern) -> true, or nil, why: a syntax check of a Lua pattern
-- (Lua itself only notices a malformed pattern when a match reaches the bad
-- part, so a config could pass a test string and fail on a request).
local function check_pattern(p)
    local i, n, depth = 1, #p, 0
    while i <= n do
        local c = sub(p, i, i)
        if c == "%" then
            local d = sub(p, i + 1, i + 1)
            if d == "" then return nil, "ends with %" end
            if d == "b" then
                if i + 3 > n then return nil, "%b needs two characters" end
                i = i + 4
            elseif d == "f" then
                if sub(p, i + 2, i + 2) ~= "[" then return nil, "%f needs a [set]" end
                i = i + 2
            else
                i = i + 2
            end
        elseif c == "[" then
            local j = i + 1
            if sub(p, j, j) == "^" then j = j + 1 end
            if sub(p, j, j) == "]" then j = j + 1 end
            while true do
                if j > n then return nil, "missing ]" end
                local e = sub(p, j, j)
                if e == "%" then
                    if j == n then return nil, "missing ]" end
                    j = j + 2
                elseif e == "]" then
                    break
                else
                    j = j + 1
                end
            end
            i = j + 1
        elseif c == "(" then
            depth, i = depth + 1, i + 1
        elseif c == ")" then
            depth, i = depth - 1, i + 1
            if depth < 0 then return nil, "unbalanced )" end
        else
            i = i + 1
        end
    end
    if depth ~= 0 then return nil, "unbalanced (" end
    local ok, err = pcall(find, "", p)
    if not ok then return nil, tostring(err) end
    return true
end

local P = {
    name = "cors",
    priority = 4000, -- before authentication: a preflight carries no credentials
    schema = {
        fields = {
            origins = { type = "array", items = STRINGS.items, default = {},
                description = "allowed origins: exact, \"*.example.com\" subdomains, or \"*\"" },
            origin_patterns = { type = "array", items = STRINGS.items, default = {},
                description = "Lua patterns an allowed Origin matches in full" },
            methods = { type = "array", items = STRINGS.items,
                default = { "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE" },
                description = "methods allowed in a preflight answer" },
            headers = { type = "array", items = STRINGS.items,
                description = "request headers allowed; not set: the preflight's requested ones" },
            expose_headers = { type = "array", items = STRINGS.items, default = {},
                description = "response headers the browser may expose to scripts" },
            credentials = { type = "boolean", default = false,
                description = "send Access-Control-Allow-Credentials: true" },
            max_age = { type = "integer", default = 600, min = 0,
                description = "seconds a browser may cache a preflight answer" },
        },
        check = function(conf)
            for _, o in ipairs(conf.origins) do
                if o == "*" and conf.credentials then
                    return nil, "origins \"*\" cannot be combined with credentials"
                end
                local rest = o:match("^%a[%w+.-]*://(.*)$") or o
                if o ~= "*" and find(o, "*", 1, true)
                    and (sub(rest, 1, 2) ~= "*." or find(rest, "*", 2, true)) then
                    return nil, "origins: \"*\" only as a leading \"*.\" label: " .. o
                end
            end
            for _, p in ipairs(conf.origin_patterns) do
                local ok, err = check_pattern(p)
                if not ok then return nil, "origin_patterns: bad pattern " .. p .. ": " .. err end
            end
            if #conf.origins == 0 and #conf.origin_patterns == 0 then
                return nil, "needs origins or origin_patterns"
            end
            return true
        end,
    },
    check_pattern = check_pattern,
}

-- conf -> { any =, exact = set, wild = { { scheme =, suffix = } }, patterns =,
-- methods = "GET,...", expose = "...", headers = "..." or nil }
local compiled = setmetatable({}, { __mode = "k" })

local function compile(conf)
    local c = compiled[conf]
    if c then return c end
    c = { exact = {}, wild = {}, patterns = {} }
    for _, o in ipairs(conf.origins) do
        if o == "*" then
            c.any = true
        else
            local scheme, rest = o:match("^(%a[%w+.-]*)://(.*)$")
            rest = rest or o
            if sub(rest, 1, 2) == "*." then
                c.wild[#c.wild + 1] = { scheme = scheme and lower(scheme), suffix = lower(sub(rest, 2)) }
            else
                c.exact[lower(o)] = true
            end
        end
    end
    for i, p in ipairs(conf.origin_patterns) do
        if sub(p, 1, 1) ~= "^" then p = "^" .. p end
        if sub(p, -1) ~= "$" or sub(p, -2) == "%$" then p = p .. "$" end
        c.patterns[i] = p
    end
    local m = {}
    for i, v in ipairs(conf.methods) do m[i] = upper(v) end
    c.methods = concat(m, ",")
    c.expose = #conf.expose_headers > 0 and concat(conf.expose_headers, ",") or nil
    c.headers = conf.headers and concat(conf.headers, ",") or nil
    compiled[conf] = c
    return c
end

--- P.origin_allowed(conf, origin) -> true when the Origin header value is
-- allowed by an exact entry, a "*." wildcard, a pattern or "*".
function P.origin_allowed(conf, origin)
    if type(origin) ~= "string" or origin == "" then return false end
    local c = compile(conf)
    if c.any then return true end
    local o = lower(origin)
    if c.exact[o] then return true end
    if #c.wild > 0 then
        local scheme, host = o:match("^(%a[%w+.-]*)://([%w.:%-%[%]]+)$")
        if scheme then
            for _, w in ipairs(c.wild) do
                local ok_scheme = w.scheme == scheme
                    or (not w.scheme and (scheme == "http" or scheme == "https"))
                -- host[:port] must end with ".suffix" and have a label before it
                if ok_scheme and #host > #w.suffix and sub(host, -#w.suffix) == w.suffix
                    and find(sub(host, 1, -#w.suffix - 1), "^[%w%-%.]*[%w%-]$") then
                    return true
                end
            end
        end
    end
    for _, p in ipairs(c.patterns) do
        if find(origin, p) then return true end
    end
    return false
end

--- P.allow_origin_value(conf, origin) -> the Access-Control-Allow-Origin
-- value for this Origin, or nil when it gets no CORS headers.
function P.allow_origin_value(conf, origin)
    if not P.origin_allowed(conf, origin) then return nil end
    if compile(conf).any and not conf.credentials then return "*" end
    return origin
end

--- P.preflight_headers(conf, origin, req_method, req_headers) -> headers table
-- for the 204 answer (only Vary when the origin is not allowed).
function P.preflight_headers(conf, origin, req_method, req_headers)
    local h = { Vary = "Origin" }
    local acao = P.allow_origin_value(conf, origin)
    if not acao then return h end
    local c = compile(conf)
    h["Access-Control-Allow-Origin"] = acao
    h["Access-Control-Allow-Methods"] = c.methods
    local allow_h = c.headers
    if not allow_h and req_headers and not find(req_headers, "[\r\n%z]") then
        allow_h = req_headers
        h.Vary = "Origin, Access-Control-Request-Headers"
    end
    if allow_h and allow_h ~= "" then h["Access-Control-Allow-Headers"] = allow_h end
    h["Access-Control-Max-Age"] = tostring(conf.max_age)
    if conf.credentials then h["Access-Control-Allow-Credentials"] = "true" end
    return h
end

function P.access(conf, ctx)
    if gw.request.get_method(ctx) ~= "OPTIONS" then return end
    local origin = gw.request.get_header(ctx, "origin")
    local req_method = gw.request.get_header(ctx, "access-control-request-method")
    if not origin or not req_method then return end
    ctx.var.cors_preflight = true
    return 204, nil, P.preflight_headers(conf, origin, req_method,
        gw.request.get_header(ctx, "access-control-request-headers"))
end

local function add_vary(ctx, value)
    local v = gw.response.get_header(ctx, "vary")
    if not v or v == "" then
        gw.response.set_header(ctx, "Vary", value)
    elseif v ~= "*" and not find("," .. gsub(lower(v), "%s", "") .. ",", "," .. lower(value) .. ",", 1, true) then
        gw.response.set_header(ctx, "Vary", v .. ", " .. value)
    end
end

function P.header_filter(conf, ctx)
    if ctx.var.cors_preflight then return end
    add_vary(ctx, "Origin")
    local origin = gw.request.get_header(ctx, "origin")
    local acao = origin and P.allow_origin_value(conf, origin)
    if not acao then return end
    gw.response.set_header(ctx, "Access-Control-Allow-Origin", acao)
    if conf.credentials then
        gw.response.set_header(ctx, "Access-Control-Allow-Credentials", "true")
    end
    local c = compile(conf)
    if c.expose then gw.response.set_header(ctx, "Access-Control-Expose-Headers", c.expose) end
end

return P
