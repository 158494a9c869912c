-- The gw API: what plugins and handlers use to reach the request, the
-- response and the gateway. Request-scoped calls take the request's `ctx`
-- (nothing request-scoped lives in a global). Synchronous calls cross into
-- C through the FFI; waiting calls (gw.sleep) yield the request's
-- coroutine. Documented in docs/lua-api.md.
local ffi = require("ffi")
local cdef = require("moongate.cdef")
local cjson = require("cjson.safe")

local C = ffi.C
local ffi_string = ffi.string
local co_running, co_yield = coroutine.running, coroutine.yield
local type, error, tostring, select = type, error, tostring, select
local concat = table.concat
local floor, tonumber = math.floor, tonumber

local MG_DECLINED = 2
local str_out = ffi.new("mg_str_t[2]")

local _M = { request = {}, response = {}, json = {}, version = cdef.version }

-- core/ffi.h and cdef.lua must describe the same functions.
if C.mg_ffi_version() ~= cdef.version then
    error("moongate: lua/moongate/cdef.lua is FFI version " .. cdef.version
          .. ", the binary is " .. C.mg_ffi_version() .. ": they must match", 0)
end

-- The task (C side of a coroutine) of each running coroutine, for calls
-- that wait. Weak keys: a finished coroutine takes its entry with it.
local tasks = setmetatable({}, { __mode = "k" })
_M._tasks = tasks

-- The core passes a request's and a task's pointers as numbers (see
-- push_ptr in core/lua.c); these make them FFI pointers once, at the start.
local REQ_T, TASK_T = ffi.typeof("mg_req_t *"), ffi.typeof("mg_lua_task_t *")
function _M._to_req(n)
    if type(n) == "number" then return ffi.cast(REQ_T, n) end
    return n
end
function _M._to_task(n)
    if type(n) == "number" then return ffi.cast(TASK_T, n) end
    return n
end

local function req_of(ctx)
    local r = type(ctx) == "table" and ctx._req
    if not r then error("expected the request's ctx as first argument", 3) end
    if ctx._done then error("the request has ended", 3) end
    return r
end

local function getter(fn)
    return function(ctx)
        fn(req_of(ctx), str_out)
        return ffi_string(str_out[0].p, str_out[0].len)
    end
end

--- gw.request.get_method(ctx) -> "GET". Any phase.
_M.request.get_method = getter(C.mg_ffi_req_method)
--- gw.request.get_path(ctx) -> the normalized path ("/users/1"). Any phase.
_M.request.get_path = getter(C.mg_ffi_req_path)
--- gw.request.get_query(ctx) -> the raw query string without "?" ("a=1&b=2").
_M.request.get_query = getter(C.mg_ffi_req_query)
--- gw.request.get_host(ctx) -> the Host header ("api.example.com:8080").
_M.request.get_host = getter(C.mg_ffi_req_host)
--- gw.request.get_scheme(ctx) -> "https" on a TLS listener, else "http". Any phase.
_M.request.get_scheme = getter(C.mg_ffi_req_scheme)
--- gw.request.get_client_ip(ctx) -> the TCP peer address ("127.0.0.1").
_M.request.get_client_ip = getter(C.mg_ffi_req_client_ip)
--- gw.request.get_id(ctx) -> the request id sent upstream as X-Request-Id.
_M.request.get_id = getter(C.mg_ffi_req_id)

--- gw.request.get_param(ctx, "id") -> a route parameter ("/users/{id}") or nil.
function _M.request.get_param(ctx, name)
    local r = req_of(ctx)
    if C.mg_ffi_req_param(r, name, #name, str_out) ~= 0 then return nil end
    return ffi_string(str_out[0].p, str_out[0].len)
end

--- gw.request.set_path(ctx, "/v2/users") -> true, or nil, err.
-- rewrite/access only; replaces the path sent upstream (strip_prefix and
-- rewrite of the route no longer apply).
function _M.request.set_path(ctx, path)
    if type(path) ~= "string" or path:sub(1, 1) ~= "/" then
        error("path must be a string starting with '/'", 2)
    end
    local rc = C.mg_ffi_req_set_path(req_of(ctx), path, #path)
    if rc == -2 then error("the path cannot be changed in this phase", 2) end
    if rc ~= 0 then return nil, "invalid path" end
    return true
end

--- gw.request.set_query(ctx, "a=1") replaces the query string sent upstream.
function _M.request.set_query(ctx, query)
    if type(query) ~= "string" then error("query must be a string", 2) end
    if C.mg_ffi_req_set_query(req_of(ctx), query, #query) ~= 0 then
        error("the query cannot be changed in this phase", 2)
    end
end

local function header_get(resp)
    return function(ctx, name)
        local r = req_of(ctx)
        if C.mg_ffi_header_get(r, resp, name, #name, str_out) == MG_DECLINED then
            return nil
        end
        return ffi_string(str_out[0].p, str_out[0].len)
    end
end

local function headers_get(resp)
    return function(ctx)
        local r = req_of(ctx)
        local out = {}
        for i = 0, C.mg_ffi_header_count(r, resp) - 1 do
            C.mg_ffi_header_at(r, resp, i, str_out, str_out + 1)
            local name = ffi_string(str_out[0].p, str_out[0].len):lower()
            local value = ffi_string(str_out[1].p, str_out[1].len)
            local prev = out[name]
            if prev == nil then
                out[name] = value
            elseif type(prev) == "table" then
                prev[#prev + 1] = value
            else
                out[name] = { prev, value }
            end
        end
        return out
    end
end

-- mg_ffi_header_set's refusals.
local HEADER_SET_ERRORS = {
    [-1] = "headers cannot be changed in this phase",
    [-2] = "invalid header name",
    [-3] = "invalid header value",
}

local function header_set(resp, replace)
    return function(ctx, name, value)
        local r = req_of(ctx)
        if type(name) ~= "string" then error("invalid header name", 2) end
        local rc
        if value == nil then
            rc = C.mg_ffi_header_set(r, resp, name, #name, nil, 0, 1)
        else
            if type(value) ~= "string" then value = tostring(value) end
            rc = C.mg_ffi_header_set(r, resp, name, #name, value, #value, replace)
        end
        if rc ~= 0 then error(HEADER_SET_ERRORS[rc] or "cannot set the header", 2) end
    end
end

--- gw.request.get_content_length(ctx) -> the declared body length (a
-- number), or nil and `true` when the body is chunked (its length is known
-- only once read), or nil, false without a body. Any phase; reads nothing.
function _M.request.get_content_length(ctx)
    local n = tonumber(C.mg_ffi_req_content_length(req_of(ctx)))
    if n >= 0 then return n end
    return nil, n == -2
end

--- gw.request.get_body(ctx) -> the whole request body ("" when none), or
-- nil, err. rewrite/access/handler; waits until it is read (bounded by the
-- route's max_body: over it the client gets 413). The body then goes
-- upstream with a Content-Length.
function _M.request.get_body(ctx)
    local r = req_of(ctx)
    local co = co_running()
    local task = co and tasks[co]
    if not task then error("gw.request.get_body cannot wait here", 2) end
    local rc = C.mg_ffi_req_read_body(task, r)
    if rc < 0 then return nil, "the body cannot be read in this phase" end
    if rc == 1 then co_yield("wait") end
    if ctx._done then return nil, "the request has ended" end
    C.mg_ffi_req_body(r, str_out)
    if str_out[0].p == nil then return nil, "the body could not be read" end
    return ffi_string(str_out[0].p, str_out[0].len)
end

--- gw.request.set_body(ctx, "new body"): replaces the body sent upstream.
-- Reads (and drops) the client's body first if needed.
function _M.request.set_body(ctx, body)
    if type(body) ~= "string" then error("body must be a string", 2) end
    local ok, err = _M.request.get_body(ctx)
    if not ok then return nil, err end
    if C.mg_ffi_req_set_body(req_of(ctx), body, #body) ~= 0 then
        return nil, "the body cannot be set in this phase"
    end
    return true
end

--- gw.request.get_header(ctx, "x-api-key") -> first value or nil.
_M.request.get_header = header_get(0)
--- gw.request.get_headers(ctx) -> { ["lower-name"] = "v" or { "v1", "v2" } }.
_M.request.get_headers = headers_get(0)
--- gw.request.set_header(ctx, "X-User-ID", "42"): replaces; nil removes.
_M.request.set_header = header_set(0, 1)
--- gw.request.add_header(ctx, "X-Tag", "a"): appends another line.
_M.request.add_header = header_set(0, 0)
--- gw.request.clear_header(ctx, "Cookie")
function _M.request.clear_header(ctx, name) _M.request.set_header(ctx, name, nil) end

-- For the runtime: hands ctx.consumer.id to the core (access log).
function _M._record_consumer(ctx)
    local c = ctx.consumer
    local id = type(c) == "table" and c.id or nil
    if id ~= nil then
        id = tostring(id)
        C.mg_ffi_req_set_consumer(ctx._req, id, #id)
    end
end

--- gw.response.get_status(ctx) -> 200. header_filter and log.
function _M.response.get_status(ctx) return C.mg_ffi_resp_status(req_of(ctx)) end
--- gw.response.set_status(ctx, 203). header_filter only.
function _M.response.set_status(ctx, status)
    if C.mg_ffi_resp_set_status(req_of(ctx), status) ~= 0 then
        error("the status cannot be changed in this phase", 2)
    end
end
--- gw.response.get_header(ctx, "content-type") -> first value or nil.
_M.response.get_header = header_get(1)
--- gw.response.get_headers(ctx) -> table as for the request.
_M.response.get_headers = headers_get(1)
--- gw.response.set_header(ctx, "Cache-Control", "no-store"); nil removes.
_M.response.set_header = header_set(1, 1)
--- gw.response.add_header(ctx, "Set-Cookie", "a=b")
_M.response.add_header = header_set(1, 0)
--- gw.response.clear_header(ctx, "Server")
function _M.response.clear_header(ctx, name) _M.response.set_header(ctx, name, nil) end

local LEVELS = { error = 0, warn = 1, info = 2, debug = 3 }

--- gw.log("warn", "upstream said ", status): one error-log line.
function _M.log(level, ...)
    local lv = LEVELS[level]
    if not lv then error("log level must be error, warn, info or debug", 2) end
    local parts = { ... }
    for i = 1, select("#", ...) do parts[i] = tostring(parts[i]) end
    local msg = concat(parts)
    C.mg_ffi_log(lv, msg, #msg)
end

--- gw.now() -> seconds since the epoch, with milliseconds (a float).
function _M.now() return C.mg_ffi_now() end

local timespec = ffi.new("mg_timespec_t")
local CLOCK_REALTIME = 0

--- gw.now_us() -> microseconds since the epoch, a whole number (exact in a
-- double until the year 2255). Anywhere. For durations and span times
-- finer than gw.now()'s milliseconds.
function _M.now_us()
    C.clock_gettime(CLOCK_REALTIME, timespec)
    return tonumber(timespec.tv_sec) * 1000000 + floor(tonumber(timespec.tv_nsec) / 1000)
end

--- gw.sleep(0.2): yields the request for that long. rewrite/access/handler.
function _M.sleep(seconds)
    if type(seconds) ~= "number" or seconds < 0 then
        error("seconds must be a non-negative number", 2)
    end
    local co = co_running()
    local task = co and tasks[co]
    if not task then error("gw.sleep cannot wait here (not in a yieldable phase)", 2) end
    if C.mg_ffi_sleep(task, seconds) ~= 0 then return nil, "cannot sleep" end
    co_yield("wait")
    return true
end

--- gw.http.request{ upstream = "users", path = "/users/1" } -> res or nil, err
-- gw.http.request_multi{ req1, req2 } -> responses, errors (in parallel).
-- See lua/moongate/http.lua.
_M.http = require("moongate.http")
_M.http.tasks = tasks

--- gw.timer.at(delay, fn, ...) / gw.timer.every(interval, fn, ...) /
-- gw.timer.cancel(id): see lua/moongate/timer.lua.
_M.timer = require("moongate.timer")
_M.timer.tasks = tasks

--- gw.crypto: digest, hmac, equal, random, base64(url), load_public_key,
-- verify (RSA/PSS/ECDSA/EdDSA). See lua/moongate/crypto.lua.
_M.crypto = require("moongate.crypto")

--- gw.shared.<zone>: shared-memory dicts (lua/moongate/shared.lua).
_M.shared = require("moongate.shared")

--- gw.metrics.counter: plugin counters on /metrics (lua/moongate/metrics.lua).
_M.metrics = require("moongate.metrics")

--- gw.json.encode(t) -> string or nil, err; gw.json.decode(s) -> value or nil, err.
_M.json.encode = cjson.encode
_M.json.decode = cjson.decode
_M.json.null = cjson.null

--- gw.redis.command/pipeline/eval/configure: Redis, yielding
-- (lua/moongate/redis.lua, docs/redis.md).
_M.redis = require("moongate.redis")

return _M
