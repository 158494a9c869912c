-- rate-limit: counts requests per key (client IP, consumer, route, a header,
-- a Lua function, or a combination) against one or more limits, and
-- answers 429 once a limit is spent. Three algorithms: "sliding" (counts
-- per tenth of a window; no window-length interval admits more than the
-- limit; the default), "fixed" (a plain counter per
-- window; up to 2x the limit can pass around a window boundary) and "gcra"
-- (a token bucket of `burst` tokens refilled at limit/window). Two
-- storages: "local" (a shared dict, exact across the workers of one
-- gateway) and "redis" (one atomic script run per batch of requests,
-- exact across gateways). It is not a quota system: counters live only
-- as long as their window. Documented in docs/plugins/rate-limit.md.
local gw = require("moongate.gw")

local type, ipairs, tostring, error, setmetatable = type, ipairs, tostring, error, setmetatable
local floor, ceil, max, min, huge = math.floor, math.ceil, math.max, math.min, math.huge
local format = string.format

-- Whole numbers as text. tostring() of a number goes through the general
-- float formatter, several times slower than "%d" on the hot path.
local function int_str(n) return format("%d", n) end

local ERROR_COUNTER = "rate-limit:redis-errors"   -- in the dict: redis failures seen
local LOG_EVERY = 1                               -- seconds between redis failure warnings

local BY = { ip = true, consumer = true, route = true, header = true }

-- On the admin listener's /metrics: one count per decision.
local decisions = gw.metrics.counter("moongate_ratelimit_decisions_total",
    "Rate-limit decisions by route: allowed, limited, or what a storage failure led to.",
    { "route", "decision" })

local function count(ctx, decision)
    decisions:inc(1, { ctx.route and ctx.route.name or "", decision })
end

local P = {
    name = "rate-limit",
    priority = 910,
    schema = {
        fields = {
            limit = { type = "integer", min = 1,
                description = "requests allowed per window (shorthand for one entry of limits)" },
            window = { type = "number", min = 0.001,
                description = "window length in seconds for `limit` (default 60)" },
            limits = { type = "array", description = "several limits, all checked",
                items = { type = "table", description = "one limit", fields = {
                    limit = { type = "integer", required = true, min = 1,
                        description = "requests allowed per window" },
                    window = { type = "number", required = true, min = 0.001,
                        description = "window length in seconds" },
                    burst = { type = "integer", min = 1,
                        description = "gcra: bucket size (default: limit)" },
                } } },
            burst = { type = "integer", min = 1,
                description = "gcra: bucket size for `limit` (default: limit)" },
            algorithm = { type = "string", default = "sliding",
                enum = { "sliding", "fixed", "gcra" }, description = "counting algorithm" },
            by = { type = "any", default = "ip",
                description = "ip, consumer, route or header, or a list of them (combined)" },
            header = { type = "string", min_len = 1,
                description = "the request header counted per when `by` includes header" },
            key = { type = "function",
                description = "function(ctx) -> string: a custom key part (added to `by`)" },
            namespace = { type = "string", default = "",
                description = "keeps this limit's counters apart from others with the same key" },
            storage = { type = "string", default = "local", enum = { "local", "redis" },
                description = "local (shared dict) or redis (shared by every gateway)" },
            dict = { type = "string", default = "limits", min_len = 1,
                description = "shared dict zone for local storage and the `local` fallback" },
            on_redis_error = { type = "string", default = "fail_open",
                enum = { "fail_open", "fail_closed", "local" },
                description = "when redis fails: allow, answer 503, or count in the dict" },
        },
    },
}

-- ---------------------------------------------------------------- pure math
-- Everything here is a plain function of numbers and strings, so the
-- specs can test it without a request.
local algo = {}
P.algo = algo

--- One GCRA step. tat: the stored theoretical arrival time (nil: none);
-- interval = window / limit; burst: the bucket size. Returns allowed,
-- the TAT to store, remaining, seconds until the bucket is full again,
-- seconds until the next request is allowed (0 when allowed).
function algo.gcra(tat, now, interval, burst)
    tat = max(tat or now, now)
    local new = tat + interval
    local allow_at = new - burst * interval
    if now < allow_at then
        return false, tat, 0, tat - now, allow_at - now
    end
    return true, new, floor((now - allow_at) / interval + 1e-9), new - now, 0
end

local escaped, nescaped = {}, 0   -- a bounded cache: gsub is not compiled by the JIT
local MAX_ESCAPED = 10000

local function hex_escape(c) return ("%%%02X"):format(c:byte()) end

local function escape(s)
    s = tostring(s)
    local e = escaped[s]
    if e then return e end
    e = s:gsub("[%%|{}]", hex_escape)
    if nescaped >= MAX_ESCAPED then escaped, nescaped = {}, 0 end
    escaped[s], nescaped = e, nescaped + 1
    return e
end

--- The identity part of a key from its parts ({ "ip=10.0.0.1", ... }):
-- each escaped so that no combination can forge another.
function algo.build_key(namespace, parts)
    local key = escape(namespace)
    for i = 1, #parts do key = key .. "|" .. escape(parts[i]) end
    return key
end

--- The Redis key of one limit: the identity in a {hash tag}, so all keys
-- of one request live in one Redis Cluster slot.
function algo.redis_key(identity, algorithm, window)
    return "rl:{" .. identity .. algo.redis_key_suffix(algorithm, window)
end

--- What follows the identity in a limit's Redis key (built once per config).
function algo.redis_key_suffix(algorithm, window)
    return "}:" .. algorithm:sub(1, 1) .. ":" .. window
end

--- The limit to report in headers: the one with the fewest remaining.
function algo.tightest(results)
    local best
    for _, r in ipairs(results) do
        if not best or r.remaining < best.remaining then best = r end
    end
    return best
end

-- ------------------------------------------------------------ config check

local function by_list(by)
    if type(by) == "string" then return { by } end
    return by
end

function P.schema.check(conf)
    if (conf.limit == nil) == (conf.limits == nil) then
        return nil, "give either limit (and window) or limits"
    end
    if conf.limits and #conf.limits == 0 then return nil, "limits must not be empty" end
    if conf.limits and (conf.window or conf.burst) then
        return nil, "window and burst go inside each entry of limits"
    end
    local list = by_list(conf.by)
    if type(list) ~= "table" or #list == 0 then
        return nil, "by must be ip, consumer, route or header, or a non-empty list of them"
    end
    for _, b in ipairs(list) do
        if not BY[b] then return nil, "by: unknown key " .. tostring(b) end
        if b == "header" and not conf.header then
            return nil, "by = header needs header = \"X-...\""
        end
    end
    for _, l in ipairs(conf.limits or { { limit = conf.limit, burst = conf.burst } }) do
        if l.burst and conf.algorithm ~= "gcra" then
            return nil, "burst applies only to algorithm = gcra"
        end
    end
    return true
end

-- Derived per config generation (the conf table is new at each reload).
local compiled = setmetatable({}, { __mode = "k" })

local function compile(conf)
    local c = compiled[conf]
    if c then return c end
    local limits = {}
    local src = conf.limits or { { limit = conf.limit, window = conf.window or 60,
        burst = conf.burst } }
    for i, l in ipairs(src) do
        limits[i] = { limit = l.limit, window = l.window, burst = l.burst or l.limit,
            interval = l.window / l.limit }
    end
    for _, l in ipairs(limits) do
        l.prefix = "rl:" .. conf.algorithm:sub(1, 1) .. ":" .. l.window .. ":"
    end
    c = { limits = limits, by = by_list(conf.by), namespace = escape(conf.namespace) }
    compiled[conf] = c
    return c
end

-- ------------------------------------------------------------------- keys

local function identity(conf, c, ctx)
    local key = c.namespace
    local by = c.by
    for i = 1, #by do
        local b, v = by[i], nil
        if b == "consumer" then
            local consumer = ctx.consumer
            v = consumer and consumer.id
            if v == nil then b, v = "ip", gw.request.get_client_ip(ctx) end
        elseif b == "route" then
            v = ctx.route.name
        elseif b == "header" then
            v = gw.request.get_header(ctx, conf.header) or ""
        else
            v = gw.request.get_client_ip(ctx)
        end
        key = key .. "|" .. escape(b .. "=" .. tostring(v))
    end
    if conf.key then
        key = key .. "|" .. escape("fn=" .. tostring(conf.key(ctx) or gw.request.get_client_ip(ctx)))
    end
    return key
end

-- ---------------------------------------------------------- local storage

local function dict_of(conf)
    local d = gw.shared[conf.dict]
    if not d then
        error("rate-limit: shared dict \"" .. conf.dict .. "\" is not declared: add shared = { "
            .. conf.dict .. " = \"16m\" } to the config", 0)
    end
    return d
end

-- Counts one request against fixed-window limit `l` in the dict. Returns
-- a result table and, when it was counted, the key and delta that take it
-- back; or nil, err. incr-then-check is exact across workers: incr hands
-- out every value once, so exactly `limit` requests see a value <= limit.
local function local_counter(d, base, l, now)
    local w = l.window
    local idx = floor(now / w)
    local elapsed = now - idx * w
    if idx ~= l.idx then
        -- The window's key suffix changes once per window, not per request.
        l.idx, l.cur_suffix = idx, ":" .. int_str(idx)
    end
    local cur_key = base .. l.cur_suffix
    local c, err = d:incr(cur_key, 1, 0, 2 * w + 1)
    if not c then return nil, err end
    local reset = w - elapsed
    if c > l.limit then
        d:incr(cur_key, -1)
        return { limit = l.limit, remaining = 0, reset = reset, retry = reset, denied = true }
    end
    return { limit = l.limit, remaining = l.limit - c, reset = reset }, cur_key, -1
end

-- The sliding window in the dict: one entry per key holding per-slice
-- counts (core/shdict.h mg_shdict_window_hit), so no interval of `window`
-- seconds ever admits more than the limit -- including a burst at the end
-- of one window and the start of the next. Slices of a tenth of the window:
-- up to a tenth of the limit may be refused early.
local SLICES = 10

local function local_window(d, base, l)
    local ok, before, retry, reset, slice = d:window_hit(base, l.window, SLICES, l.limit)
    if ok == nil then return nil, before end
    if not ok then
        return { limit = l.limit, remaining = 0, reset = reset, retry = retry, denied = true }
    end
    -- A hit counts for up to a window and a slice; the header says the
    -- window at most, as for the other algorithms.
    return { limit = l.limit, remaining = l.limit - before - 1, reset = min(reset, l.window) },
        base, { slice = slice }
end

-- GCRA in the dict with incr only (the dict has no compare-and-set): the
-- TAT is incremented by one interval; a TAT left in the past by an idle
-- key is brought up to now first.
local function local_gcra(d, base, l, now)
    local T, span = l.interval, l.burst * l.interval
    local new, err = d:incr(base, T, now, span + 1)
    if not new then return nil, err end
    if new - T < now then
        new, err = d:incr(base, now - (new - T))
        if not new then return nil, err end
    end
    if new - now > span then
        d:incr(base, -T)
        return { limit = l.burst, remaining = 0, reset = new - T - now,
            retry = new - span - now, denied = true }
    end
    d:expire(base, new - now + 1)
    return { limit = l.burst, remaining = floor((span - (new - now)) / T + 1e-9),
        reset = new - now }, base, -T
end

-- Takes back what limits already counted (a number: an incr delta; a
-- table: a sliding window's slice).
local function undo(d, keys, deltas, n)
    for i = 1, n do
        local delta = deltas[i]
        if type(delta) == "table" then
            d:window_undo(keys[i], SLICES, delta.slice)
        else
            d:incr(keys[i], delta)
        end
    end
end

local function check_local(conf, c, id, now)
    local d = dict_of(conf)
    local limits = c.limits
    if #limits == 1 then
        -- The common case: nothing to take back from other limits.
        local l = limits[1]
        local r, err
        if conf.algorithm == "gcra" then
            r, err = local_gcra(d, l.prefix .. id, l, now)
        elseif conf.algorithm == "sliding" then
            r, err = local_window(d, l.prefix .. id, l)
        else
            r, err = local_counter(d, l.prefix .. id, l, now)
        end
        if not r then return nil, "shared dict " .. conf.dict .. ": " .. tostring(err) end
        return not r.denied, r
    end
    local results, keys, deltas, n = {}, {}, {}, 0
    for i, l in ipairs(limits) do
        local r, k, delta
        if conf.algorithm == "gcra" then
            r, k, delta = local_gcra(d, l.prefix .. id, l, now)
        elseif conf.algorithm == "sliding" then
            r, k, delta = local_window(d, l.prefix .. id, l)
        else
            r, k, delta = local_counter(d, l.prefix .. id, l, now)
        end
        if not r then
            undo(d, keys, deltas, n)
            return nil, "shared dict " .. conf.dict .. ": " .. tostring(k)
        end
        results[i] = r
        if r.denied then
            -- A request refused by one limit is not counted by the others.
            undo(d, keys, deltas, n)
            return false, r
        end
        n = n + 1
        keys[n], deltas[n] = k, delta
    end
    return true, algo.tightest(results)
end

-- ---------------------------------------------------------- redis storage

-- Run with gw.redis.eval_batched: the checks of every request of the
-- worker in one turn of its loop arrive together (ARGV[1] calls; ARGV[2i],
-- ARGV[2i+1] call i's number of keys and args; then the args). A call's
-- KEYS are one per limit; its one arg "algorithm limit window burst ..."
-- (window in ms; a triple per limit, one string so that Redis makes one
-- Lua string per call, parsed once per batch). Calls are decided in order, against state read once
-- per key and written back once at the end, so a batch costs one read
-- and one write per distinct key. Within a call every limit is checked
-- before any is counted, so a request refused by one limit costs the
-- others nothing. Redis's own clock is used, so gateways with skewed
-- clocks still share one window. Returns per call allowed (0/1), the
-- index of the deciding limit, its remaining, reset ms and retry ms, laid
-- flat (eval_batched hands each call its five).
local SCRIPT = [=[
local floor, ceil, min, max = math.floor, math.ceil, math.min, math.max
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
local state, order = {}, {}

-- A key's state, read on its first use in the batch.
local function load(key, algorithm)
  local s = state[key]
  if s then return s end
  if algorithm == 'gcra' then
    s = { tat = tonumber(redis.call('GET', key)) }
  elseif algorithm == 'sliding' then
    -- A ring of eleven slice counts, fields "0".."10" (slice number mod
    -- 11), and "last", the newest slice counted: the slot of slice k holds
    -- its count, for k in the last window, exactly when k <= last.
    local h = redis.call('HMGET', key, 'last', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '10')
    s = { last = tonumber(h[1]), slots = {} }
    for j = 0, 10 do s.slots[j] = tonumber(h[j + 2]) or 0 end
  else
    local h = redis.call('HMGET', key, 'w', 'c', 'p')
    s = { w = tonumber(h[1]), c = tonumber(h[2]) or 0, p = tonumber(h[3]) or 0 }
  end
  state[key] = s
  order[#order + 1] = key
  return s
end

-- remaining, reset, retry, denied for one more request under the limit.
local function check(s, algorithm, limit, window, burst)
  if algorithm == 'gcra' then
    local interval = window / limit
    local tat = max(s.tat or now, now)
    local allow_at = tat + interval - burst * interval
    if now < allow_at then return 0, tat - now, allow_at - now, true end
    return floor((now - allow_at) / interval + 1e-9), tat + interval - now, 0, false
  elseif algorithm == 'sliding' then
    local slice = window / 10
    local cur = max(floor(now / slice), s.last or 0) -- Redis's clock may step back
    local top = min(cur, s.last or cur - 11)
    if not s.sum then -- once per key and batch: count() keeps it current
      s.sum = 0
      for k = cur - 10, top do s.sum = s.sum + s.slots[k % 11] end
    end
    if s.first == nil then -- the oldest slice with hits, false: none
      s.first = false
      for k = cur - 10, top do
        if s.slots[k % 11] > 0 then s.first = k break end
      end
    end
    local need = s.sum + 1 - limit
    if need <= 0 then
      return limit - s.sum - 1, min(((s.first or cur) + 11) * slice - now, window), 0, false
    end
    -- Refused: when the oldest slices have freed enough.
    local reset, retry, freed = nil, 0, 0
    for k = cur - 10, top do
      local n = s.slots[k % 11]
      if n > 0 then
        local leaves = (k + 11) * slice - now
        reset = reset or leaves
        freed = freed + n
        if retry == 0 and freed >= need then retry = leaves end
      end
    end
    if retry == 0 then retry = window end
    return 0, min(reset or window, window), retry, true
  else
    local idx = floor(now / window)
    local c = s.w == idx and s.c or 0
    local reset = window - (now - idx * window)
    if c + 1 > limit then return 0, reset, reset, true end
    return floor(limit - c - 1), reset, 0, false
  end
end

-- Counts one request in the key's state (written back at the end).
local function count(s, algorithm, limit, window)
  s.dirty = true
  if algorithm == 'gcra' then
    s.tat = max(s.tat or now, now) + window / limit
  elseif algorithm == 'sliding' then
    local slice = window / 10
    local cur = max(floor(now / slice), s.last or 0)
    if s.last == nil or cur > s.last then -- a new slice: stale slots start over
      for k = max((s.last or cur - 11) + 1, cur - 10), cur do s.slots[k % 11] = 0 end
      s.last, s.fresh, s.ttl = cur, true, ceil(window + slice) + 1000
    end
    s.slots[cur % 11] = s.slots[cur % 11] + 1
    s.sum = (s.sum or 0) + 1
    s.first = s.first or cur
    s.delta = (s.delta or 0) + 1
  else
    local idx = floor(now / window)
    if s.w ~= idx then
      s.p = s.w == idx - 1 and s.c or 0
      s.c, s.w, s.fresh, s.ttl = 0, idx, true, 2 * window + 1000
    end
    s.c = s.c + 1
    s.delta = (s.delta or 0) + 1
  end
end

-- A call's one arg, "algorithm limit window burst ..." (window in ms, a
-- triple per limit), parsed once per batch: its calls mostly share it.
local specs = {}
local function spec_of(text)
  local sp = specs[text]
  if not sp then
    sp = {}
    for word in string.gmatch(text, '%S+') do sp[#sp + 1] = tonumber(word) or word end
    specs[text] = sp
  end
  return sp
end

local ncalls = tonumber(ARGV[1])
local results, ki, ai, ri = {}, 0, 1 + 2 * ncalls, 0
for call = 1, ncalls do
  local nkeys, nargs = tonumber(ARGV[2 * call]), tonumber(ARGV[2 * call + 1])
  local sp = spec_of(ARGV[ai + 1])
  local algorithm = sp[1]
  -- The deciding limit: the first that refuses, else the tightest.
  local allowed, decider, d_remaining, d_reset, d_retry = 1, 0, 0, 0, 0
  for i = 1, nkeys do
    local s = load(KEYS[ki + i], algorithm)
    local remaining, reset, retry, denied = check(s, algorithm,
      sp[3 * i - 1], sp[3 * i], sp[3 * i + 1])
    if allowed == 1 and (denied or decider == 0 or remaining < d_remaining) then
      decider, d_remaining, d_reset, d_retry = i, remaining, reset, retry
    end
    if denied then allowed = 0 end
  end
  if allowed == 1 then
    for i = 1, nkeys do
      count(state[KEYS[ki + i]], algorithm, sp[3 * i - 1], sp[3 * i])
    end
  end
  -- Five flat elements per call (cheaper for Redis to send than a list).
  results[ri + 1], results[ri + 2], results[ri + 3] = allowed, decider, d_remaining
  results[ri + 4], results[ri + 5] = ceil(d_reset), ceil(d_retry)
  ki, ai, ri = ki + nkeys, ai + nargs, ri + 5
end

for _, key in ipairs(order) do
  local s = state[key]
  if s.dirty then
    if s.tat then
      redis.call('SET', key, string.format('%.3f', s.tat), 'PX', ceil(s.tat - now) + 1000)
    elseif s.slots then
      if s.fresh then
        local w = { 'HSET', key, 'last', s.last }
        for j = 0, 10 do w[#w + 1] = j; w[#w + 1] = s.slots[j] end
        redis.call(unpack(w))
        redis.call('PEXPIRE', key, s.ttl)
      else
        redis.call('HINCRBY', key, s.last % 11, s.delta)
      end
    elseif s.fresh then
      redis.call('HSET', key, 'w', s.w, 'c', s.c, 'p', s.p)
      redis.call('PEXPIRE', key, s.ttl)
    else
      redis.call('HINCRBY', key, 'c', s.delta)
    end
  end
end
return results
]=]

local function check_redis(conf, c, id)
    local args = c.redis_args
    if not args then
        -- The same for every request of this config: built once, as text.
        local spec = { conf.algorithm }
        c.redis_suffixes = {}
        for i, l in ipairs(c.limits) do
            spec[#spec + 1] = int_str(l.limit)
            spec[#spec + 1] = int_str(floor(l.window * 1000 + 0.5))
            spec[#spec + 1] = int_str(l.burst)
            c.redis_suffixes[i] = algo.redis_key_suffix(conf.algorithm, l.window)
        end
        args = { table.concat(spec, " ") }
        c.redis_args = args
    end
    local keys, suffixes = {}, c.redis_suffixes
    for i = 1, #suffixes do keys[i] = "rl:{" .. id .. suffixes[i] end
    local r, err = gw.redis.eval_batched(SCRIPT, keys, args)
    if not r then return nil, err end
    if type(r) ~= "table" or #r ~= 5 then return nil, "unexpected script reply" end
    local l = c.limits[r[2]]
    local res = { limit = conf.algorithm == "gcra" and l.burst or l.limit,
        remaining = r[3], reset = r[4] / 1000, retry = r[5] / 1000 }
    return r[1] == 1, res
end

-- Redis failures: counted in the dict (when there is one) and warned
-- about at most once a second per worker, with the count since the last.
local failures, last_warn = 0, -huge

local function redis_failed(conf, err)
    failures = failures + 1
    local d = gw.shared[conf.dict]
    if d then d:incr(ERROR_COUNTER, 1, 0) end
    local now = gw.now()
    if now - last_warn >= LOG_EVERY then
        gw.log("warn", "rate-limit: redis failed (", err, "), ", conf.on_redis_error, "; ",
            failures, " failure(s) since the last warning")
        failures, last_warn = 0, now
    end
end

-- ----------------------------------------------------------------- phases

local function headers_of(r)
    return {
        ["RateLimit-Limit"] = int_str(r.limit),
        ["RateLimit-Remaining"] = int_str(max(r.remaining, 0)),
        ["RateLimit-Reset"] = int_str(max(ceil(r.reset - 1e-6), 0)),
    }
end

function P.access(conf, ctx)
    local c = compile(conf)
    local id = identity(conf, c, ctx)
    local allowed, r
    if conf.storage == "redis" then
        local err
        allowed, err = check_redis(conf, c, id)
        if allowed == nil then
            redis_failed(conf, err)
            if conf.on_redis_error == "fail_open" then return count(ctx, "fail_open") end
            if conf.on_redis_error == "fail_closed" then
                count(ctx, "fail_closed")
                return 503, { error = "rate limit unavailable" }
            end
            allowed, r = check_local(conf, c, id, gw.now())
        else
            r = err
        end
    else
        allowed, r = check_local(conf, c, id, gw.now())
    end
    if allowed == nil then
        -- The dict is full or broken: a gateway fault, not the client's.
        gw.log("error", "rate-limit: ", r)
        return count(ctx, "error")
    end
    local h = headers_of(r)
    ctx.var.rate_limit_headers = h
    if not allowed then
        h["Retry-After"] = int_str(max(ceil(r.retry - 1e-6), 1))
        count(ctx, "limited")
        return 429, { error = "rate limit exceeded" }, h
    end
    count(ctx, "allowed")
end

function P.header_filter(conf, ctx)
    local h = ctx.var.rate_limit_headers
    if not h then return end
    local set = gw.response.set_header
    set(ctx, "RateLimit-Limit", h["RateLimit-Limit"])
    set(ctx, "RateLimit-Remaining", h["RateLimit-Remaining"])
    set(ctx, "RateLimit-Reset", h["RateLimit-Reset"])
end

return P
