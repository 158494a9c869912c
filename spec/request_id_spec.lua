-- plugins/request-id.lua: W3C traceparent parsing and validation, and the
-- ids the gateway makes. Propagation upstream and the response header are
-- exercised in tests/e2e/test_everyday_plugins.py.
local schema = require("moongate.schema")

local P = dofile("plugins/request-id.lua")

local VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

describe("request-id traceparent parsing", function()
    it("returns the trace id, parent id and flags of a valid version-00 header", function()
        local tid, pid, fl = P.parse_traceparent(VALID)
        assert.are.equal("4bf92f3577b34da6a3ce929d0e0e4736", tid)
        assert.are.equal("00f067aa0ba902b7", pid)
        assert.are.equal("01", fl)
        assert.are.equal("00", select(3, P.parse_traceparent(VALID:sub(1, -3) .. "00")))
    end)

    it("refuses all-zero trace and parent ids", function()
        assert.are.same({ nil, "zero trace id" },
            { P.parse_traceparent("00-" .. ("0"):rep(32) .. "-00f067aa0ba902b7-01") })
        assert.are.same({ nil, "zero parent id" },
            { P.parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-" .. ("0"):rep(16) .. "-01") })
    end)

    it("refuses other versions, upper-case hex, bad lengths and separators", function()
        local bad = {
            "ff" .. VALID:sub(3), "01" .. VALID:sub(3), VALID:upper(),
            VALID .. "-01", VALID:sub(1, -2), "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-011",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            " " .. VALID:sub(2), "", "garbage",
        }
        for _, s in ipairs(bad) do
            assert.is_nil((P.parse_traceparent(s)), s)
        end
        assert.is_nil((P.parse_traceparent(nil)))
    end)
end)

describe("request-id new ids", function()
    it("makes lower-case hex ids of the asked size that differ each time", function()
        local a, b = P.new_id(8), P.new_id(8)
        assert.matches("^%x+$", a)
        assert.are.equal(16, #a)
        assert.are.equal(32, #P.new_id(16))
        assert.is_nil(a:find("[A-F]"))
        assert.are_not.equal(a, b)
    end)

    it("makes a traceparent that parses back", function()
        local tp = "00-" .. P.new_id(16) .. "-" .. P.new_id(8) .. "-01"
        assert.is_truthy((P.parse_traceparent(tp)))
    end)
end)

describe("request-id config", function()
    it("defaults the response header to X-Trace-Id", function()
        local c = assert(schema.validate(P.schema, {}))
        assert.are.equal("X-Trace-Id", c.response_header)
    end)

    it("refuses a response header name that is not a token", function()
        local out, errs = schema.validate(P.schema, { response_header = "bad name" })
        assert.is_nil(out)
        assert.matches("response_header", table.concat(errs, "; "))
    end)
end)
