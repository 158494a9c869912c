-- The plugin runtime inside each worker's Lua VM: builds a generation's
-- plugin chains from the config file (loading plugin modules fresh, so a
-- reload picks up edited scripts), checks every plugin config against its
-- schema, and runs a request's phases in its coroutine. The C side
-- (core/lua.c) calls load_generation, free_generation and handle; nothing
-- else decides phase order.
local schema = require("moongate.schema")
local gw = require("moongate.gw")

local type, pairs, ipairs, pcall, error, tostring = type, pairs, ipairs, pcall, error, tostring
local setmetatable, loadfile, loadstring, setfenv = setmetatable, loadfile, loadstring, setfenv
local co_yield, co_running = coroutine.yield, coroutine.running
local sort, concat, find = table.sort, table.concat, string.find
local io_open, getenv = io.open, os.getenv
local now_us = gw.now_us

local _M = {}

local PHASES = { "rewrite", "access", "header_filter", "body_filter", "log" }
local PHASE_BIT = { rewrite = 1, access = 2, header_filter = 4, body_filter = 8, log = 16 }
local HANDLER_BIT = 32
_M.PHASE_BIT, _M.HANDLER_BIT = PHASE_BIT, HANDLER_BIT

local generations = {}
local ctxs = setmetatable({}, { __mode = "k" }) -- coroutine -> its ctx

local function file_exists(path)
    local f = io_open(path, "r")
    if f then f:close() return true end
    return false
end

local function dirname(path)
    return path:match("^(.*)/[^/]*$") or "."
end

-- The directory holding lua/ and plugins/ (set by core/lua.c).
_M.root = "."

-- The directory of the config file of the generation being built (or
-- last built), for plugins that read files named in their config relative
-- to it (jwt-auth's jwks_file), as plugin_paths are.
_M.config_dir = nil

local function resolve_dir(base, dir)
    if dir:sub(1, 1) == "/" then return dir end
    return base .. "/" .. dir
end

-- Loads a plugin module by name: plugin_paths first, then plugins/. Each
-- generation loads its own copy, so edited files take effect on reload.
local function load_plugin(name, paths, cache)
    if cache[name] then return cache[name] end
    if not name:find("^[%w_-]+$") then
        return nil, "invalid plugin name \"" .. name .. "\""
    end
    local file
    for _, dir in ipairs(paths) do
        if file_exists(dir .. "/" .. name .. ".lua") then
            file = dir .. "/" .. name .. ".lua"
            break
        end
    end
    if not file then return nil, "no plugin named \"" .. name .. "\"" end
    local chunk, err = loadfile(file)
    if not chunk then return nil, err end
    local ok, mod = pcall(chunk)
    if not ok then return nil, file .. ": " .. tostring(mod) end
    if type(mod) ~= "table" then return nil, file .. ": must return a table" end
    if mod.name ~= name then
        return nil, file .. ": name is \"" .. tostring(mod.name) .. "\", expected \"" .. name .. "\""
    end
    if type(mod.priority) ~= "number" then return nil, file .. ": priority must be a number" end
    local sok, serr = schema.check_schema(mod.schema)
    if not sok then return nil, file .. ": " .. serr end
    cache[name] = mod
    return mod
end

local function is_inline(value)
    if type(value) ~= "table" then return false end
    for _, phase in ipairs(PHASES) do
        if type(value[phase]) == "function" then return true end
    end
    return false
end

-- One entry of a chain: a plugin with its checked config.
local function make_entry(name, value, paths, cache, where, errors)
    if is_inline(value) then
        return { name = name, priority = value.priority or 0, mod = value, conf = value }
    end
    local mod, err = load_plugin(name, paths, cache)
    if not mod then
        errors[#errors + 1] = where .. ": plugins." .. name .. ": " .. err
        return nil
    end
    local conf, errs = schema.validate(mod.schema, value == true and {} or value)
    if not conf then
        for _, e in ipairs(errs) do
            local sep = e:sub(1, 2) == ": " and "" or "."
            errors[#errors + 1] = where .. ": plugins." .. name .. sep .. e
        end
        return nil
    end
    return { name = name, priority = mod.priority, mod = mod, conf = conf }
end

-- Orders entries: a route's `order` list first, in its order; the rest by
-- priority (higher first), then name, so the result never depends on
-- table iteration order.
local function order_entries(entries, order, where, errors)
    local rank = {}
    for i, name in ipairs(order or {}) do rank[name] = i end
    for name in pairs(rank) do
        local found = false
        for _, e in ipairs(entries) do found = found or e.name == name end
        if not found then
            errors[#errors + 1] = where .. ": order: \"" .. name .. "\" is not enabled here"
        end
    end
    sort(entries, function(a, b)
        local ra, rb = rank[a.name], rank[b.name]
        if ra and rb then return ra < rb end
        if ra or rb then return ra ~= nil end
        if a.priority ~= b.priority then return a.priority > b.priority end
        return a.name < b.name
    end)
end

-- The "ip:port" targets of the named upstream, for work that outlives a
-- request (a cache's background refresh): gw.http resolves upstream names
-- only through a live request.
local function targets_of(upstreams, name)
    local u = type(upstreams) == "table" and type(name) == "string" and upstreams[name]
    if type(u) ~= "table" or type(u.targets) ~= "table" then return nil end
    local out = {}
    for _, t in ipairs(u.targets) do
        local addr = type(t) == "table" and t[1] or t
        if type(addr) == "string" then out[#out + 1] = addr end
    end
    return out
end

-- A phase's chain as one straight-line function: each call site then calls
-- one plugin, which LuaJIT compiles without the guards and side exits of a
-- loop calling a different function each time round (a chain of no-ops
-- runs about twice as fast). rewrite and access stop at the first plugin
-- that returns a status. nil for an empty chain.
local function compile_phase(chain, phase, where)
    if #chain == 0 then return nil end
    local can_exit = phase == "rewrite" or phase == "access"
    local src = { "local chain = ...\n" }
    for i = 1, #chain do
        src[#src + 1] = ("local f%d, c%d, n%d = chain[%d].fn, chain[%d].conf, chain[%d].name\n")
            :format(i, i, i, i, i, i)
    end
    src[#src + 1] = ("return function(ctx)\nctx.phase = %q\nlocal s, b, h\n"):format(phase)
    for i = 1, #chain do
        if can_exit then
            src[#src + 1] = ("ctx.plugin = n%d s, b, h = f%d(c%d, ctx) if s ~= nil then return s, b, h end\n")
                :format(i, i, i)
        else
            src[#src + 1] = ("ctx.plugin = n%d f%d(c%d, ctx)\n"):format(i, i, i)
        end
    end
    src[#src + 1] = "end\n"
    local fn = assert(loadstring(concat(src), "=" .. where .. " " .. phase .. " chain"))
    return fn(chain)
end

local function build_route(route, globals, paths, cache, where, errors, upstreams)
    local merged = {}
    for name, value in pairs(globals) do merged[name] = value end
    for name, value in pairs(route.plugins or {}) do merged[name] = value end
    local entries = {}
    for name, value in pairs(merged) do
        if value ~= false then
            local e = make_entry(name, value, paths, cache, where, errors)
            if e then entries[#entries + 1] = e end
        end
    end
    order_entries(entries, route.order, where, errors)
    -- Timings are off unless a plugin of the route asks for them (see
    -- handle): mod.timings(conf) -> nil, "request" or "plugins".
    local timed
    for _, e in ipairs(entries) do
        local want = type(e.mod.timings) == "function" and e.mod.timings(e.conf)
        if want == "plugins" or (want == "request" and not timed) then timed = want end
    end
    local chains, run, mask = {}, {}, 0
    for _, phase in ipairs(PHASES) do
        local chain = {}
        for _, e in ipairs(entries) do
            -- mod.skips(conf, phase) -> true leaves a phase function out
            -- of this route's chain (a config that does not need it)
            local skips = e.mod.skips
            if type(e.mod[phase]) == "function"
                and not (type(skips) == "function" and skips(e.conf, phase)) then
                chain[#chain + 1] = { name = e.name, fn = e.mod[phase], conf = e.conf }
            end
        end
        chains[phase] = chain
        if phase ~= "body_filter" then run[phase] = compile_phase(chain, phase, where) end
        if #chain > 0 then mask = mask + PHASE_BIT[phase] end
    end
    if route.handler ~= nil then
        if type(route.handler) ~= "function" then
            errors[#errors + 1] = where .. ": handler: expected a function"
        end
        mask = mask + HANDLER_BIT
    end
    local names = {}
    for i, e in ipairs(entries) do names[i] = e.name end
    return {
        chains = chains, run = run, handler = route.handler, mask = mask, plugins = names,
        timed = timed,
        info = { name = route.name or route.path, path = route.path,
                 upstream = type(route.upstream) == "string" and route.upstream or nil,
                 targets = targets_of(upstreams, route.upstream),
                 strip_prefix = route.strip_prefix, rewrite = route.rewrite },
    }
end

local function run_config(path)
    local chunk, err = loadfile(path)
    if not chunk then return nil, err end
    local env = setmetatable({
        env = function(name, default)
            local v = getenv(name)
            if v == nil then return default end
            return v
        end,
    }, { __index = _G })
    setfenv(chunk, env)
    local ok, conf = pcall(chunk)
    if not ok then return nil, path .. ": " .. tostring(conf) end
    if type(conf) ~= "table" then return nil, path .. ": the chunk must return a table" end
    return conf
end

--- Builds generation `id` from the config file. Returns a list of route
-- masks (phases with plugins, plus HANDLER_BIT), or nil and the errors
-- joined by newlines ("FILE: routes[2] \"/x\": plugins.acl.allow: required").
function _M.load_generation(id, path)
    local conf, err = run_config(path)
    if not conf then return nil, err end
    local base = dirname(path)
    _M.config_dir = base
    local paths = {}
    if conf.plugin_paths ~= nil and type(conf.plugin_paths) ~= "table" then
        return nil, path .. ": top level: plugin_paths: expected a list"
    end
    for _, dir in ipairs(conf.plugin_paths or {}) do
        paths[#paths + 1] = resolve_dir(base, dir)
    end
    paths[#paths + 1] = _M.root .. "/plugins"
    local globals = conf.plugins or {}
    local errors, cache = {}, {}
    if type(globals) ~= "table" then
        return nil, path .. ": top level: plugins: expected a table"
    end
    local gen = { id = id, routes = {} }
    local masks = {}
    for i, route in ipairs(conf.routes or {}) do
        local where = path .. ": routes[" .. i .. "] \"" .. tostring(route.path) .. "\""
        if route.plugins ~= nil and type(route.plugins) ~= "table" then
            errors[#errors + 1] = where .. ": plugins: expected a table"
        else
            gen.routes[i] = build_route(route, globals, paths, cache, where, errors, conf.upstreams)
            masks[i] = gen.routes[i].mask
        end
    end
    local rok, rerr = gw.redis.check_config(conf.redis)
    if not rok then errors[#errors + 1] = path .. ": top level: redis: " .. rerr end
    if #errors > 0 then return nil, concat(errors, "\n") end
    gw.redis.use_config(conf.redis)
    gen.modules = cache
    generations[id] = gen
    return masks
end

--- Forgets generation `id`; returns the ids of its timers (C cancels them).
function _M.free_generation(id)
    generations[id] = nil
    -- Compiled traces hold on to the prototypes they start in: without a
    -- flush, every reload's plugin code would stay reachable through the
    -- JIT until its trace cache filled up.
    if jit then jit.flush() end
    return gw.timer.drop_generation(id)
end

--- Runs every loaded plugin module's init_worker() once for generation
-- `id`, in its own coroutine (it may start timers, wait, use gw.http).
-- Plugins are run in name order; one failing does not stop the others.
function _M.init_worker(task, id)
    local gen = generations[id]
    if not gen then return end
    local co = co_running()
    gw._tasks[co] = gw._to_task(task)
    gw.timer.gens[co] = id
    local names = {}
    for name, mod in pairs(gen.modules) do
        if type(mod.init_worker) == "function" then names[#names + 1] = name end
    end
    sort(names)
    for _, name in ipairs(names) do
        local ok, err = pcall(gen.modules[name].init_worker)
        if not ok then
            gw.log("error", "init_worker of plugin ", name, ": ", tostring(err))
        end
    end
end

--- A gw.timer fired: runs its function in this (fresh) coroutine.
function _M.run_timer(task, id)
    return gw.timer.run(task, id)
end

-- Appends one checked header line to a flat list. (Not a closure inside
-- response(): creating one per exit keeps LuaJIT from compiling it.)
-- Header names already checked: an early exit's names are nearly always
-- the same few, and a pattern match is never JIT-compiled. Bounded.
local good_names, ngood_names = {}, 0

local function add_header(flat, name, value)
    if type(value) ~= "string" then value = tostring(value) end
    if not good_names[name] then
        if type(name) ~= "string" or not name:find("^[%w!#$%%&'*+.^_`|~-]+$") then
            error("invalid response header " .. tostring(name), 0)
        end
        if ngood_names >= 1000 then good_names, ngood_names = {}, 0 end
        good_names[name], ngood_names = true, ngood_names + 1
    end
    -- Plain finds compile; a character-class pattern would not.
    if find(value, "\r", 1, true) or find(value, "\n", 1, true) or find(value, "\0", 1, true) then
        error("invalid response header " .. tostring(name), 0)
    end
    flat[#flat + 1] = name
    flat[#flat + 1] = value
end

-- Turns a phase's early exit into what C sends: a status, a string body
-- and a flat header list.
local function response(status, body, headers)
    if type(status) ~= "number" or status < 100 or status > 599 then
        error("a phase must return an HTTP status (100-599), got " .. tostring(status), 0)
    end
    local flat = {}
    local has_type = false
    for name, value in pairs(headers or {}) do
        if type(name) == "string" and name:lower() == "content-type" then has_type = true end
        if type(value) == "table" then
            for _, v in ipairs(value) do add_header(flat, name, v) end
        else
            add_header(flat, name, value)
        end
    end
    if type(body) == "table" then
        local json, err = gw.json.encode(body)
        if not json then error("cannot encode the response body: " .. err, 0) end
        body = json .. "\n"
        if not has_type then flat[#flat + 1] = "Content-Type"; flat[#flat + 1] = "application/json" end
    elseif body ~= nil then
        body = tostring(body)
        if not has_type then
            flat[#flat + 1] = "Content-Type"
            flat[#flat + 1] = "text/plain; charset=utf-8"
        end
    end
    return status, body or "", flat
end

-- A phase's chain as a loop, timing each plugin call: for routes whose
-- tracing asked for per-plugin spans (the compiled chains of
-- compile_phase serve every other route). `spans` gets four entries per
-- call: name, phase, start and end (gw.now_us).
local function run_timed(chain, ctx, phase, spans)
    ctx.phase = phase
    for i = 1, #chain do
        local p = chain[i]
        ctx.plugin = p.name
        local t0 = now_us()
        local status, body, headers = p.fn(p.conf, ctx)
        local n = #spans
        spans[n + 1], spans[n + 2], spans[n + 3], spans[n + 4] = p.name, phase, t0, now_us()
        if status ~= nil and (phase == "rewrite" or phase == "access") then
            return status, body, headers
        end
    end
end

-- Runs phase `phase` of the route: its compiled chain, or the timed loop.
local function run_phase(route, ctx, phase, spans)
    if spans then return run_timed(route.chains[phase], ctx, phase, spans) end
    local fn = route.run[phase]
    if fn then return fn(ctx) end
end

-- Passes one piece of the response body through the chain: each plugin
-- gets what the one before it returned (nil from a plugin: unchanged).
local function run_body_filter(chain, ctx, chunk, eof)
    ctx.phase = "body_filter"
    for i = 1, #chain do
        local p = chain[i]
        ctx.plugin = p.name
        local out = p.fn(p.conf, ctx, chunk, eof)
        if out ~= nil then
            if type(out) ~= "string" then
                error("body_filter must return a string or nil, not a " .. type(out), 0)
            end
            chunk = out
        end
    end
    return chunk
end

--- The body of a request's coroutine (see core/lua.c). Yields "proxy" or
-- "respond" once rewrite/access are done, then runs the phases the core
-- resumes it with ("header_filter", "log") and returns after "log".
--
-- Timings (for a tracing plugin's spans), only on a route where a plugin
-- asked for them: ctx.timings = { start =, proxy =, header =, finish =,
-- plugins = }, gw.now_us() when the Lua side got the request, when it went
-- upstream, when the response head arrived (header_filter) and when the
-- log phase began (false until then); `plugins` ("plugins" level only)
-- lists each plugin call and the handler as name, phase, start, end.
function _M.handle(task, gen_id, route_idx, req, co)
    local route = generations[gen_id].routes[route_idx]
    req, task = gw._to_req(req), gw._to_task(task)
    -- phase and plugin are named here so that the table is built with
    -- room for them (no rehash when the chain sets them).
    local ctx = { _req = req, var = {}, route = route.info, phase = "rewrite", plugin = false }
    co = co or co_running()
    ctxs[co] = ctx
    gw._tasks[co] = task
    gw.http.requests[co] = req
    gw.timer.gens[co] = gen_id
    gw.timer.starters[co] = task -- timers may start in every phase
    local t, spans
    if route.timed then
        spans = route.timed == "plugins" and {} or nil
        -- every field in the constructor: one allocation, no rehash later
        t = { start = now_us(), proxy = false, header = false, finish = false, plugins = spans }
        ctx.timings = t
    end
    local status, body, headers = run_phase(route, ctx, "rewrite", spans)
    if status == nil then
        status, body, headers = run_phase(route, ctx, "access", spans)
    end
    -- A plugin that will not use them stops the timings of this request
    -- (ctx.timings = false in rewrite or access): no more clock reads.
    if t and not ctx.timings then t, spans = nil, nil end
    if status == nil and route.handler then
        ctx.phase, ctx.plugin = "handler", nil
        local t0 = spans and now_us()
        status, body, headers = route.handler(ctx)
        if spans then
            local n = #spans
            spans[n + 1], spans[n + 2], spans[n + 3], spans[n + 4] = "handler", "handler", t0, now_us()
        end
        if status == nil then status = 200 end
    end
    local phase, chunk, eof, out
    if status ~= nil then
        phase, chunk, eof = co_yield("respond", response(status, body, headers))
    else
        if t then t.proxy = now_us() end
        phase, chunk, eof = co_yield("proxy")
    end
    gw._tasks[co] = nil -- later phases may not wait
    while true do
        out = nil
        if phase == "header_filter" then
            if t then t.header = now_us() end
            run_phase(route, ctx, phase, spans)
        elseif phase == "body_filter" then
            out = run_body_filter(route.chains.body_filter, ctx, chunk, eof)
        elseif phase == "log" or phase == "finish" then
            gw._record_consumer(ctx)
            if t then t.finish = now_us() end
            if phase == "log" then run_phase(route, ctx, phase, spans) end
            ctx._done = true
            return "done"
        end
        phase, chunk, eof = co_yield("next", out)
    end
end

--- A request's coroutine was dropped before its request finished: its
-- ctx now refuses every gw call (the request's memory is gone).
function _M.abandon(co)
    local ctx = ctxs[co]
    if ctx then ctx._done = true end
end

--- The body of a pooled request coroutine: serves one request, parks
-- (yield "park"), and is resumed with the next request's arguments. Saves
-- creating and collecting a coroutine per request.
function _M.runner(task, gen_id, route_idx, req)
    local co, handle = co_running(), _M.handle
    while true do
        handle(task, gen_id, route_idx, req, co)
        task, gen_id, route_idx, req = co_yield("park")
    end
end

--- `moongate lua FILE args...`: runs a script as the main coroutine.
function _M.run_script(task, file, ...)
    gw._tasks[co_running()] = gw._to_task(task)
    local chunk, err = loadfile(file)
    if not chunk then error(err, 0) end
    _G.arg = { [0] = file, ... }
    return chunk(...)
end

-- A plugin config as plain JSON-able data: functions (inline plugins) and
-- other non-data values shown by their type; keys of non-array tables
-- made strings. Depth-limited, since a config may be cyclic.
local function plain(v, depth)
    local t = type(v)
    if t == "string" or t == "number" or t == "boolean" then return v end
    if t ~= "table" or depth > 16 then return "<" .. t .. ">" end
    local n, count = #v, 0
    for _ in pairs(v) do count = count + 1 end
    local out = {}
    if n > 0 and n == count then
        for i = 1, n do out[i] = plain(v[i], depth + 1) end
        return out
    end
    for k, x in pairs(v) do out[tostring(k)] = plain(x, depth + 1) end
    return out
end

-- JSON arrays built by hand: this cjson (2.1.0) encodes {} as an object.
local function json_list(items)
    return "[" .. concat(items, ",") .. "]"
end

--- Describes the plugin chains of the config at `path` without keeping a
-- generation: one JSON string per route, in config order, with the chain
-- of each phase in run order ({"plugins": [names], "phases": {phase:
-- [{name, priority[, config]}]}, "handler": bool}). Plugin configs (as
-- checked, defaults filled) only when `with_conf`. Returns the list, or
-- nil and the errors. Used by `moongate explain` and the admin /status.
function _M.describe(path, with_conf)
    local masks, err = _M.load_generation(0, path)
    if not masks then return nil, err end
    local gen = generations[0]
    generations[0] = nil
    local enc = gw.json.encode
    local out = {}
    for i, route in ipairs(gen.routes) do
        local phases = {}
        for k, phase in ipairs(PHASES) do
            local list = {}
            for j, p in ipairs(route.chains[phase]) do
                local mod = gen.modules[p.name]
                local prio = mod and mod.priority or p.conf.priority or 0
                local e = '{"name":' .. enc(p.name) .. ',"priority":' .. enc(prio)
                if with_conf then
                    local c, cerr = enc(plain(p.conf, 0))
                    if not c then
                        return nil, path .. ": routes[" .. i .. "]: plugins." .. p.name
                            .. ": " .. tostring(cerr)
                    end
                    e = e .. ',"config":' .. c
                end
                list[j] = e .. "}"
            end
            phases[k] = enc(phase) .. ":" .. json_list(list)
        end
        local names = {}
        for j, name in ipairs(route.plugins) do names[j] = enc(name) end
        out[i] = '{"plugins":' .. json_list(names) .. ',"phases":{' .. concat(phases, ",")
            .. '},"handler":' .. tostring(route.handler ~= nil) .. "}"
    end
    return out
end

return _M
