-- compression: gzip and brotli for responses, negotiated from the client's
-- Accept-Encoding (q-values, `*`, identity), streamed: each piece of the
-- body is compressed as it arrives and the compressor is finished at the
-- end, so a body of any size passes in the memory of one compressor.
--
--   compression = { min_length = 512, gzip_level = 1, brotli_quality = 4,
--                   types = { "text/*", "application/json" } }
--
-- Left alone: HEAD, 1xx/204/304, 206 and anything with Content-Range,
-- bodies the upstream already encoded (any Content-Encoding), types not in
-- `types`, bodies known to be shorter than `min_length`, responses with
-- Cache-Control: no-transform. The request's own Content-Encoding is not
-- this plugin's business. A compressed response gets Content-Encoding, no
-- Content-Length (it goes out chunked), no Accept-Ranges, a weak ETag; every
-- response that could have been compressed gets Vary: Accept-Encoding.
--
-- Its priority is below every other plugin's (inline plugins default to 0):
-- in header_filter it decides on the final headers, in body_filter it
-- compresses the final body.
local gw = require("moongate.gw")
local zlib = require("moongate.zlib")
local brotli = require("moongate.brotli")

local type, ipairs, tonumber, setmetatable, error = type, ipairs, tonumber, setmetatable, error
local find, lower, sub, gsub, match, gmatch = string.find, string.lower, string.sub, string.gsub,
    string.match, string.gmatch

local DEFAULT_TYPES = { "text/*", "application/json", "application/javascript",
    "application/xml", "image/svg+xml" }

local P = {
    name = "compression",
    priority = -1000,
    schema = {
        fields = {
            encodings = { type = "array", default = { "br", "gzip" },
                items = { type = "string", enum = { "br", "gzip" } },
                description = "encodings offered, preferred first when the client's q-values tie" },
            min_length = { type = "integer", default = 256, min = 0,
                description = "bodies whose Content-Length is below this are sent as they are "
                    .. "(an unknown length is compressed)" },
            types = { type = "array", items = { type = "string", min_len = 1 },
                default = DEFAULT_TYPES,
                description = "media types to compress: exact (\"application/json\") or "
                    .. "\"type/*\"; parameters such as charset are ignored" },
            gzip_level = { type = "integer", default = 1, min = 1, max = 9,
                description = "gzip compression level (1 fastest, 9 smallest)" },
            brotli_quality = { type = "integer", default = 4, min = 0, max = 11,
                description = "brotli quality (0 fastest, 11 smallest; above 5 is costly "
                    .. "for dynamic responses)" },
        },
        check = function(conf)
            if #conf.encodings == 0 then return nil, "encodings must not be empty" end
            for _, t in ipairs(conf.types) do
                if not find(t, "^[%w!#$&^_.+-]+/[%w!#$&^_.+*-]+$") then
                    return nil, "types: not a media type: " .. t
                end
            end
            return true
        end,
    },
}

-- ------------------------------------------------------------ negotiation

--- P.parse_accept_encoding(value) -> { [coding] = q } with lower-case
-- codings ("x-gzip" counted as "gzip"); entries with a malformed q are
-- ignored.
function P.parse_accept_encoding(value)
    local q = {}
    if type(value) ~= "string" then return q end
    for item in gmatch(value, "[^,]+") do
        local coding = match(item, "^%s*([%w!#$%%&'*+.^_`|~-]+)")
        if coding then
            coding = lower(coding)
            if coding == "x-gzip" then coding = "gzip" end
            local weight = 1
            local params = sub(item, #match(item, "^%s*[^;%s]*") + 1)
            local qv = match(params, "^%s*;%s*[qQ]%s*=%s*([%d.]+)%s*$")
            if qv then
                -- RFC 9110: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
                weight = (find(qv, "^0%.?%d?%d?%d?$") or find(qv, "^1%.?0?0?0?$")) and tonumber(qv)
            elseif find(params, "%S") then
                weight = nil -- parameters we do not understand: skip the entry
            end
            if weight and (q[coding] == nil or weight > q[coding]) then q[coding] = weight end
        end
    end
    return q
end

--- P.negotiate(accept_encoding, offered) -> "br", "gzip" or nil (identity).
-- Picks the offered coding with the highest q (> 0); `*` stands for every
-- coding the header does not name; q=0 refuses; ties go to `offered`'s
-- order. No header, or one naming none of them, gives nil.
function P.negotiate(value, offered)
    local q = P.parse_accept_encoding(value)
    local star = q["*"]
    local best, best_q = nil, 0
    for _, coding in ipairs(offered) do
        local w = q[coding]
        if w == nil then w = star end
        if w and w > best_q then best, best_q = coding, w end
    end
    return best
end

-- ------------------------------------------------------------ eligibility

local types_cache = setmetatable({}, { __mode = "k" })

local function type_allowed(conf, ctype)
    if not ctype then return false end
    local mt = lower(match(ctype, "^%s*([^;%s]+)") or "")
    if mt == "" then return false end
    local set = types_cache[conf]
    if not set then
        set = { exact = {}, prefix = {} }
        for _, t in ipairs(conf.types) do
            t = lower(t)
            if sub(t, -2) == "/*" then set.prefix[sub(t, 1, -2)] = true else set.exact[t] = true end
        end
        types_cache[conf] = set
    end
    if set.exact[mt] then return true end
    local major = match(mt, "^[^/]+/")
    return major ~= nil and set.prefix[major] == true
end

--- P.eligible(conf, method, status, headers) -> true, or false, why: may
-- this response be compressed at all (whoever asks)? `headers` are
-- lower-case names to values (gw.response.get_headers).
function P.eligible(conf, method, status, headers)
    if method == "HEAD" then return false, "HEAD" end
    if status < 200 or status == 204 or status == 304 then return false, "no body" end
    if status == 206 or headers["content-range"] then return false, "a range" end
    local ce = headers["content-encoding"]
    if ce and (type(ce) == "table" or lower(ce) ~= "identity") then
        return false, "already encoded"
    end
    local ctype = headers["content-type"]
    if type(ctype) == "table" then ctype = ctype[1] end
    if not type_allowed(conf, ctype) then return false, "type" end
    local cc = headers["cache-control"]
    if cc then
        if type(cc) == "table" then cc = table.concat(cc, ",") end
        if find(lower(cc), "no-transform", 1, true) then return false, "no-transform" end
    end
    local len = headers["content-length"]
    len = type(len) == "string" and tonumber(len)
    if len and len < conf.min_length then return false, "short" end
    return true
end

local function add_vary(ctx)
    local v = gw.response.get_header(ctx, "vary")
    if not v or v == "" then
        gw.response.set_header(ctx, "Vary", "Accept-Encoding")
    elseif v ~= "*"
        and not find("," .. gsub(lower(v), "%s", "") .. ",", ",accept-encoding,", 1, true) then
        gw.response.set_header(ctx, "Vary", v .. ", Accept-Encoding")
    end
end

--- P.weak_etag(etag) -> the ETag marked weak (a compressed body is not
-- byte-identical to the one the strong tag was for).
function P.weak_etag(etag)
    if sub(etag, 1, 2) == "W/" then return etag end
    return "W/" .. etag
end

-- ------------------------------------------------------------ phases

function P.header_filter(conf, ctx)
    local headers = gw.response.get_headers(ctx)
    local ok = P.eligible(conf, gw.request.get_method(ctx), gw.response.get_status(ctx), headers)
    if not ok then return end
    add_vary(ctx)
    -- Several Accept-Encoding lines are one list (RFC 9110 5.3).
    local ae = gw.request.get_headers(ctx)["accept-encoding"]
    if type(ae) == "table" then ae = table.concat(ae, ",") end
    local coding = P.negotiate(ae, conf.encodings)
    if not coding then return end
    gw.response.set_header(ctx, "Content-Encoding", coding)
    gw.response.clear_header(ctx, "Content-Length")
    gw.response.clear_header(ctx, "Accept-Ranges")
    local etag = headers["etag"]
    if type(etag) == "string" then gw.response.set_header(ctx, "ETag", P.weak_etag(etag)) end
    local ctype = headers["content-type"]
    -- Server-sent events must reach the client as they are produced.
    local flush = type(ctype) == "string" and find(lower(ctype), "^%s*text/event%-stream") ~= nil
    ctx.var.compression = { coding = coding, flush = flush }
end

local function new_stream(conf, coding)
    if coding == "br" then return brotli.encoder({ quality = conf.brotli_quality, text = true }) end
    return zlib.deflate({ level = conf.gzip_level })
end

function P.body_filter(conf, ctx, chunk, eof)
    local st = ctx.var.compression
    if not st then return nil end
    local s = st.stream
    if not s then
        local err
        s, err = new_stream(conf, st.coding)
        if not s then error("compression: " .. err) end
        st.stream = s
    end
    local out, err
    if eof then
        out, err = s:finish(chunk)
        st.stream = nil
    else
        out, err = s:write(chunk)
        if out and st.flush then
            local tail
            tail, err = s:flush()
            out = tail and out .. tail
        end
    end
    if not out then error("compression: " .. err) end
    return out
end

-- A response cut short (client gone, upstream failed) never reached eof:
-- free the compressor now rather than at the next GC.
function P.log(conf, ctx)
    local st = ctx.var.compression
    if st and st.stream then
        st.stream:close()
        st.stream = nil
    end
end

return P
