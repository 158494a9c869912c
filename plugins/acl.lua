-- acl: lets a request through when its consumer's roles allow it, per route
-- and optionally per method. Runs in access after the authentication
-- plugins (jwt-auth, key-auth: higher priorities) have set ctx.consumer.
--
--   acl = { allow = { "user", "admin" } }
--   acl = { rules = {
--       { methods = { "GET", "HEAD" }, allow = { "user", "admin" } },
--       { methods = { "DELETE" }, allow = { "admin" } },
--   }, deny = { "banned" } }
--
-- The first rule whose methods include the request's method decides (a rule
-- without methods matches every method); when none matches, the top-level
-- allow/deny decide; when there are none either, the request is refused
-- (fail closed). In a rule, deny wins over allow; "*" in allow means any
-- authenticated consumer. No consumer: 401; not allowed: 403.
local gw = require("moongate.gw")

local type, ipairs, setmetatable, upper = type, ipairs, setmetatable, string.upper

local ROLES = { type = "array", items = { type = "string", min_len = 1 } }

local P = {
    name = "acl",
    priority = 900,
    schema = {
        fields = {
            allow = { type = "array", items = ROLES.items,
                description = "roles let through when no rule matches the method (\"*\": any consumer)" },
            deny = { type = "array", items = ROLES.items,
                description = "roles refused when no rule matches the method" },
            rules = { type = "array", default = {},
                items = { type = "table", description = "a rule", fields = {
                    methods = { type = "array", items = { type = "string", min_len = 1 },
                        description = "methods this rule applies to (case-insensitive); none: all" },
                    allow = { type = "array", items = ROLES.items,
                        description = "roles let through (\"*\": any consumer)" },
                    deny = { type = "array", items = ROLES.items,
                        description = "roles refused, before allow is looked at" },
                } },
                description = "per-method rules, first match decides" },
        },
        check = function(conf)
            for i, r in ipairs(conf.rules) do
                if not r.allow and not r.deny then
                    return nil, "rules[" .. i .. "] needs allow or deny"
                end
            end
            if #conf.rules == 0 and not conf.allow and not conf.deny then
                return nil, "needs allow, deny or rules"
            end
            return true
        end,
    },
}

local function set_of(list)
    if not list then return nil end
    local s = {}
    for _, v in ipairs(list) do s[v] = true end
    return s
end

-- conf -> compiled { rules = { { methods = set|nil, allow = set|nil, deny = set|nil } }, top = rule|nil }
local compiled = setmetatable({}, { __mode = "k" })

local function compile(conf)
    local c = { rules = {} }
    for i, r in ipairs(conf.rules) do
        local m
        if r.methods then
            m = {}
            for _, x in ipairs(r.methods) do m[upper(x)] = true end
        end
        c.rules[i] = { methods = m, allow = set_of(r.allow), deny = set_of(r.deny) }
    end
    if conf.allow or conf.deny then c.top = { allow = set_of(conf.allow), deny = set_of(conf.deny) } end
    compiled[conf] = c
    return c
end

--- P.allowed(conf, method, roles) -> true, or nil, reason. Pure.
function P.allowed(conf, method, roles)
    local c = compiled[conf] or compile(conf)
    method = upper(method)
    local rule
    for _, r in ipairs(c.rules) do
        if not r.methods or r.methods[method] then
            rule = r
            break
        end
    end
    rule = rule or c.top
    if not rule then return nil, "method not allowed for any role" end
    if type(roles) ~= "table" then roles = {} end
    if rule.deny then
        for _, role in ipairs(roles) do
            if rule.deny[role] then return nil, "role denied" end
        end
    end
    if rule.allow then
        if rule.allow["*"] then return true end
        for _, role in ipairs(roles) do
            if rule.allow[role] then return true end
        end
        return nil, "no allowed role"
    end
    return true
end

function P.access(conf, ctx)
    local consumer = ctx.consumer
    if type(consumer) ~= "table" then
        return 401, { error = "authentication required" }
    end
    local ok, why = P.allowed(conf, gw.request.get_method(ctx), consumer.roles)
    if not ok then
        gw.log("info", "acl: ", why, " (route ", ctx.route and ctx.route.name or "?", ")")
        return 403, { error = "forbidden" }
    end
end

return P
