return {
    listen = { "127.0.0.1:0", "[::1]:0" },
    workers = 2,
    error_log = "stderr",
    log_level = "debug",
    trusted_proxies = { "10.0.0.0/8", "::1/128" },
    identity_headers = { "X-User-Id" },
    limits = { max_uri = "8k", max_body = "1m", header_timeout = "10s",
               max_header_fields = 100, keepalive_timeout = "60s" },
    shared = { limits = "1m", cache = "2m" },
    upstreams = {
        users = { targets = { "127.0.0.1:9001", { "127.0.0.1:9002", weight = 3 } },
                  timeouts = { connect = "1s", read = "30s" },
                  keepalive = { max_idle = 8, idle_timeout = "5s" } },
    },
    routes = {
        { name = "me", path = "/users/me", methods = { "GET" }, upstream = "users" },
        { path = "/users/{id}", upstream = "users", rewrite = "/v2/u/{id}" },
        { path = "/static/*", hosts = { "cdn.example.com" }, upstream = "users",
          strip_prefix = true, max_body = "0" },
    },
}
