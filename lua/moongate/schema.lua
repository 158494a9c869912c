-- Plugin config schemas: checked once per config generation, never per
-- request. A schema is a table of fields:
--
--   schema = {
--     fields = {
--       limit  = { type = "number", required = true, min = 1,
--                  description = "requests allowed per window" },
--       by     = { type = "string", default = "ip", enum = { "ip", "consumer" },
--                  description = "what a limit is counted per" },
--       allow  = { type = "array", items = { type = "string" },
--                  description = "roles let through" },
--       redis  = { type = "table", fields = { ... }, description = "..." },
--     },
--     check = function(conf) return true end,   -- optional cross-field rule
--   }
--
-- Types: string, number, integer, boolean, table (with `fields`), array
-- (with `items`), map (string keys, values per `values`), function, any.
-- validate() returns a fresh copy of the config with defaults filled in, or
-- nil and a list of "path: why" strings. Unknown fields are errors.
local type, pairs, ipairs, tostring = type, pairs, ipairs, tostring
local floor, sort, concat = math.floor, table.sort, table.concat

local _M = {}

local function is_array(t)
    local n = 0
    for _ in pairs(t) do n = n + 1 end
    for i = 1, n do
        if t[i] == nil then return false end
    end
    return true
end

local function join(path, key)
    if path == "" then return tostring(key) end
    if type(key) == "number" then return path .. "[" .. key .. "]" end
    return path .. "." .. key
end

local validate_value

local function check_fields(spec, value, path, errors)
    local out = {}
    local keys = {}
    for k in pairs(value) do keys[#keys + 1] = k end
    sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    for _, k in ipairs(keys) do
        if type(k) ~= "string" or not spec.fields[k] then
            errors[#errors + 1] = join(path, tostring(k)) .. ": unknown field"
        end
    end
    local names = {}
    for name in pairs(spec.fields) do names[#names + 1] = name end
    sort(names)
    for _, name in ipairs(names) do
        local fspec = spec.fields[name]
        local v = value[name]
        if v == nil then
            if fspec.default ~= nil then
                v = fspec.default
                if type(v) == "table" then v = _M.deep_copy(v) end
            elseif fspec.required then
                errors[#errors + 1] = join(path, name) .. ": required"
            end
        end
        if v ~= nil then
            out[name] = validate_value(fspec, v, join(path, name), errors)
        end
    end
    return out
end

local function check_number(spec, value, path, errors)
    if spec.type == "integer" and value ~= floor(value) then
        errors[#errors + 1] = path .. ": expected an integer, got " .. value
    end
    if spec.min and value < spec.min then
        errors[#errors + 1] = path .. ": must be at least " .. spec.min
    end
    if spec.max and value > spec.max then
        errors[#errors + 1] = path .. ": must be at most " .. spec.max
    end
end

validate_value = function(spec, value, path, errors)
    local want = spec.type or "any"
    local got = type(value)
    local lua_type = (want == "integer" and "number")
        or ((want == "array" or want == "map") and "table") or want
    if want ~= "any" and got ~= lua_type then
        errors[#errors + 1] = path .. ": expected " .. want .. ", got " .. got
        return value
    end
    if spec.enum then
        local ok = false
        for _, e in ipairs(spec.enum) do
            if e == value then ok = true end
        end
        if not ok then
            local names = {}
            for i, e in ipairs(spec.enum) do names[i] = tostring(e) end
            errors[#errors + 1] = path .. ": must be one of " .. concat(names, ", ")
        end
    end
    if want == "number" or want == "integer" then
        check_number(spec, value, path, errors)
    elseif want == "string" then
        if spec.min_len and #value < spec.min_len then
            errors[#errors + 1] = path .. ": must be at least " .. spec.min_len .. " characters"
        end
        if spec.pattern and not value:find(spec.pattern) then
            errors[#errors + 1] = path .. ": does not match " .. spec.pattern
        end
    elseif want == "table" and spec.fields then
        return check_fields(spec, value, path, errors)
    elseif want == "array" then
        if not is_array(value) then
            errors[#errors + 1] = path .. ": expected a list"
            return value
        end
        local out = {}
        for i, item in ipairs(value) do
            out[i] = spec.items and validate_value(spec.items, item, join(path, i), errors)
                or item
        end
        return out
    elseif want == "map" then
        local out = {}
        for k, v in pairs(value) do
            if type(k) ~= "string" then
                errors[#errors + 1] = path .. ": keys must be strings"
            else
                out[k] = spec.values and validate_value(spec.values, v, join(path, k), errors) or v
            end
        end
        return out
    end
    return value
end

function _M.deep_copy(t)
    if type(t) ~= "table" then return t end
    local out = {}
    for k, v in pairs(t) do out[k] = _M.deep_copy(v) end
    return out
end

-- Checks a schema itself: every field has a type and a description.
function _M.check_schema(schema)
    if type(schema) ~= "table" or type(schema.fields) ~= "table" then
        return nil, "schema.fields must be a table"
    end
    local function walk(fields, path)
        for name, f in pairs(fields) do
            if type(f) ~= "table" or type(f.type) ~= "string" then
                return nil, join(path, name) .. ": field spec needs a type"
            end
            if type(f.description) ~= "string" then
                return nil, join(path, name) .. ": field spec needs a description"
            end
            if f.fields then
                local ok, err = walk(f.fields, join(path, name))
                if not ok then return nil, err end
            end
        end
        return true
    end
    return walk(schema.fields, "")
end

-- Validates `conf` against `schema`. Returns the config with defaults, or
-- nil and a list of error strings (each "field.path: why").
function _M.validate(schema, conf)
    local errors = {}
    -- Errors about the whole config (not one field) start with ": ".
    if type(conf) ~= "table" then
        return nil, { ": expected a table, got " .. type(conf) }
    end
    local out = check_fields(schema, conf, "", errors)
    if #errors == 0 and schema.check then
        local ok, err = schema.check(out)
        if not ok then errors[#errors + 1] = ": " .. tostring(err or "invalid") end
    end
    if #errors > 0 then return nil, errors end
    return out
end

return _M
