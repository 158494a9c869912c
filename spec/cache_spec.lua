-- plugins/cache.lua: key building, Cache-Control/Expires freshness, Vary,
-- conditional requests, HTTP dates and config checks. The request flow
-- (hits, collapsing, purge, stale, Redis) is exercised end to end in
-- tests/e2e/test_cache.py.

local gw = require("moongate.gw")
local P = dofile("plugins/cache.lua")

local conf, refused = require("spec.helpers.plugin_conf")(P)

-- A fake request for the key builders: gw.request getters read it.
local function with_request(r, fn)
    local saved = {}
    local getters = {
        get_query = function() return r.query or "" end,
        get_host = function() return r.host or "example.com" end,
        get_path = function() return r.path or "/" end,
        get_headers = function() return r.headers or {} end,
    }
    for name, f in pairs(getters) do
        saved[name] = gw.request[name]
        gw.request[name] = f
    end
    local ok, err = pcall(fn, {})
    for name, f in pairs(saved) do gw.request[name] = f end
    assert(ok, err)
end

describe("cache keys", function()
    it("start with method, host and path, then the sorted query", function()
        local c = conf({})
        with_request({ host = "API.example.com", path = "/users/1", query = "b=2&a=1&a=0" },
            function(ctx)
                assert.are.equal("cache:GET:api.example.com/users/1?a=1&a=0&b=2", P.build_key(c, ctx))
            end)
    end)

    it("keep the order of a repeated parameter while sorting by name", function()
        assert.are.equal("a=2&a=1&b=0&c", P.normalize_query("c&a=2&b=0&a=1", {}))
        assert.are.equal("a=1&a=2&b=0", P.normalize_query("b=0&a=1&a=2", {}))
    end)

    it("leave out ignored query parameters and empty pairs", function()
        local c = conf({ ignore_query = { "utm_source", "x" } })
        with_request({ path = "/p", query = "utm_source=mail&&z=1&x&x=2" }, function(ctx)
            assert.are.equal("cache:GET:example.com/p?z=1", P.build_key(c, ctx))
        end)
        with_request({ path = "/p", query = "utm_source=mail" }, function(ctx)
            assert.are.equal("cache:GET:example.com/p", P.build_key(c, ctx))
        end)
    end)

    it("add configured request headers (sorted by name) and the consumer", function()
        local c = conf({ key_headers = { "X-Tenant", "Accept-Language" }, key_prefix = "k/" })
        with_request({ path = "/p", headers = { ["x-tenant"] = "t1", ["accept-language"] = { "de", "en" } } },
            function(ctx)
                assert.are.equal("k/GET:example.com/p|h:accept-language=de, en|h:x-tenant=t1|u:alice",
                                 P.build_key(c, ctx, "alice"))
            end)
        with_request({ path = "/p" }, function(ctx)
            assert.are.equal("k/GET:example.com/p|h:accept-language=|h:x-tenant=", P.build_key(c, ctx))
        end)
    end)

    it("escape the separator so no value can pose as another key part", function()
        local c = conf({ key_headers = { "X-T" } })
        local a, b
        with_request({ path = "/p", headers = { ["x-t"] = "a|u:bob" } }, function(ctx)
            a = P.build_key(c, ctx, "eve")
        end)
        with_request({ path = "/p", headers = { ["x-t"] = "a" } }, function(ctx)
            b = P.build_key(c, ctx, "bob")
        end)
        assert.are_not.equal(a, b)
        assert.are.equal("cache:GET:example.com/p|h:x-t=a%7Cu:bob|u:eve", a)
        with_request({ path = "/a|b", query = "q=|" }, function(ctx)
            assert.are.equal("cache:GET:example.com/a%7Cb?q=%7C|h:x-t=", P.build_key(c, ctx))
        end)
    end)

    it("append the request's values of the upstream's Vary headers", function()
        local values = { accept = "text/html", ["accept-encoding"] = "gzip" }
        assert.are.equal("B|v:accept=text/html|v:accept-encoding=gzip|v:x-none=",
            P.variant_key("B", { "accept", "accept-encoding", "x-none" }, function(t, n) return t[n] end, values))
    end)
end)

describe("cache Vary parsing", function()
    it("lower-cases, sorts and de-duplicates names", function()
        assert.are.same({ "accept", "accept-encoding" }, P.parse_vary("Accept-Encoding, Accept,accept"))
        assert.are.same({ "a", "b" }, P.parse_vary({ "B", "A" }))
    end)
    it("reports * and no Vary", function()
        assert.are.equal("*", P.parse_vary("Accept, *"))
        assert.is_nil(P.parse_vary(nil))
        assert.is_nil(P.parse_vary(" , "))
    end)
end)

describe("cache Cache-Control and Expires", function()
    local now = 1000000000
    local c = conf({ ttl = 30, stale_while_revalidate = 5, stale_if_error = 7 })

    it("parses directives with and without values, quoted or not", function()
        assert.are.same({ ["max-age"] = "60", private = true, ["no-cache"] = "Set-Cookie" },
            P.parse_cache_control('Max-Age=60, private, no-cache="Set-Cookie"'))
    end)

    it("uses the config ttl when the upstream says nothing", function()
        assert.are.same({ 30, 5, 7 }, { P.freshness(c, 200, {}, now) })
    end)

    it("prefers s-maxage over max-age over Expires", function()
        assert.are.equal(10, P.freshness(c, 200, { ["cache-control"] = "max-age=20, s-maxage=10" }, now))
        assert.are.equal(20, P.freshness(c, 200, { ["cache-control"] = "max-age=20",
            expires = "Sun, 09 Sep 2001 01:47:20 GMT" }, now))
        assert.are.equal(100, P.freshness(c, 200, { expires = "Sun, 09 Sep 2001 01:48:20 GMT",
            date = "Sun, 09 Sep 2001 01:46:40 GMT" }, now))
    end)

    it("takes stale-while-revalidate and stale-if-error from the upstream", function()
        assert.are.same({ 30, 50, 70 }, { P.freshness(c, 200,
            { ["cache-control"] = "stale-while-revalidate=50, stale-if-error=70" }, now) })
        assert.are.same({ 30, 0, 0 }, { P.freshness(c, 200, { ["cache-control"] = "must-revalidate" }, now) })
    end)

    it("subtracts the upstream's Age", function()
        assert.are.equal(15, P.freshness(c, 200, { ["cache-control"] = "max-age=20", age = "5" }, now))
        assert.is_nil(P.freshness(c, 200, { ["cache-control"] = "max-age=20", age = "25" }, now))
    end)

    it("ignores the upstream when respect_cache_control is off", function()
        local off = conf({ ttl = 30, respect_cache_control = false })
        assert.are.equal(30, P.freshness(off, 200, { ["cache-control"] = "max-age=1" }, now))
        assert.is_nil(P.freshness(off, 200, { ["cache-control"] = "private" }, now))
    end)

    it("never stores no-store, private, no-cache, Set-Cookie or Vary: *", function()
        for _, h in ipairs({
            { ["cache-control"] = "no-store" }, { ["cache-control"] = "public, PRIVATE" },
            { ["cache-control"] = "no-cache" }, { ["set-cookie"] = "a=1" },
            { ["set-cookie"] = { "a=1", "b=2" } }, { vary = "*" },
        }) do
            assert.is_nil(P.freshness(c, 200, h, now))
        end
    end)

    it("stores only configured statuses, and nothing already expired", function()
        assert.is_nil(P.freshness(c, 500, {}, now))
        assert.is_nil(P.freshness(c, 302, {}, now))
        assert.is_not_nil(P.freshness(c, 404, {}, now))
        assert.is_nil(P.freshness(c, 200, { ["cache-control"] = "max-age=0" }, now))
        assert.is_nil(P.freshness(c, 200, { expires = "0" }, now))  -- invalid: already expired
        assert.is_nil(P.freshness(c, 200, { expires = "Sun, 09 Sep 2001 01:46:40 GMT" }, now))
    end)
end)

describe("cache HTTP dates", function()
    it("reads the three forms of RFC 9110", function()
        assert.are.equal(784111777, P.parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"))
        assert.are.equal(784111777, P.parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"))
        assert.are.equal(784111777, P.parse_http_date("Sun Nov  6 08:49:37 1994"))
        assert.are.equal(951782400, P.parse_http_date("Tue, 29 Feb 2000 00:00:00 GMT"))
        assert.are.equal(0, P.parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"))
    end)
    it("refuses anything else", function()
        for _, s in ipairs({ "0", "", "Sun, 06 Nov 1994 08:49:37 PST", "Sun, 06 Foo 1994 08:49:37 GMT",
                             "Sun, 06 Nov 1994 25:49:37 GMT" }) do
            assert.is_nil(P.parse_http_date(s))
        end
        assert.is_nil(P.parse_http_date(nil))
    end)
end)

describe("cache conditional requests", function()
    local entry = { s = 200, h = { { "etag", '"v1"' }, { "last-modified", "Sun, 06 Nov 1994 08:49:37 GMT" } } }
    local function get(t, n) return t[n] end

    it("match If-None-Match weakly, in lists, and *", function()
        assert.is_true(P.not_modified(get, { ["if-none-match"] = '"v1"' }, entry))
        assert.is_true(P.not_modified(get, { ["if-none-match"] = 'W/"v1"' }, entry))
        assert.is_true(P.not_modified(get, { ["if-none-match"] = '"x", "v1"' }, entry))
        assert.is_true(P.not_modified(get, { ["if-none-match"] = "*" }, entry))
        assert.is_false(P.not_modified(get, { ["if-none-match"] = '"v2"' }, entry))
    end)

    it("let If-None-Match decide over If-Modified-Since", function()
        assert.is_false(P.not_modified(get, { ["if-none-match"] = '"v2"',
            ["if-modified-since"] = "Sun, 06 Nov 1994 08:49:37 GMT" }, entry))
    end)

    it("compare If-Modified-Since with Last-Modified", function()
        assert.is_true(P.not_modified(get, { ["if-modified-since"] = "Sun, 06 Nov 1994 08:49:37 GMT" }, entry))
        assert.is_true(P.not_modified(get, { ["if-modified-since"] = "Mon, 07 Nov 1994 08:49:37 GMT" }, entry))
        assert.is_false(P.not_modified(get, { ["if-modified-since"] = "Sat, 05 Nov 1994 08:49:37 GMT" }, entry))
        assert.is_false(P.not_modified(get, { ["if-modified-since"] = "garbage" }, entry))
    end)

    it("answer 304 only for a stored 200 and only when asked", function()
        assert.is_false(P.not_modified(get, {}, entry))
        local e404 = { s = 404, h = entry.h }
        assert.is_false(P.not_modified(get, { ["if-none-match"] = '"v1"' }, e404))
    end)
end)

describe("cache config", function()
    it("fills in the defaults", function()
        local c = conf({})
        assert.are.equal("shared", c.storage)
        assert.are.equal("cache", c.zone)
        assert.are.same({ "GET", "HEAD" }, c.methods)
        assert.are.same({ 200, 203, 301, 404, 410 }, c.statuses)
        assert.is_true(c.respect_cache_control)
        assert.is_false(c.vary_by_consumer)
        assert.is_false(c.allow_purge)
        assert.are.equal(1048576, c.max_entry_size)
    end)

    it("refuses bad values with the field named", function()
        refused({ storage = "memcached" }, "storage: must be one of")
        refused({ methods = { "POST" } }, "methods%[1%]: must be one of")
        refused({ statuses = { 99 } }, "statuses%[1%]: must be at least 100")
        refused({ ttl = 0 }, "ttl: must be at least")
        refused({ ttl = "60" }, "ttl: expected number")
        refused({ key_headers = { "bad header" } }, "key_headers%[1%]")
        refused({ lock_timeout = 0 }, "lock_timeout")
        refused({ max_entry_size = -1 }, "max_entry_size")
        refused({ purge_allow = { "10.0.0.0/33" } }, "purge_allow: prefix length over 32")
        refused({ purge_allow = { "not-an-ip" } }, "purge_allow: invalid address")
        refused({ extra = 1 }, "extra: unknown field")
    end)
end)

-- lua/moongate/timer.lua: a request's task stays usable for starting
-- timers after its coroutine may no longer wait (header_filter,
-- body_filter, log), which the cache needs to store into Redis from
-- body_filter. The script's own task stands in for a request's here.
describe("gw.timer from a phase that cannot wait", function()
    local task = gw._tasks[coroutine.running()]

    it("starts a timer through the coroutine's starter task", function()
        local ran = false
        local co = coroutine.create(function()
            return gw.timer.at(0, function() ran = true end)
        end)
        gw.timer.starters[co] = task
        local ok, id = coroutine.resume(co)
        assert.is_true(ok, id)
        assert.is_number(id)
        gw.sleep(0.02)
        assert.is_true(ran)
    end)

    it("still refuses a coroutine that has no task at all", function()
        local co = coroutine.create(function() return gw.timer.at(0, function() end) end)
        local ok, err = coroutine.resume(co)
        assert.is_false(ok)
        assert.matches("gw.timer is not available here", err, 1, true)
    end)
end)
