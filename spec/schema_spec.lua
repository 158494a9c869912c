-- Plugin config schemas (lua/moongate/schema.lua): validate() with every
-- field type, required fields, defaults, enums, ranges, nested tables,
-- arrays, maps, unknown fields and check(); check_schema() on schemas.
local schema = require("moongate.schema")

local function f(spec)
    spec.description = spec.description or "a field"
    return spec
end

-- validate() with a one-field schema { x = spec }. Errors name the field
-- path ("x: required"); errors about the whole config start with ": ".
local function one(spec, conf)
    return schema.validate({ fields = { x = f(spec) } }, conf)
end

describe("schema.validate types", function()
    local cases = {
        { "string", "abc", 1, "x: expected string, got number" },
        { "number", 1.5, "1.5", "x: expected number, got string" },
        { "integer", 3, true, "x: expected integer, got boolean" },
        { "boolean", false, "false", "x: expected boolean, got string" },
        { "table", { a = 1 }, "t", "x: expected table, got string" },
        { "array", { 1, 2 }, 1, "x: expected array, got number" },
        { "map", { a = 1 }, "m", "x: expected map, got string" },
        { "function", print, "print", "x: expected function, got string" },
    }
    for _, c in ipairs(cases) do
        local typ, good, bad, msg = c[1], c[2], c[3], c[4]

        it("accepts a " .. typ .. " value for a " .. typ .. " field", function()
            local conf, errs = one({ type = typ }, { x = good })
            assert.is_nil(errs)
            assert.are.same(good, conf.x)
        end)

        it("refuses a " .. type(bad) .. " for a " .. typ .. " field, naming both types", function()
            local conf, errs = one({ type = typ }, { x = bad })
            assert.is_nil(conf)
            assert.are.same({ msg }, errs)
        end)
    end

    it("accepts anything for an any field", function()
        for _, v in ipairs({ 1, "s", true, {}, print }) do
            local conf, errs = one({ type = "any" }, { x = v })
            assert.is_nil(errs)
            assert.are.equal(v, conf.x)
        end
    end)

    it("refuses a fraction for an integer field", function()
        local conf, errs = one({ type = "integer" }, { x = 2.5 })
        assert.is_nil(conf)
        assert.are.same({ "x: expected an integer, got 2.5" }, errs)
    end)

    it("refuses a config that is not a table, as an error about the whole config", function()
        local conf, errs = schema.validate({ fields = {} }, "nope")
        assert.is_nil(conf)
        assert.are.same({ ": expected a table, got string" }, errs)
    end)
end)

describe("schema.validate required fields and defaults", function()
    it("reports a missing required field", function()
        local conf, errs = one({ type = "string", required = true }, {})
        assert.is_nil(conf)
        assert.are.same({ "x: required" }, errs)
    end)

    it("accepts a missing optional field and leaves it nil", function()
        local conf, errs = one({ type = "string" }, {})
        assert.is_nil(errs)
        assert.are.same({}, conf)
    end)

    it("fills in a default for a missing field", function()
        local conf = one({ type = "number", default = 60 }, {})
        assert.are.same({ x = 60 }, conf)
    end)

    it("keeps a given value over the default, including false", function()
        assert.are.same({ x = false }, one({ type = "boolean", default = true }, { x = false }))
        assert.are.same({ x = 5 }, one({ type = "number", default = 60 }, { x = 5 }))
    end)

    it("uses the default of a required field that is missing", function()
        local conf, errs = one({ type = "string", required = true, default = "ip" }, {})
        assert.is_nil(errs)
        assert.are.same({ x = "ip" }, conf)
    end)

    it("copies a table default, so no two configs share it", function()
        local spec = { type = "array", items = { type = "string" }, default = { "a", "b" } }
        local s = { fields = { x = f(spec) } }
        local c1 = schema.validate(s, {})
        local c2 = schema.validate(s, {})
        assert.are.same({ "a", "b" }, c1.x)
        assert.are_not.equal(spec.default, c1.x)
        assert.are_not.equal(c1.x, c2.x)
        c1.x[1] = "changed"
        assert.are.same({ "a", "b" }, spec.default)
        assert.are.same({ "a", "b" }, c2.x)
    end)

    it("fills in the defaults inside a given nested table", function()
        local s = { fields = { redis = f({ type = "table", fields = {
            host = f({ type = "string", default = "127.0.0.1" }),
            port = f({ type = "integer", default = 6379 }),
        } }) } }
        local conf, errs = schema.validate(s, { redis = { port = 7000 } })
        assert.is_nil(errs)
        assert.are.same({ redis = { host = "127.0.0.1", port = 7000 } }, conf)
    end)

    it("fills in nested defaults under a table default", function()
        local s = { fields = { redis = f({ type = "table", default = {}, fields = {
            host = f({ type = "string", default = "127.0.0.1" }),
            opts = f({ type = "table", default = { tls = false }, fields = {
                tls = f({ type = "boolean" }),
            } }),
        } }) } }
        local c1 = schema.validate(s, {})
        local c2 = schema.validate(s, {})
        assert.are.same({ redis = { host = "127.0.0.1", opts = { tls = false } } }, c1)
        c1.redis.opts.tls = true
        assert.is_false(c2.redis.opts.tls)
        assert.are.same({ tls = false }, s.fields.redis.fields.opts.default)
    end)

    it("returns a fresh table and leaves the given config untouched", function()
        local given = { y = 1 }
        local s = { fields = {
            x = f({ type = "number", default = 2 }),
            y = f({ type = "number" }),
        } }
        local conf = schema.validate(s, given)
        assert.are_not.equal(given, conf)
        assert.are.same({ x = 2, y = 1 }, conf)
        assert.are.same({ y = 1 }, given)
    end)
end)

describe("schema.validate enums and ranges", function()
    it("accepts a value listed in enum", function()
        assert.are.same({ x = "consumer" },
            one({ type = "string", enum = { "ip", "consumer" } }, { x = "consumer" }))
    end)

    it("refuses a value not listed in enum, naming the choices", function()
        local conf, errs = one({ type = "string", enum = { "ip", "consumer" } }, { x = "moon" })
        assert.is_nil(conf)
        assert.are.same({ "x: must be one of ip, consumer" }, errs)
    end)

    it("checks a number enum", function()
        local _, errs = one({ type = "integer", enum = { 1, 2 } }, { x = 3 })
        assert.are.same({ "x: must be one of 1, 2" }, errs)
    end)

    it("accepts the bounds of min and max themselves", function()
        local spec = { type = "number", min = 1, max = 10 }
        assert.are.same({ x = 1 }, one(spec, { x = 1 }))
        assert.are.same({ x = 10 }, one(spec, { x = 10 }))
    end)

    it("refuses a number below min or above max", function()
        local spec = { type = "number", min = 1, max = 10 }
        assert.are.same({ "x: must be at least 1" }, select(2, one(spec, { x = 0.5 })))
        assert.are.same({ "x: must be at most 10" }, select(2, one(spec, { x = 11 })))
    end)

    it("checks min and max on integers too", function()
        local spec = { type = "integer", min = 0, max = 65535 }
        assert.are.same({ "x: must be at least 0" }, select(2, one(spec, { x = -1 })))
        assert.are.same({ "x: must be at most 65535" }, select(2, one(spec, { x = 70000 })))
    end)

    it("checks a string's min_len and pattern", function()
        local spec = { type = "string", min_len = 3, pattern = "^%a+$" }
        assert.are.same({ x = "abc" }, one(spec, { x = "abc" }))
        assert.are.same({ "x: must be at least 3 characters" }, select(2, one(spec, { x = "ab" })))
        assert.are.same({ "x: does not match ^%a+$" }, select(2, one(spec, { x = "ab1" })))
    end)
end)

describe("schema.validate tables, arrays and maps", function()
    local nested = { fields = { redis = f({ type = "table", fields = {
        host = f({ type = "string", required = true }),
        port = f({ type = "integer", min = 1 }),
    } }) } }

    it("checks the fields of a nested table with dotted paths", function()
        local conf, errs = schema.validate(nested, { redis = { port = 0 } })
        assert.is_nil(conf)
        assert.are.same({ "redis.host: required", "redis.port: must be at least 1" }, errs)
    end)

    it("refuses an unknown field inside a nested table", function()
        local _, errs = schema.validate(nested, { redis = { host = "h", hots = "x" } })
        assert.are.same({ "redis.hots: unknown field" }, errs)
    end)

    it("checks every item of an array, naming its index", function()
        local s = { fields = { allow = f({ type = "array", items = { type = "string" } }) } }
        assert.are.same({ allow = { "a", "b" } }, schema.validate(s, { allow = { "a", "b" } }))
        local _, errs = schema.validate(s, { allow = { "a", 2, "c", false } })
        assert.are.same({ "allow[2]: expected string, got number",
            "allow[4]: expected string, got boolean" }, errs)
    end)

    it("accepts an empty array", function()
        local s = { fields = { allow = f({ type = "array", items = { type = "string" } }) } }
        assert.are.same({ allow = {} }, schema.validate(s, { allow = {} }))
    end)

    it("refuses a table with non-list keys for an array", function()
        local s = { fields = { allow = f({ type = "array" }) } }
        assert.are.same({ "allow: expected a list" },
            select(2, schema.validate(s, { allow = { a = 1 } })))
        assert.are.same({ "allow: expected a list" },
            select(2, schema.validate(s, { allow = { [1] = "a", [3] = "c" } })))
    end)

    it("checks array items that are tables with fields", function()
        local s = { fields = { targets = f({ type = "array", items = { type = "table", fields = {
            host = f({ type = "string", required = true }),
            weight = f({ type = "integer", default = 1 }),
        } } }) } }
        local conf = schema.validate(s,
            { targets = { { host = "a" }, { host = "b", weight = 3 } } })
        assert.are.same(
            { targets = { { host = "a", weight = 1 }, { host = "b", weight = 3 } } }, conf)
        local _, errs = schema.validate(s, { targets = { { weight = 2 } } })
        assert.are.same({ "targets[1].host: required" }, errs)
    end)

    it("checks every value of a map, naming its key", function()
        local s = { fields = {
            limits = f({ type = "map", values = { type = "integer", min = 1 } }),
        } }
        assert.are.same({ limits = { gold = 100, free = 10 } },
            schema.validate(s, { limits = { gold = 100, free = 10 } }))
        local _, errs = schema.validate(s, { limits = { gold = 0 } })
        assert.are.same({ "limits.gold: must be at least 1" }, errs)
    end)

    it("refuses a map with a key that is not a string", function()
        local s = { fields = { m = f({ type = "map" }) } }
        assert.are.same({ "m: keys must be strings" }, select(2, schema.validate(s, { m = { 1 } })))
    end)
end)

describe("schema.validate unknown fields and many errors", function()
    it("refuses an unknown field", function()
        local _, errs = one({ type = "string" }, { x = "a", y = 1 })
        assert.are.same({ "y: unknown field" }, errs)
    end)

    it("refuses a list entry in a field table", function()
        local _, errs = one({ type = "string" }, { "positional" })
        assert.are.same({ "1: unknown field" }, errs)
    end)

    it("reports every error at once, in a stable order", function()
        local s = { fields = {
            a = f({ type = "string", required = true }),
            b = f({ type = "number", max = 1 }),
            c = f({ type = "string", enum = { "x" } }),
        } }
        local _, errs = schema.validate(s, { b = 2, c = "y", zz = 1, yy = 2 })
        assert.are.same({
            "yy: unknown field", "zz: unknown field",
            "a: required", "b: must be at most 1", "c: must be one of x",
        }, errs)
    end)
end)

describe("schema.validate check()", function()
    local s = {
        fields = {
            min = f({ type = "number", default = 0 }),
            max = f({ type = "number", required = true }),
        },
        check = function(conf)
            if conf.min > conf.max then return nil, "min must not exceed max" end
            return true
        end,
    }

    it("passes the config with defaults applied to check()", function()
        local seen
        local s2 = { fields = s.fields, check = function(conf) seen = conf; return true end }
        local conf = schema.validate(s2, { max = 5 })
        assert.are.equal(conf, seen)
        assert.are.same({ min = 0, max = 5 }, seen)
    end)

    it("reports check()'s reason as an error about the whole config", function()
        local conf, errs = schema.validate(s, { min = 9, max = 5 })
        assert.is_nil(conf)
        assert.are.same({ ": min must not exceed max" }, errs)
    end)

    it("reports a refusal without a reason as invalid", function()
        local _, errs = schema.validate({ fields = {}, check = function() return false end }, {})
        assert.are.same({ ": invalid" }, errs)
    end)

    it("does not run check() when a field is already wrong", function()
        local called = false
        local s2 = { fields = s.fields, check = function() called = true; return true end }
        local _, errs = schema.validate(s2, {})
        assert.are.same({ "max: required" }, errs)
        assert.is_false(called)
    end)
end)

describe("schema.check_schema", function()
    it("accepts fields that all have a type and a description", function()
        assert.is_true(schema.check_schema({ fields = {
            a = { type = "string", description = "a" },
            t = { type = "table", description = "t", fields = {
                b = { type = "number", description = "b" },
            } },
        } }))
    end)

    it("accepts a schema without fields", function()
        assert.is_true(schema.check_schema({ fields = {} }))
    end)

    it("refuses a schema without a fields table", function()
        assert.are.same({ nil, "schema.fields must be a table" }, { schema.check_schema(nil) })
        assert.are.same({ nil, "schema.fields must be a table" }, { schema.check_schema({}) })
    end)

    it("refuses a field without a type", function()
        local ok, err = schema.check_schema({ fields = { a = { description = "a" } } })
        assert.is_nil(ok)
        assert.are.equal("a: field spec needs a type", err)
    end)

    it("refuses a field without a description", function()
        local ok, err = schema.check_schema({ fields = { a = { type = "string" } } })
        assert.is_nil(ok)
        assert.are.equal("a: field spec needs a description", err)
    end)

    it("checks the fields of nested tables, naming the path", function()
        local ok, err = schema.check_schema({ fields = { redis = { type = "table",
            description = "r", fields = { host = { type = "string" } } } } })
        assert.is_nil(ok)
        assert.are.equal("redis.host: field spec needs a description", err)
    end)
end)

describe("schema.deep_copy", function()
    it("copies nested tables and keeps scalars", function()
        local t = { a = { b = { 1, 2 } }, s = "x" }
        local c = schema.deep_copy(t)
        assert.are.same(t, c)
        assert.are_not.equal(t.a, c.a)
        assert.are_not.equal(t.a.b, c.a.b)
        assert.are.equal(5, schema.deep_copy(5))
    end)
end)
