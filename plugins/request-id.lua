-- request-id: W3C trace context on top of the gateway's request id, and an
-- optional OTLP/HTTP JSON span exporter (what Kong's and APISIX's
-- `opentelemetry` plugins do; docs/plugins/tracing.md).
--
--   ["request-id"] = {}                                   -- defaults
--   ["request-id"] = { response_header = "traceparent" }  -- echo the traceparent
--   ["request-id"] = { exporter = { url = "http://127.0.0.1:4318/v1/traces" } }
--
-- The X-Request-Id is the gateway's own (gw.request.get_id: a trusted peer's,
-- or generated; sent upstream and returned to the client); this plugin leaves
-- it alone. It adds trace context: an incoming `traceparent` (version 00, a
-- 32-hex trace id and a 16-hex parent id, neither all zeros, 2-hex flags) keeps
-- its trace id and flags, and the upstream gets a new parent id: the
-- gateway's span id (8 random bytes, hex). A missing or malformed traceparent
-- starts a fresh trace (flags 01); `tracestate` goes upstream unchanged only
-- with a valid traceparent and is dropped otherwise. The trace id is in
-- ctx.var.trace_id (span id: ctx.var.span_id, the client's span id:
-- ctx.var.parent_span_id) and returned to the client in `response_header`:
-- "X-Trace-Id" (the trace id), "traceparent" (the traceparent sent
-- upstream), or "" for none.
--
-- The exporter: the log phase appends the request's record to a bounded
-- per-worker queue (full: the new record is dropped and counted); a
-- gw.timer started in init_worker sends the queue in batches with gw.http,
-- never on the request path. A failed export (refused, timeout, 429, 502,
-- 503, 504) keeps its spans queued and backs off; other statuses drop the
-- batch, as the OTLP spec says. Failures and drops are logged (the first at
-- once, then at most once every REPORT_EVERY seconds per collector).
local gw = require("moongate.gw")

local type, pairs, ipairs, tostring, pcall = type, pairs, ipairs, tostring, pcall
local byte, find, format, rep = string.byte, string.find, string.format, string.rep
local concat, sort = table.concat, table.sort
local min, ceil = math.min, math.ceil
local random, now_us, now = gw.crypto.random, gw.now_us, gw.now
local get_header, set_header = gw.request.get_header, gw.request.set_header
local json_encode = gw.json.encode
local strbuf = require("string.buffer")

local TOKEN = "^[%w!#$%%&'*+.^_`|~-]+$"
local TICK = 0.1          -- how often the exporter's timer looks at its queue (max)
local MAX_BACKOFF = 30    -- seconds between retries while the collector fails
local REPORT_EVERY = 10   -- seconds between two failure/drop log lines of a collector
local RETRYABLE = { [429] = true, [502] = true, [503] = true, [504] = true }
local GATEWAY_OWNED = { ["content-length"] = true, ["transfer-encoding"] = true,
                        connection = true, ["content-type"] = true }

local P = {
    name = "request-id",
    priority = 11000, -- rewrite, before everything else, so all later phases see the ids
    schema = {
        fields = {
            response_header = { type = "string", default = "X-Trace-Id",
                pattern = "^[%w!#$%%&'*+.^_`|~-]*$",
                description = "response header for the trace id (\"traceparent\": the "
                    .. "traceparent sent upstream; \"\": none)" },
            exporter = { type = "table",
                description = "send a span per request as OTLP/HTTP JSON to a collector "
                    .. "(absent: no export)",
                fields = {
                    url = { type = "string", required = true, pattern = "^http://",
                        description = "the collector's OTLP/HTTP traces endpoint, "
                            .. "http://IP[:port]/path (an IP literal or localhost)" },
                    service_name = { type = "string", default = "moongate", min_len = 1,
                        description = "the resource's service.name" },
                    resource_attributes = { type = "map", default = {},
                        values = { type = "string", description = "attribute value" },
                        description = "more resource attributes (string values)" },
                    headers = { type = "map", default = {},
                        values = { type = "string", description = "header value" },
                        description = "headers sent with every export (e.g. an API key)" },
                    batch_size = { type = "integer", default = 100, min = 1, max = 10000,
                        description = "requests (spans of) per export request, at most" },
                    flush_interval = { type = "number", default = 1, min = 0.01, max = 60,
                        description = "seconds a queued span waits at most before it is sent" },
                    max_queue = { type = "integer", default = 2048, min = 1, max = 100000,
                        description = "requests queued per worker; more are dropped and counted" },
                    timeout = { type = "number", default = 2, min = 0.001, max = 60,
                        description = "seconds for one export request" },
                    plugin_spans = { type = "boolean", default = false,
                        description = "a child span for each plugin call (times every "
                            .. "plugin of the route)" },
                },
            },
        },
    },
}

local ZERO32, ZERO16 = rep("0", 32), rep("0", 16)
local HEX8, HEX16 = rep("%02x", 8), rep("%02x", 16)

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

--- P.new_id(nbytes) -> lower-case hex of nbytes (8 or 16) random bytes, never all zeros.
function P.new_id(n)
    local fmt = n == 16 and HEX16 or HEX8
    while true do
        local h = format(fmt, byte(random(n), 1, n))
        if find(h, "[^0]") then return h end
    end
end

-- ------------------------------------------------------------ the exporter

-- Exporters of this module's generation, by config table: registered when
-- a config is checked (the one place a plugin sees each of its configs,
-- since init_worker takes none), so init_worker can start their timers.
-- Routes with equal exporter settings share one exporter (one queue).
local exporters, by_key, list = {}, {}, {}

local function sorted_pairs_text(map)
    local keys = {}
    for k in pairs(map) do keys[#keys + 1] = k end
    sort(keys)
    local parts = {}
    for i, k in ipairs(keys) do parts[i] = k .. "=" .. map[k] end
    return concat(parts, "\0"), keys
end

local function attr_str(key, value)
    return '{"key":' .. json_encode(key) .. ',"value":{"stringValue":'
        .. json_encode(value) .. "}}"
end

local function new_exporter(ex)
    local res_text, res_keys = sorted_pairs_text(ex.resource_attributes)
    local hdr_text = sorted_pairs_text(ex.headers)
    local key = concat({ ex.url, ex.service_name, res_text, hdr_text, ex.batch_size,
        ex.flush_interval, ex.max_queue, ex.timeout, tostring(ex.plugin_spans) }, "\1")
    local st = by_key[key]
    if st then return st end
    local attrs = { attr_str("service.name", ex.service_name) }
    for _, k in ipairs(res_keys) do
        if k ~= "service.name" then attrs[#attrs + 1] = attr_str(k, ex.resource_attributes[k]) end
    end
    local headers = { ["Content-Type"] = "application/json" }
    for k, v in pairs(ex.headers) do headers[k] = v end
    st = {
        url = ex.url, headers = headers, timeout = ex.timeout, batch = ex.batch_size,
        max = ex.max_queue, interval = ex.flush_interval, plugin_spans = ex.plugin_spans,
        q = {}, head = 1, n = 0,                 -- the ring of queued records
        buf = strbuf.new(),                      -- where a batch is encoded
        sent = 0, dropped = 0, rejected = 0, failed = 0, -- counters (P.stats)
        busy = false, last_send = now(), retry_at = 0, failures_in_row = 0,
        last_err = nil, last_report = -1 / 0, reported = { dropped = 0, rejected = 0, failed = 0 },
        -- ExportTraceServiceRequest around the spans of one batch
        prefix = '{"resourceSpans":[{"resource":{"attributes":[' .. concat(attrs, ",")
            .. ']},"scopeSpans":[{"scope":{"name":"moongate"},"spans":[',
        suffix = "]}]}]}",
    }
    by_key[key] = st
    list[#list + 1] = st
    return st
end

-- "http://IP[:port]/path" with an address gw.http can reach without a
-- name lookup.
local function check_url(url)
    local host = url:match("^http://([^/?#]+)/[^%s]*$")
    if not host then return nil, "must be http://IP[:port]/path" end
    local h = host:match("^(.*):%d+$") or host
    if h == "localhost" or h:find("^%d+%.%d+%.%d+%.%d+$") or h:find("^%[[%x:.]+%]$") then
        return true
    end
    return nil, "the host must be an IP literal or localhost (names are not resolved)"
end

function P.schema.check(conf)
    local ex = conf.exporter
    if not ex then return true end
    local ok, err = check_url(ex.url)
    if not ok then return nil, "exporter.url: " .. err end
    if ex.batch_size > ex.max_queue then
        return nil, "exporter.batch_size must not exceed exporter.max_queue"
    end
    for name, value in pairs(ex.headers) do
        if not name:find(TOKEN) or value:find("[\r\n%z]") then
            return nil, "exporter.headers: invalid header " .. name
        end
        if GATEWAY_OWNED[name:lower()] then
            return nil, "exporter.headers: " .. name .. " is set by the gateway"
        end
    end
    exporters[ex] = new_exporter(ex)
    return true
end

--- The runtime's hook: which timings this config needs (ctx.timings).
function P.timings(conf)
    local ex = conf.exporter
    if not ex then return nil end
    return ex.plugin_spans and "plugins" or "request"
end

--- The runtime's hook: without an exporter, no log phase (a route whose
-- plugins have none saves resuming the request for it).
function P.skips(conf, phase)
    return phase == "log" and not conf.exporter
end

--- P.exporter(conf) -> the exporter state of a checked config (or nil).
function P.exporter(conf)
    return conf.exporter and exporters[conf.exporter]
end

-- A queued record is an array (no hash part: a third of the memory of the
-- same fields by name), in this order.
local TID, SID, PARENT, STATE, METHOD, ROUTE, ROUTE_NAME, PATH, STATUS, CLIENT, RID, START,
    PROXY, HEAD, FINISH, PLUGINS = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16

--- P.new_record(fields) -> a record from named fields (trace_id, span_id,
-- parent, tracestate, method, route, route_name, path, status, client,
-- request_id, start, proxy, header, finish, plugins); absent ones false.
function P.new_record(f)
    return { f.trace_id, f.span_id, f.parent or false, f.tracestate or false, f.method,
             f.route, f.route_name, f.path, f.status, f.client, f.request_id, f.start,
             f.proxy or false, f.header or false, f.finish, f.plugins or false }
end

--- P.enqueue(st, rec) -> true, or false when the queue is full (counted).
function P.enqueue(st, rec)
    local n = st.n
    if n >= st.max then
        st.dropped = st.dropped + 1
        return false
    end
    st.q[(st.head + n - 1) % st.max + 1] = rec
    st.n = n + 1
    return true
end

local function pop(st, k)
    local q, head, max = st.q, st.head, st.max
    for _ = 1, k do
        q[head] = nil
        head = head % max + 1
    end
    st.head, st.n = head, st.n - k
end

-- Spans are written into a string.buffer (LuaJIT): one string per batch,
-- not one per span and attribute.

-- Puts a JSON string literal; the common case (printable ASCII but " and
-- \: nothing to escape) without cjson.
local function put_str(buf, s)
    if find(s, "[^ !#-%[%]-~]") then return buf:put(json_encode(s)) end
    return buf:put('"', s, '"')
end

-- The same for values that repeat (methods, routes, client addresses): the
-- literal is kept, in a table emptied when it holds QUOTED_MAX of them.
local QUOTED_MAX = 1024
local quoted, nquoted = {}, 0
local function put_known(buf, s)
    local q = quoted[s]
    if not q then
        q = find(s, "[^ !#-%[%]-~]") and json_encode(s) or '"' .. s .. '"'
        if nquoted >= QUOTED_MAX then quoted, nquoted = {}, 0 end
        quoted[s], nquoted = q, nquoted + 1
    end
    return buf:put(q)
end

local function put_attr(buf, key, s, put)
    buf:put(',{"key":"', key, '","value":{"stringValue":')
    put(buf, s)
    buf:put("}}")
end

-- Child span ids only need to be unique within their trace: a random
-- per-module prefix (4 bytes, not zero) and a counter, cheaper than 8
-- random bytes per span.
local child_prefix
repeat child_prefix = format("%02x%02x%02x%02x", byte(random(4), 1, 4)) until child_prefix ~= "00000000"
local child_n = 0
local function child_id()
    child_n = (child_n + 1) % 4294967296
    return format("%s%08x", child_prefix, child_n)
end

local function put_child(buf, tid, sid, t0, t1)
    buf:put(',{"traceId":"', tid, '","spanId":"', child_id(), '","parentSpanId":"', sid,
            '","kind":1')
    buf:putf(',"startTimeUnixNano":"%.0f000","endTimeUnixNano":"%.0f000"', t0, t1)
end

--- P.put_spans(buf, rec, plugin_spans, first): puts the OTLP JSON span
-- objects of a record, comma-separated (and preceded by a comma unless
-- `first`): the gateway's SERVER span, an "upstream" child when the
-- request was proxied, and one child per plugin call when asked for.
function P.put_spans(buf, rec, plugin_spans, first)
    local tid, sid, status, proxy, finish = rec[TID], rec[SID], rec[STATUS], rec[PROXY],
        rec[FINISH]
    local err = status >= 500 or status == 0
    buf:put(first and '{"traceId":"' or ',{"traceId":"', tid, '","spanId":"', sid, '"')
    if rec[PARENT] then buf:put(',"parentSpanId":"', rec[PARENT], '"') end
    if rec[STATE] then
        buf:put(',"traceState":')
        put_str(buf, rec[STATE])
    end
    buf:put(',"name":')
    local method, route = rec[METHOD], rec[ROUTE]
    put_known(buf, method .. " " .. route)
    buf:putf(',"kind":2,"startTimeUnixNano":"%.0f000","endTimeUnixNano":"%.0f000"',
        rec[START], finish)
    buf:put(',"attributes":[{"key":"http.request.method","value":{"stringValue":')
    put_known(buf, method)
    buf:put("}}")
    put_attr(buf, "http.route", route, put_known)
    buf:putf(',{"key":"http.response.status_code","value":{"intValue":"%d"}}', status)
    put_attr(buf, "url.path", rec[PATH], put_str)
    buf:put(',{"key":"url.scheme","value":{"stringValue":"http"}}')
    put_attr(buf, "client.address", rec[CLIENT], put_known)
    put_attr(buf, "moongate.route", rec[ROUTE_NAME], put_known)
    put_attr(buf, "moongate.request_id", rec[RID], put_str)
    if proxy then
        buf:putf(',{"key":"moongate.upstream_ms","value":{"doubleValue":%.3f}}',
            (finish - proxy) / 1000)
    end
    buf:put("]")
    if err then buf:put(',"status":{"code":2}') end
    buf:put("}")
    if proxy then
        put_child(buf, tid, sid, proxy, finish)
        buf:put(',"name":"upstream"')
        local head = rec[HEAD]
        if head and head >= proxy then
            buf:putf(',"events":[{"timeUnixNano":"%.0f000","name":"response head"}]', head)
        end
        if err then buf:put(',"status":{"code":2}') end
        buf:put("}")
    end
    local calls = plugin_spans and rec[PLUGINS]
    if calls then
        for i = 1, #calls - 3, 4 do
            local name, phase = calls[i], calls[i + 1]
            put_child(buf, tid, sid, calls[i + 2], calls[i + 3])
            buf:put(',"name":')
            put_known(buf, phase .. " " .. name)
            buf:put(',"attributes":[{"key":"moongate.plugin","value":{"stringValue":')
            put_known(buf, name)
            buf:put('}},{"key":"moongate.phase","value":{"stringValue":"', phase, '"}}]}')
        end
    end
end

--- P.spans(rec, plugin_spans) -> the JSON array (text) of a record's spans.
function P.spans(rec, plugin_spans)
    local buf = strbuf.new()
    P.put_spans(buf, rec, plugin_spans, true)
    return "[" .. buf:tostring() .. "]"
end

--- P.encode(st, k) -> the ExportTraceServiceRequest (JSON text) of the k
-- oldest queued records.
function P.encode(st, k)
    local buf, q, max, plugin_spans = st.buf, st.q, st.max, st.plugin_spans
    buf:reset()
    local i = st.head
    buf:put(st.prefix)
    for j = 1, k do
        P.put_spans(buf, q[i], plugin_spans, j == 1)
        i = i % max + 1
    end
    buf:put(st.suffix)
    local body = buf:tostring()
    buf:reset()
    return body
end

--- P.send(st, body) -> HTTP status, or nil, err. One export request.
function P.send(st, body)
    local res, err = gw.http.request({ url = st.url, method = "POST", headers = st.headers,
                                       body = body, timeout = st.timeout })
    if not res then return nil, err end
    return res.status
end

-- Sends what is queued, batch by batch, until the queue is empty, a
-- retryable failure (the batch stays queued: backoff), or as many batches
-- as were queued at the start (later records wait for the next tick).
local function drain(st)
    for _ = 1, ceil(st.n / st.batch) do
        local k = min(st.n, st.batch)
        if k == 0 then break end
        local status, err = P.send(st, P.encode(st, k))
        if status and status >= 200 and status < 300 then
            pop(st, k)
            st.sent, st.failures_in_row, st.retry_at = st.sent + k, 0, 0
        elseif status and not RETRYABLE[status] then
            pop(st, k) -- the collector refuses this batch for good (OTLP: no retry)
            st.rejected, st.last_err = st.rejected + k, "HTTP " .. status
        else
            st.failed, st.failures_in_row = st.failed + 1, st.failures_in_row + 1
            st.last_err = err or ("HTTP " .. status)
            st.retry_at = now() + min(MAX_BACKOFF, st.interval * 2 ^ (st.failures_in_row - 1))
            break
        end
    end
end

-- A warn line when something failed or was dropped since the last one: at
-- once for the first failure, drop or rejection, then at most one line per
-- REPORT_EVERY seconds.
local function report(st, t)
    local r = st.reported
    if st.failed == r.failed and st.dropped == r.dropped and st.rejected == r.rejected then
        return
    end
    local first = (r.failed == 0 and st.failed > 0) or (r.dropped == 0 and st.dropped > 0)
        or (r.rejected == 0 and st.rejected > 0)
    if not first and t - st.last_report < REPORT_EVERY then return end
    gw.log("warn", "request-id exporter ", st.url, ": ", st.failed - r.failed,
        " export(s) failed (last: ", tostring(st.last_err), "), ",
        st.dropped - r.dropped, " span(s) dropped (queue full: ", st.max, "), ",
        st.rejected - r.rejected, " rejected by the collector; ", st.n, " queued")
    st.last_report, r.failed, r.dropped, r.rejected = t, st.failed, st.dropped, st.rejected
end

--- P.flush(st[, force]): the timer's work. Sends when a batch is full or
-- the oldest span has waited flush_interval (`force`: anything queued),
-- unless a send is in progress or a failure's backoff runs.
function P.flush(st, force)
    if st.busy then return end
    local t = now()
    if st.n > 0 and t >= st.retry_at
        and (force or st.n >= st.batch or t - st.last_send >= st.interval) then
        st.busy = true
        local ok, err = pcall(drain, st)
        st.busy = false
        if not ok then st.failed, st.last_err = st.failed + 1, tostring(err) end
        t = now()
        st.last_send = t
    elseif st.n == 0 then
        st.last_send = t -- the interval counts from the first span queued
    end
    report(st, t)
end

--- P.stats(st) -> { queued, sent, dropped, rejected, failed }.
function P.stats(st)
    return { queued = st.n, sent = st.sent, dropped = st.dropped, rejected = st.rejected,
             failed = st.failed }
end

function P.init_worker()
    for _, st in ipairs(list) do
        local id, err = gw.timer.every(min(st.interval, TICK), P.flush, st)
        if not id then gw.log("error", "request-id exporter ", st.url, ": ", err) end
    end
end

-- --------------------------------------------------------------- phases

function P.rewrite(conf, ctx)
    local incoming = get_header(ctx, "traceparent")
    local tid, pid, flags = P.parse_traceparent(incoming)
    if not tid then
        tid, pid, flags = P.new_id(16), nil, "01"
        gw.request.clear_header(ctx, "tracestate")
    end
    local span = P.new_id(8)
    local tp = "00-" .. tid .. "-" .. span .. "-" .. flags
    set_header(ctx, "traceparent", tp)
    local v = ctx.var
    v.trace_id, v.span_id, v.traceparent, v.parent_span_id = tid, span, tp, pid
    -- The exporter's queue is full (a dead or slow collector): this
    -- request's span will be dropped, so it need not be timed either.
    local ex = conf.exporter
    if ex then
        local st = exporters[ex]
        if st and st.n >= st.max then ctx.timings = false end
    end
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

local NO_TIMINGS = {}

--- P.record(ctx) -> what the exporter keeps of a finished request.
function P.record(ctx)
    local v, t, route = ctx.var, ctx.timings or NO_TIMINGS, ctx.route
    local parent = v.parent_span_id or false
    local finish = t.finish or now_us()
    return { v.trace_id, v.span_id, parent, parent and get_header(ctx, "tracestate") or false,
             gw.request.get_method(ctx), route.path or "", route.name or "",
             gw.request.get_path(ctx), gw.response.get_status(ctx),
             gw.request.get_client_ip(ctx), gw.request.get_id(ctx), t.start or finish,
             t.proxy or false, t.header or false, finish, t.plugins or false }
end

function P.log(conf, ctx)
    local st = conf.exporter and exporters[conf.exporter]
    -- No span without ids (an earlier rewrite plugin ended the request).
    if not st or not ctx.var.span_id then return end
    -- Full now, or already when the request began (rewrite then dropped
    -- its timings): counted as a drop.
    if st.n >= st.max or ctx.timings == false then
        st.dropped = st.dropped + 1
        return
    end
    P.enqueue(st, P.record(ctx))
end

return P
