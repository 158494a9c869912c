-- The demo config: `make run` starts moongate with this file, and
-- scripts/run-demo.sh starts the three demo upstreams it proxies to
-- (users, orders and products on 127.0.0.1:9101..9103).
-- Try: curl http://127.0.0.1:8080/users/42
return {
    listen  = { "0.0.0.0:8080" },
    workers = "auto",      -- one worker per CPU core
    -- pid_file defaults to moongate.pid beside this file (conf/moongate.pid)

    upstreams = {
        users    = { targets = { "127.0.0.1:9101" } },
        orders   = { targets = { "127.0.0.1:9102" } },
        products = { targets = { "127.0.0.1:9103" } },
    },

    -- "/users/*" matches /users and everything below it; the path is
    -- proxied unchanged.
    routes = {
        { path = "/users/*",    upstream = "users" },
        { path = "/orders/*",   upstream = "orders" },
        { path = "/products/*", upstream = "products" },
    },
}
