/*
 * The master process: opens the listening sockets, forks the workers,
 * restarts a worker that dies, validates a new config on SIGHUP before any
 * worker sees it, and stops gracefully on SIGTERM/SIGINT. It never handles
 * a request. Signals are taken synchronously with sigtimedwait, so the
 * master is a plain loop with no handler re-entrancy to reason about.
 *
 * Listening sockets stay open in the master for the gateway's whole life;
 * workers inherit them through fork. A worker's death or replacement
 * therefore never drops a connection waiting in an accept queue.
 *
 * The master also serves the admin listener when one is configured
 * (admin.c says why), so its loop waits in poll() on a signalfd and the
 * admin sockets; signals are still taken synchronously, one at a time.
 */
#include "master.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <llhttp.h>
#include <openssl/evp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/inotify.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "generation.h"
#include "listen.h"
#include "log.h"
#include "lua.h"
#include "metrics.h"
#include "peers.h"
#include "upstream.h"
#include "worker.h"
#include "zones.h"

#define RESTART_BACKOFF_MS 1000
/* `watch = true`: a save often comes as several events (truncate, write,
 * rename); reload once they have stopped for this long. */
#define WATCH_DEBOUNCE_MS 300

typedef struct {
    pid_t pid; /* 0: not running */
    unsigned slot;
    uint64_t started_ms;
    uint64_t restart_at_ms; /* 0: no restart pending */
    unsigned restarts;      /* times this slot's worker was restarted */
    int mslot;              /* metrics gauge slot of the running worker */
} worker_slot_t;

typedef struct {
    const char *config_path;
    mg_config_t *cfg;
    int *fds; /* one per cfg->listen entry */
    size_t nfds;
    worker_slot_t *slots; /* current workers */
    size_t nslots;
    pid_t *retired; /* old workers draining after a replacement */
    int *retired_mslot;
    size_t nretired;
    int stopping;
    uint64_t stop_deadline_ms;
    int sfd; /* the signalfd the loop waits on */
    int wfd; /* inotify on the config's directory (watch = true), or -1 */
    uint64_t watch_due_ms; /* a change was seen: reload at this time */
    /* The admin listener and what it reports. */
    mg_admin_t *admin;    /* NULL: no admin listener */
    int admin_dirty;      /* a reload may have changed the admin config:
                             apply it once the admin request is answered */
    unsigned generation;  /* 1 at start, +1 per accepted reload */
    char config_hash[65]; /* hex sha256 of the config file */
    char **chains;        /* per route: plugin chain JSON (lua.h) */
    uint64_t reloads_ok, reloads_failed, restarts;
    /* The last reload (SIGHUP or POST /reload), for /status: 0 none yet,
     * 1 accepted, -1 refused with last_reload_error (owned). */
    int last_reload;
    char *last_reload_error;
    time_t last_reload_at;                    /* wall clock */
    uint8_t ticket_secret[MG_TLS_SECRET_LEN]; /* TLS session tickets: drawn
                                                 once, inherited by every
                                                 worker (tls.h) */
    int ticket_ok;
} master_t;

/* Opens every listener of `cfg`, reusing open sockets of `old` whose
 * address is unchanged. Returns 0 or a negative errno (nothing leaked). */
static int open_listeners(const mg_config_t *cfg, const mg_config_t *old,
                          const int *old_fds, int **out)
{
    int *fds = mg_calloc(cfg->nlisten, sizeof(int));
    for (size_t i = 0; i < cfg->nlisten; i++) {
        const mg_listen_conf_t *l = &cfg->listen[i];
        fds[i] = -1;
        for (size_t k = 0; old && k < old->nlisten; k++)
            if (old->listen[k].addrlen == l->addrlen
                && memcmp(&old->listen[k].addr, &l->addr, l->addrlen) == 0)
                fds[i] = old_fds[k];
        if (fds[i] >= 0)
            continue;
        fds[i] = mg_listen_socket(l, 511, 0); /* inherited by workers */
        if (fds[i] < 0) {
            int e = fds[i];
            mg_log_error("cannot listen on %s: %s", l->text, strerror(-e));
            for (size_t k = 0; k < i; k++) {
                int reused = 0;
                for (size_t j = 0; old && j < old->nlisten; j++)
                    reused |= old_fds[j] == fds[k];
                if (!reused)
                    close(fds[k]);
            }
            free(fds);
            return e;
        }
        mg_log_info("listening on %s", l->text);
    }
    *out = fds;
    return 0;
}

static pid_t spawn(master_t *m, unsigned slot, int mslot)
{
    pid_t pid = fork();
    if (pid < 0) {
        mg_log_error("fork: %s", strerror(errno));
        return 0;
    }
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        mg_admin_close_fds(m->admin);
        close(m->sfd); /* the worker takes its signals through libuv */
        if (m->wfd >= 0)
            close(m->wfd);
        mg_metrics_attach(mslot);
        mg_worker_opts_t opts = {.listen_fds = m->fds,
                                 .nlisten = m->nfds,
                                 .slot = slot,
                                 .config_path = m->config_path,
                                 .ticket_secret =
                                     m->ticket_ok ? m->ticket_secret : NULL};
        /* The worker takes the config (this process's copy of it). */
        exit(mg_worker_run(&opts, m->cfg));
    }
    return pid;
}

static void start_slot(master_t *m, worker_slot_t *s)
{
    s->mslot = mg_metrics_proc_acquire();
    s->pid = spawn(m, s->slot, s->mslot);
    if (!s->pid)
        mg_metrics_proc_release(s->mslot);
    s->started_ms = mg_monotonic_ms();
    s->restart_at_ms = s->pid ? 0 : mg_monotonic_ms() + RESTART_BACKOFF_MS;
}

static void start_workers(master_t *m)
{
    m->nslots = m->cfg->workers;
    m->slots = mg_calloc(m->nslots, sizeof(worker_slot_t));
    for (size_t i = 0; i < m->nslots; i++) {
        m->slots[i].slot = (unsigned)i + 1;
        start_slot(m, &m->slots[i]);
    }
}

static void signal_all(master_t *m, int sig)
{
    for (size_t i = 0; i < m->nslots; i++)
        if (m->slots[i].pid)
            kill(m->slots[i].pid, sig);
    for (size_t i = 0; i < m->nretired; i++)
        kill(m->retired[i], sig);
}

static size_t running(const master_t *m)
{
    size_t n = m->nretired;
    for (size_t i = 0; i < m->nslots; i++)
        n += m->slots[i].pid != 0;
    return n;
}

static void reap(master_t *m)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (size_t i = 0; i < m->nretired; i++)
            if (m->retired[i] == pid) {
                mg_metrics_proc_release(m->retired_mslot[i]);
                m->nretired--;
                m->retired[i] = m->retired[m->nretired];
                m->retired_mslot[i] = m->retired_mslot[m->nretired];
                pid = 0;
                break;
            }
        for (size_t i = 0; pid && i < m->nslots; i++) {
            worker_slot_t *s = &m->slots[i];
            if (s->pid != pid)
                continue;
            s->pid = 0;
            mg_metrics_proc_release(s->mslot);
            if (m->stopping)
                break;
            s->restarts++;
            m->restarts++;
            if (WIFSIGNALED(status))
                mg_log_error("worker %u (pid %d) killed by signal %d, "
                             "restarting",
                             s->slot, pid, WTERMSIG(status));
            else
                mg_log_error("worker %u (pid %d) exited with status %d, "
                             "restarting",
                             s->slot, pid, WEXITSTATUS(status));
            /* A worker that dies at once would die again: back off. */
            if (mg_monotonic_ms() - s->started_ms < RESTART_BACKOFF_MS)
                s->restart_at_ms = mg_monotonic_ms() + RESTART_BACKOFF_MS;
            else
                start_slot(m, s);
        }
    }
}

static int same_listeners(const mg_config_t *a, const mg_config_t *b)
{
    if (a->nlisten != b->nlisten)
        return 0;
    for (size_t i = 0; i < a->nlisten; i++)
        if (a->listen[i].addrlen != b->listen[i].addrlen
            || memcmp(&a->listen[i].addr, &b->listen[i].addr,
                      a->listen[i].addrlen)
                   != 0)
            return 0;
    return 1;
}

/* Replaces every worker: new ones start on the new listeners, old ones
 * drain. Only when the worker count or the listeners change. Takes cfg;
 * returns 0, or -1 with the reason in err (the old workers keep going). */
static int replace_workers(master_t *m, mg_config_t *cfg, char *err,
                           size_t errlen)
{
    int *fds;
    int lrc = open_listeners(cfg, m->cfg, m->fds, &fds);
    if (lrc < 0) {
        snprintf(err, errlen, "listeners could not be opened: %s",
                 strerror(-lrc));
        mg_log_error("reload refused: %s", err);
        mg_config_free(cfg);
        return -1;
    }
    /* Zones kept by name and size keep their contents; the new workers
     * map the new set. */
    int rc = mg_zones_apply(cfg);
    if (rc < 0) {
        snprintf(err, errlen, "shared zones: %s", strerror(-rc));
        mg_log_error("reload refused: shared zones: %s", strerror(-rc));
        for (size_t i = 0; i < cfg->nlisten; i++) {
            int reused = 0;
            for (size_t k = 0; k < m->nfds; k++)
                reused |= m->fds[k] == fds[i];
            if (!reused)
                close(fds[i]);
        }
        free(fds);
        mg_config_free(cfg);
        return -1;
    }
    for (size_t i = 0; i < m->nslots; i++) {
        if (!m->slots[i].pid)
            continue;
        kill(m->slots[i].pid, SIGTERM);
        m->retired = mg_realloc(m->retired, (m->nretired + 1) * sizeof(pid_t));
        m->retired_mslot =
            mg_realloc(m->retired_mslot, (m->nretired + 1) * sizeof(int));
        m->retired_mslot[m->nretired] = m->slots[i].mslot;
        m->retired[m->nretired++] = m->slots[i].pid;
    }
    /* Close sockets the new config no longer listens on. */
    for (size_t k = 0; k < m->nfds; k++) {
        int kept = 0;
        for (size_t i = 0; i < cfg->nlisten; i++)
            kept |= fds[i] == m->fds[k];
        if (!kept)
            close(m->fds[k]);
    }
    free(m->fds);
    free(m->slots);
    mg_config_free(m->cfg);
    m->cfg = cfg;
    m->fds = fds;
    m->nfds = cfg->nlisten;
    start_workers(m);
    mg_log_info("workers replaced: %u workers", cfg->workers);
    return 0;
}

/* Hex sha256 of the file's bytes into out[65] ("" when unreadable). */
static void hash_file(const char *path, char out[65])
{
    out[0] = '\0';
    FILE *f = fopen(path, "rb");
    if (!f)
        return;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    unsigned char buf[8192], md[EVP_MAX_MD_SIZE];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0)
        EVP_DigestUpdate(ctx, buf, n);
    unsigned mdlen = 0;
    EVP_DigestFinal_ex(ctx, md, &mdlen);
    EVP_MD_CTX_free(ctx);
    fclose(f);
    for (unsigned i = 0; i < mdlen && i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static void free_chains(master_t *m)
{
    for (size_t i = 0; m->chains && i < m->cfg->nroutes; i++)
        free(m->chains[i]);
    free(m->chains);
    m->chains = NULL;
}

/* Facts about the config just made current, for /status and /metrics. */
static void describe_config(master_t *m)
{
    char err[4096];
    free_chains(m);
    hash_file(m->config_path, m->config_hash);
    if (mg_lua_describe(m->config_path, 0, m->cfg->nroutes, &m->chains, err,
                        sizeof(err)))
        mg_log_lines(MG_LOG_WARN, "plugin chains not described: ", err);
}

static int reload_inner(master_t *m, char *err, size_t errlen);

/*
 * Validates the config file again and applies it. Returns 0 when the new
 * config is running (or being rolled out to the workers); otherwise the
 * previous one keeps serving and the reason is in err: MG_ECONFIG for an
 * invalid config, -1 when it was valid but could not be applied. The
 * outcome is remembered for /status.
 */
static int reload(master_t *m, char *err, size_t errlen)
{
    err[0] = '\0';
    int rc = reload_inner(m, err, errlen);
    free(m->last_reload_error);
    m->last_reload_error = NULL;
    m->last_reload = rc == 0 ? 1 : -1;
    m->last_reload_at = time(NULL);
    if (rc) {
        size_t n = strlen(err);
        while (n && err[n - 1] == '\n')
            n--;
        m->last_reload_error = mg_strndup(err, n);
    }
    return rc;
}

static int reload_inner(master_t *m, char *err, size_t errlen)
{
    mg_config_t *cfg;
    int rc = mg_config_load(m->config_path, &cfg, err, errlen);
    if (rc == 0 && (rc = mg_gen_check(cfg, err, errlen)) != 0)
        mg_config_free(cfg);
    if (rc) {
        mg_log_lines(MG_LOG_ERROR,
                     "reload refused, the running config keeps serving: ", err);
        m->reloads_failed++;
        return MG_ECONFIG;
    }
    /* The chains describe routes of the config being replaced. */
    free_chains(m);
    if (cfg->workers != m->cfg->workers || !same_listeners(cfg, m->cfg)
        || !mg_zones_same(cfg)) {
        if (replace_workers(m, cfg, err, errlen) < 0) {
            m->reloads_failed++;
            describe_config(m);
            return -1;
        }
    } else {
        /* Same shape: each worker swaps generations in place. */
        mg_config_free(m->cfg);
        m->cfg = cfg;
        signal_all(m, SIGHUP);
        mg_log_info("reload: config valid, workers signalled");
    }
    m->reloads_ok++;
    m->generation++;
    m->admin_dirty = 1;
    describe_config(m);
    return 0;
}

/* ---- admin endpoints ---------------------------------------------------- */

static void status_routes(const master_t *m, mg_strbuf_t *b)
{
    const mg_config_t *cfg = m->cfg;
    mg_strbuf_puts(b, "\"routes\":[");
    for (size_t i = 0; i < cfg->nroutes; i++) {
        const mg_route_conf_t *rt = &cfg->routes[i];
        mg_strbuf_puts(b, i ? ",{\"name\":" : "{\"name\":");
        mg_strbuf_json_str(b, rt->name);
        mg_strbuf_puts(b, ",\"path\":");
        mg_strbuf_json_str(b, rt->path);
        mg_strbuf_puts(b, ",\"methods\":[");
        int first = 1;
        for (unsigned k = 0; k < 64; k++)
            if (rt->methods & ((uint64_t)1 << k)) {
                mg_strbuf_puts(b, first ? "" : ",");
                mg_strbuf_json_str(b, llhttp_method_name((llhttp_method_t)k));
                first = 0;
            }
        mg_strbuf_puts(b, "],\"hosts\":[");
        for (size_t k = 0; k < rt->nhosts; k++) {
            mg_strbuf_puts(b, k ? "," : "");
            mg_strbuf_json_str(b, rt->hosts[k]);
        }
        mg_strbuf_puts(b, "],\"upstream\":");
        if (rt->upstream >= 0)
            mg_strbuf_json_str(b, cfg->upstreams[rt->upstream].name);
        else
            mg_strbuf_puts(b, "null");
        mg_strbuf_puts(b, ",\"plugin_chain\":");
        mg_strbuf_puts(b, m->chains && m->chains[i] ? m->chains[i] : "null");
        mg_strbuf_puts(b, "}");
    }
    mg_strbuf_puts(b, "]");
}

/* Upstreams with each target's live state from the shared per-target
 * table (health, breaker, in flight: the whole gateway's numbers). */
static void status_upstreams(const mg_config_t *cfg, mg_strbuf_t *b)
{
    mg_strbuf_puts(b, "\"upstreams\":[");
    for (size_t i = 0; i < cfg->nupstreams; i++) {
        const mg_upstream_conf_t *u = &cfg->upstreams[i];
        mg_strbuf_puts(b, i ? ",{\"name\":" : "{\"name\":");
        mg_strbuf_json_str(b, u->name);
        mg_strbuf_puts(b, ",\"balance\":");
        mg_strbuf_json_str(b, u->balance ? u->balance : "round_robin");
        mg_strbuf_printf(b, ",\"health_checks\":%s,\"breaker\":%s",
                         u->health.enabled ? "true" : "false",
                         u->breaker.enabled ? "true" : "false");
        mg_strbuf_puts(b, ",\"targets\":[");
        mg_target_status_t *ts =
            mg_calloc(u->ntargets ? u->ntargets : 1, sizeof(*ts));
        mg_upstream_conf_status(u, ts, u->ntargets);
        for (size_t k = 0; k < u->ntargets; k++) {
            const mg_target_status_t t = ts[k];
            mg_strbuf_puts(b, k ? ",{\"address\":" : "{\"address\":");
            mg_strbuf_json_str(b, t.address);
            mg_strbuf_printf(
                b,
                ",\"weight\":%u,\"healthy\":%s,\"breaker\":\"%s\","
                "\"inflight\":%u,\"failures\":%u,\"requests\":%llu,"
                "\"failed\":%llu,\"checks\":%llu,\"latency_ms\":%.3f}",
                t.weight, t.healthy ? "true" : "false", t.breaker, t.inflight,
                t.failures, (unsigned long long)t.requests,
                (unsigned long long)t.failed, (unsigned long long)t.checks,
                t.latency_ms);
        }
        free(ts);
        mg_strbuf_puts(b, "]}");
    }
    mg_strbuf_puts(b, "]");
}

static int admin_status(void *arg, mg_strbuf_t *b)
{
    const master_t *m = arg;
    mg_strbuf_puts(b, "{\"version\":");
    mg_strbuf_json_str(b, MG_VERSION);
    mg_strbuf_puts(b, ",\"config_file\":");
    mg_strbuf_json_str(b, m->config_path);
    mg_strbuf_puts(b, ",\"config_hash\":");
    mg_strbuf_json_str(b, m->config_hash);
    mg_strbuf_printf(b,
                     ",\"generation\":%u,\"master_pid\":%d,"
                     "\"reloads\":{\"success\":%llu,\"failure\":%llu},"
                     "\"workers\":[",
                     m->generation, (int)getpid(),
                     (unsigned long long)m->reloads_ok,
                     (unsigned long long)m->reloads_failed);
    for (size_t i = 0; i < m->nslots; i++) {
        const worker_slot_t *w = &m->slots[i];
        mg_strbuf_printf(b,
                         "%s{\"slot\":%u,\"pid\":%d,\"running\":%s,"
                         "\"restarts\":%u}",
                         i ? "," : "", w->slot, (int)w->pid,
                         w->pid ? "true" : "false", w->restarts);
    }
    mg_strbuf_puts(b, "],\"draining_workers\":[");
    for (size_t i = 0; i < m->nretired; i++)
        mg_strbuf_printf(b, "%s%d", i ? "," : "", (int)m->retired[i]);
    mg_strbuf_puts(b, "],\"last_reload\":");
    if (m->last_reload) {
        mg_strbuf_printf(b, "{\"result\":\"%s\",\"at\":%lld,\"error\":",
                         m->last_reload > 0 ? "success" : "failure",
                         (long long)m->last_reload_at);
        if (m->last_reload_error)
            mg_strbuf_json_str(b, m->last_reload_error);
        else
            mg_strbuf_puts(b, "null");
        mg_strbuf_puts(b, "}");
    } else {
        mg_strbuf_puts(b, "null");
    }
    mg_strbuf_puts(b, ",");
    status_routes(m, b);
    mg_strbuf_puts(b, ",");
    status_upstreams(m->cfg, b);
    mg_strbuf_puts(b, "}\n");
    return 200;
}

static int admin_metrics(void *arg, mg_strbuf_t *b)
{
    const master_t *m = arg;
    mg_metrics_master_t mm = {.config_hash = m->config_hash,
                              .reloads_ok = m->reloads_ok,
                              .reloads_failed = m->reloads_failed,
                              .worker_restarts = m->restarts,
                              .workers = m->cfg->workers,
                              .cfg = m->cfg};
    mg_metrics_render(b, &mm);
    return 200;
}

static int admin_reload(void *arg, mg_strbuf_t *b)
{
    master_t *m = arg;
    char err[8192];
    if (m->stopping) {
        mg_strbuf_puts(b, "{\"reloaded\":false,\"error\":\"stopping\"}\n");
        return 503;
    }
    int rc = reload(m, err, sizeof(err));
    if (rc == 0) {
        mg_strbuf_printf(b,
                         "{\"reloaded\":true,\"generation\":%u,"
                         "\"config_hash\":",
                         m->generation);
        mg_strbuf_json_str(b, m->config_hash);
        mg_strbuf_printf(b, ",\"routes\":%zu,\"workers\":%u}\n",
                         m->cfg->nroutes, m->cfg->workers);
        return 200;
    }
    size_t n = strlen(err);
    while (n && err[n - 1] == '\n')
        err[--n] = '\0';
    mg_strbuf_printf(
        b, "{\"reloaded\":false,\"generation\":%u,\"error\":", m->generation);
    mg_strbuf_json_str(b, err);
    mg_strbuf_puts(b, "}\n");
    return rc == MG_ECONFIG ? 400 : 500;
}

/* The dashboard lives beside lua/ and plugins/ (MOONGATE_HOME or found
 * from the executable); read again on each reload so an edit shows. */
static void load_page(mg_admin_t *a)
{
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/admin/dashboard.html", mg_lua_root());
    mg_admin_load_page(a, path);
}

/* Makes the admin listener match m->cfg: opened, kept, moved or closed.
 * A new address that cannot be bound is logged; the old one is kept. */
static void sync_admin(master_t *m)
{
    const mg_admin_conf_t *ac = &m->cfg->admin;
    m->admin_dirty = 0;
    if (!ac->listen.text) {
        if (m->admin)
            mg_log_info("admin listener closed");
        mg_admin_close(m->admin);
        m->admin = NULL;
        return;
    }
    if (m->admin && mg_admin_same_address(m->admin, ac)) {
        mg_admin_set_token(m->admin, ac->token);
        load_page(m->admin);
        return;
    }
    mg_admin_handlers_t h = {admin_status, admin_metrics, admin_reload, m};
    mg_admin_t *a;
    int rc = mg_admin_open(ac, &h, &a);
    if (rc < 0) {
        mg_log_error("cannot listen on admin address %s: %s", ac->listen.text,
                     strerror(-rc));
        if (m->admin)
            mg_admin_set_token(m->admin, ac->token);
        return;
    }
    mg_admin_close(m->admin);
    m->admin = a;
    load_page(a);
    mg_log_info("admin listening on %s", ac->listen.text);
}

/* ---- watch = true ---------------------------------------------------------
 */

/* Starts or stops watching the config file to match m->cfg->watch. The
 * directory is watched, not the file: editors and deploy tools often
 * replace the file by a rename, which a watch on the old file misses. */
static void sync_watch(master_t *m)
{
    if (!m->cfg->watch) {
        if (m->wfd >= 0) {
            close(m->wfd);
            mg_log_info("no longer watching %s", m->config_path);
        }
        m->wfd = -1;
        m->watch_due_ms = 0;
        return;
    }
    if (m->wfd >= 0)
        return;
    char dir[4096];
    const char *slash = strrchr(m->config_path, '/');
    snprintf(dir, sizeof(dir), "%.*s",
             slash ? (int)(slash - m->config_path) + 1 : 1,
             slash ? m->config_path : ".");
    int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (fd < 0
        || inotify_add_watch(fd, dir, IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE)
               < 0) {
        mg_log_error("watch: cannot watch %s: %s", dir, strerror(errno));
        if (fd >= 0)
            close(fd);
        return;
    }
    m->wfd = fd;
    mg_log_info("watching %s for changes", m->config_path);
}

/* Reads the pending inotify events; a change to the config file (re)arms
 * the debounce deadline. */
static void on_watch_events(master_t *m)
{
    const char *slash = strrchr(m->config_path, '/');
    const char *base = slash ? slash + 1 : m->config_path;
    char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
    ssize_t n;
    while ((n = read(m->wfd, buf, sizeof(buf))) > 0) {
        for (char *p = buf; p < buf + n;) {
            const struct inotify_event *ev = (const struct inotify_event *)p;
            if (ev->len && strcmp(ev->name, base) == 0)
                m->watch_due_ms = mg_monotonic_ms() + WATCH_DEBOUNCE_MS;
            p += sizeof(*ev) + ev->len;
        }
    }
}

static void begin_stop(master_t *m)
{
    if (m->stopping)
        return;
    m->stopping = 1;
    m->stop_deadline_ms =
        mg_monotonic_ms() + m->cfg->limits.drain_timeout_ms + 2000;
    mg_log_info("stopping: draining %zu workers", running(m));
    signal_all(m, SIGTERM);
}

static void tick(master_t *m)
{
    uint64_t now = mg_monotonic_ms();
    if (m->stopping) {
        if (now >= m->stop_deadline_ms) {
            mg_log_error("workers did not drain in time, killing them");
            signal_all(m, SIGKILL);
            m->stop_deadline_ms = now + 60000;
        }
        return;
    }
    for (size_t i = 0; i < m->nslots; i++)
        if (!m->slots[i].pid && m->slots[i].restart_at_ms
            && now >= m->slots[i].restart_at_ms)
            start_slot(m, &m->slots[i]);
}

/*
 * Raises the soft file-descriptor limit toward what max_connections needs
 * (a client and an upstream socket per connection, plus some), up to the
 * hard limit; workers inherit it. A shell's usual 1024 would otherwise
 * make the kernel refuse connections long before max_connections.
 */
static void raise_fd_limit(const mg_config_t *cfg)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        return;
    rlim_t want = (rlim_t)cfg->limits.max_connections * 2 + 1024;
    if (rl.rlim_cur >= want)
        return;
    rlim_t old = rl.rlim_cur;
    rl.rlim_cur =
        rl.rlim_max == RLIM_INFINITY || rl.rlim_max > want ? want : rl.rlim_max;
    if (rl.rlim_cur > old && setrlimit(RLIMIT_NOFILE, &rl) == 0)
        mg_log_info("file descriptor limit raised from %llu to %llu",
                    (unsigned long long)old, (unsigned long long)rl.rlim_cur);
    if (rl.rlim_cur < want)
        mg_log_warn("file descriptor limit %llu is below the %llu that "
                    "max_connections %u needs: raise the hard limit "
                    "(ulimit -Hn, systemd LimitNOFILE=)",
                    (unsigned long long)rl.rlim_cur, (unsigned long long)want,
                    cfg->limits.max_connections);
}

static int write_pid_file(const char *path)
{
    char buf[32];
    int n = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, buf, (size_t)n) != n) {
        mg_log_error("cannot write pid file %s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    return 0;
}

int mg_master_run(const char *config_path, mg_config_t *cfg)
{
    master_t m = {.config_path = config_path, .cfg = cfg, .wfd = -1};
    sigset_t set;
    sigemptyset(&set);
    int sigs[] = {SIGCHLD, SIGHUP, SIGTERM, SIGINT, SIGQUIT, SIGUSR1};
    for (size_t i = 0; i < MG_ARRAY_SIZE(sigs); i++)
        sigaddset(&set, sigs[i]);
    sigprocmask(SIG_BLOCK, &set, NULL);

    raise_fd_limit(cfg);
    if (open_listeners(cfg, NULL, NULL, &m.fds) < 0) {
        mg_config_free(cfg);
        return 1;
    }
    m.nfds = cfg->nlisten;
    int rc = mg_zones_apply(cfg);
    if (rc < 0)
        mg_log_error("cannot create the shared zones: %s", strerror(-rc));
    /* Per-target health and breaker state, shared by every worker. */
    if (rc == 0 && (rc = mg_peers_init()) < 0)
        mg_log_error("cannot map the per-target state: %s", strerror(-rc));
    if (rc == 0 && (rc = mg_metrics_init()) < 0)
        mg_log_error("cannot map the metrics area: %s", strerror(-rc));
    int sfd = rc < 0 ? -1 : signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    m.sfd = sfd;
    if (rc == 0 && sfd < 0)
        mg_log_error("signalfd: %s", strerror(errno));
    m.generation = 1;
    if (sfd >= 0) {
        describe_config(&m);
        sync_admin(&m); /* logs why when it cannot listen */
        sync_watch(&m);
    }
    if (sfd < 0 || (cfg->admin.listen.text && !m.admin)
        || write_pid_file(cfg->pid_file) < 0) {
        for (size_t i = 0; i < m.nfds; i++)
            close(m.fds[i]);
        if (sfd >= 0)
            close(sfd);
        mg_admin_close(m.admin);
        free(m.fds);
        free_chains(&m);
        mg_config_free(cfg);
        return 1;
    }
    m.ticket_ok = mg_tls_new_secret(m.ticket_secret) == 0;
    if (!m.ticket_ok)
        mg_log_warn("no random bytes for a ticket secret: TLS session "
                    "tickets are off");
    mg_log_info("moongate %s starting %u workers", MG_VERSION, cfg->workers);
    start_workers(&m);

    while (!m.stopping || running(&m) > 0) {
        struct pollfd pfds[2 + MG_ADMIN_MAX_POLLFDS];
        int timeout = 200;
        pfds[0] = (struct pollfd){.fd = sfd, .events = POLLIN};
        size_t na =
            mg_admin_pollfds(m.admin, pfds + 1, MG_ADMIN_MAX_POLLFDS, &timeout);
        size_t np = 1 + na;
        if (m.wfd >= 0)
            pfds[np++] = (struct pollfd){.fd = m.wfd, .events = POLLIN};
        if (m.watch_due_ms) {
            uint64_t now = mg_monotonic_ms();
            int left = m.watch_due_ms > now ? (int)(m.watch_due_ms - now) : 0;
            timeout = left < timeout ? left : timeout;
        }
        int sig = 0;
        if (poll(pfds, np, timeout) > 0) {
            mg_admin_process(m.admin, pfds + 1, na);
            if (m.wfd >= 0 && (pfds[np - 1].revents & POLLIN))
                on_watch_events(&m);
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si))
                sig = (int)si.ssi_signo;
        }
        char err[8192];
        switch (sig) {
        case 0: break;
        case SIGCHLD: reap(&m); break;
        case SIGHUP:
            if (!m.stopping)
                reload(&m, err, sizeof(err));
            break;
        case SIGTERM:
        case SIGINT:
        case SIGQUIT: begin_stop(&m); break;
        case SIGUSR1:
            /* logrotate moved the logs: reopen them everywhere. */
            mg_log_init(m.cfg->error_log, m.cfg->log_level, NULL);
            signal_all(&m, SIGUSR1);
            break;
        default: break;
        }
        if (m.watch_due_ms && mg_monotonic_ms() >= m.watch_due_ms
            && !m.stopping) {
            m.watch_due_ms = 0;
            mg_log_info("%s changed: reloading", m.config_path);
            reload(&m, err, sizeof(err));
        }
        /* A reload (signal, admin or watch) may change the admin listener
         * and the watch: applied once the admin request was answered. */
        if (m.admin_dirty) {
            sync_admin(&m);
            sync_watch(&m);
        }
        /* Several SIGCHLD merge into one: reap on every turn. */
        reap(&m);
        tick(&m);
    }
    unlink(m.cfg->pid_file);
    for (size_t i = 0; i < m.nfds; i++)
        close(m.fds[i]);
    mg_admin_close(m.admin);
    close(sfd);
    if (m.wfd >= 0)
        close(m.wfd);
    mg_log_info("stopped");
    free(m.fds);
    free(m.slots);
    free(m.retired);
    free(m.retired_mslot);
    free_chains(&m);
    free(m.last_reload_error);
    mg_config_free(m.cfg);
    return 0;
}
