-- gw.redis: Redis commands, pipelines and scripts from Lua, yielding the
-- calling coroutine while Redis answers (core/redis.c: one connection per
-- worker over hiredis on the worker's loop, shared by all its requests).
-- Runtime failures come back as nil, "short reason" ("timeout",
-- "connection refused", "closed", or Redis's own "ERR ..."); misuse (bad
-- arguments, a phase that cannot wait, commands that would break the
-- shared connection) raises a Lua error. Documented in docs/redis.md.
--
-- This module must not require moongate.gw at load (gw requires it): the
-- task table is looked up in package.loaded when a call is made.
local ffi = require("ffi")
require("moongate.cdef")
local cjson = require("cjson.safe")

local C = ffi.C
local ffi_new, ffi_string = ffi.new, ffi.string
local type, error, tostring, tonumber, select, pairs, unpack = type, error, tostring, tonumber, select, pairs, unpack
local floor, max, huge = math.floor, math.max, math.huge
local format, char = string.format, string.char
local co_running, co_yield = coroutine.running, coroutine.yield
local loaded = package.loaded

local MG_AGAIN, MG_DECLINED = 1, 2
local KIND_COMMAND, KIND_PIPELINE, KIND_EVALSHA, KIND_EVAL_BATCH = 0, 1, 2, 3
local MAX_PIPELINE = 10000       -- commands in one pipeline
local MAX_SCRIPTS = 256          -- script -> SHA1 cache entries

-- Commands that would change the shared connection for every request of
-- the worker, or make replies stop matching calls.
local NEVER = {
    SUBSCRIBE = true, PSUBSCRIBE = true, SSUBSCRIBE = true, UNSUBSCRIBE = true,
    PUNSUBSCRIBE = true, SUNSUBSCRIBE = true, MONITOR = true, QUIT = true, SELECT = true,
    AUTH = true, HELLO = true, RESET = true, WATCH = true, UNWATCH = true, SYNC = true,
    PSYNC = true,
}
-- Transactions only inside one pipeline (nothing can interleave there).
local TXN = { MULTI = true, EXEC = true, DISCARD = true }

local _M = {}

--- gw.redis.null: what a nil reply becomes inside a table (an array
-- element, a pipeline entry). It is gw.json.null (cjson.null).
_M.null = cjson.null

local DEFAULTS = {
    host = "127.0.0.1", port = 6379, username = "", password = "", db = 0,
    timeout = 1, connect_timeout = 1,
}
local FIELDS = {
    url = "string", host = "string", port = "number", username = "string",
    password = "string", db = "number", timeout = "number", connect_timeout = "number",
}

local settings              -- normalized settings, nil until configured
local serial = 0            -- their version; the C side compares

local tasks                 -- gw._tasks: coroutine -> task
local shas, nshas = {}, 0   -- script -> SHA1 hex

-- Scratch arrays handed to C; the strings they point to are anchored by
-- a Lua table for the duration of the (synchronous) call.
local cap, ncap = 0, 0
local argv, lens, counts
local errp = ffi_new("const char *[1]")
local sha_buf = ffi_new("char[41]")

local function unescape(s)
    return (s:gsub("%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

-- "redis://[[username]:password@]host[:port][/db]" -> fields, or nil, err.
local function parse_url(url)
    local rest = url:match("^redis://(.*)$")
    if not rest then
        if url:find("^rediss://") then return nil, "TLS (rediss://) is not supported" end
        return nil, "url must look like redis://[:password@]host[:port][/db]"
    end
    local out = {}
    local auth, hostpart = rest:match("^(.*)@([^@]*)$")
    if not auth then hostpart = rest end
    if auth then
        local user, pass = auth:match("^([^:]*):(.*)$")
        if user then
            out.username, out.password = unescape(user), unescape(pass)
        else
            out.username = unescape(auth)
        end
    end
    local hp, db = hostpart:match("^([^/]*)/?(.*)$")
    local host, port
    if hp:sub(1, 1) == "[" then
        host, port = hp:match("^%[([^%]]+)%]:?(%d*)$")
    else
        host, port = hp:match("^([^:]*):?(%d*)$")
    end
    if not host or host == "" then return nil, "url has no host" end
    out.host = host
    if port ~= "" then out.port = tonumber(port) end
    if db ~= "" then
        if not db:find("^%d+$") then return nil, "url: the database must be a number" end
        out.db = tonumber(db)
    end
    return out
end

local function is_int(v, lo, hi)
    return type(v) == "number" and v == floor(v) and v >= lo and v <= hi
end

-- A settings table -> the normalized settings, or nil, err.
local function normalize(t)
    if type(t) ~= "table" then return nil, "expected a table" end
    for k, v in pairs(t) do
        local want = FIELDS[k]
        if not want then return nil, "unknown field " .. tostring(k) end
        if type(v) ~= want then return nil, k .. ": expected a " .. want end
    end
    local s = {}
    for k, v in pairs(DEFAULTS) do s[k] = v end
    if t.url then
        local u, err = parse_url(t.url)
        if not u then return nil, err end
        for k, v in pairs(u) do s[k] = v end
    end
    for k in pairs(DEFAULTS) do
        if t[k] ~= nil then s[k] = t[k] end
    end
    if s.host == "" or s.host:find("[%s%z/]") then return nil, "host: invalid" end
    if not is_int(s.port, 1, 65535) then return nil, "port: expected 1-65535" end
    if not is_int(s.db, 0, 1000000) then return nil, "db: expected a non-negative integer" end
    for _, k in pairs({ "timeout", "connect_timeout" }) do
        if not (s[k] > 0 and s[k] <= 86400) then
            return nil, k .. ": expected seconds, more than 0"
        end
    end
    if s.username ~= "" and s.password == "" then
        return nil, "a username needs a password"
    end
    return s
end

local function apply(s)
    if settings then
        local same = true
        for k, v in pairs(s) do same = same and settings[k] == v end
        if same then return end
    end
    settings = s
    serial = serial + 1
end

--- gw.redis.configure{ url = "redis://:secret@10.0.0.5:6379/2", timeout = 0.5 }
-- or { host =, port =, username =, password =, db =, timeout =, connect_timeout = }
-- (url first, then the other fields override it; timeouts in seconds,
-- default 1). Sets the worker's Redis settings for the calls that follow;
-- a changed address, password or db reconnects (calls in flight on the old
-- connection fail with "closed"). Any phase, at config load, in a script.
-- Raises an error on invalid settings. Returns true.
function _M.configure(t)
    local s, err = normalize(t)
    if not s then error("gw.redis.configure: " .. err, 2) end
    apply(s)
    return true
end

--- gw.redis.check_config(conf) -> true, or nil, err: validates the config's
-- `redis` table without applying it (nil is valid: no Redis).
function _M.check_config(t)
    if t == nil then return true end
    local s, err = normalize(t)
    if not s then return nil, err end
    return true
end

--- gw.redis.use_config(conf) -> true, or nil, err: applies the config's
-- `redis` table (for the runtime, once a generation loaded); nil leaves
-- the settings as they are.
function _M.use_config(t)
    if t == nil then return true end
    local s, err = normalize(t)
    if not s then return nil, err end
    apply(s)
    return true
end

local function task_of(level)
    local co = co_running()
    if not tasks then
        local gw = loaded["moongate.gw"]
        tasks = gw and gw._tasks
    end
    local task = co and tasks and tasks[co]
    if not task then
        error("gw.redis cannot wait here (not in a yieldable phase)", level + 1)
    end
    return task
end

local function ensure(nargs, ncmds)
    if nargs > cap then
        cap = max(nargs, cap * 2, 16)
        argv = ffi_new("const char *[?]", cap)
        lens = ffi_new("size_t[?]", cap)
    end
    if ncmds > ncap then
        ncap = max(ncmds, ncap * 2, 16)
        counts = ffi_new("int[?]", ncap)
    end
end

-- `level`: the caller's level for error(), as seen from each function.
local function arg_string(v, i, level)
    local tv = type(v)
    if tv == "string" then return v end
    if tv == "number" then
        if v ~= v or v == huge or v == -huge then
            error("argument #" .. i .. " is not a finite number", level)
        end
        if v == floor(v) and v > -2^53 and v < 2^53 then
            return v == 0 and "0" or format("%.0f", v)
        end
        return format("%.17g", v)
    end
    error("argument #" .. i .. " must be a string or a number, got " .. tv, level)
end

-- Puts one command's arguments at argv[off..]; returns the new offset and
-- its upper-cased name.
local function put_command(cmd, off, anchor, level)
    local n, name = #cmd, nil
    for i = 1, n do
        local s = arg_string(cmd[i], i, level + 1)
        anchor[#anchor + 1] = s
        argv[off + i - 1] = s
        lens[off + i - 1] = #s
        if i == 1 then name = s:upper() end
    end
    if NEVER[name] or (name == "CLIENT" and type(cmd[2]) == "string"
                       and cmd[2]:upper() == "REPLY") then
        error("gw.redis: " .. name .. " is not supported (the connection is shared by"
              .. " every request of the worker)", level)
    end
    return off + n, name
end

local function send(task, kind, n, script)
    if not settings then
        error("gw.redis is not configured (set `redis` in the config or call "
              .. "gw.redis.configure)", 3)
    end
    local slen = script and #script or 0
    local rc = C.mg_ffi_redis_send(task, serial, kind, n, counts, argv, lens, script, slen, errp)
    if rc == MG_DECLINED then
        local s = settings
        C.mg_ffi_redis_configure(task, serial, s.host, #s.host, s.port, s.username,
                                 #s.username, s.password, #s.password, s.db,
                                 s.connect_timeout, s.timeout)
        rc = C.mg_ffi_redis_send(task, serial, kind, n, counts, argv, lens, script, slen, errp)
    end
    if rc ~= MG_AGAIN then return nil, ffi_string(errp[0]) end
    return co_yield("wait")
end

--- gw.redis.command("SET", "k", "v", "EX", 60) -> reply, or nil, err.
-- Arguments are strings or numbers. Replies: status and bulk strings ->
-- string, integer -> number, nil -> nil (err is nil too: test err, not the
-- value), array -> table (nil elements are gw.redis.null), Redis error ->
-- nil, "ERR ..."; failures -> nil, "timeout" / "connection refused" /
-- "closed" / .... Yields: rewrite, access, handler, timers, scripts.
-- Example: local n, err = gw.redis.command("INCR", "hits:" .. ip)
function _M.command(...)
    local n = select("#", ...)
    if n == 0 then error("gw.redis.command needs a command name", 2) end
    local cmd = { ... }
    for i = 1, n do
        if cmd[i] == nil then error("argument #" .. i .. " is nil", 2) end
    end
    ensure(n, 1)
    local anchor = {}
    local _, name = put_command(cmd, 0, anchor, 3)
    if TXN[name] then
        error("gw.redis: run MULTI ... EXEC as one gw.redis.pipeline", 2)
    end
    counts[0] = n
    local task = task_of(2)
    return send(task, KIND_COMMAND, 1, nil)
end

--- gw.redis.pipeline({ { "INCR", "a" }, { "EXPIRE", "a", 10 } }) -> replies, errors
-- Sends the commands in one write and waits for all replies (one round
-- trip). replies[i] is the reply (nil -> gw.redis.null, a Redis error ->
-- false and errors[i] = "ERR ..."); on failure nil, "timeout" etc. A
-- MULTI ... EXEC transaction must sit whole inside one pipeline.
-- Example: local r, errs = gw.redis.pipeline({ { "INCR", k }, { "TTL", k } })
function _M.pipeline(cmds)
    if type(cmds) ~= "table" or #cmds == 0 then
        error("gw.redis.pipeline takes a non-empty list of commands", 2)
    end
    local ncmds = #cmds
    if ncmds > MAX_PIPELINE then
        error("gw.redis.pipeline: more than " .. MAX_PIPELINE .. " commands", 2)
    end
    local total = 0
    for i = 1, ncmds do
        local cmd = cmds[i]
        if type(cmd) ~= "table" or #cmd == 0 then
            error("gw.redis.pipeline: command #" .. i .. " must be a non-empty list", 2)
        end
        total = total + #cmd
    end
    ensure(total, ncmds)
    local anchor, off, in_multi = {}, 0, false
    for i = 1, ncmds do
        local name
        off, name = put_command(cmds[i], off, anchor, 3)
        counts[i - 1] = #cmds[i]
        if name == "MULTI" then
            if in_multi then error("gw.redis.pipeline: MULTI inside MULTI", 2) end
            in_multi = true
        elseif name == "EXEC" or name == "DISCARD" then
            if not in_multi then error("gw.redis.pipeline: " .. name .. " without MULTI", 2) end
            in_multi = false
        end
    end
    if in_multi then error("gw.redis.pipeline: MULTI without EXEC or DISCARD", 2) end
    local task = task_of(2)
    return send(task, KIND_PIPELINE, ncmds, nil)
end

-- Small counts as strings, so a script call formats no number.
local COUNT = {}
for i = 0, 64 do COUNT[i] = tostring(i) end

-- Formats "EVALSHA sha #keys keys... args..." straight into the scratch
-- arrays (no command table: this runs on every rate-limited request) and
-- sends it as `kind`.
local function send_script(kind, script, keys, args)
    if type(script) ~= "string" or script == "" then
        error("gw.redis: the script must be a non-empty string", 3)
    end
    keys, args = keys or {}, args or {}
    if type(keys) ~= "table" or type(args) ~= "table" then
        error("gw.redis: keys and args must be lists", 3)
    end
    local sha = shas[script]
    if not sha then
        C.mg_ffi_redis_sha1(script, #script, sha_buf)
        sha = ffi_string(sha_buf, 40)
        if nshas >= MAX_SCRIPTS then shas, nshas = {}, 0 end
        shas[script] = sha
        nshas = nshas + 1
    end
    local nkeys, nargs = #keys, #args
    local total = 3 + nkeys + nargs
    ensure(total, 1)
    local nk = COUNT[nkeys] or arg_string(nkeys, 3, 3)
    argv[0], lens[0] = "EVALSHA", 7
    argv[1], lens[1] = sha, 40
    argv[2], lens[2] = nk, #nk
    -- Strings stay anchored by keys/args during the call (C copies them
    -- before it returns); numbers turned into strings here by `anchor`.
    local anchor
    for i = 1, nkeys + nargs do
        local v
        if i <= nkeys then v = keys[i] else v = args[i - nkeys] end
        if type(v) ~= "string" then
            v = arg_string(v, 3 + i, 3)
            anchor = anchor or {}
            anchor[#anchor + 1] = v
        end
        argv[2 + i], lens[2 + i] = v, #v
    end
    counts[0] = total
    local task = task_of(3)
    return send(task, kind, 1, script)
end

-- Redis forgot the script and the worker no longer holds its text (more
-- scripts in use than it keeps): EVAL it, which caches it again.
local function eval_plain(script, keys, args)
    local cmd = { "EVAL", script, #keys }
    for i = 1, #keys do cmd[#cmd + 1] = keys[i] end
    for i = 1, #args do cmd[#cmd + 1] = args[i] end
    return _M.command(unpack(cmd))
end

--- gw.redis.eval(script, keys, args) -> reply, or nil, err (as command).
-- Runs a Lua script on Redis with EVALSHA (the SHA1 is computed and cached
-- per worker); if Redis does not know the script yet (NOSCRIPT) it is sent
-- once with EVAL, in the same call. keys and args are optional lists.
-- Example: gw.redis.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", { "k" }, { 5 })
function _M.eval(script, keys, args)
    local r, err = send_script(KIND_EVALSHA, script, keys, args)
    if err and err:sub(1, 8) == "NOSCRIPT" then return eval_plain(script, keys or {}, args or {}) end
    return r, err
end

--- gw.redis.eval_batched(script, keys, args) -> reply, or nil, err.
-- Like eval, but the calls of one script made by the worker's requests
-- in the same turn of its event loop go to Redis as ONE EVALSHA: one
-- round trip and one script run for all of them. The script must be
-- written for that: KEYS holds every call's keys in order; ARGV[1] is the
-- number of calls n; ARGV[2i] and ARGV[2i+1] the number of keys and of
-- args of call i; then every call's args in order. It returns a list with
-- one element per call: what that call returns. A script error fails
-- every call of the batch. The script runs atomically, so calls are
-- applied in order as if sent one by one. Keys of different calls may be
-- in different Redis Cluster slots: not for Cluster (docs/redis.md).
-- Example: see plugins/rate-limit.lua.
function _M.eval_batched(script, keys, args)
    return send_script(KIND_EVAL_BATCH, script, keys, args)
end

return _M
