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
 */
#include "master.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "generation.h"
#include "log.h"
#include "peers.h"
#include "worker.h"
#include "zones.h"

#define RESTART_BACKOFF_MS 1000

typedef struct {
    pid_t pid; /* 0: not running */
    unsigned slot;
    uint64_t started_ms;
    uint64_t restart_at_ms; /* 0: no restart pending */
} worker_slot_t;

typedef struct {
    const char *config_path;
    mg_config_t *cfg;
    int *fds; /* one per cfg->listen entry */
    size_t nfds;
    worker_slot_t *slots; /* current workers */
    size_t nslots;
    pid_t *retired; /* old workers draining after a replacement */
    size_t nretired;
    int stopping;
    uint64_t stop_deadline_ms;
} master_t;

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int open_listener(const mg_listen_conf_t *l)
{
    int fd = socket(l->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (l->addr.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)&l->addr, l->addrlen) < 0
        || listen(fd, 511) < 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    return fd;
}

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
        fds[i] = open_listener(l);
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

static pid_t spawn(master_t *m, unsigned slot)
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
        mg_worker_opts_t opts = {.listen_fds = m->fds,
                                 .nlisten = m->nfds,
                                 .slot = slot,
                                 .config_path = m->config_path};
        /* The worker takes the config (this process's copy of it). */
        exit(mg_worker_run(&opts, m->cfg));
    }
    return pid;
}

static void start_slot(master_t *m, worker_slot_t *s)
{
    s->pid = spawn(m, s->slot);
    s->started_ms = now_ms();
    s->restart_at_ms = s->pid ? 0 : now_ms() + RESTART_BACKOFF_MS;
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
                m->retired[i] = m->retired[--m->nretired];
                pid = 0;
                break;
            }
        for (size_t i = 0; pid && i < m->nslots; i++) {
            worker_slot_t *s = &m->slots[i];
            if (s->pid != pid)
                continue;
            s->pid = 0;
            if (m->stopping)
                break;
            if (WIFSIGNALED(status))
                mg_log_error("worker %u (pid %d) killed by signal %d, "
                             "restarting",
                             s->slot, pid, WTERMSIG(status));
            else
                mg_log_error("worker %u (pid %d) exited with status %d, "
                             "restarting",
                             s->slot, pid, WEXITSTATUS(status));
            /* A worker that dies at once would die again: back off. */
            if (now_ms() - s->started_ms < RESTART_BACKOFF_MS)
                s->restart_at_ms = now_ms() + RESTART_BACKOFF_MS;
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
 * drain. Only when the worker count or the listeners change. */
static void replace_workers(master_t *m, mg_config_t *cfg)
{
    int *fds;
    if (open_listeners(cfg, m->cfg, m->fds, &fds) < 0) {
        mg_log_error("reload refused: listeners could not be opened");
        mg_config_free(cfg);
        return;
    }
    /* Zones kept by name and size keep their contents; the new workers
     * map the new set. */
    int rc = mg_zones_apply(cfg);
    if (rc < 0) {
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
        return;
    }
    for (size_t i = 0; i < m->nslots; i++) {
        if (!m->slots[i].pid)
            continue;
        kill(m->slots[i].pid, SIGTERM);
        m->retired = mg_realloc(m->retired, (m->nretired + 1) * sizeof(pid_t));
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
}

static void reload(master_t *m)
{
    char err[8192];
    mg_config_t *cfg;
    if (mg_config_load(m->config_path, &cfg, err, sizeof(err))
        || (mg_gen_check(cfg, err, sizeof(err)) && (mg_config_free(cfg), 1))) {
        mg_log_lines(MG_LOG_ERROR,
                     "reload refused, the running config keeps serving: ", err);
        return;
    }
    if (cfg->workers != m->cfg->workers || !same_listeners(cfg, m->cfg)
        || !mg_zones_same(cfg)) {
        replace_workers(m, cfg);
        return;
    }
    /* Same shape: each worker swaps generations in place. */
    mg_config_free(m->cfg);
    m->cfg = cfg;
    signal_all(m, SIGHUP);
    mg_log_info("reload: config valid, workers signalled");
}

static void begin_stop(master_t *m)
{
    if (m->stopping)
        return;
    m->stopping = 1;
    m->stop_deadline_ms = now_ms() + m->cfg->limits.drain_timeout_ms + 2000;
    mg_log_info("stopping: draining %zu workers", running(m));
    signal_all(m, SIGTERM);
}

static void tick(master_t *m)
{
    uint64_t now = now_ms();
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
    master_t m = {.config_path = config_path, .cfg = cfg};
    sigset_t set;
    sigemptyset(&set);
    int sigs[] = {SIGCHLD, SIGHUP, SIGTERM, SIGINT, SIGQUIT, SIGUSR1};
    for (size_t i = 0; i < MG_ARRAY_SIZE(sigs); i++)
        sigaddset(&set, sigs[i]);
    sigprocmask(SIG_BLOCK, &set, NULL);

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
    if (rc < 0 || write_pid_file(cfg->pid_file) < 0) {
        for (size_t i = 0; i < m.nfds; i++)
            close(m.fds[i]);
        free(m.fds);
        mg_config_free(cfg);
        return 1;
    }
    mg_log_info("moongate %s starting %u workers", MG_VERSION, cfg->workers);
    start_workers(&m);

    while (!m.stopping || running(&m) > 0) {
        struct timespec timeout = {0, 200 * 1000000};
        siginfo_t info;
        int sig = sigtimedwait(&set, &info, &timeout);
        switch (sig) {
        case SIGCHLD: reap(&m); break;
        case SIGHUP:
            if (!m.stopping)
                reload(&m);
            break;
        case SIGTERM:
        case SIGINT:
        case SIGQUIT: begin_stop(&m); break;
        case SIGUSR1:
            /* logrotate moved the logs: reopen them everywhere. */
            mg_log_init(m.cfg->error_log, m.cfg->log_level, NULL);
            signal_all(&m, SIGUSR1);
            break;
        default:
            reap(&m); /* a SIGCHLD may merge with another signal */
            break;
        }
        tick(&m);
    }
    unlink(m.cfg->pid_file);
    for (size_t i = 0; i < m.nfds; i++)
        close(m.fds[i]);
    mg_log_info("stopped");
    free(m.fds);
    free(m.slots);
    free(m.retired);
    mg_config_free(m.cfg);
    return 0;
}
