-- ip-restriction: allows or refuses a request by its client IP against CIDR
-- lists (IPv4 and IPv6), answering 403 {"error":"forbidden"}.
--
--   ["ip-restriction"] = { allow = { "10.0.0.0/8", "2001:db8::/32" } }
--   ["ip-restriction"] = { deny = { "203.0.113.0/24" } }
--
-- The client IP is gw.request.get_client_ip(ctx): the TCP peer, or the
-- X-Forwarded-For address walked past the config's trusted_proxies; a
-- client's own X-Forwarded-For from an untrusted peer is never believed.
-- deny is looked at first; with an allow list, an address outside it is
-- refused. IPv4 networks also match IPv4-mapped IPv6 addresses
-- (::ffff:10.1.2.3). Addresses are parsed in pure Lua into 16 bytes; the
-- networks are parsed once per config (a weak-keyed cache keyed by conf).
local gw = require("moongate.gw")

local type, ipairs, tonumber, setmetatable = type, ipairs, tonumber, setmetatable
local byte, find, sub, gmatch = string.byte, string.find, string.sub, string.gmatch
local floor = math.floor

local P = {
    name = "ip-restriction",
    priority = 3000,
    schema = {
        fields = {
            allow = { type = "array", items = { type = "string", min_len = 1 },
                description = "CIDRs (or single addresses) let through; others are refused" },
            deny = { type = "array", items = { type = "string", min_len = 1 },
                description = "CIDRs (or single addresses) refused, checked before allow" },
            status = { type = "integer", default = 403, min = 400, max = 599,
                description = "status of the refusal" },
            message = { type = "string", default = "forbidden",
                description = "the error text of the JSON refusal" },
        },
    },
}

-- "1.2.3.4" -> list of 4 bytes, or nil.
local function parse_v4(s, out, at)
    local n = 0
    for part in gmatch(s .. ".", "([^.]*)%.") do
        n = n + 1
        if n > 4 or not find(part, "^%d%d?%d?$") then return nil end
        if #part > 1 and byte(part, 1) == 48 then return nil end -- no leading zeros
        local v = tonumber(part)
        if v > 255 then return nil end
        out[at + n] = v
    end
    if n ~= 4 then return nil end
    return out
end

-- An IPv6 textual address -> list of 16 bytes, or nil.
local function parse_v6(s)
    if find(s, "[^%x:.]") or find(s, ":::") then return nil end
    local head, tail = s, nil
    local dc = find(s, "::", 1, true)
    if dc then
        head, tail = sub(s, 1, dc - 1), sub(s, dc + 2)
        if find(tail, "::", 1, true) then return nil end
    end
    local function groups(part, allow_v4)
        local g = {}
        if part == "" then return g end
        local items = {}
        for item in gmatch(part .. ":", "([^:]*):") do items[#items + 1] = item end
        for i, item in ipairs(items) do
            if i == #items and allow_v4 and find(item, ".", 1, true) then
                local b = parse_v4(item, {}, 0)
                if not b then return nil end
                g[#g + 1] = b[1] * 256 + b[2]
                g[#g + 1] = b[3] * 256 + b[4]
            else
                if not find(item, "^%x%x?%x?%x?$") then return nil end
                g[#g + 1] = tonumber(item, 16)
            end
        end
        return g
    end
    local hg, tg
    if dc then
        hg = groups(head, false)
        tg = groups(tail, true)
        if not hg or not tg or #hg + #tg > 7 then return nil end
    else
        hg = groups(head, true)
        if not hg or #hg ~= 8 then return nil end
        tg = {}
    end
    local words = {}
    for i = 1, #hg do words[i] = hg[i] end
    for i = #hg + 1, 8 - #tg do words[i] = 0 end
    for i = 1, #tg do words[8 - #tg + i] = tg[i] end
    local out = {}
    for i = 1, 8 do
        out[2 * i - 1] = floor(words[i] / 256)
        out[2 * i] = words[i] % 256
    end
    return out
end

--- P.parse_ip("10.0.0.1") -> 16 bytes (IPv4 as ::ffff:a.b.c.d), is_v4; or nil.
function P.parse_ip(s)
    if type(s) ~= "string" then return nil end
    if find(s, ":", 1, true) then
        local b = parse_v6(s)
        return b, false
    end
    local b = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255 }
    if not parse_v4(s, b, 12) then return nil end
    return b, true
end

--- P.parse_cidr("10.0.0.0/8") -> { bytes = {16}, bits = 104 }, or nil, err.
-- A bare address is a /32 (IPv4) or /128 (IPv6). Host bits need not be 0.
function P.parse_cidr(s)
    if type(s) ~= "string" then return nil, "not a string" end
    local addr, len = s, nil
    local slash = find(s, "/", 1, true)
    if slash then
        addr, len = sub(s, 1, slash - 1), sub(s, slash + 1)
        if not find(len, "^%d%d?%d?$") then return nil, "invalid prefix length in " .. s end
        len = tonumber(len)
    end
    local bytes, v4 = P.parse_ip(addr)
    if not bytes then return nil, "invalid address in " .. s end
    local max = v4 and 32 or 128
    len = len or max
    if len > max then return nil, "prefix length over " .. max .. " in " .. s end
    return { bytes = bytes, bits = v4 and len + 96 or len }
end

--- P.match(net, bytes) -> true when the 16-byte address is inside net.
function P.match(net, bytes)
    local bits, nb = net.bits, net.bytes
    local i = 1
    while bits >= 8 do
        if nb[i] ~= bytes[i] then return false end
        bits, i = bits - 8, i + 1
    end
    if bits > 0 then
        local d = 2 ^ (8 - bits)
        if floor(nb[i] / d) ~= floor(bytes[i] / d) then return false end
    end
    return true
end

local function parse_list(list)
    if not list then return nil end
    local nets = {}
    for i, s in ipairs(list) do
        local net, err = P.parse_cidr(s)
        if not net then return nil, err end
        nets[i] = net
    end
    return nets
end

P.schema.check = function(conf)
    if not conf.allow and not conf.deny then return nil, "needs allow or deny" end
    for _, k in ipairs({ "allow", "deny" }) do
        local _, err = parse_list(conf[k])
        if err then return nil, k .. ": " .. err end
    end
    return true
end

local compiled = setmetatable({}, { __mode = "k" })

local function nets_of(conf)
    local c = compiled[conf]
    if not c then
        c = { allow = parse_list(conf.allow), deny = parse_list(conf.deny) }
        compiled[conf] = c
    end
    return c
end

local function inside(nets, bytes)
    for i = 1, #nets do
        if P.match(nets[i], bytes) then return true end
    end
    return false
end

--- P.allowed(conf, ip) -> true, or false (also for an unparsable ip).
function P.allowed(conf, ip)
    local c = nets_of(conf)
    local bytes = P.parse_ip(ip)
    if not bytes then return false end
    if c.deny and inside(c.deny, bytes) then return false end
    if c.allow and not inside(c.allow, bytes) then return false end
    return true
end

function P.access(conf, ctx)
    if not P.allowed(conf, gw.request.get_client_ip(ctx)) then
        return conf.status, { error = conf.message }
    end
end

return P
