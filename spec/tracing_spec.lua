-- The span exporter of plugins/request-id.lua (config, span building, the
-- OTLP/HTTP JSON it sends, its bounded queue, batching, failures) and the
-- runtime's opt-in timings it reads (ctx.timings). Delivery to a real
-- collector process is exercised in tests/e2e/test_tracing.py.
local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec"
package.path = SPEC_DIR .. "/fixtures/?.lua;" .. package.path

local gw = require("moongate.gw")
local runtime = require("moongate.runtime")
local trace = require("trace")

local URL = "http://127.0.0.1:4318/v1/traces"
local TID, PARENT, SID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "b7ad6b7169203331"

-- A fresh copy of the plugin (its exporters are per module, as they are
-- per generation in a worker) and a checked config with an exporter.
local function load(exporter)
    local P = dofile("plugins/request-id.lua")
    local conf, refused = require("spec.helpers.plugin_conf")(P)
    local c = conf({ exporter = exporter })
    return P, c, P.exporter(c), refused
end

local P_any = dofile("plugins/request-id.lua") -- for new_record only

local function record(over)
    local r = {
        trace_id = TID, span_id = SID, parent = PARENT, tracestate = "k=v",
        method = "GET", route = "/users/{id}", route_name = "users", path = "/users/7",
        status = 200, client = "127.0.0.1", request_id = "rid-1",
        start = 1700000000000000, proxy = 1700000000000100, header = 1700000000000900,
        finish = 1700000000001000,
        plugins = { "request-id", "rewrite", 1700000000000010, 1700000000000020,
                    "acl", "access", 1700000000000030, 1700000000000090 },
    }
    for k, v in pairs(over or {}) do r[k] = v end
    return P_any.new_record(r)
end

local function attrs(list)
    local out = {}
    for _, a in ipairs(list or {}) do
        local v = a.value
        out[a.key] = v.stringValue or v.intValue or v.doubleValue
    end
    return out
end

-- Spans checked for the OTLP/JSON shape: hex ids, uint64 times as strings,
-- the kind as a number.
local function check_shape(spans)
    for _, s in ipairs(spans) do
        assert.matches("^%x+$", s.traceId)
        assert.are.equal(32, #s.traceId)
        assert.are.equal(16, #s.spanId)
        assert.is_nil(s.traceId:find("[A-F]"))
        assert.matches("^%d+$", s.startTimeUnixNano)       -- uint64 as a JSON string
        assert.matches("^%d+$", s.endTimeUnixNano)
        assert.is_number(s.kind)
        assert.is_string(s.name)
    end
    return spans
end

-- The spans of one decoded ExportTraceServiceRequest.
local function spans_of(body)
    local doc = assert(gw.json.decode(body))
    assert.are.equal(1, #doc.resourceSpans)
    local rs = doc.resourceSpans[1]
    assert.is_table(rs.resource.attributes)
    assert.are.equal(1, #rs.scopeSpans)
    assert.are.equal("moongate", rs.scopeSpans[1].scope.name)
    return check_shape(rs.scopeSpans[1].spans), doc
end

-- The spans of one record, decoded.
local function spans(P, rec, plugin_spans)
    return check_shape(assert(gw.json.decode(P.spans(rec, plugin_spans))))
end

describe("request-id exporter config", function()
    it("has a log phase only with an exporter", function()
        local P, c = load({ url = URL })
        assert.is_false(P.skips(c, "log"))
        local plain = require("spec.helpers.plugin_conf")(P)({})
        assert.is_true(P.skips(plain, "log"))
        assert.is_false(P.skips(plain, "rewrite"))
    end)

    it("fills in the defaults and asks the runtime for request timings", function()
        local P, c, st = load({ url = URL })
        assert.are.same({ url = URL, service_name = "moongate", resource_attributes = {},
            headers = {}, batch_size = 100, flush_interval = 1, max_queue = 2048, timeout = 2,
            plugin_spans = false }, c.exporter)
        assert.are.equal("request", P.timings(c))
        assert.is_table(st)
        local P2, c2 = load({ url = URL, plugin_spans = true })
        assert.are.equal("plugins", P2.timings(c2))
        assert.is_nil(P.timings(require("spec.helpers.plugin_conf")(P)({})))
    end)

    it("refuses a url gw.http cannot reach without a name lookup, and bad sizes and headers", function()
        local _, _, _, refused = load({ url = URL })
        refused({ exporter = { url = "http://otel.example.com:4318/v1/traces" } }, "IP literal")
        refused({ exporter = { url = "https://127.0.0.1:4318/v1/traces" } }, "url")
        refused({ exporter = { url = "http://127.0.0.1:4318" } }, "http://IP%[:port%]/path")
        refused({ exporter = { url = URL, batch_size = 100, max_queue = 10 } }, "batch_size")
        refused({ exporter = { url = URL, max_queue = 0 } }, "max_queue")
        refused({ exporter = { url = URL, headers = { ["Content-Length"] = "1" } } },
            "set by the gateway")
        refused({ exporter = { url = URL, headers = { ["bad name"] = "1" } } }, "invalid header")
        refused({ exporter = { url = URL, headers = { ["X-Key"] = "a\r\nb" } } }, "invalid header")
        refused({ exporter = { url = URL, colour = "blue" } }, "exporter.colour: unknown field")
        load({ url = "http://[::1]:4318/v1/traces" })
        load({ url = "http://localhost/v1/traces" })
    end)

    it("shares one exporter between routes with equal settings", function()
        local P = dofile("plugins/request-id.lua")
        local conf = require("spec.helpers.plugin_conf")(P)
        local a, b = conf({ exporter = { url = URL } }), conf({ exporter = { url = URL } })
        local c = conf({ exporter = { url = URL, batch_size = 5 } })
        assert.are.equal(P.exporter(a), P.exporter(b))
        assert.are_not.equal(P.exporter(a), P.exporter(c))
    end)
end)

describe("request-id spans", function()
    it("makes the gateway's SERVER span with the client's span as parent", function()
        local P = load({ url = URL })
        local list = spans(P, record())
        assert.are.equal(2, #list)
        local s = list[1]
        assert.are.equal(TID, s.traceId)
        assert.are.equal(SID, s.spanId)
        assert.are.equal(PARENT, s.parentSpanId)
        assert.are.equal("k=v", s.traceState)
        assert.are.equal("GET /users/{id}", s.name)
        assert.are.equal(2, s.kind)
        assert.are.equal("1700000000000000000", s.startTimeUnixNano)
        assert.are.equal("1700000000001000000", s.endTimeUnixNano)
        assert.is_nil(s.status)
        local a = attrs(s.attributes)
        assert.are.equal("GET", a["http.request.method"])
        assert.are.equal("/users/{id}", a["http.route"])
        assert.are.equal("200", a["http.response.status_code"])
        assert.are.equal("/users/7", a["url.path"])
        assert.are.equal("127.0.0.1", a["client.address"])
        assert.are.equal("rid-1", a["moongate.request_id"])
        assert.are.equal(0.9, a["moongate.upstream_ms"])
    end)

    it("adds an upstream child span from proxying to the end, with the response head as an event", function()
        local P = load({ url = URL })
        local up = spans(P, record())[2]
        assert.are.equal(TID, up.traceId)
        assert.are.equal(SID, up.parentSpanId)
        assert.are_not.equal(SID, up.spanId)
        assert.matches("^%x+$", up.spanId)
        assert.are.equal("upstream", up.name)
        assert.are.equal(1, up.kind)
        assert.are.equal("1700000000000100000", up.startTimeUnixNano)
        assert.are.equal("1700000000001000000", up.endTimeUnixNano)
        assert.are.same({ { timeUnixNano = "1700000000000900000", name = "response head" } },
            up.events)
    end)

    it("makes a root span for a fresh trace and marks 5xx as an error", function()
        local P = load({ url = URL })
        local list = spans(P, record({ parent = false, tracestate = false, proxy = false,
                                       status = 502 }))
        assert.are.equal(1, #list)
        local s = list[1]
        assert.is_nil(s.parentSpanId)
        assert.is_nil(s.traceState)
        assert.are.same({ code = 2 }, s.status)
        assert.is_nil(attrs(s.attributes)["moongate.upstream_ms"])
    end)

    it("adds a span per plugin call only when plugin_spans is on", function()
        local P = load({ url = URL })
        assert.are.equal(2, #spans(P, record(), false))
        local list = spans(P, record(), true)
        assert.are.equal(4, #list)
        local rw, acl = list[3], list[4]
        assert.are.equal("rewrite request-id", rw.name)
        assert.are.equal(SID, rw.parentSpanId)
        assert.are.equal("1700000000000010000", rw.startTimeUnixNano)
        assert.are.equal("1700000000000020000", rw.endTimeUnixNano)
        assert.are.same({ ["moongate.plugin"] = "acl", ["moongate.phase"] = "access" },
            attrs(acl.attributes))
    end)

    it("escapes what came from the client in valid JSON", function()
        local P = load({ url = URL })
        local s = spans(P, record({ path = '/a"b\\c\1\200', tracestate = 'x="y"' }))[1]
        assert.are.equal('/a"b\\c\1\200', attrs(s.attributes)["url.path"])
        assert.are.equal('x="y"', s.traceState)
    end)
end)

describe("request-id export batches", function()
    it("encodes queued records as one ExportTraceServiceRequest with the resource", function()
        local _, _, st = load({ url = URL, service_name = "edge",
                                resource_attributes = { ["deployment.environment"] = "prod" } })
        local P = load({ url = URL })
        P.enqueue(st, record())
        P.enqueue(st, record({ span_id = "1111111111111111", proxy = false }))
        local spans, doc = spans_of(P.encode(st, 2))
        assert.are.equal(3, #spans)
        assert.are.same({ ["service.name"] = "edge", ["deployment.environment"] = "prod" },
            attrs(doc.resourceSpans[1].resource.attributes))
    end)

    it("sends full batches at once and the rest after flush_interval", function()
        local P, _, st = load({ url = URL, batch_size = 100, flush_interval = 0.05 })
        local bodies = {}
        P.send = function(_, body) bodies[#bodies + 1] = body; return 200 end
        for i = 1, 250 do P.enqueue(st, record({ proxy = false, request_id = "r" .. i })) end
        P.flush(st)
        assert.are.equal(3, #bodies)   -- a full queue goes out whole, in batches
        local counts = {}
        for i, b in ipairs(bodies) do counts[i] = #spans_of(b) end
        assert.are.same({ 100, 100, 50 }, counts)
        assert.are.same({ queued = 0, sent = 250, dropped = 0, rejected = 0, failed = 0 },
            P.stats(st))
        -- the records go out oldest first
        assert.are.equal("r1", attrs(spans_of(bodies[1])[1].attributes)["moongate.request_id"])
        assert.are.equal("r250", attrs(spans_of(bodies[3])[50].attributes)["moongate.request_id"])
    end)

    it("keeps a part batch until flush_interval has passed", function()
        local P, _, st = load({ url = URL, batch_size = 10, flush_interval = 0.05 })
        local sent = 0
        P.send = function() sent = sent + 1; return 200 end
        P.flush(st)                     -- empty queue: the interval starts now
        for _ = 1, 3 do P.enqueue(st, record()) end
        P.flush(st)
        assert.are.equal(0, sent)
        assert.are.equal(3, P.stats(st).queued)
        gw.sleep(0.06)
        P.flush(st)
        assert.are.equal(1, sent)
        assert.are.equal(0, P.stats(st).queued)
    end)

    it("bounds the queue: records past max_queue are dropped and counted, never queued", function()
        local P, _, st = load({ url = URL, batch_size = 2, max_queue = 5 })
        for i = 1, 8 do P.enqueue(st, record({ request_id = "r" .. i })) end
        assert.are.same({ queued = 5, sent = 0, dropped = 3, rejected = 0, failed = 0 },
            P.stats(st))
        local got, answers = {}, { 200, 503 }
        P.send = function(_, body)
            local status = table.remove(answers, 1) or 200
            if status == 200 then
                for _, s in ipairs(spans_of(body)) do
                    if s.kind == 2 then got[#got + 1] = attrs(s.attributes)["moongate.request_id"] end
                end
            end
            return status
        end
        P.flush(st, true)              -- r1, r2 sent; r3, r4 refused with 503: kept
        assert.are.same({ "r1", "r2" }, got)
        -- the ring wraps: new records take the two freed slots, then it is full again
        assert.is_true(P.enqueue(st, record({ request_id = "r9" })))
        assert.is_true(P.enqueue(st, record({ request_id = "r10" })))
        assert.is_false(P.enqueue(st, record({ request_id = "r11" })))
        st.retry_at = 0
        P.flush(st, true)
        assert.are.same({ "r1", "r2", "r3", "r4", "r5", "r9", "r10" }, got)
        assert.are.same({ queued = 0, sent = 7, dropped = 4, rejected = 0, failed = 1 },
            P.stats(st))
        assert.is_nil(next(st.q))      -- nothing kept once sent
    end)
end)

describe("request-id export failures", function()
    it("keeps spans queued and backs off when the collector refuses connections", function()
        -- port 1 on loopback: nothing listens there
        local P, _, st = load({ url = "http://127.0.0.1:1/v1/traces",
                                flush_interval = 0.05, timeout = 1 })
        for _ = 1, 3 do P.enqueue(st, record()) end
        P.flush(st, true)
        local stats = P.stats(st)
        assert.are.same({ queued = 3, sent = 0, dropped = 0, rejected = 0, failed = 1 }, stats)
        assert.matches("refused", st.last_err)
        P.flush(st, true)                       -- within the backoff: no new attempt
        assert.are.equal(1, P.stats(st).failed)
        gw.sleep(0.06)
        P.flush(st, true)
        assert.are.equal(2, P.stats(st).failed)
        assert.are.equal(2, st.failures_in_row)   -- the next backoff is twice as long
        assert.is_true(st.retry_at > gw.now())
        -- one warn line so far: the second failure waits for REPORT_EVERY
        assert.are.equal(1, st.reported.failed)
    end)

    it("retries 429/503 later but drops a batch the collector refuses for good", function()
        local P, _, st = load({ url = URL, batch_size = 2, flush_interval = 0.01 })
        local answers = { 503, 400 }
        P.send = function() return table.remove(answers, 1) end
        for _ = 1, 3 do P.enqueue(st, record()) end
        P.flush(st, true)
        assert.are.same({ queued = 3, sent = 0, dropped = 0, rejected = 0, failed = 1 },
            P.stats(st))
        st.retry_at = 0
        P.send = function() return table.remove(answers, 1) or 200 end
        P.flush(st, true)
        assert.are.same({ queued = 0, sent = 1, dropped = 0, rejected = 2, failed = 1 },
            P.stats(st))
    end)

    it("counts a request whose timings rewrite dropped as a drop, without reading it", function()
        local P, c, st = load({ url = URL })
        -- a fake ctx: reading the request would raise, so nothing is read
        P.log(c, { var = { span_id = SID }, timings = false })
        assert.are.same({ queued = 0, sent = 0, dropped = 1, rejected = 0, failed = 0 },
            P.stats(st))
    end)

    it("survives a send that raises", function()
        local P, _, st = load({ url = URL })
        P.send = function() error("boom") end
        P.enqueue(st, record())
        P.flush(st, true)
        assert.are.equal(1, P.stats(st).failed)
        assert.are.equal(1, P.stats(st).queued)
        assert.is_false(st.busy)
    end)
end)

describe("runtime timings", function()
    local gen = 7000

    local function run(idx)
        trace.reset()
        local co = coroutine.create(runtime.handle)
        local ok, what = coroutine.resume(co, "task", gen, idx, "req")
        assert(ok, what)
        assert(coroutine.resume(co, "header_filter"))
        assert(coroutine.resume(co, "log"))
        return what, trace.calls[1]
    end

    local masks
    setup(function()
        masks = assert(runtime.load_generation(gen, SPEC_DIR .. "/fixtures/timings.lua"))
    end)
    teardown(function() runtime.free_generation(gen) end)

    it("times the request and each plugin call on a route that asks for plugins", function()
        local what, t = run(1)
        assert.are.equal("proxy", what)
        assert.is_true(t.start <= t.proxy and t.proxy <= t.header and t.header <= t.finish)
        assert.are.equal(0, t.start % 1)
        assert.is_true(math.abs(t.start / 1e6 - gw.now()) < 5)
        local calls = {}
        for i = 1, #t.plugins, 4 do
            calls[#calls + 1] = t.plugins[i] .. " " .. t.plugins[i + 1]
            assert.is_true(t.plugins[i + 2] <= t.plugins[i + 3])
        end
        -- the log call is recorded once it returned
        assert.are.same({ "timed rewrite", "timed access", "other access",
                          "timed header_filter", "timed log" }, calls)
    end)

    it("times only the request at the request level", function()
        local _, t = run(2)
        assert.is_number(t.start)
        assert.is_number(t.proxy)
        assert.is_nil(t.plugins)
    end)

    it("leaves ctx.timings out where no plugin asks", function()
        local _, t = run(3)
        assert.is_false(t)
    end)

    it("leaves out a phase the plugin's skips(conf, phase) declines", function()
        local log_bit = runtime.PHASE_BIT.log
        assert.are.equal(0, math.floor(masks[5] / log_bit) % 2)
        assert.are.equal(1, math.floor(masks[1] / log_bit) % 2)
        local calls = {}
        run(5)
        for i, c in ipairs(trace.calls) do calls[i] = c end
        assert.are.same({ "access" }, calls)
    end)

    it("stops timing a request whose plugin set ctx.timings to false", function()
        local what = run(6)
        assert.are.equal("proxy", what)
        local t, seen_in_log = trace.calls[1], trace.calls[2]
        assert.is_number(t.start)
        assert.is_false(t.proxy)
        assert.is_false(t.header)
        assert.is_false(t.finish)
        assert.is_false(seen_in_log)
    end)

    it("times a handler like a plugin call, with no upstream time", function()
        local what, t = run(4)
        assert.are.equal("respond", what)
        assert.is_false(t.proxy)
        assert.are.same({ "handler", "handler" }, { t.plugins[1], t.plugins[2] })
    end)
end)
