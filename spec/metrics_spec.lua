-- gw.metrics (lua/moongate/metrics.lua): definitions are checked; outside a
-- gateway (moongate lua, no shared metrics area) counting is a no-op that
-- still validates its arguments. Counting itself is checked end to end in
-- tests/e2e/test_metrics.py.
local gw = require("moongate.gw")

describe("gw.metrics.counter", function()
    it("returns a counter whose inc accepts a count and label values", function()
        local c = gw.metrics.counter("spec_things_total", "Things.", { "kind", "result" })
        assert.is_true(c:inc(1, { "a", "ok" }))
        assert.is_true(c:inc(3, { "a", "ok" }))
        assert.is_true(gw.metrics.counter("spec_plain_total", "Plain."):inc())
    end)

    it("refuses names that are not Prometheus counter names", function()
        for _, name in ipairs({ "things", "1_total", "a-b_total", "", 42 }) do
            assert.has_error(function() gw.metrics.counter(name, "help") end,
                "metric name must match [a-zA-Z_:][a-zA-Z0-9_:]* and end in _total")
        end
    end)

    it("refuses the gateway's own metric names", function()
        assert.has_error(function()
            gw.metrics.counter("moongate_http_requests_total", "mine")
        end, "metric moongate_http_requests_total belongs to the gateway")
    end)

    it("refuses a missing or multi-line help and bad label names", function()
        assert.has_error(function() gw.metrics.counter("a_total", "") end,
            "metric help must be a non-empty line of text")
        assert.has_error(function() gw.metrics.counter("a_total", "x\ny") end,
            "metric help must be a non-empty line of text")
        assert.has_error(function() gw.metrics.counter("a_total", "x", { "le-x" }) end,
            "invalid label name le-x")
        assert.has_error(function() gw.metrics.counter("a_total", "x", { "__name" }) end,
            "invalid label name __name")
        assert.has_error(function() gw.metrics.counter("a_total", "x", "route") end,
            "labels must be a list of names")
    end)

    it("refuses negative or fractional increments and a wrong number of values", function()
        local c = gw.metrics.counter("spec_checked_total", "Checked.", { "kind" })
        assert.has_error(function() c:inc(-1, { "a" }) end,
            "counter increment must be a whole number >= 0")
        assert.has_error(function() c:inc(0.5, { "a" }) end,
            "counter increment must be a whole number >= 0")
        assert.has_error(function() c:inc(1, { "a", "b" }) end,
            "expected 1 label values, got 2")
        assert.has_error(function() c:inc(1) end, "expected 1 label values, got 0")
    end)
end)
