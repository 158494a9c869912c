-- moongate.transform: the request side of the templates. JSON, paths,
-- operations and the templates themselves are lua/moongate/json_ops.lua;
-- this module has what only a request has: the values templates read
-- (request_lookup) and URL encoding for paths and query strings.
-- Pure: gw is passed in, so everything here is testable with plain tables.
--
--   local T = require("moongate.transform")
--   local J = require("moongate.json_ops")
--   local tpl = assert(J.compile_template("/users/{params.id}"))  -- once per config
--   local path = J.render(tpl, T.request_lookup(gw, ctx), T.escape_path)
local null = require("cjson.safe").null

local type, ipairs, tonumber = type, ipairs, tonumber
local gsub, match, byte, char, format = string.gsub, string.match, string.byte, string.char,
    string.format
local concat = table.concat

local _M = {}

-- aggregate.md told configs to use require("moongate.transform").EMPTY_ARRAY
-- for a `[]` in a body; it is json_ops's now and stays reachable here.
_M.EMPTY_ARRAY = require("moongate.json_ops").EMPTY_ARRAY

--- T.escape("a b/c") -> "a%20b%2Fc": every byte but unreserved ones.
function _M.escape(s)
    return (gsub(s, "[^%w%-._~]", function(c) return format("%%%02X", byte(c)) end))
end

--- T.escape_path(v): T.escape for a path segment; "." and ".." (which the
-- gateway's path normalization would treat as dot segments) are refused.
function _M.escape_path(v)
    if v == "." or v == ".." or v == "" then return nil end
    return _M.escape(v)
end

local function hex_byte(h) return char(tonumber(h, 16)) end

local function unescape(s)
    s = gsub(s, "+", " ")
    return (gsub(s, "%%(%x%x)", hex_byte))
end
_M.unescape = unescape

--- T.parse_query("a=1&b=x%20y&a=2") -> { { "a", "1" }, { "b", "x y" }, { "a", "2" } }
-- (decoded names and values, in order; a name without "=" has value "").
function _M.parse_query(q)
    local out = {}
    for pair in (q or ""):gmatch("[^&]+") do
        local k, v = match(pair, "^([^=]*)=(.*)$")
        if not k then k, v = pair, "" end
        out[#out + 1] = { unescape(k), unescape(v) }
    end
    return out
end

--- T.build_query(list) -> "a=1&b=x%20y" from { { name, value }, ... }.
function _M.build_query(list)
    local out = {}
    for i, kv in ipairs(list) do out[i] = _M.escape(kv[1]) .. "=" .. _M.escape(kv[2]) end
    return concat(out, "&")
end

--- T.request_lookup(gw, ctx) -> lookup(source, name) reading the request,
-- for json_ops.render: "params" (or "param"): a decoded route parameter;
-- "query": a decoded query parameter (the first of a name); "headers" (or
-- "header"): a request header; "consumer": a dotted path into
-- ctx.consumer (JSON null counts as missing). The singular names are
-- response-transform's documented spelling. Anything else has no value.
function _M.request_lookup(gw, ctx)
    local query
    return function(source, name)
        if source == "params" or source == "param" then
            -- The core gives the segment as in the normalized path (reserved
            -- characters still escaped): a template wants the value.
            local v = gw.request.get_param(ctx, name)
            return v and (gsub(v, "%%(%x%x)", hex_byte))
        elseif source == "headers" or source == "header" then
            return gw.request.get_header(ctx, name)
        elseif source == "query" then
            if not query then
                query = {}
                for _, kv in ipairs(_M.parse_query(gw.request.get_query(ctx))) do
                    if query[kv[1]] == nil then query[kv[1]] = kv[2] end
                end
            end
            return query[name]
        elseif source == "consumer" then
            local node = ctx.consumer
            for part in name:gmatch("[^.]+") do
                if type(node) ~= "table" then return nil end
                node = node[part]
            end
            if node == null then return nil end
            return node
        end
    end
end

return _M
