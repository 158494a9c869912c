-- key-auth: authenticates a request by an API key from a header (default
-- X-API-Key) or a query parameter. Keys come from the config and map to a
-- consumer { id, roles }; they are stored by their SHA-256 digest, and the
-- digest found is compared again in constant time. On success: ctx.consumer
-- and the upstream identity headers, as jwt-auth sets them; the key itself
-- is removed from the upstream request unless hide_credentials = false.
-- Otherwise: 401 with a JSON body.
--
-- Not here (yet): keys from a file.
local gw = require("moongate.gw")

local type, pairs, ipairs, next, select, setmetatable = type, pairs, ipairs, next, select, setmetatable
local gsub, gmatch, concat, char, tonumber = string.gsub, string.gmatch, table.concat, string.char, tonumber
local crypto = gw.crypto

local P = {
    name = "key-auth",
    priority = 1050,
    schema = {
        fields = {
            header = { type = "string", default = "X-API-Key",
                description = "request header holding the key; \"\" to not look in headers" },
            query = { type = "string",
                description = "query parameter holding the key, looked at when the header has none" },
            keys = { type = "map", required = true,
                values = { type = "table", description = "the consumer a key stands for", fields = {
                    id = { type = "string", required = true, min_len = 1,
                        pattern = "^[^%c,]+$", description = "consumer id (X-User-ID)" },
                    roles = { type = "array", default = {},
                        items = { type = "string", min_len = 1, pattern = "^[^%c,%s]+$" },
                        description = "the consumer's roles" },
                } },
                description = "API key -> consumer" },
            hide_credentials = { type = "boolean", default = true,
                description = "remove the key (header or query parameter) before proxying" },
            id_header = { type = "string", default = "X-User-ID",
                description = "upstream header for the consumer id; \"\" for none" },
            roles_header = { type = "string", default = "X-User-Roles",
                description = "upstream header for the roles, comma-joined; \"\" for none" },
        },
        check = function(conf)
            if conf.header == "" and not conf.query then
                return nil, "no place to look for the key (header or query)"
            end
            if next(conf.keys) == nil then return nil, "keys must not be empty" end
            return true
        end,
    },
}

-- conf -> { [sha256(key)] = { digest = ..., consumer = { id, roles } } }
local compiled = setmetatable({}, { __mode = "k" })

local function table_of(conf)
    local c = compiled[conf]
    if c then return c end
    c = {}
    for key, who in pairs(conf.keys) do
        local d = crypto.digest("sha256", key)
        c[d] = { digest = d, id = who.id, roles = who.roles }
    end
    compiled[conf] = c
    return c
end

--- P.lookup(conf, key) -> { id, roles }, or nil, reason. Pure.
function P.lookup(conf, key)
    if type(key) ~= "string" or key == "" then return nil, "missing API key" end
    if #key > 1024 then return nil, "invalid API key" end
    local d = crypto.digest("sha256", key)
    local e = table_of(conf)[d]
    if not e or not crypto.equal(e.digest, d) then return nil, "invalid API key" end
    local roles = {}
    for i, r in ipairs(e.roles) do roles[i] = r end
    return { id = e.id, roles = roles }
end

local function unescape(s)
    return (gsub(s, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

-- The key from the query (and the query without it), or nil.
function P.from_query(query, name)
    local key, kept = nil, {}
    for pair in gmatch(query, "[^&]+") do
        local k, v = pair:match("^([^=]*)=?(.*)$")
        if unescape(gsub(k, "%+", " ")) == name then
            key = key or unescape(gsub(v, "%+", " "))
        else
            kept[#kept + 1] = pair
        end
    end
    return key, concat(kept, "&")
end

function P.access(conf, ctx)
    local key, where, rest
    if conf.header ~= "" then
        key = gw.request.get_header(ctx, conf.header)
        if key then where = "header" end
    end
    if not key and conf.query then
        key, rest = P.from_query(gw.request.get_query(ctx), conf.query)
        if key then where = "query" end
    end
    local who, err = P.lookup(conf, key)
    if not who then
        gw.log("info", "key-auth: ", err, " (route ", ctx.route and ctx.route.name or "?", ")")
        return 401, { error = err }
    end
    if conf.hide_credentials then
        if conf.header ~= "" then gw.request.clear_header(ctx, conf.header) end
        if conf.query then
            if where ~= "query" then rest = select(2, P.from_query(gw.request.get_query(ctx), conf.query)) end
            if rest ~= gw.request.get_query(ctx) then gw.request.set_query(ctx, rest) end
        end
    end
    who.claims = {}
    ctx.consumer = who
    if conf.id_header ~= "" then gw.request.set_header(ctx, conf.id_header, who.id) end
    if conf.roles_header ~= "" then
        gw.request.set_header(ctx, conf.roles_header, #who.roles > 0 and concat(who.roles, ",") or nil)
    end
end

return P
