return {
    listen = { "[::1]:80", ":8080", "nonsense" },
    workers = "auto",
    limits = { max_body = "1m", header_timeout = "10s", bogus = true },
    upstreams = { a = { targets = { { "10.0.0.1:80", weight = 0 } },
                        timeouts = { connect = "1ms" } } },
    routes = { { path = "/a/*", upstream = "b", methods = { "GET", "BREW" },
                 hosts = { "*.example.com", "" }, strip_prefix = true,
                 rewrite = "/x/{*}/{nope}" },
               { path = "/a/../b", upstream = "a" } },
    trusted_proxies = { "10.0.0.0/8", "::/129" },
    shared = { limits = "16m", b = "1k" },
}
