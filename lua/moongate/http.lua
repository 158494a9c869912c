-- gw.http: HTTP requests from Lua through the core's upstream pools
-- (core/client.c). A request names an upstream of the current config
-- (balanced like proxied traffic) or a literal "http://ip:port/path" URL.
-- Waiting yields the coroutine; request_multi runs its requests in
-- parallel and returns when all are answered or have failed.
local ffi = require("ffi")
require("moongate.cdef")

local C = ffi.C
local type, pairs, ipairs, tostring, error = type, pairs, ipairs, tostring, error
local concat = table.concat
local co_running, co_yield = coroutine.running, coroutine.yield

local _M = {}

-- Set by the runtime: the task and the request of each running coroutine.
_M.tasks = nil
_M.requests = setmetatable({}, { __mode = "k" })

local function encode_query(q)
    if type(q) == "string" then return q end
    local parts = {}
    for k, v in pairs(q) do
        parts[#parts + 1] = tostring(k):gsub("[^%w%-._~]", function(c)
            return ("%%%02X"):format(c:byte())
        end) .. "=" .. tostring(v):gsub("[^%w%-._~]", function(c)
            return ("%%%02X"):format(c:byte())
        end)
    end
    table.sort(parts)
    return concat(parts, "&")
end

local function check_header(name, value)
    if type(name) ~= "string" or not name:find("^[%w!#$%%&'*+.^_`|~-]+$") then
        error("invalid header name " .. tostring(name), 4)
    end
    value = tostring(value)
    if value:find("[\r\n%z]") then error("invalid header value for " .. name, 4) end
    return value
end

-- Builds the request bytes; returns raw, upstream, addr, timeout.
local function build(req)
    if type(req) ~= "table" then error("a request must be a table", 3) end
    local method = req.method or "GET"
    if type(method) ~= "string" or not method:find("^%u+$") then
        error("invalid method", 3)
    end
    local upstream, addr, host, path = req.upstream, nil, nil, req.path or "/"
    if req.url then
        local h, p = tostring(req.url):match("^http://([^/]+)(.*)$")
        if not h then error("url must be http://host[:port]/path", 3) end
        addr = h:find(":%d+$") and h or (h .. ":80")
        host = h
        path = p ~= "" and p or "/"
    elseif type(upstream) == "string" then
        host = upstream
    else
        error("a request needs `upstream` (a name) or `url`", 3)
    end
    if type(path) ~= "string" or path:sub(1, 1) ~= "/" or path:find("[%s%z]") then
        error("path must start with '/' and have no spaces", 3)
    end
    if req.query then path = path .. (path:find("?", 1, true) and "&" or "?") .. encode_query(req.query) end
    local lines = { method .. " " .. path .. " HTTP/1.1" }
    local has_host = false
    for name, value in pairs(req.headers or {}) do
        local lname = tostring(name):lower()
        if lname == "content-length" or lname == "transfer-encoding" or lname == "connection" then
            error("the " .. name .. " header is set by the gateway", 3)
        end
        has_host = has_host or lname == "host"
        if type(value) == "table" then
            for _, v in ipairs(value) do lines[#lines + 1] = name .. ": " .. check_header(name, v) end
        else
            lines[#lines + 1] = name .. ": " .. check_header(name, value)
        end
    end
    if not has_host then lines[#lines + 1] = "Host: " .. host end
    local body = req.body
    if body ~= nil and type(body) ~= "string" then error("body must be a string", 3) end
    if body or method == "POST" or method == "PUT" or method == "PATCH" then
        lines[#lines + 1] = "Content-Length: " .. #(body or "")
    end
    local raw = concat(lines, "\r\n") .. "\r\n\r\n" .. (body or "")
    local timeout = req.timeout or 10
    if type(timeout) ~= "number" or timeout <= 0 then error("timeout must be a positive number", 3) end
    return raw, upstream, addr, timeout
end

--- gw.http.request_multi({ req1, req2, ... }) -> responses, errors.
-- responses[i] is { status =, headers = { ["lower-name"] = v }, body = }
-- or false; errors[i] then says why ("timeout", "connection refused",
-- "no such upstream", ...). Requests run in parallel. Yields: rewrite,
-- access, handler, or a `moongate lua` script.
function _M.request_multi(reqs)
    if type(reqs) ~= "table" or #reqs == 0 then
        error("request_multi takes a non-empty list of requests", 2)
    end
    local co = co_running()
    local task = co and _M.tasks[co]
    if not task then error("gw.http cannot wait here (not in a yieldable phase)", 2) end
    local built = {}
    for i, req in ipairs(reqs) do built[i] = { build(req) } end
    local group = C.mg_ffi_http_begin(task, #reqs)
    if group == nil then return nil, "cannot start requests here" end
    local r = _M.requests[co]
    for i, b in ipairs(built) do
        local raw, upstream, addr = b[1], b[2] or "", b[3] or ""
        C.mg_ffi_http_add(group, i - 1, r, upstream, #upstream, addr, #addr, raw, #raw, b[4])
    end
    return co_yield("wait")
end

--- gw.http.request(req) -> response or nil, err. See request_multi.
function _M.request(req)
    local res, errs = _M.request_multi({ req })
    if not res then return nil, errs end
    if not res[1] then return nil, errs[1] end
    return res[1]
end

return _M
