/*
 * Shared-memory metrics (see metrics.h for the model). Layout of the one
 * mapping, all of it zero at start:
 *
 *   header   the route-name registry: MAX_ROUTES slots, each claimed once
 *            with a compare-and-swap and never released, so a series index
 *            means the same route name in every process for the gateway's
 *            life (reloads included);
 *   procs    per-worker gauges (connections, generations alive), one
 *            cache line each, owned by one live process at a time;
 *   shards   SHARDS copies of the per-route counters; a worker adds into
 *            shard (slot % SHARDS). Workers draining after a replacement may
 *            share a shard with their successor: adds stay atomic, so
 *            sharing only costs cache traffic, never counts.
 *
 * The mapping is lazily backed by the kernel: untouched route slots cost
 * nothing, which is why the limits can be generous.
 */
#include "metrics.h"

#include <errno.h>
#include <llhttp.h>
#include <sched.h>
#include <stdio.h>
#include <sys/mman.h>
#include <uv.h>

#include "config.h"
#include "ffi.h"
#include "peers.h"

#define SHARDS 8
#define NAME_MAX_LEN 200
#define NMETHODS 8
#define NCLASSES 5
#define NBUCKETS 15 /* 14 bounds and +Inf */

enum { SLOT_EMPTY, SLOT_WRITING, SLOT_READY };
enum { SERIES_UNMATCHED, SERIES_OTHER, SERIES_FIRST };

/* Upper bounds in nanoseconds; the last bucket is +Inf. */
static const uint64_t bounds_ns[NBUCKETS - 1] = {
    500000,     1000000,    2500000,    5000000,     10000000,
    25000000,   50000000,   100000000,  250000000,   500000000,
    1000000000, 2500000000, 5000000000, 10000000000,
};
static const char *const bound_text[NBUCKETS - 1] = {
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
    "0.1",    "0.25",  "0.5",    "1",     "2.5",  "5",     "10",
};
static const char *const method_names[NMETHODS] = {
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
};
static const char *const class_names[NCLASSES] = {"1xx", "2xx", "3xx", "4xx",
                                                  "5xx"};

typedef struct {
    uint32_t state;
    char name[NAME_MAX_LEN];
} route_slot_t;

typedef struct {
    int64_t connections;
    int64_t generations;
    char pad[48]; /* one cache line per worker */
} proc_gauges_t;

typedef struct {
    uint64_t requests[NMETHODS][NCLASSES];
    uint64_t duration[NBUCKETS], duration_sum_ns;
    uint64_t upstream[NBUCKETS], upstream_sum_ns;
    uint64_t bytes_in, bytes_out;
} route_stats_t;

/* Plugin counters (gw.metrics): families and their series. */
#define MAX_FAMILIES 64
#define MAX_SERIES 2048
#define FAMILY_NAME_LEN 96
#define FAMILY_HELP_LEN 160
#define LABELS_LEN 200

typedef struct {
    uint32_t state;
    char name[FAMILY_NAME_LEN];
    char help[FAMILY_HELP_LEN];
    char labelnames[FAMILY_HELP_LEN]; /* "a,b": same name, same labels */
} family_t;

typedef struct {
    uint32_t state;
    uint32_t family;
    char labels[LABELS_LEN];
    uint64_t value;
} series_t;

/* HTTP/2 error codes 0x0..0xd (RFC 9113 7), then "unknown". */
#define H2_CODES 15
static const char *const h2_code_names[H2_CODES] = {
    "no_error",
    "protocol_error",
    "internal_error",
    "flow_control_error",
    "settings_timeout",
    "stream_closed",
    "frame_size_error",
    "refused_stream",
    "cancel",
    "compression_error",
    "connect_error",
    "enhance_your_calm",
    "inadequate_security",
    "http_1_1_required",
    "unknown",
};

typedef struct {
    uint64_t goaways[H2_CODES];
    uint64_t streams, connections;
} h2_stats_t;

typedef struct {
    route_slot_t routes[MG_METRICS_MAX_ROUTES];
    h2_stats_t h2;
    family_t families[MAX_FAMILIES];
    series_t series[MAX_SERIES];
    proc_gauges_t procs[MG_METRICS_MAX_PROCS];
    route_stats_t shards[SHARDS][MG_METRICS_MAX_ROUTES];
} area_t;

/* Process-wide by nature (an inherited mapping); see the top comment. */
static area_t *area;
static int my_slot = MG_METRICS_NO_SLOT;
static int enabled;
static uint8_t proc_used[MG_METRICS_MAX_PROCS]; /* master's bookkeeping */

static void add(uint64_t *p, uint64_t v)
{
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

static uint64_t load(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static void claim(unsigned idx, const char *name)
{
    route_slot_t *s = &area->routes[idx];
    snprintf(s->name, sizeof(s->name), "%s", name);
    __atomic_store_n(&s->state, SLOT_READY, __ATOMIC_RELEASE);
}

int mg_metrics_init(void)
{
    if (area)
        return 0;
    void *p = mmap(NULL, sizeof(area_t), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return -errno;
    area = p;
    claim(SERIES_UNMATCHED, "(unmatched)");
    claim(SERIES_OTHER, "(other)");
    return 0;
}

int mg_metrics_proc_acquire(void)
{
    for (int i = 0; i < MG_METRICS_MAX_PROCS; i++)
        if (!proc_used[i]) {
            proc_used[i] = 1;
            return i;
        }
    return MG_METRICS_NO_SLOT;
}

void mg_metrics_proc_release(int slot)
{
    if (slot < 0 || slot >= MG_METRICS_MAX_PROCS || !area)
        return;
    proc_used[slot] = 0;
    /* The process is dead: nobody else writes these any more. */
    __atomic_store_n(&area->procs[slot].connections, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&area->procs[slot].generations, 0, __ATOMIC_RELAXED);
}

void mg_metrics_attach(int slot)
{
    my_slot = slot;
}

void mg_metrics_enable(int on)
{
    enabled = on;
}

static uint32_t hash_name(const char *s)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

unsigned mg_metrics_route_series(const char *name)
{
    if (!area)
        return SERIES_OTHER;
    const unsigned n = MG_METRICS_MAX_ROUTES - SERIES_FIRST;
    unsigned start = hash_name(name) % n;
    for (unsigned k = 0; k < n; k++) {
        unsigned idx = SERIES_FIRST + (start + k) % n;
        route_slot_t *s = &area->routes[idx];
        uint32_t st = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
        if (st == SLOT_EMPTY) {
            uint32_t expect = SLOT_EMPTY;
            if (__atomic_compare_exchange_n(&s->state, &expect, SLOT_WRITING, 0,
                                            __ATOMIC_ACQ_REL,
                                            __ATOMIC_ACQUIRE)) {
                claim(idx, name);
                return idx;
            }
            st = expect;
        }
        /* Another worker is writing this name: it takes microseconds. */
        while (st == SLOT_WRITING) {
            sched_yield();
            st = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
        }
        if (strncmp(s->name, name, NAME_MAX_LEN - 1) == 0)
            return idx;
    }
    return SERIES_OTHER;
}

static unsigned method_index(unsigned m)
{
    switch (m) {
    case HTTP_GET: return 0;
    case HTTP_HEAD: return 1;
    case HTTP_POST: return 2;
    case HTTP_PUT: return 3;
    case HTTP_DELETE: return 4;
    case HTTP_PATCH: return 5;
    case HTTP_OPTIONS: return 6;
    default: return 7;
    }
}

static unsigned bucket(uint64_t ns)
{
    unsigned i = 0;
    while (i < NBUCKETS - 1 && ns > bounds_ns[i])
        i++;
    return i;
}

void mg_metrics_record(const mg_req_t *r, int status)
{
    if (!area || !enabled)
        return;
    unsigned series = r->route ? r->route->metrics_series : SERIES_UNMATCHED;
    if (series >= MG_METRICS_MAX_ROUTES)
        series = SERIES_OTHER;
    unsigned shard = my_slot < 0 ? 0 : (unsigned)my_slot % SHARDS;
    route_stats_t *s = &area->shards[shard][series];
    unsigned cls = status < 200    ? 0
                   : status >= 500 ? 4
                                   : (unsigned)status / 100 - 1;
    /* A request refused before its method was accepted has none. */
    unsigned m = r->method_name.len ? method_index(r->method) : NMETHODS - 1;
    add(&s->requests[m][cls], 1);
    uint64_t total = r->start_ns ? uv_hrtime() - r->start_ns : 0;
    add(&s->duration[bucket(total)], 1);
    add(&s->duration_sum_ns, total);
    if (r->upstream_ns) {
        add(&s->upstream[bucket(r->upstream_ns)], 1);
        add(&s->upstream_sum_ns, r->upstream_ns);
    }
    add(&s->bytes_in, r->body_received);
    add(&s->bytes_out, r->bytes_out);
}

const char *mg_metrics_h2_code_name(uint32_t code)
{
    return h2_code_names[code < H2_CODES - 1 ? code : H2_CODES - 1];
}

/* Counted even when request recording is off: rare events, and the
 * hostile-client tests read them. */
void mg_metrics_h2_goaway(uint32_t code)
{
    if (area)
        add(&area->h2.goaways[code < H2_CODES - 1 ? code : H2_CODES - 1], 1);
}

void mg_metrics_h2_stream(void)
{
    if (area)
        add(&area->h2.streams, 1);
}

void mg_metrics_h2_connection(void)
{
    if (area)
        add(&area->h2.connections, 1);
}

static void family(mg_strbuf_t *out, const char *name, const char *type,
                   const char *help);

static void render_h2(mg_strbuf_t *out)
{
    family(out, "moongate_http2_goaways_total", "counter",
           "HTTP/2 GOAWAY frames sent to clients, by error code.");
    for (unsigned i = 0; i < H2_CODES; i++)
        mg_strbuf_printf(
            out, "moongate_http2_goaways_total{code=\"%s\"} %llu\n",
            h2_code_names[i], (unsigned long long)load(&area->h2.goaways[i]));
    family(out, "moongate_http2_streams_total", "counter",
           "HTTP/2 streams (requests) begun by clients.");
    mg_strbuf_printf(out, "moongate_http2_streams_total %llu\n",
                     (unsigned long long)load(&area->h2.streams));
    family(out, "moongate_http2_connections_total", "counter",
           "Client connections that spoke HTTP/2 (h2 or h2c).");
    mg_strbuf_printf(out, "moongate_http2_connections_total %llu\n",
                     (unsigned long long)load(&area->h2.connections));
}

void mg_metrics_set_connections(unsigned n)
{
    if (area && my_slot >= 0)
        __atomic_store_n(&area->procs[my_slot].connections, (int64_t)n,
                         __ATOMIC_RELAXED);
}

void mg_metrics_add_generations(int delta)
{
    if (area && my_slot >= 0)
        __atomic_fetch_add(&area->procs[my_slot].generations, delta,
                           __ATOMIC_RELAXED);
}

/* ---- plugin counters ---------------------------------------------------- */

/* Waits out another process writing slot `state`; returns its final state. */
static uint32_t settled(uint32_t *state)
{
    uint32_t st;
    while ((st = __atomic_load_n(state, __ATOMIC_ACQUIRE)) == SLOT_WRITING)
        sched_yield();
    return st;
}

/* Claims an empty slot (returns 1, state WRITING) or reports it taken. */
static int try_claim(uint32_t *state)
{
    uint32_t expect = SLOT_EMPTY;
    return __atomic_compare_exchange_n(state, &expect, SLOT_WRITING, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

int mg_ffi_metrics_define(const char *name, const char *help,
                          const char *labelnames)
{
    if (!area)
        return 0;
    if (strlen(name) >= FAMILY_NAME_LEN
        || strlen(labelnames) >= FAMILY_HELP_LEN)
        return -1;
    unsigned start = hash_name(name) % MAX_FAMILIES;
    for (unsigned k = 0; k < MAX_FAMILIES; k++) {
        family_t *f = &area->families[(start + k) % MAX_FAMILIES];
        if (try_claim(&f->state)) {
            snprintf(f->name, sizeof(f->name), "%s", name);
            snprintf(f->help, sizeof(f->help), "%s", help);
            snprintf(f->labelnames, sizeof(f->labelnames), "%s", labelnames);
            __atomic_store_n(&f->state, SLOT_READY, __ATOMIC_RELEASE);
            return (int)((start + k) % MAX_FAMILIES);
        }
        settled(&f->state);
        if (strcmp(f->name, name) == 0)
            return strcmp(f->labelnames, labelnames) == 0
                       ? (int)((start + k) % MAX_FAMILIES)
                       : -1;
    }
    return -2;
}

int mg_ffi_metrics_series(int fam, const char *labels)
{
    if (!area)
        return 0;
    if (fam < 0 || fam >= MAX_FAMILIES || strlen(labels) >= LABELS_LEN)
        return -2;
    unsigned start =
        (hash_name(labels) ^ (uint32_t)fam * 2654435761u) % MAX_SERIES;
    for (unsigned k = 0; k < MAX_SERIES; k++) {
        unsigned idx = (start + k) % MAX_SERIES;
        series_t *sr = &area->series[idx];
        if (try_claim(&sr->state)) {
            sr->family = (uint32_t)fam;
            snprintf(sr->labels, sizeof(sr->labels), "%s", labels);
            __atomic_store_n(&sr->state, SLOT_READY, __ATOMIC_RELEASE);
            return (int)idx;
        }
        settled(&sr->state);
        if (sr->family == (uint32_t)fam && strcmp(sr->labels, labels) == 0)
            return (int)idx;
    }
    return -2;
}

void mg_ffi_metrics_add(int series, uint64_t n)
{
    if (area && series >= 0 && series < MAX_SERIES)
        add(&area->series[series].value, n);
}

static void family(mg_strbuf_t *out, const char *name, const char *type,
                   const char *help);

static void render_plugin_counters(mg_strbuf_t *out)
{
    for (unsigned f = 0; f < MAX_FAMILIES; f++) {
        const family_t *fam = &area->families[f];
        if (__atomic_load_n(&fam->state, __ATOMIC_ACQUIRE) != SLOT_READY)
            continue;
        family(out, fam->name, "counter", fam->help);
        for (unsigned i = 0; i < MAX_SERIES; i++) {
            const series_t *sr = &area->series[i];
            if (__atomic_load_n(&sr->state, __ATOMIC_ACQUIRE) != SLOT_READY
                || sr->family != f)
                continue;
            mg_strbuf_printf(
                out, sr->labels[0] ? "%s{%s} %llu\n" : "%s%s %llu\n", fam->name,
                sr->labels, (unsigned long long)load(&sr->value));
        }
    }
}

/* ---- rendering (master) ------------------------------------------------ */

/* A label value: backslash, double quote and newline escaped. */
static void label(mg_strbuf_t *out, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\' || *v == '"')
            mg_strbuf_printf(out, "\\%c", *v);
        else if (*v == '\n')
            mg_strbuf_puts(out, "\\n");
        else
            mg_strbuf_add(out, v, 1);
    }
}

static void family(mg_strbuf_t *out, const char *name, const char *type,
                   const char *help)
{
    mg_strbuf_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name,
                     type);
}

/* Sums the shards of one route. */
static void sum_route(unsigned idx, route_stats_t *t)
{
    memset(t, 0, sizeof(*t));
    for (unsigned sh = 0; sh < SHARDS; sh++) {
        const route_stats_t *s = &area->shards[sh][idx];
        for (unsigned m = 0; m < NMETHODS; m++)
            for (unsigned c = 0; c < NCLASSES; c++)
                t->requests[m][c] += load(&s->requests[m][c]);
        for (unsigned b = 0; b < NBUCKETS; b++) {
            t->duration[b] += load(&s->duration[b]);
            t->upstream[b] += load(&s->upstream[b]);
        }
        t->duration_sum_ns += load(&s->duration_sum_ns);
        t->upstream_sum_ns += load(&s->upstream_sum_ns);
        t->bytes_in += load(&s->bytes_in);
        t->bytes_out += load(&s->bytes_out);
    }
}

static void histogram(mg_strbuf_t *out, const char *name, const char *route,
                      const uint64_t *b, uint64_t sum_ns)
{
    uint64_t cum = 0;
    for (unsigned i = 0; i < NBUCKETS; i++) {
        cum += b[i];
        mg_strbuf_printf(out, "%s_bucket{route=\"", name);
        label(out, route);
        mg_strbuf_printf(out, "\",le=\"%s\"} %llu\n",
                         i < NBUCKETS - 1 ? bound_text[i] : "+Inf",
                         (unsigned long long)cum);
    }
    mg_strbuf_printf(out, "%s_sum{route=\"", name);
    label(out, route);
    mg_strbuf_printf(out, "\"} %.9f\n%s_count{route=\"", (double)sum_ns / 1e9,
                     name);
    label(out, route);
    mg_strbuf_printf(out, "\"} %llu\n", (unsigned long long)cum);
}

static int route_ready(unsigned idx)
{
    return __atomic_load_n(&area->routes[idx].state, __ATOMIC_ACQUIRE)
           == SLOT_READY;
}

/* One "{upstream=...,target=...}" label set. */
static void target_labels(mg_strbuf_t *out, const char *upstream,
                          const char *target)
{
    mg_strbuf_puts(out, "{upstream=\"");
    label(out, upstream);
    mg_strbuf_puts(out, "\",target=\"");
    label(out, target);
    mg_strbuf_puts(out, "\"");
}

/*
 * Health, breaker and traffic of every target of the running config, from
 * the shared per-target table (peers.h): what an operator charts as
 * "unhealthy backends" and "open breakers". Targets only, so a target a
 * reload dropped is no longer reported.
 */
static void render_targets(mg_strbuf_t *out, const mg_config_t *cfg)
{
    static const struct {
        const char *name, *type, *help;
    } fams[] = {
        {"moongate_upstream_target_up", "gauge",
         "1 when the target takes traffic (healthy), 0 when marked down."},
        {"moongate_upstream_breaker_state", "gauge",
         "The target's circuit breaker: 1 for the state it is in."},
        {"moongate_upstream_target_in_flight", "gauge",
         "Requests on the target now, all workers."},
        {"moongate_upstream_target_requests_total", "counter",
         "Tries sent to the target (retries included)."},
        {"moongate_upstream_target_failures_total", "counter",
         "Tries that failed: connect errors, timeouts, failure statuses."},
        {"moongate_upstream_health_checks_total", "counter",
         "Active health checks of the target."},
    };
    static const char *states[] = {"closed", "open", "half_open"};
    for (size_t f = 0; f < MG_ARRAY_SIZE(fams); f++) {
        family(out, fams[f].name, fams[f].type, fams[f].help);
        for (size_t u = 0; u < cfg->nupstreams; u++) {
            const mg_upstream_conf_t *uc = &cfg->upstreams[u];
            for (size_t t = 0; t < uc->ntargets; t++) {
                mg_peer_t *pe =
                    mg_peers_get(mg_str_from_cstr(uc->name),
                                 mg_str_from_cstr(uc->targets[t].text));
                if (f == 1) {
                    int st = mg_breaker_state(&pe->breaker);
                    for (int s = 0; s < 3; s++) {
                        mg_strbuf_puts(out, fams[f].name);
                        target_labels(out, uc->name, uc->targets[t].text);
                        mg_strbuf_printf(out, ",state=\"%s\"} %d\n", states[s],
                                         st == s);
                    }
                    continue;
                }
                uint64_t v = f == 0   ? !atomic_load(&pe->down)
                             : f == 2 ? atomic_load(&pe->inflight)
                             : f == 3 ? atomic_load(&pe->requests)
                             : f == 4 ? atomic_load(&pe->failures)
                                      : atomic_load(&pe->checks);
                mg_strbuf_puts(out, fams[f].name);
                target_labels(out, uc->name, uc->targets[t].text);
                mg_strbuf_printf(out, "} %llu\n", (unsigned long long)v);
            }
        }
    }
}

void mg_metrics_render(mg_strbuf_t *out, const mg_metrics_master_t *m)
{
    if (!area)
        return;
    route_stats_t *all = mg_calloc(MG_METRICS_MAX_ROUTES, sizeof(*all));
    uint8_t *show = mg_calloc(MG_METRICS_MAX_ROUTES, 1);
    for (unsigned i = 0; i < MG_METRICS_MAX_ROUTES; i++)
        if (route_ready(i)) {
            sum_route(i, &all[i]);
            /* "(other)" only once the route table has overflowed. */
            show[i] = i != SERIES_OTHER;
            for (unsigned b = 0; b < NBUCKETS && !show[i]; b++)
                show[i] = all[i].duration[b] != 0;
        }

    family(out, "moongate_http_requests_total", "counter",
           "Requests answered, by route, method and status class.");
    for (unsigned i = 0; i < MG_METRICS_MAX_ROUTES; i++)
        for (unsigned me = 0; show[i] && me < NMETHODS; me++)
            for (unsigned c = 0; c < NCLASSES; c++) {
                if (!all[i].requests[me][c])
                    continue;
                mg_strbuf_puts(out, "moongate_http_requests_total{route=\"");
                label(out, area->routes[i].name);
                mg_strbuf_printf(out, "\",method=\"%s\",status=\"%s\"} %llu\n",
                                 method_names[me], class_names[c],
                                 (unsigned long long)all[i].requests[me][c]);
            }

    static const struct {
        const char *name, *help;
        int upstream;
    } hists[] = {
        {"moongate_http_request_duration_seconds",
         "Time from a request's complete head to its response's end.", 0},
        {"moongate_upstream_duration_seconds",
         "Time from sending a request upstream to the upstream response's "
         "end.",
         1},
    };
    for (size_t h = 0; h < MG_ARRAY_SIZE(hists); h++) {
        family(out, hists[h].name, "histogram", hists[h].help);
        for (unsigned i = 0; i < MG_METRICS_MAX_ROUTES; i++)
            if (show[i])
                histogram(out, hists[h].name, area->routes[i].name,
                          hists[h].upstream ? all[i].upstream : all[i].duration,
                          hists[h].upstream ? all[i].upstream_sum_ns
                                            : all[i].duration_sum_ns);
    }

    static const struct {
        const char *name, *help;
        size_t off;
    } bytes[] = {
        {"moongate_http_received_bytes_total",
         "Request body bytes received from clients.",
         offsetof(route_stats_t, bytes_in)},
        {"moongate_http_sent_bytes_total",
         "Response bytes (head and body) written to clients.",
         offsetof(route_stats_t, bytes_out)},
    };
    for (size_t k = 0; k < MG_ARRAY_SIZE(bytes); k++) {
        family(out, bytes[k].name, "counter", bytes[k].help);
        for (unsigned i = 0; i < MG_METRICS_MAX_ROUTES; i++) {
            if (!show[i])
                continue;
            mg_strbuf_printf(out, "%s{route=\"", bytes[k].name);
            label(out, area->routes[i].name);
            mg_strbuf_printf(
                out, "\"} %llu\n",
                (unsigned long long)*(const uint64_t *)((const char *)&all[i]
                                                        + bytes[k].off));
        }
    }
    free(all);
    free(show);

    int64_t conns = 0, gens = 0;
    for (unsigned i = 0; i < MG_METRICS_MAX_PROCS; i++) {
        conns += __atomic_load_n(&area->procs[i].connections, __ATOMIC_RELAXED);
        gens += __atomic_load_n(&area->procs[i].generations, __ATOMIC_RELAXED);
    }
    family(out, "moongate_active_connections", "gauge",
           "Client connections open, all workers.");
    mg_strbuf_printf(out, "moongate_active_connections %lld\n",
                     (long long)conns);
    family(out, "moongate_generations_alive", "gauge",
           "Config generations held in workers (current ones and old ones "
           "still finishing requests).");
    mg_strbuf_printf(out, "moongate_generations_alive %lld\n", (long long)gens);
    family(out, "moongate_workers", "gauge", "Configured worker processes.");
    mg_strbuf_printf(out, "moongate_workers %u\n", m->workers);
    family(out, "moongate_worker_restarts_total", "counter",
           "Workers restarted by the master after they died.");
    mg_strbuf_printf(out, "moongate_worker_restarts_total %llu\n",
                     (unsigned long long)m->worker_restarts);
    family(out, "moongate_config_reloads_total", "counter",
           "Config reloads, by result.");
    mg_strbuf_printf(out,
                     "moongate_config_reloads_total{result=\"success\"} %llu\n"
                     "moongate_config_reloads_total{result=\"failure\"} %llu\n",
                     (unsigned long long)m->reloads_ok,
                     (unsigned long long)m->reloads_failed);
    family(out, "moongate_config_info", "gauge",
           "The running config: its sha256 in the hash label.");
    mg_strbuf_printf(out, "moongate_config_info{hash=\"%s\"} 1\n",
                     m->config_hash);
    render_h2(out);
    if (m->cfg)
        render_targets(out, m->cfg);
    render_plugin_counters(out);
}
