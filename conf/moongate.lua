-- The demo config that `make run` starts: one moongate process that is
-- both the gateway and its own three demo services.
--
--   public routes  /users/*  /orders/*  /products/*  (proxied, with plugins)
--        |  through a real upstream connection pool, back into this gateway
--        v
--   demo services  /_demo/users/...  /_demo/orders/...  /_demo/products/...
--                  answered by Lua handlers, no upstream process needed
--
-- Try: curl -i localhost:8080/users/1
-- Environment: MOONGATE_DEMO_LISTEN ("0.0.0.0:8080"), MOONGATE_DEMO_PID
-- (pid file; default conf/moongate.pid) -- the e2e test starts the demo on
-- a free loopback port with them. MOONGATE_DEMO_TLS_LISTEN with
-- MOONGATE_DEMO_TLS_CERT and _KEY add an HTTPS listener (h2 and http/1.1 by
-- ALPN; the plain one speaks h2c too).
local gw = require("moongate.gw")

local LISTEN = env("MOONGATE_DEMO_LISTEN", "0.0.0.0:8080")
local SELF = "127.0.0.1:" .. LISTEN:match(":(%d+)$")
local LISTENERS = { LISTEN }
if env("MOONGATE_DEMO_TLS_LISTEN") then
    LISTENERS[2] = { env("MOONGATE_DEMO_TLS_LISTEN"), tls = {
        cert = env("MOONGATE_DEMO_TLS_CERT"), key = env("MOONGATE_DEMO_TLS_KEY") } }
end

-- The demo services' data: what a team's backend would hold.
local USERS = {
    ["1"] = { userId = 1, userName = "Ada Lovelace", userEmail = "ada@example.com" },
    ["2"] = { userId = 2, userName = "Alan Turing", userEmail = "alan@example.com" },
}
local PRODUCTS = {
    ["7"] = { id = 7, name = "desk lamp", price = 24.5 },
    ["8"] = { id = 8, name = "notebook", price = 3.2 },
}

local function list(t)
    local out = {}
    for _, v in pairs(t) do out[#out + 1] = v end
    table.sort(out, function(a, b) return (a.userId or a.id) < (b.userId or b.id) end)
    return out
end

local function lookup(t, kind)
    return function(ctx)
        local item = t[gw.request.get_param(ctx, "id")]
        if not item then return 404, { error = kind .. " not found" } end
        return 200, item
    end
end

return {
    listen  = LISTENERS,
    workers = "auto",      -- one worker per CPU core
    pid_file = env("MOONGATE_DEMO_PID"),
    shared  = { demo = "1m" },

    -- The demo services live at this very gateway.
    upstreams = {
        demo = { targets = { SELF }, timeouts = { read = 5 } },
    },

    -- Global plugins apply to every route; this inline one counts requests
    -- in a shared dict (the same count in every worker).
    plugins = {
        counter = { log = function(conf, ctx) gw.shared.demo:incr("requests", 1, 0) end },
    },

    routes = {
        -- Public routes: proxied (and rewritten) to the demo services.
        { path = "/users/*", upstream = "demo", rewrite = "/_demo/users{*}",
          plugins = {
              -- An inline per-route plugin: answers in the response headers
              -- how the gateway saw the request.
              stamp = { header_filter = function(conf, ctx)
                  gw.response.set_header(ctx, "X-Demo-Route", ctx.route.name)
              end },
          } },
        { path = "/orders/*", upstream = "demo", rewrite = "/_demo/orders{*}" },
        { path = "/products/*", upstream = "demo", rewrite = "/_demo/products{*}" },
        { path = "/stats", handler = function(ctx)
            return 200, { requests = gw.shared.demo:get("requests") or 0 }
        end },

        -- The demo services themselves.
        { path = "/_demo/users/{id}", handler = lookup(USERS, "user") },
        { path = "/_demo/users/*", handler = function(ctx) return 200, list(USERS) end },
        { path = "/_demo/products/{id}", handler = lookup(PRODUCTS, "product") },
        { path = "/_demo/products/*", handler = function(ctx) return 200, list(PRODUCTS) end },
        { path = "/_demo/orders/*", handler = function(ctx)
            return 200, { orders = { { id = 42, user = 1, items = { 7, 8 } } },
                          query = gw.request.get_query(ctx) }
        end },
    },
}
