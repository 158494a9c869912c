/*
 * The worker process: accepts on the listening sockets inherited from the
 * master, serves connections on one libuv loop, swaps config generations on
 * SIGHUP, and drains on SIGTERM/SIGINT/SIGQUIT. Everything the worker owns
 * hangs off one mg_worker_t on the stack of mg_worker_run: no globals.
 */
#include "worker.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <unistd.h>

#include "accesslog.h"
#include "generation.h"
#include "health.h"
#include "log.h"
#include "metrics.h"
#include "upstream.h"

struct mg_worker_s {
    uv_loop_t loop;
    mg_worker_opts_t opts;
    uv_tcp_t *listeners;
    uv_signal_t sig_reload, sig_term, sig_int, sig_quit;
    uv_timer_t drain_timer;
    uv_check_t write_check;     /* deliver in-place write completions: */
    uv_prepare_t write_prepare; /* after I/O callbacks, and before the loop
                                   blocks (for writes made in timers) */
    mg_wreq_t *done_head, *done_tail;
    mg_gen_t *gen;
    unsigned next_gen_id;
    mg_lua_t *lua;
    mg_accesslog_t *alog;
    uv_signal_t sig_reopen;
    mg_conn_list_t conns;
    mg_target_t **targets; /* every target any generation used */
    size_t ntargets;
    int draining;
    int shut;
    uint64_t rng[2];
    mg_health_t *health; /* active health checks: worker 1 only */
    char scratch[65536]; /* mg_worker_scratch */
};

mg_gen_t *mg_worker_gen(mg_worker_t *w)
{
    return w->gen;
}

uv_loop_t *mg_worker_loop(mg_worker_t *w)
{
    return &w->loop;
}

mg_accesslog_t *mg_worker_accesslog(mg_worker_t *w)
{
    return w->alog;
}

/* Opens, keeps or replaces the access log to match cfg. */
static void set_access_log(mg_worker_t *w, const mg_config_t *cfg)
{
    const char *want = cfg->access_log;
    if (w->alog && want && strcmp(mg_accesslog_path(w->alog), want) == 0)
        return;
    mg_accesslog_close(w->alog);
    w->alog = NULL;
    if (!want)
        return;
    char err[512];
    w->alog = mg_accesslog_open(&w->loop, want, err, sizeof(err));
    if (!w->alog)
        mg_log_error("%s", err);
}

char *mg_worker_scratch(mg_worker_t *w, size_t *len)
{
    *len = sizeof(w->scratch);
    return w->scratch;
}

mg_lua_t *mg_worker_lua(mg_worker_t *w)
{
    return w->lua;
}

int mg_worker_draining(const mg_worker_t *w)
{
    return w->draining;
}

mg_conn_list_t *mg_worker_conns(mg_worker_t *w)
{
    return &w->conns;
}

/* xorshift128+: request ids need uniqueness, not secrecy. */
static uint64_t next_random(mg_worker_t *w)
{
    uint64_t s1 = w->rng[0];
    const uint64_t s0 = w->rng[1];
    w->rng[0] = s0;
    s1 ^= s1 << 23;
    w->rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return w->rng[1] + s0;
}

void mg_worker_request_id(mg_worker_t *w, char out[33])
{
    static const char hex[] = "0123456789abcdef";
    uint64_t a = next_random(w), b = next_random(w);
    for (int i = 0; i < 16; i++) {
        out[i] = hex[(a >> (i * 4)) & 15];
        out[16 + i] = hex[(b >> (i * 4)) & 15];
    }
    out[32] = '\0';
}

mg_target_t *mg_worker_target(mg_worker_t *w, const mg_target_conf_t *tc)
{
    for (size_t i = 0; i < w->ntargets; i++)
        if (mg_target_matches(w->targets[i], tc))
            return w->targets[i];
    w->targets =
        mg_realloc(w->targets, (w->ntargets + 1) * sizeof(*w->targets));
    w->targets[w->ntargets] = mg_target_new(&w->loop, tc);
    return w->targets[w->ntargets++];
}

/* ------------------------------------------------------------------ */
/* Writes                                                             */

static void on_uv_write(uv_write_t *req, int status)
{
    mg_wreq_t *wr = (mg_wreq_t *)req;
    wr->cb(wr, status);
}

static void deliver_writes(mg_worker_t *w)
{
    while (w->done_head) {
        mg_wreq_t *wr = w->done_head;
        w->done_head = wr->next_done;
        if (!w->done_head)
            w->done_tail = NULL;
        int status = wr->status;
        if (!status && wr->stream && uv_is_closing((uv_handle_t *)wr->stream))
            status = UV_ECANCELED;
        wr->cb(wr, status);
    }
}

static void on_write_check(uv_check_t *h)
{
    deliver_writes(h->data);
}

static void on_write_prepare(uv_prepare_t *h)
{
    deliver_writes(h->data);
}

void mg_worker_defer(mg_worker_t *w, mg_wreq_t *wr, mg_wreq_cb cb)
{
    wr->stream = NULL;
    wr->cb = cb;
    wr->next_done = NULL;
    wr->status = 0;
    if (w->done_tail)
        w->done_tail->next_done = wr;
    else
        w->done_head = wr;
    w->done_tail = wr;
}

void mg_worker_write(mg_worker_t *w, uv_stream_t *s, mg_wreq_t *wr,
                     const uv_buf_t *bufs, unsigned n, mg_wreq_cb cb)
{
    wr->stream = s;
    wr->cb = cb;
    wr->next_done = NULL;
    wr->status = 0;
    size_t total = 0;
    for (unsigned i = 0; i < n; i++)
        total += bufs[i].len;
    int done = uv_try_write(s, bufs, n);
    if (done == (int)total) {
        if (w->done_tail)
            w->done_tail->next_done = wr;
        else
            w->done_head = wr;
        w->done_tail = wr;
        return;
    }
    /* Queue the rest, skipping what went out in place. */
    uv_buf_t rest[8];
    unsigned k = 0;
    size_t skip = done > 0 ? (size_t)done : 0;
    for (unsigned i = 0; i < n; i++) {
        if (skip >= bufs[i].len) {
            skip -= bufs[i].len;
            continue;
        }
        if (k == MG_ARRAY_SIZE(rest))
            abort(); /* callers pass at most 3 buffers */
        rest[k++] =
            uv_buf_init(bufs[i].base + skip, (unsigned)(bufs[i].len - skip));
        skip = 0;
    }
    int rc = uv_write(&wr->req, s, rest, k, on_uv_write);
    if (rc < 0) {
        /* Same promise as in-place: the callback comes from the loop. */
        wr->status = rc;
        if (w->done_tail)
            w->done_tail->next_done = wr;
        else
            w->done_head = wr;
        w->done_tail = wr;
    }
}

/* ------------------------------------------------------------------ */

/* Points a new generation's routes at their shared metrics series
 * (registered by name, so a reload keeps counting into the same ones) and
 * turns recording on when an admin listener can read it. */
static void set_metrics(mg_gen_t *g)
{
    int on = g->cfg->admin.listen.text != NULL;
    mg_metrics_enable(on);
    for (size_t i = 0; on && i < g->cfg->nroutes; i++)
        g->cfg->routes[i].metrics_series =
            mg_metrics_route_series(g->cfg->routes[i].name);
}

static void on_connection(uv_stream_t *server, int status)
{
    mg_worker_t *w = server->data;
    if (status < 0) {
        mg_log_error("accept: %s", uv_strerror(status));
        return;
    }
    if (w->draining)
        return;
    /* The current generation's TLS settings for this listener: a reload
     * brings new certificates to new connections. */
    size_t i = (size_t)((uv_tcp_t *)server - w->listeners);
    const mg_config_t *cfg = w->gen->cfg;
    mg_http1_accept(w, server, i < cfg->nlisten ? cfg->listen[i].tls : NULL,
                    i < cfg->nlisten ? cfg->listen[i].http2 : 1);
    mg_metrics_set_connections(w->conns.count);
}

/* Gives a config's TLS listeners the master's ticket secret, so sessions
 * resume on any worker. */
static void arm_tls(mg_worker_t *w, mg_config_t *cfg)
{
    for (size_t i = 0; w->opts.ticket_secret && i < cfg->nlisten; i++)
        if (cfg->listen[i].tls)
            mg_tls_set_ticket_secret(cfg->listen[i].tls, w->opts.ticket_secret);
}

static void reload(mg_worker_t *w)
{
    char err[4096];
    mg_config_t *cfg;
    if (mg_config_load(w->opts.config_path, &cfg, err, sizeof(err))) {
        char prefix[80];
        snprintf(prefix, sizeof(prefix),
                 "reload refused, generation %u keeps serving: ", w->gen->id);
        mg_log_lines(MG_LOG_ERROR, prefix, err);
        return;
    }
    arm_tls(w, cfg);
    mg_gen_t *g = mg_gen_new(w, w->lua, cfg, w->next_gen_id, err, sizeof(err));
    if (!g) {
        char prefix[80];
        snprintf(prefix, sizeof(prefix),
                 "reload refused, generation %u keeps serving: ", w->gen->id);
        mg_log_lines(MG_LOG_ERROR, prefix, err);
        return;
    }
    w->next_gen_id++;
    set_metrics(g);
    mg_gen_t *old = w->gen;
    w->gen = g;
    /* Requests in flight keep their own references to the old one. */
    mg_gen_unref(old);
    mg_log_info("generation %u active (%zu routes)", g->id, g->cfg->nroutes);
    if (w->health)
        mg_health_apply(w->health, g);
    set_access_log(w, g->cfg);
    mg_lua_gen_init_worker(w->lua, g->id);
}

static void on_close_noop(uv_handle_t *h)
{
    (void)h;
}

/* Closes what keeps the loop alive once no connection is left. */
static void shutdown_worker(mg_worker_t *w)
{
    if (w->shut)
        return;
    w->shut = 1;
    mg_health_close(w->health);
    w->health = NULL;
    uv_close((uv_handle_t *)&w->sig_reload, on_close_noop);
    uv_close((uv_handle_t *)&w->sig_term, on_close_noop);
    uv_close((uv_handle_t *)&w->sig_int, on_close_noop);
    uv_close((uv_handle_t *)&w->sig_quit, on_close_noop);
    uv_close((uv_handle_t *)&w->sig_reopen, on_close_noop);
    mg_accesslog_close(w->alog);
    w->alog = NULL;
    uv_close((uv_handle_t *)&w->drain_timer, on_close_noop);
    uv_close((uv_handle_t *)&w->write_check, on_close_noop);
    uv_close((uv_handle_t *)&w->write_prepare, on_close_noop);
    for (size_t i = 0; i < w->ntargets; i++)
        mg_target_free(w->targets[i]);
    w->ntargets = 0;
    mg_lua_close_ext(w->lua);
}

static void on_drain_timeout(uv_timer_t *t)
{
    mg_worker_t *w = t->data;
    mg_log_warn("drain timeout: closing %u connections", w->conns.count);
    while (w->conns.head)
        mg_conn_abort(w->conns.head);
}

static void drain(mg_worker_t *w)
{
    if (w->draining)
        return;
    w->draining = 1;
    /* A replacement worker 1 takes the health checks over. */
    mg_health_close(w->health);
    w->health = NULL;
    mg_log_info("draining %u connections", w->conns.count);
    for (size_t i = 0; i < w->opts.nlisten; i++)
        uv_close((uv_handle_t *)&w->listeners[i], on_close_noop);
    mg_http1_drain_all(w);
    uv_timer_start(&w->drain_timer, on_drain_timeout,
                   w->gen->cfg->limits.drain_timeout_ms, 0);
    if (w->conns.count == 0)
        shutdown_worker(w);
}

void mg_worker_conn_closed(mg_worker_t *w)
{
    w->conns.count--;
    mg_metrics_set_connections(w->conns.count);
    if (w->draining && w->conns.count == 0)
        shutdown_worker(w);
}

static void on_signal(uv_signal_t *s, int signum)
{
    mg_worker_t *w = s->data;
    if (signum == SIGHUP) {
        reload(w);
    } else if (signum == SIGUSR1) {
        if (w->alog)
            mg_accesslog_reopen(w->alog);
    } else {
        drain(w);
    }
}

static int listen_all(mg_worker_t *w)
{
    w->listeners = mg_calloc(w->opts.nlisten, sizeof(uv_tcp_t));
    for (size_t i = 0; i < w->opts.nlisten; i++) {
        uv_tcp_t *l = &w->listeners[i];
        uv_tcp_init(&w->loop, l);
        l->data = w;
        int rc = uv_tcp_open(l, w->opts.listen_fds[i]);
        if (rc == 0)
            rc = uv_listen((uv_stream_t *)l, 511, on_connection);
        if (rc < 0) {
            mg_log_error("listen: %s", uv_strerror(rc));
            return rc;
        }
    }
    return 0;
}

static void start_signal(mg_worker_t *w, uv_signal_t *s, int signum)
{
    uv_signal_init(&w->loop, s);
    s->data = w;
    uv_signal_start(s, on_signal, signum);
}

int mg_worker_run(const mg_worker_opts_t *opts, mg_config_t *cfg)
{
    mg_worker_t w;
    memset(&w, 0, sizeof(w));
    w.opts = *opts;
    char who[32];
    snprintf(who, sizeof(who), "worker %u", opts->slot);
    mg_log_set_who(who);
    prctl(PR_SET_PDEATHSIG, SIGTERM); /* never outlive the master */
    if (getrandom(w.rng, sizeof(w.rng), 0) != sizeof(w.rng) || !w.rng[0])
        w.rng[0] = (uint64_t)getpid() * 0x9E3779B97F4A7C15ull + 1;
    uv_loop_init(&w.loop);

    char err[4096];
    arm_tls(&w, cfg);
    w.lua = mg_lua_new(&w.loop, err, sizeof(err));
    if (!w.lua) {
        mg_log_error("%s", err);
        return 1;
    }
    w.gen = mg_gen_new(&w, w.lua, cfg, 1, err, sizeof(err));
    if (!w.gen) {
        mg_log_lines(MG_LOG_ERROR, "", err);
        return 1;
    }
    w.next_gen_id = 2;
    set_metrics(w.gen);
    start_signal(&w, &w.sig_reload, SIGHUP);
    start_signal(&w, &w.sig_term, SIGTERM);
    start_signal(&w, &w.sig_int, SIGINT);
    start_signal(&w, &w.sig_quit, SIGQUIT);
    start_signal(&w, &w.sig_reopen, SIGUSR1);
    uv_timer_init(&w.loop, &w.drain_timer);
    w.drain_timer.data = &w;
    uv_check_init(&w.loop, &w.write_check);
    w.write_check.data = &w;
    uv_check_start(&w.write_check, on_write_check);
    uv_unref((uv_handle_t *)&w.write_check);
    uv_prepare_init(&w.loop, &w.write_prepare);
    w.write_prepare.data = &w;
    uv_prepare_start(&w.write_prepare, on_write_prepare);
    uv_unref((uv_handle_t *)&w.write_prepare);
    if (listen_all(&w) < 0)
        return 1;
    mg_log_info("generation 1 active (%zu routes)", w.gen->cfg->nroutes);
    /* One process checks health for the whole gateway (health.h). */
    if (opts->slot == 1) {
        w.health = mg_health_new(&w.loop);
        mg_health_apply(w.health, w.gen);
    }
    set_access_log(&w, w.gen->cfg);
    mg_lua_gen_init_worker(w.lua, 1);

    uv_run(&w.loop, UV_RUN_DEFAULT);

    mg_gen_unref(w.gen);
    mg_lua_free(w.lua);
    free(w.targets);
    free(w.listeners);
    int rc = uv_loop_close(&w.loop);
    if (rc)
        mg_log_error("loop closed with live handles: %s", uv_strerror(rc));
    mg_log_info("exiting");
    return 0;
}
