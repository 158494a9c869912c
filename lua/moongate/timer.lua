-- gw.timer: functions run later, each in a coroutine of its own (so they
-- may wait: gw.sleep, gw.http, gw.redis). A timer belongs to the config
-- generation that started it and is cancelled when that generation is
-- freed (after a reload, once its last request is done), so a reloaded
-- plugin never keeps running old code.
local ffi = require("ffi")
require("moongate.cdef")

local C = ffi.C
local type, error, select, unpack, pcall = type, error, select, unpack, pcall
local co_running = coroutine.running

local _M = {}

local timers = {}           -- id -> { fn, args, n, every, gen }
local next_id = 0
_M.tasks = nil              -- set by gw: coroutine -> task
-- coroutine -> task, for starting timers only: a request's task stays here
-- through header_filter, body_filter and log, where it is no longer in
-- _M.tasks (those phases may not wait). Starting a timer only arms a libuv
-- timer (the function runs later, in a coroutine of its own), so it is safe
-- in any phase while the request's task is alive, which it is while its
-- coroutine runs. The runtime sets the entry at the start of each request.
_M.starters = setmetatable({}, { __mode = "k" })
_M.gens = setmetatable({}, { __mode = "k" }) -- coroutine -> generation id

local function start(delay, every, fn, ...)
    if type(delay) ~= "number" or delay < 0 then error("delay must be a non-negative number", 3) end
    if type(fn) ~= "function" then error("expected a function", 3) end
    local co = co_running()
    local task = co and (_M.tasks[co] or _M.starters[co])
    if not task then error("gw.timer is not available here (not in a request, timer or script)", 3) end
    next_id = next_id + 1
    local id = next_id
    timers[id] = { fn = fn, args = { ... }, n = select("#", ...), every = every,
                   gen = _M.gens[co] or 0 }
    if C.mg_ffi_timer_start(task, id, delay, every and delay or 0) ~= 0 then
        timers[id] = nil
        return nil, "timers need the event loop"
    end
    return id
end

--- gw.timer.at(delay, fn, ...) -> id: runs fn(...) once after `delay` s.
function _M.at(delay, fn, ...) return start(delay, false, fn, ...) end

--- gw.timer.every(interval, fn, ...) -> id: runs fn(...) every `interval` s.
function _M.every(interval, fn, ...)
    if type(interval) ~= "number" or interval <= 0 then error("interval must be positive", 2) end
    return start(interval, true, fn, ...)
end

--- gw.timer.cancel(id): stops a timer (no error if it already ran).
function _M.cancel(id)
    local co = co_running()
    local task = co and (_M.tasks[co] or _M.starters[co])
    if timers[id] and task then
        timers[id] = nil
        C.mg_ffi_timer_cancel(task, id)
    end
end

-- Called by the C side when a timer fires, inside the timer's coroutine.
function _M.run(task, id)
    local t = timers[id]
    if not t then return end
    if not t.every then timers[id] = nil end
    local co = co_running()
    -- A number from the core (see push_ptr in core/lua.c).
    _M.tasks[co] = type(task) == "number" and ffi.cast("mg_lua_task_t *", task) or task
    _M.gens[co] = t.gen
    t.fn(unpack(t.args, 1, t.n))
end

-- The ids of a generation's timers, forgotten here (C cancels them).
function _M.drop_generation(gen)
    local ids = {}
    for id, t in pairs(timers) do
        if t.gen == gen then
            ids[#ids + 1] = id
            timers[id] = nil
        end
    end
    return ids
end

-- How many timers are pending (for tests and /status).
function _M.count()
    local n = 0
    for _ in pairs(timers) do n = n + 1 end
    return n
end

return _M
