-- plugins/rate-limit.lua without a request: the algorithm math (sliding
-- estimate and retry time, GCRA steps, key building, the tightest limit)
-- and the config schema's refusals.
local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec"
local schema = require("moongate.schema")
local P = dofile(SPEC_DIR .. "/../plugins/rate-limit.lua")
local algo = P.algo

-- The config as the runtime checks it: fields, defaults, then check().
local function validate(conf)
    local out, errs = schema.validate(P.schema, conf)
    if not out then return nil, table.concat(errs, "; ") end
    local ok, err = P.schema.check(out)
    if not ok then return nil, err end
    return out
end

describe("rate-limit gcra arithmetic", function()
    it("lets a full bucket of burst requests through at once, then refuses", function()
        local tat, now, T, burst = nil, 100, 0.1, 3
        local remaining = {}
        for i = 1, 3 do
            local ok, new, rem = algo.gcra(tat, now, T, burst)
            assert.is_true(ok)
            tat, remaining[i] = new, rem
        end
        assert.are.same({ 2, 1, 0 }, remaining)
        local ok, kept, rem, reset, retry = algo.gcra(tat, now, T, burst)
        assert.is_false(ok)
        assert.are.equal(tat, kept)
        assert.are.equal(0, rem)
        assert.is_true(math.abs(reset - 0.3) < 1e-9)
        assert.is_true(math.abs(retry - 0.1) < 1e-9)
    end)

    it("admits one request per interval once the bucket is empty", function()
        local ok, tat = algo.gcra(nil, 0, 1, 1)
        assert.is_true(ok)
        assert.is_false((algo.gcra(tat, 0.5, 1, 1)))
        assert.is_true((algo.gcra(tat, 1, 1, 1)))
    end)

    it("treats a TAT in the past as an idle, full bucket", function()
        local ok, new, rem = algo.gcra(5, 1000, 1, 10)
        assert.is_true(ok)
        assert.are.equal(1001, new)
        assert.are.equal(9, rem)
    end)
end)

describe("rate-limit keys", function()
    it("joins the namespace and parts", function()
        assert.are.equal("ns|ip=1.2.3.4|route=/x", algo.build_key("ns", { "ip=1.2.3.4", "route=/x" }))
    end)

    it("escapes separators so one combination cannot forge another", function()
        local a = algo.build_key("", { "header=a|b" })
        local b = algo.build_key("", { "header=a", "b" })
        assert.are_not.equal(a, b)
        assert.is_nil(algo.build_key("", { "h={x}" }):find("[{}]"))
    end)

    it("puts the identity in a Redis Cluster hash tag", function()
        assert.are.equal("rl:{|ip=1.2.3.4}:s:60", algo.redis_key("|ip=1.2.3.4", "sliding", 60))
    end)

    it("reports the limit with the fewest remaining", function()
        local r = algo.tightest({ { limit = 1000, remaining = 900 }, { limit = 10, remaining = 3 } })
        assert.are.equal(10, r.limit)
    end)
end)

describe("rate-limit schema", function()
    it("accepts the shorthand and fills the defaults", function()
        local conf = assert(validate({ limit = 10 }))
        assert.are.equal("sliding", conf.algorithm)
        assert.are.equal("ip", conf.by)
        assert.are.equal("local", conf.storage)
        assert.are.equal("limits", conf.dict)
        assert.are.equal("fail_open", conf.on_redis_error)
    end)

    it("accepts several limits and a combined key", function()
        assert(validate({ limits = { { limit = 1000, window = 3600 }, { limit = 10, window = 1 } },
            by = { "consumer", "route" } }))
    end)

    it("refuses a config with neither or both of limit and limits", function()
        assert.is_nil((validate({})))
        assert.is_nil((validate({ limit = 1, limits = { { limit = 1, window = 1 } } })))
    end)

    it("refuses an unknown by, and by = header without a header name", function()
        local _, err = validate({ limit = 1, by = "cookie" })
        assert.matches("unknown key cookie", err)
        _, err = validate({ limit = 1, by = { "ip", "header" } })
        assert.matches("needs header", err)
    end)

    it("refuses burst outside gcra, and bad field values", function()
        local _, err = validate({ limit = 5, burst = 2 })
        assert.matches("only to algorithm = gcra", err)
        assert.is_truthy(validate({ limit = 5, burst = 2, algorithm = "gcra" }))
        _, err = validate({ limit = 0 })
        assert.matches("at least 1", err)
        _, err = validate({ limit = 1, storage = "memcached" })
        assert.matches("one of", err)
    end)
end)
