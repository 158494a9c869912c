return {
    listen = { "127.0.0.1:0" },
    upstreams = { users = { targets = { "127.0.0.1:9001" } } },
    routes = { { path = "/users/{id}", upstream = "users" } },
}
