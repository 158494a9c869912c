-- request-size-limit: a per-route request body limit lower than the route's
-- max_body, answering 413 {"error":"request body too large"}.
--
--   ["request-size-limit"] = { limit = "64k" }     -- or a number of bytes
--
-- How it is enforced: a declared Content-Length over the limit is refused
-- before a byte of the body is read (gw.request.get_content_length). A
-- chunked body has no length until read: it is read with
-- gw.request.get_body (bounded by the route's max_body, which the core
-- enforces while streaming) and refused when over the limit; the upstream
-- never sees it. The trade-off for chunked bodies: under this plugin they
-- are buffered in the gateway, up to the route's max_body, not streamed.
local gw = require("moongate.gw")

local type, tonumber, lower, floor = type, tonumber, string.lower, math.floor

local UNITS = { [""] = 1, b = 1, k = 1024, m = 1024 * 1024, g = 1024 * 1024 * 1024 }

--- P.parse_size(v) -> bytes, or nil, err. 1024 (bytes), "512", "64k", "1m", "1g".
local function parse_size(v)
    if type(v) == "number" then
        if v >= 0 and v == floor(v) then return v end
        return nil, "must be a whole number of bytes"
    end
    if type(v) ~= "string" then return nil, "must be a number or a size string" end
    local n, u = lower(v):match("^(%d+)([kmgb]?)$")
    if not n then return nil, "invalid size " .. v .. " (bytes, or like \"64k\", \"1m\")" end
    return tonumber(n) * UNITS[u]
end

local P = {
    name = "request-size-limit",
    priority = 2950,
    schema = {
        fields = {
            limit = { type = "any", required = true,
                description = "largest request body accepted: bytes, or \"64k\", \"1m\", \"1g\"" },
        },
        check = function(conf)
            local _, err = parse_size(conf.limit)
            if err then return nil, "limit " .. err end
            return true
        end,
    },
    parse_size = parse_size,
}

local TOO_LARGE = { error = "request body too large" }

function P.access(conf, ctx)
    local limit = parse_size(conf.limit)
    -- A declared length decides before a byte is read; a chunked body is
    -- read (bounded by the route's max_body) and measured.
    local n, chunked = gw.request.get_content_length(ctx)
    if n and n > limit then return 413, TOO_LARGE end
    if not chunked then return end
    local body = gw.request.get_body(ctx)
    -- nil: over max_body (the core answered 413) or the client went away
    if body and #body > limit then return 413, TOO_LARGE end
end

return P
