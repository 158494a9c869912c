-- gw.metrics: counters a plugin defines and the admin listener's /metrics
-- shows beside the gateway's own (core/metrics.c keeps them in the same
-- shared memory, so every worker adds to one value and a reload keeps it).
--
--   local hits = gw.metrics.counter("myplugin_hits_total", "Hits by result.",
--                                   { "route", "result" })
--   hits:inc(1, { ctx.route.name, "ok" })
--
-- Cardinality is the plugin's to bound: label values should come from a
-- small set (a route name, a decision, a reason), never from a client
-- (a path, a user id). The gateway holds at most 2048 plugin series and 64
-- counters; past that :inc returns nil, "too many series".
local ffi = require("ffi")
require("moongate.cdef")

local C = ffi.C
local type, error, ipairs, tostring, setmetatable = type, error, ipairs, tostring, setmetatable
local concat, gsub, find = table.concat, string.gsub, string.find

local _M = {}

local Counter = {}
Counter.__index = Counter

local CACHE_MAX = 4096 -- per counter and worker: series ids already looked up

-- The gateway's own families (core/metrics.c): not for plugins.
local CORE = {}
for _, n in ipairs({ "moongate_http_requests_total", "moongate_http_received_bytes_total",
    "moongate_http_sent_bytes_total", "moongate_worker_restarts_total",
    "moongate_config_reloads_total" }) do
    CORE[n] = true
end

local function escape(v)
    return (gsub(v, '[\\"\n]', { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end

--- gw.metrics.counter(name, help[, labels]) -> counter. Any phase, or at
-- plugin load. `name` must follow Prometheus conventions and end in
-- "_total"; `labels` is a list of label names. Defining the same name again
-- (a reload, another worker) returns the same counter; with other label
-- names it is an error.
-- Example: local c = gw.metrics.counter("x_total", "Things.", { "kind" })
function _M.counter(name, help, labels)
    if type(name) ~= "string" or not find(name, "^[a-zA-Z_:][a-zA-Z0-9_:]*_total$") then
        error("metric name must match [a-zA-Z_:][a-zA-Z0-9_:]* and end in _total", 2)
    end
    if CORE[name] then error("metric " .. name .. " belongs to the gateway", 2) end
    if type(help) ~= "string" or help == "" or find(help, "[\r\n]") then
        error("metric help must be a non-empty line of text", 2)
    end
    labels = labels or {}
    if type(labels) ~= "table" then error("labels must be a list of names", 2) end
    for _, l in ipairs(labels) do
        if type(l) ~= "string" or not find(l, "^[a-zA-Z_][a-zA-Z0-9_]*$") or find(l, "^__") then
            error("invalid label name " .. tostring(l), 2)
        end
    end
    local fam = C.mg_ffi_metrics_define(name, help, concat(labels, ","))
    if fam == -1 then
        error("metric " .. name .. " is already defined with other labels (or too long)", 2)
    elseif fam < 0 then
        error("too many plugin metrics (64)", 2)
    end
    return setmetatable({ fam = fam, labels = labels, ids = {}, nids = 0 }, Counter)
end

--- counter:inc([n[, values]]) -> true, or nil and "too many series".
-- `n` defaults to 1 (a whole number >= 0); `values` lists the label
-- values in the order of the label names. Cheap once a label set was seen:
-- a table lookup and one atomic add.
function Counter:inc(n, values)
    n = n or 1
    if type(n) ~= "number" or n < 0 or n % 1 ~= 0 then
        error("counter increment must be a whole number >= 0", 2)
    end
    values = values or {}
    local key = #self.labels == 0 and "" or concat(values, "\0")
    local id = self.ids[key]
    if not id then
        if #values ~= #self.labels then
            error("expected " .. #self.labels .. " label values, got " .. #values, 2)
        end
        local parts = {}
        for i, l in ipairs(self.labels) do
            parts[i] = l .. '="' .. escape(tostring(values[i])) .. '"'
        end
        id = C.mg_ffi_metrics_series(self.fam, concat(parts, ","))
        if id < 0 then return nil, "too many series" end
        if self.nids < CACHE_MAX then
            self.ids[key] = id
            self.nids = self.nids + 1
        end
    end
    C.mg_ffi_metrics_add(id, n)
    return true
end

return _M
