-- gw.shared.<zone>: the shared-memory dicts (core/shdict.c), the same
-- memory in every worker, surviving reloads. Methods follow OpenResty's
-- ngx.shared.DICT: get, set, add, replace, incr, delete, ttl, expire,
-- flush_all, stats; plus delete_prefix (for cache purges). Keys are strings; values numbers, strings or booleans.
-- TTLs are in seconds (0 or nil: no expiry). Usable in any phase.
local ffi = require("ffi")
require("moongate.cdef")

local C = ffi.C
local ffi_string, ffi_new = ffi.string, ffi.new
local type, tostring, error, setmetatable, rawset = type, tostring, error, setmetatable, rawset

local MG_DECLINED, MG_ETOOLARGE, MG_EPROTO = 2, -4003, -4004
local NIL, NUMBER, STRING, BOOLEAN = 0, 1, 2, 3

local value = ffi_new("mg_shdict_value_t")
local out = ffi_new("double[3]")
local evicted = ffi_new("int[1]")
local buf_size = 4096
local buf = ffi_new("char[?]", buf_size)

local Dict = {}
Dict.__index = Dict

local function check_key(key)
    if type(key) ~= "string" or #key == 0 then error("key must be a non-empty string", 3) end
end

--- dict:get(key) -> value, flags (nil when missing or expired).
function Dict:get(key)
    check_key(key)
    local rc = C.mg_ffi_shdict_get(self._d, key, #key, value, buf, buf_size)
    if rc == MG_ETOOLARGE then
        -- A string larger than the scratch buffer: grow it once and retry.
        buf_size = tonumber(value.len) * 2
        buf = ffi_new("char[?]", buf_size)
        rc = C.mg_ffi_shdict_get(self._d, key, #key, value, buf, buf_size)
    end
    if rc ~= 0 then return nil end
    local t, flags = value.type, value.flags
    if t == NUMBER then return value.number, flags end
    if t == STRING then return ffi_string(value.str, value.len), flags end
    if t == BOOLEAN then return value.number ~= 0, flags end
    return nil
end

local function store(self, op, key, v, ttl, flags)
    check_key(key)
    local tv = type(v)
    if tv == "number" then
        value.type, value.number = NUMBER, v
    elseif tv == "string" then
        value.type, value.str, value.len = STRING, v, #v
    elseif tv == "boolean" then
        value.type, value.number = BOOLEAN, v and 1 or 0
    elseif v == nil then
        value.type = NIL
    else
        error("values must be numbers, strings or booleans", 3)
    end
    value.flags = flags or 0
    local rc = C.mg_ffi_shdict_store(self._d, op, key, #key, value, ttl or 0, evicted)
    if rc == 0 then return true, nil, evicted[0] > 0 end
    if rc == MG_DECLINED then return false, op == 1 and "exists" or "not found" end
    if rc == MG_ETOOLARGE then return false, "no memory" end
    return false, "invalid value"
end

--- dict:set(key, value[, ttl[, flags]]) -> ok, err, forcible (evicted others).
function Dict:set(key, v, ttl, flags) return store(self, 0, key, v, ttl, flags) end
--- dict:add(...) as set, only when absent -> false, "exists" otherwise.
function Dict:add(key, v, ttl, flags) return store(self, 1, key, v, ttl, flags) end
--- dict:replace(...) as set, only when present -> false, "not found" otherwise.
function Dict:replace(key, v, ttl, flags) return store(self, 2, key, v, ttl, flags) end

--- dict:incr(key, delta[, init[, init_ttl]]) -> new value or nil, err.
-- Atomic across all workers. Without init a missing key is "not found".
function Dict:incr(key, delta, init, init_ttl)
    check_key(key)
    if type(delta) ~= "number" then error("delta must be a number", 2) end
    local rc = C.mg_ffi_shdict_incr(self._d, key, #key, delta, init and 1 or 0,
                                    init or 0, init_ttl or 0, out)
    if rc == 0 then return out[0] end
    if rc == MG_DECLINED then return nil, "not found" end
    if rc == MG_EPROTO then return nil, "not a number" end
    return nil, "no memory"
end

local window_out = ffi.new("double[5]")

--- dict:window_hit(key, window, slices, limit) -> admitted, hits_before,
-- retry_after, reset_after, slice; or nil, err. A sliding-window counter
-- (core/shdict.h mg_shdict_window_hit): counts one hit unless that would
-- put more than `limit` hits in some interval of `window` seconds; the
-- window is cut in `slices` (1..60) and up to one slice's worth may be
-- refused early. Atomic across workers.
function Dict:window_hit(key, window, slices, limit)
    check_key(key)
    local rc = C.mg_ffi_shdict_window_hit(self._d, key, #key, window, slices, limit, window_out)
    if rc == 0 then
        return window_out[0] ~= 0, window_out[1], window_out[2], window_out[3], window_out[4]
    end
    if rc == MG_EPROTO then return nil, "not a sliding window" end
    if rc == MG_DECLINED then return nil, "bad window or slices" end
    return nil, "no memory"
end

--- dict:window_undo(key, slices, slice): takes back a hit window_hit
-- counted (its fifth result), e.g. when another limit refused the request.
function Dict:window_undo(key, slices, slice)
    check_key(key)
    C.mg_ffi_shdict_window_undo(self._d, key, #key, slices, slice)
end

--- dict:delete(key)
function Dict:delete(key)
    check_key(key)
    C.mg_ffi_shdict_delete(self._d, key, #key)
end

--- dict:ttl(key) -> seconds left (0: no expiry) or nil, "not found".
function Dict:ttl(key)
    check_key(key)
    if C.mg_ffi_shdict_ttl(self._d, key, #key, out) ~= 0 then return nil, "not found" end
    return out[0]
end

--- dict:expire(key, ttl) -> true or nil, "not found".
function Dict:expire(key, ttl)
    check_key(key)
    if C.mg_ffi_shdict_expire(self._d, key, #key, ttl or 0) ~= 0 then
        return nil, "not found"
    end
    return true
end

--- dict:delete_prefix(prefix) -> how many entries were removed.
-- Removes every key starting with `prefix` ("" removes everything). Walks
-- every entry of the zone once under its lock: for purges, not hot paths.
function Dict:delete_prefix(prefix)
    if type(prefix) ~= "string" then error("prefix must be a string", 2) end
    return tonumber(C.mg_ffi_shdict_delete_prefix(self._d, prefix, #prefix))
end

--- dict:flush_all() empties the zone.
function Dict:flush_all() C.mg_ffi_shdict_flush_all(self._d) end

--- dict:stats() -> { capacity =, free =, count = } (bytes, bytes, entries).
function Dict:stats()
    C.mg_ffi_shdict_stats(self._d, out)
    return { capacity = out[0], free = out[1], count = out[2] }
end

-- gw.shared.limits -> the zone named "limits", or nil if not configured.
return setmetatable({}, {
    __index = function(t, name)
        if type(name) ~= "string" then return nil end
        local d = C.mg_ffi_shdict_find(name, #name)
        if d == nil then return nil end
        local dict = setmetatable({ _d = d, name = name }, Dict)
        rawset(t, name, dict)
        return dict
    end,
})
