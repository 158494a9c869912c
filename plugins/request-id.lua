-- request-id: W3C trace context on top of the gateway's request id.
--
--   ["request-id"] = {}                                   -- defaults
--   ["request-id"] = { response_header = "traceparent" }  -- echo the traceparent
--
-- The X-Request-Id is the gateway's own (gw.request.get_id: a trusted peer's,
-- or generated; sent upstream and returned to the client); this plugin leaves
-- it alone. It adds trace context: an incoming `traceparent` (version 00, a
-- 32-hex trace id and a 16-hex parent id, neither all zeros, 2-hex flags) keeps
-- its trace id and flags, and the upstream gets a new parent id: the
-- gateway's span id (8 random bytes, hex). A missing or malformed traceparent
-- starts a fresh trace (flags 01); `tracestate` goes upstream unchanged only
-- with a valid traceparent and is dropped otherwise. The trace id is in
-- ctx.var.trace_id (span id: ctx.var.span_id) and returned to the client in
-- `response_header`: "X-Trace-Id" (the trace id), "traceparent" (the
-- traceparent sent upstream), or "" for none. No span exporter (yet).
local gw = require("moongate.gw")

local type, byte, find, format = type, string.byte, string.find, string.format
local random = gw.crypto.random

local P = {
    name = "request-id",
    priority = 11000, -- rewrite, before everything else, so all later phases see the ids
    schema = {
        fields = {
            response_header = { type = "string", default = "X-Trace-Id",
                pattern = "^[%w!#$%%&'*+.^_`|~-]*$",
                description = "response header for the trace id (\"traceparent\": the "
                    .. "traceparent sent upstream; \"\": none)" },
        },
    },
}

local ZERO32, ZERO16 = string.rep("0", 32), string.rep("0", 16)

--- P.parse_traceparent(s) -> trace_id, parent_id, flags; or nil, reason.
-- Version 00 only, lower-case hex, exactly 55 characters.
function P.parse_traceparent(s)
    if type(s) ~= "string" then return nil, "missing" end
    if #s ~= 55 then return nil, "bad length" end
    local v, tid, pid, fl = s:match("^(%x%x)%-(%x+)%-(%x+)%-(%x%x)$")
    if not v or #tid ~= 32 or #pid ~= 16 then return nil, "bad format" end
    if find(s, "[A-F]") then return nil, "upper-case hex" end
    if v ~= "00" then return nil, "unsupported version" end
    if tid == ZERO32 then return nil, "zero trace id" end
    if pid == ZERO16 then return nil, "zero parent id" end
    return tid, pid, fl
end

local function hex(bytes)
    return (bytes:gsub(".", function(c) return format("%02x", byte(c)) end))
end

--- P.new_id(nbytes) -> lower-case hex of nbytes random bytes, never all zeros.
function P.new_id(n)
    while true do
        local h = hex(random(n))
        if find(h, "[^0]") then return h end
    end
end

function P.rewrite(conf, ctx)
    local incoming = gw.request.get_header(ctx, "traceparent")
    local tid, _, flags = P.parse_traceparent(incoming)
    if not tid then
        tid, flags = P.new_id(16), "01"
        gw.request.clear_header(ctx, "tracestate")
    end
    local span = P.new_id(8)
    local tp = "00-" .. tid .. "-" .. span .. "-" .. flags
    gw.request.set_header(ctx, "traceparent", tp)
    ctx.var.trace_id, ctx.var.span_id, ctx.var.traceparent = tid, span, tp
end

function P.header_filter(conf, ctx)
    local name = conf.response_header
    if name == "" or not ctx.var.trace_id then return end
    if name:lower() == "traceparent" then
        gw.response.set_header(ctx, name, ctx.var.traceparent)
    else
        gw.response.set_header(ctx, name, ctx.var.trace_id)
    end
end

return P
