-- cache: an HTTP response cache shared by every worker (a shared dict) or
-- by every gateway (Redis). Stores GET responses with cacheable statuses
-- for a TTL taken from Cache-Control/Expires (or the config); never stores
-- no-store/private/no-cache responses, Set-Cookie responses, or answers to
-- requests with credentials unless the route keys them by consumer. Keys:
-- host, normalized path, sorted query, configured request headers, the
-- consumer (opt-in) and the upstream's Vary (a per-URL vary record, then a
-- second lookup, as nginx and Varnish do). Concurrent misses of one key
-- make one upstream request (a lock in the shared dict; the others poll).
-- Stale entries are served while one background refresh runs
-- (stale-while-revalidate) and in place of an upstream 5xx
-- (stale-if-error). PURGE requests from allowed addresses delete entries.
-- Documented in docs/plugins/cache.md (key format, purge, limits).
local gw = require("moongate.gw")
local runtime = require("moongate.runtime")

local type, pairs, ipairs, tonumber, tostring, pcall = type, pairs, ipairs, tonumber, tostring, pcall
local setmetatable, unpack = setmetatable, unpack
local concat, sort = table.concat, table.sort
local find, sub, lower, gsub, gmatch, match = string.find, string.sub, string.lower,
    string.gsub, string.gmatch, string.match
local floor, min, max = math.floor, math.min, math.max
local format = string.format
local req, resp = gw.request, gw.response

-- ip matching is the ip-restriction plugin's (the built-in file).
local ipr = dofile(runtime.root .. "/plugins/ip-restriction.lua")

local P = {
    name = "cache",
    priority = 100, -- after auth (key-auth 1050, jwt-auth), acl and rate-limit
    schema = {
        fields = {
            storage = { type = "string", default = "shared", enum = { "shared", "redis" },
                description = "where entries live: a shared dict, or Redis (shared by gateways)" },
            zone = { type = "string", default = "cache", min_len = 1,
                description = "shared dict for entries (storage shared) and, always, the locks" },
            key_prefix = { type = "string", default = "cache:",
                description = "prefix of every entry key (Redis key prefix too)" },
            methods = { type = "array", default = { "GET", "HEAD" },
                items = { type = "string", enum = { "GET", "HEAD" }, description = "a method" },
                description = "methods served from the cache (HEAD is answered from GET entries)" },
            statuses = { type = "array", default = { 200, 203, 301, 404, 410 },
                items = { type = "integer", min = 100, max = 599, description = "a status" },
                description = "response statuses that may be stored" },
            ttl = { type = "number", default = 60, min = 0.001,
                description = "seconds an entry is fresh when the upstream says nothing" },
            respect_cache_control = { type = "boolean", default = true,
                description = "upstream s-maxage, max-age, Expires and stale-* override ttl" },
            ignore_query = { type = "array", default = {},
                items = { type = "string", min_len = 1, description = "a parameter name" },
                description = "query parameters left out of the key (e.g. utm_source)" },
            key_headers = { type = "array", default = {},
                items = { type = "string", pattern = "^[%w!#$%%&'*+.^_`|~-]+$",
                          description = "a header name" },
                description = "request headers whose values are part of the key" },
            vary_by_consumer = { type = "boolean", default = false,
                description = "cache requests with credentials, keyed by ctx.consumer.id" },
            honor_client_no_cache = { type = "boolean", default = false,
                description = "client Cache-Control no-cache refetches, no-store bypasses" },
            max_entry_size = { type = "integer", default = 1048576, min = 0,
                description = "largest body stored, bytes; larger ones stream through" },
            collapse = { type = "boolean", default = true,
                description = "concurrent misses of one key make one upstream request" },
            lock_timeout = { type = "number", default = 5, min = 0.001,
                description = "seconds a collapsed request waits before going upstream itself" },
            stale_while_revalidate = { type = "number", default = 0, min = 0,
                description = "seconds past expiry an entry is served while it is refreshed" },
            stale_if_error = { type = "number", default = 0, min = 0,
                description = "seconds past expiry an entry replaces an upstream 5xx" },
            allow_purge = { type = "boolean", default = false,
                description = "answer PURGE requests (exact URL, or a prefix ending in *)" },
            purge_allow = { type = "array", default = { "127.0.0.1", "::1" },
                items = { type = "string", description = "an address or CIDR" },
                description = "client addresses allowed to PURGE" },
        },
    },
}

function P.schema.check(conf)
    for _, c in ipairs(conf.purge_allow) do
        local ok, err = ipr.parse_cidr(c)
        if not ok then return nil, "purge_allow: " .. err end
    end
    return true
end

-- ------------------------------------------------------------ per config

local compiled = setmetatable({}, { __mode = "k" })

local function setup(conf)
    local c = compiled[conf]
    if c then return c end
    c = { methods = {}, statuses = {}, ignore = {}, headers = {},
          purge = { allow = conf.purge_allow } }
    for _, m in ipairs(conf.methods) do c.methods[m] = true end
    for _, s in ipairs(conf.statuses) do c.statuses[s] = true end
    for _, q in ipairs(conf.ignore_query) do c.ignore[q] = true end
    for i, h in ipairs(conf.key_headers) do c.headers[i] = lower(h) end
    sort(c.headers)
    compiled[conf] = c
    return c
end

-- ------------------------------------------------------------ parsing

--- P.parse_cache_control("max-age=60, private") -> { ["max-age"] = "60", private = true }
function P.parse_cache_control(v)
    local out = {}
    if type(v) == "table" then v = concat(v, ",") end
    if type(v) ~= "string" then return out end
    for part in gmatch(v, "[^,]+") do
        local name, val = match(part, "^%s*([^=%s]+)%s*=%s*\"?([^\"]*)\"?%s*$")
        if name then
            out[lower(name)] = val
        else
            name = match(part, "^%s*(%S+)%s*$")
            if name then out[lower(name)] = true end
        end
    end
    return out
end

-- seconds of a delta-seconds directive, or nil
local function delta(v)
    if type(v) ~= "string" or not find(v, "^%d+$") then return nil end
    return tonumber(v)
end

local MONTHS = { jan = 1, feb = 2, mar = 3, apr = 4, may = 5, jun = 6,
                 jul = 7, aug = 8, sep = 9, oct = 10, nov = 11, dec = 12 }

-- days since 1970-01-01 of a civil date (Howard Hinnant's algorithm)
local function days(y, m, d)
    if m <= 2 then y = y - 1 end
    local era = floor(y / 400)
    local yoe = y - era * 400
    local mp = (m + 9) % 12
    local doy = floor((153 * mp + 2) / 5) + d - 1
    local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
    return era * 146097 + doe - 719468
end

--- P.parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT") -> 784111777, or nil.
-- IMF-fixdate, RFC 850 and asctime forms (RFC 9110 5.6.7).
function P.parse_http_date(s)
    if type(s) ~= "string" then return nil end
    local d, mon, y, h, mi, sec = match(s, "^%a+, (%d%d) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d) GMT$")
    if not d then
        d, mon, y, h, mi, sec = match(s, "^%a+, (%d%d)%-(%a%a%a)%-(%d%d) (%d%d):(%d%d):(%d%d) GMT$")
        if d then
            y = tonumber(y)
            y = y + (y < 70 and 2000 or 1900)
        else
            mon, d, h, mi, sec, y = match(s, "^%a+ (%a%a%a) +(%d%d?) (%d%d):(%d%d):(%d%d) (%d%d%d%d)$")
        end
    end
    if not d then return nil end
    local m = MONTHS[lower(mon)]
    d, y, h, mi, sec = tonumber(d), tonumber(y), tonumber(h), tonumber(mi), tonumber(sec)
    if not m or d < 1 or d > 31 or h > 23 or mi > 59 or sec > 60 then return nil end
    return days(y, m, d) * 86400 + h * 3600 + mi * 60 + sec
end

--- P.parse_vary("Accept-Encoding, accept") -> { "accept", "accept-encoding" },
-- or "*" (never stored), or nil (no Vary).
function P.parse_vary(v)
    if type(v) == "table" then v = concat(v, ",") end
    if type(v) ~= "string" then return nil end
    local names, seen = {}, {}
    for name in gmatch(lower(v), "[^,%s]+") do
        if name == "*" then return "*" end
        if not seen[name] then seen[name] = true; names[#names + 1] = name end
    end
    if #names == 0 then return nil end
    sort(names)
    return names
end

--- P.freshness(conf, status, headers, now) -> fresh_for, swr, sie; or nil, reason.
-- `headers`: lower-case names to a value or a list (gw.response.get_headers).
function P.freshness(conf, status, headers, now)
    local c = setup(conf)
    if not c.statuses[status] then return nil, "status" end
    if headers["set-cookie"] then return nil, "set-cookie" end
    local cc = P.parse_cache_control(headers["cache-control"])
    if cc["no-store"] or cc["private"] or cc["no-cache"] then return nil, "cache-control" end
    if P.parse_vary(headers["vary"]) == "*" then return nil, "vary" end
    local ttl, swr, sie = conf.ttl, conf.stale_while_revalidate, conf.stale_if_error
    if conf.respect_cache_control then
        local expires = headers["expires"]
        if type(expires) == "table" then expires = expires[1] end
        if delta(cc["s-maxage"]) then
            ttl = delta(cc["s-maxage"])
        elseif delta(cc["max-age"]) then
            ttl = delta(cc["max-age"])
        elseif expires then
            -- An invalid Expires means "already expired" (RFC 9111 5.3).
            local exp = P.parse_http_date(expires)
            local date = P.parse_http_date(headers["date"]) or now
            ttl = exp and exp - date or 0
        end
        swr = delta(cc["stale-while-revalidate"]) or swr
        sie = delta(cc["stale-if-error"]) or sie
        if cc["must-revalidate"] or cc["proxy-revalidate"] then swr, sie = 0, 0 end
        ttl = ttl - (tonumber(headers["age"]) or 0)
    end
    if ttl <= 0 then return nil, "expired" end
    return ttl, swr, sie
end

-- ------------------------------------------------------------ keys

-- '|' separates key parts: escaped in paths and queries (where %7C is the
-- same URI), and with '%' in header values, so the parts stay apart.
-- (The plain finds first: they compile, gsub does not, and most values
-- have nothing to escape.)
local function esc_uri(s)
    if not find(s, "|", 1, true) then return s end
    return (gsub(s, "|", "%%7C"))
end
local function esc_value(s)
    if not find(s, "|", 1, true) and not find(s, "%", 1, true) then return s end
    return (gsub(s, "[|%%]", { ["|"] = "%7C", ["%"] = "%25" }))
end

local function by_name(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]
end

--- P.normalize_query("b=2&a=1&utm=x", { utm = true }) -> "a=1&b=2"
-- Sorted by name; repeated names keep their order (a=2&a=1 is not a=1&a=2
-- to every upstream).
function P.normalize_query(q, ignore)
    if q == "" then return "" end
    local parts = {}
    for part in gmatch(q, "[^&]+") do
        local name = match(part, "^[^=]*")
        if not ignore[name] then parts[#parts + 1] = { name, #parts + 1, part } end
    end
    if #parts > 1 then sort(parts, by_name) end
    for i = 1, #parts do parts[i] = parts[i][3] end
    return concat(parts, "&")
end

-- "cache:GET:host/path?query": a URL's key, the prefix of all its entries.
local function url_key(conf, ctx, c)
    local q = P.normalize_query(req.get_query(ctx), c.ignore)
    local k = conf.key_prefix .. "GET:" .. esc_uri(lower(req.get_host(ctx))) .. esc_uri(req.get_path(ctx))
    if q ~= "" then k = k .. "?" .. esc_uri(q) end
    return k
end

local function header_value(ctx, name)
    local v = req.get_headers(ctx)[name]
    if type(v) == "table" then v = concat(v, ", ") end
    return v
end

--- P.build_key(conf, ctx, consumer_id) -> the base key (docs: "Keys").
function P.build_key(conf, ctx, consumer_id)
    local c = setup(conf)
    local parts = { url_key(conf, ctx, c) }
    for _, h in ipairs(c.headers) do
        parts[#parts + 1] = "h:" .. h .. "=" .. esc_value(header_value(ctx, h) or "")
    end
    if consumer_id ~= nil then parts[#parts + 1] = "u:" .. esc_value(tostring(consumer_id)) end
    return concat(parts, "|")
end

--- P.variant_key(base, names, get, arg) -> base .. "|v:name=value..."
-- (get(arg, name) -> the request's value; no closures on the hot path).
function P.variant_key(base, names, get, arg)
    local parts = { base }
    for _, n in ipairs(names) do parts[#parts + 1] = "v:" .. n .. "=" .. esc_value(get(arg, n) or "") end
    return concat(parts, "|")
end

-- ------------------------------------------------------------ storage

-- Entries are strings: "E" .. json meta .. "\n" .. body; a vary record
-- is "V" .. comma-joined header names. The same encoding in both stores.
local function encode(meta, body) return "E" .. gw.json.encode(meta) .. "\n" .. body end

local function decode(v)
    if type(v) ~= "string" then return nil end
    if sub(v, 1, 1) == "V" then
        local names = {}
        for n in gmatch(sub(v, 2), "[^,]+") do names[#names + 1] = n end
        return nil, names
    end
    local nl = find(v, "\n", 1, true)
    if sub(v, 1, 1) ~= "E" or not nl then return nil end
    local meta = gw.json.decode(sub(v, 2, nl - 1))
    if type(meta) ~= "table" then return nil end
    meta.body = sub(v, nl + 1)
    return meta
end

-- Decoded entries by their stored string, per worker: a hit then costs a
-- lookup instead of a JSON decode. Keyed by the string itself (LuaJIT
-- interns strings, so equal bytes are the same key and a changed entry is
-- a different one); bounded in bytes, emptied when full.
local MEMO_BYTES = 8 * 1024 * 1024
local memo, memo_bytes = {}, 0

local function decode_memo(v)
    if type(v) ~= "string" then return nil end
    local e = memo[v]
    if e then return e end
    local names
    e, names = decode(v)
    if not e then return nil, names end
    if #v <= MEMO_BYTES / 16 then
        if memo_bytes + #v > MEMO_BYTES then memo, memo_bytes = {}, 0 end
        memo[v], memo_bytes = e, memo_bytes + #v
    end
    return e
end

local shared_store, redis_store = {}, {}

function shared_store.get(conf, key) return (gw.shared[conf.zone]:get(key)) end
function shared_store.set(conf, key, value, ttl)
    local ok, err = gw.shared[conf.zone]:set(key, value, ttl)
    if not ok then gw.log("warn", "cache: cannot store ", key, ": ", err) end
end
function shared_store.purge(conf, key, prefix)
    local d = gw.shared[conf.zone]
    local n = 0
    if key then
        n = d:get(key) ~= nil and 1 or 0
        d:delete(key)
    end
    return n + d:delete_prefix(prefix)
end

-- Redis failures count as misses; one warning a second at most per worker.
local last_warn = 0
local function redis_failed(what, err)
    local now = gw.now()
    if now - last_warn >= 1 then
        last_warn = now
        gw.log("warn", "cache: redis ", what, " failed (treated as a miss): ", err)
    end
end

function redis_store.get(conf, key)
    local v, err = gw.redis.command("GET", key)
    if err then redis_failed("GET", err) end
    return v
end
function redis_store.set(conf, key, value, ttl)
    local _, err = gw.redis.command("SET", key, value, "PX", max(1, floor(ttl * 1000)))
    if err then redis_failed("SET", err) end
end
function redis_store.purge(conf, key, prefix)
    local n = 0
    if key then n = tonumber((gw.redis.command("DEL", key))) or 0 end
    local pattern = gsub(prefix, "[%*%?%[%]\\]", "\\%0") .. "*"
    local cursor = "0"
    repeat
        local r, err = gw.redis.command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
        if not r then return nil, err end
        cursor = r[1]
        if #r[2] > 0 then n = n + (tonumber((gw.redis.command("DEL", unpack(r[2])))) or 0) end
    until cursor == "0"
    return n
end

local function store_of(conf) return conf.storage == "redis" and redis_store or shared_store end

-- (entry, key) for the request: the base key's entry, or through its vary
-- record the variant's. The key is where a response would be stored.
local function lookup(conf, ctx, base)
    local store = store_of(conf)
    local entry, names = decode_memo(store.get(conf, base))
    if not names then return entry, base end
    local key = P.variant_key(base, names, header_value, ctx)
    return (decode_memo(store.get(conf, key))), key, names
end

-- Writes an entry (and the vary record); `sw` holds what header_filter
-- kept. Then releases the fill lock. May wait (Redis): a timer's job there.
local function commit(conf, sw, body)
    local store = store_of(conf)
    local keep = sw.fresh + max(sw.swr, sw.sie)
    if sw.vary then store.set(conf, sw.base, "V" .. concat(sw.vary, ","), keep) end
    store.set(conf, sw.key, encode(sw.meta, body), keep)
    if sw.lock then gw.shared[conf.zone]:delete(sw.lock) end
end

-- ------------------------------------------------------------ serving

local NOT_STORED = { ["x-request-id"] = true, ["content-length"] = true, age = true,
                     ["x-cache"] = true, ["transfer-encoding"] = true, connection = true }
local FOR_304 = { etag = true, ["last-modified"] = true, ["cache-control"] = true,
                  expires = true, vary = true, date = true, ["content-location"] = true }

--- P.not_modified(get, arg, entry) -> true when the client's conditional
-- headers (get(arg, name) -> value) match the entry (RFC 9110 13.1.1, 13.1.3).
function P.not_modified(get, arg, entry)
    if entry.s ~= 200 then return false end
    local h = {}
    for _, p in ipairs(entry.h) do h[p[1]] = p[2] end
    local inm = get(arg, "if-none-match")
    if inm then
        if match(inm, "^%s*%*%s*$") then return true end
        local etag = h.etag
        if not etag then return false end
        etag = gsub(etag, "^W/", "")
        for tag in gmatch(inm, "[^,]+") do
            if gsub(gsub(tag, "^%s+", ""), "%s+$", ""):gsub("^W/", "") == etag then return true end
        end
        return false
    end
    local ims = P.parse_http_date(get(arg, "if-modified-since"))
    local lm = P.parse_http_date(h["last-modified"])
    return ims ~= nil and lm ~= nil and lm <= ims
end

-- The entry's headers as an early exit takes them (name -> value or list).
local function header_map(entry, only)
    local headers = {}
    for _, p in ipairs(entry.h) do
        local n, v = p[1], p[2]
        if not only or only[n] then
            local prev = headers[n]
            if prev == nil then headers[n] = v
            elseif type(prev) == "table" then prev[#prev + 1] = v
            else headers[n] = { prev, v } end
        end
    end
    return headers
end

local function serve(ctx, st, entry, label)
    st.state = "hit"
    local age = format("%d", (entry.a or 0) + max(0, floor(gw.now() - entry.t)))
    local get = req.get_header
    if (get(ctx, "if-none-match") or get(ctx, "if-modified-since"))
        and P.not_modified(get, ctx, entry) then
        local headers = header_map(entry, FOR_304)
        headers["Age"], headers["X-Cache"] = age, label
        return 304, nil, headers
    end
    -- Built once per decoded entry; the exit copies it before the next use.
    local headers = entry.hmap
    if not headers then
        headers = header_map(entry)
        if headers["content-type"] == nil then
            headers["content-type"] = "application/octet-stream"
        end
        entry.hmap = headers
    end
    headers["Age"], headers["X-Cache"] = age, label
    return entry.s, entry.body, headers
end

-- ------------------------------------------------------------ refresh

local HOP = { connection = true, ["keep-alive"] = true, te = true, trailer = true,
              ["transfer-encoding"] = true, upgrade = true, ["content-length"] = true,
              ["proxy-connection"] = true, expect = true, ["if-none-match"] = true,
              ["if-modified-since"] = true, ["cache-control"] = true, pragma = true,
              host = true }

local rr = 0 -- round robin over the targets, per worker

-- The request a background refresh sends: to one of the route upstream's
-- targets (round robin; gw.http resolves upstream names only through a
-- live request, and the refresh outlives it, so the balancer, health
-- checks and breaker are not consulted), the path the route would send
-- (strip_prefix applied), with the request's headers as the plugins before
-- this one left them (auth headers included). nil when the route has no
-- upstream or rewrites paths: the refresh then runs in the foreground.
local function refresh_request(conf, ctx)
    local route = ctx.route or {}
    local targets = route.targets
    if not targets or #targets == 0 or route.rewrite then return nil end
    rr = rr % #targets + 1
    local path = req.get_path(ctx)
    local strip = route.strip_prefix
    if strip == true and type(route.path) == "string" then strip = sub(route.path, 1, -3) end
    if type(strip) == "string" and strip ~= "" and sub(path, 1, #strip) == strip
        and (#path == #strip or sub(path, #strip + 1, #strip + 1) == "/") then
        path = #path == #strip and "/" or sub(path, #strip + 1)
    end
    local headers = { Host = req.get_host(ctx) }
    for n, v in pairs(req.get_headers(ctx)) do
        if not HOP[n] and not find(n, "_", 1, true) then headers[n] = v end
    end
    local q = req.get_query(ctx)
    if q ~= "" then path = path .. "?" .. q end
    return { url = "http://" .. targets[rr] .. path, headers = headers,
             timeout = conf.lock_timeout }
end

local function list_value(headers, name)
    local v = headers[name]
    if type(v) == "table" then v = concat(v, ", ") end
    return v
end

local function background_refresh(conf, request, base, key, lock)
    local ok, err = pcall(function()
        local res, rerr = gw.http.request(request)
        if not res then
            gw.log("warn", "cache: background refresh of ", key, " failed: ", rerr)
            return
        end
        local now = gw.now()
        local fresh, swr, sie = P.freshness(conf, res.status, res.headers, now)
        if not fresh or #res.body > conf.max_entry_size then return end
        local vary = P.parse_vary(res.headers["vary"])
        local h = {}
        for n, v in pairs(res.headers) do
            if not NOT_STORED[n] and not HOP[n] then
                if type(v) == "table" then
                    for _, x in ipairs(v) do h[#h + 1] = { n, x } end
                else
                    h[#h + 1] = { n, v }
                end
            end
        end
        local sw = { base = base, key = key, vary = vary, fresh = fresh, swr = swr, sie = sie,
                     meta = { s = res.status, h = h, t = now, a = 0, f = now + fresh,
                              w = now + fresh + swr, e = now + fresh + sie } }
        if vary then
            sw.key = P.variant_key(base, vary, list_value, request.headers)
        end
        commit(conf, sw, res.body)
    end)
    if not ok then gw.log("error", "cache: background refresh: ", err) end
    gw.shared[conf.zone]:delete(lock)
end

-- ------------------------------------------------------------ purge

local function purge(conf, ctx)
    if not ipr.allowed(setup(conf).purge, req.get_client_ip(ctx)) then
        return 403, { error = "purge not allowed" }
    end
    local c = setup(conf)
    local path = req.get_path(ctx)
    local n, err
    if sub(path, -1) == "*" then
        local prefix = conf.key_prefix .. "GET:" .. esc_uri(lower(req.get_host(ctx)))
            .. esc_uri(sub(path, 1, -2))
        n, err = store_of(conf).purge(conf, nil, prefix)
    else
        local k = url_key(conf, ctx, c)
        n, err = store_of(conf).purge(conf, k, k .. "|")
    end
    if not n then return 502, { error = "purge failed: " .. tostring(err) } end
    if n == 0 then return 404, { error = "not cached", purged = 0 } end
    return 200, { purged = n }
end

-- ------------------------------------------------------------ phases

local warned_zone = {}

function P.access(conf, ctx)
    local method = req.get_method(ctx)
    if method == "PURGE" and conf.allow_purge then return purge(conf, ctx) end
    local c = setup(conf)
    if not c.methods[method] then return end
    local st = {}
    ctx.var.cache = st
    local zone = gw.shared[conf.zone]
    if not zone then
        if not warned_zone[conf.zone] then
            warned_zone[conf.zone] = true
            gw.log("error", "cache: no shared dict \"", conf.zone, "\" (config `shared`): bypassing")
        end
        st.state = "bypass"
        return
    end
    local consumer = ctx.consumer
    local cid = type(consumer) == "table" and consumer.id or nil
    if cid ~= nil or req.get_header(ctx, "authorization") or req.get_header(ctx, "cookie") then
        if not (conf.vary_by_consumer and cid ~= nil) then st.state = "bypass"; return end
    else
        cid = nil
    end
    if conf.honor_client_no_cache then
        local cc = P.parse_cache_control(req.get_header(ctx, "cache-control"))
        if cc["no-store"] then st.state = "bypass"; return end
        st.refresh = cc["no-cache"] or find(req.get_header(ctx, "pragma") or "", "no-cache", 1, true)
    end
    local base = P.build_key(conf, ctx, conf.vary_by_consumer and cid or nil)
    local entry, key = lookup(conf, ctx, base)
    st.state, st.base, st.key, st.head = "miss", base, key, method == "HEAD"
    local now = gw.now()
    if entry and not st.refresh then
        if now < entry.f then return serve(ctx, st, entry, "HIT") end
        if now < entry.w then
            local lock = "refresh|" .. key
            if not zone:add(lock, 1, conf.lock_timeout) then return serve(ctx, st, entry, "STALE") end
            local request = refresh_request(conf, ctx)
            if request and gw.timer.at(0, background_refresh, conf, request, base, key, lock) then
                return serve(ctx, st, entry, "STALE")
            end
            st.lock = lock -- no background refresh here: this request refreshes
        end
        if now < entry.e then st.stale = entry end
    end
    if st.head then return end -- HEAD responses have no body to store
    if conf.collapse and not st.refresh and not st.lock then
        local lock = "lock|" .. key
        if zone:add(lock, 1, conf.lock_timeout) then
            st.lock = lock
        else
            local deadline, step = now + conf.lock_timeout, 0.005
            while gw.now() < deadline do
                gw.sleep(step)
                step = min(step * 2, 0.05)
                if zone:get(lock) == nil then
                    local e = lookup(conf, ctx, base)
                    if e and gw.now() < e.f then return serve(ctx, st, e, "HIT") end
                    break -- the first one stored nothing: go upstream ourselves
                end
            end
        end
    end
    -- A full response is needed to store: conditionals are answered from
    -- the entry once it is there (a 200 is a valid answer meanwhile).
    req.clear_header(ctx, "If-None-Match")
    req.clear_header(ctx, "If-Modified-Since")
end

local function release(conf, st)
    if st.lock then
        gw.shared[conf.zone]:delete(st.lock)
        st.lock = nil
    end
end

-- stale-if-error: the upstream's head is replaced by the stale entry's,
-- and body_filter replaces its body (Content-Length cleared: the length
-- changes).
local function swap_in_stale(ctx, st)
    local e = st.stale
    resp.set_status(ctx, e.s)
    for n in pairs(resp.get_headers(ctx)) do
        if n ~= "x-request-id" then resp.clear_header(ctx, n) end
    end
    for _, p in ipairs(e.h) do resp.add_header(ctx, p[1], p[2]) end
    resp.clear_header(ctx, "Content-Length")
    resp.set_header(ctx, "Age", format("%d", (e.a or 0) + max(0, floor(gw.now() - e.t))))
    resp.set_header(ctx, "X-Cache", "STALE")
    st.swap = true
end

function P.header_filter(conf, ctx)
    local st = ctx.var.cache
    if not st or st.state == "hit" then return end
    if st.state == "bypass" then resp.set_header(ctx, "X-Cache", "BYPASS"); return end
    local status = resp.get_status(ctx)
    if st.stale and status >= 500 then
        swap_in_stale(ctx, st)
        release(conf, st)
        return
    end
    local headers = resp.get_headers(ctx)
    resp.set_header(ctx, "X-Cache", "MISS")
    local now = gw.now()
    local fresh, swr, sie = P.freshness(conf, status, headers, now)
    local cl = tonumber(headers["content-length"])
    if st.head or not fresh or (cl and cl > conf.max_entry_size) then
        release(conf, st)
        return
    end
    local h = {}
    for n, v in pairs(headers) do
        if not NOT_STORED[n] then
            if type(v) == "table" then
                for _, x in ipairs(v) do h[#h + 1] = { n, x } end
            else
                h[#h + 1] = { n, v }
            end
        end
    end
    local vary = P.parse_vary(headers["vary"])
    local key = st.base
    if vary then
        key = P.variant_key(st.base, vary, header_value, ctx)
    end
    local age = tonumber(headers["age"]) or 0
    st.fill = { base = st.base, key = key, vary = vary, fresh = fresh, swr = swr, sie = sie,
                lock = st.lock, parts = {}, size = 0,
                meta = { s = status, h = h, t = now, a = age, f = now + fresh,
                         w = now + fresh + swr, e = now + fresh + sie } }
    st.lock = nil -- the fill releases it once stored
end

local function redis_commit(conf, sw, body)
    local ok, err = pcall(commit, conf, sw, body)
    if not ok then
        gw.log("error", "cache: storing ", sw.key, ": ", err)
        if sw.lock then gw.shared[conf.zone]:delete(sw.lock) end
    end
end

local function finish_fill(conf, st, sw)
    st.fill = nil
    local body = concat(sw.parts)
    sw.parts = nil
    if conf.storage == "redis" then
        -- body_filter cannot wait: a timer stores it (and then unlocks).
        if not gw.timer.at(0, redis_commit, conf, sw, body) and sw.lock then
            gw.shared[conf.zone]:delete(sw.lock)
        end
    else
        commit(conf, sw, body)
    end
end

function P.body_filter(conf, ctx, chunk, eof)
    local st = ctx.var.cache
    if not st then return end
    if st.swap then
        if eof then return st.stale.body end
        return ""
    end
    local sw = st.fill
    if not sw then return end
    if chunk ~= "" then
        sw.size = sw.size + #chunk
        if sw.size > conf.max_entry_size then
            -- Too large: stop keeping pieces, they just stream through.
            st.fill = nil
            if sw.lock then gw.shared[conf.zone]:delete(sw.lock) end
            return
        end
        sw.parts[#sw.parts + 1] = chunk
    end
    if eof then finish_fill(conf, st, sw) end
end

function P.log(conf, ctx)
    local st = ctx.var.cache
    if not st then return end
    release(conf, st)
    local sw = st.fill
    if sw then
        -- No body_filter end (an empty body): store it as it is.
        if sw.size == 0 and tonumber(resp.get_header(ctx, "content-length")) == 0 then
            finish_fill(conf, st, sw)
        elseif sw.lock then
            gw.shared[conf.zone]:delete(sw.lock)
        end
    end
end

return P
