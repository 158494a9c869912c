-- Shared by the plugin specs: a plugin config checked against its schema
-- the way a config load checks it.
--
--   local conf, refused = require("spec.helpers.plugin_conf")(P)
--   local c = conf({ allow = { "user" } })        -- defaults applied, or fails
--   refused({ allow = 5 }, "expected array")       -- the schema says no
local schema = require("moongate.schema")
local luassert = require("luassert") -- busted's assert lives in spec files' env

return function(P)
    local function conf(c)
        local out, errs = schema.validate(P.schema, c)
        assert(out, errs and table.concat(errs, "; "))
        return out
    end

    local function refused(c, pattern)
        local out, errs = schema.validate(P.schema, c)
        luassert.is_nil(out)
        luassert.matches(pattern, table.concat(errs, "; "))
    end

    return conf, refused
end
