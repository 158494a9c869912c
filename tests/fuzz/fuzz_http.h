/*
 * The engine behind the two HTTP/1 fuzz harnesses (fuzz_request.h: bytes a
 * client sends; fuzz_response.h: bytes an upstream answers), shared with
 * tests/unit/test_corpus.c.
 *
 * core/http1.c and core/proxy.c parse inside their libuv callbacks, with
 * state owned by a worker: there is no socket-free entry point, and adding
 * one would mean a second way in that the gateway itself never takes. So
 * the harness runs the real thing: mg_worker_run (core/worker.c) in a
 * thread of the fuzzing process, on a listening socket opened here, with a
 * config whose one route proxies to an "upstream" that is also this
 * process. Each input is one exchange over loopback TCP:
 *
 *   client (this thread)  --request bytes-->  worker  --proxied request-->
 *   upstream (this thread) --response bytes--> worker --response--> client
 *
 * The client sends its bytes and half-closes; the upstream reads until it
 * has seen the end of a request head (or the gateway stops sending), then
 * writes its bytes and closes. The exchange ends when the gateway closes
 * the client connection. Every byte goes through llhttp with the
 * gateway's own callbacks, limits and checks: request line, header
 * spans, Content-Length/Transfer-Encoding rules, chunked decoding with its
 * extensions and trailers, max_body, pipelining, Expect; on the upstream
 * side the status line, header filtering, framing (length, chunked,
 * close-delimited, HEAD/204/304) and re-chunking to the client.
 *
 * Checks, besides ASan/UBSan inside the worker: the exchange ends within
 * FH_DEADLINE_MS (a hang is a finding; the config's timeouts are far
 * shorter), and whatever the client receives starts with "HTTP/1.1 " or
 * "HTTP/1.0 " (or is nothing) -- or, for bytes that begin with the
 * HTTP/2 preface (h2c with prior knowledge), with a SETTINGS frame. Leaks show up under LSan at exit, since
 * the worker's state stays reachable only while it is live.
 *
 * The worker thread is started once per process and never stopped; the
 * process's signals (SIGHUP, SIGTERM...) are the worker's, as in a real
 * worker. Limits are small so the limit paths are reachable by a fuzzer.
 */
#ifndef MG_FUZZ_HTTP_H
#define MG_FUZZ_HTTP_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "config.h"
#include "log.h"
#include "worker.h"

#define FH_DEADLINE_MS 5000 /* the config's timeouts are <= 500 ms */
#define FH_MAX_UP 8         /* upstream connections per exchange */

static struct {
    int started;
    int gw_fd, up_fd; /* listening sockets */
    int gw_port, up_port;
    mg_config_t *cfg;
    mg_worker_opts_t opts;
    pthread_t thread;
    char msg[256];
    char conf_path[64];
} fuzz_http;

static void fh_remove_conf(void)
{
    unlink(fuzz_http.conf_path);
}

/*
 * LeakSanitizer does not scan LuaJIT's heap (its own allocator), so a
 * malloc'ed block that only Lua memory points to looks leaked while the
 * worker's Lua state is alive, which is always here: lua-cjson's encode
 * buffer is one. The e2e tests under ASan see these freed at a worker's
 * clean exit; this harness never stops its worker.
 */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void)
{
    return "leak:cjson.so\n";
}

static int fh_listen(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 511) < 0
        || getsockname(fd, (struct sockaddr *)&a, &len) < 0) {
        close(fd);
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

static void *fh_worker_main(void *arg)
{
    (void)arg;
    mg_worker_run(&fuzz_http.opts, fuzz_http.cfg);
    fprintf(stderr, "fuzz_http: the worker returned\n");
    abort();
    return NULL;
}

/* The gateway's config: small limits and short timeouts, one route with
 * the request-id and cors plugins (they read and add headers), and one
 * upstream: this process. */
static const char fh_config_fmt[] =
    "return {\n"
    "  listen = { \"127.0.0.1:%d\" },\n"
    "  workers = 1,\n"
    "  error_log = \"%s\",\n"
    "  log_level = \"error\",\n"
    "  limits = { max_uri = 512, max_header_bytes = 2048,\n"
    "             max_header_fields = 24, max_body = 4096,\n"
    "             header_timeout = 0.3, body_timeout = 0.3,\n"
    "             keepalive_timeout = 0.3, drain_timeout = 0.3 },\n"
    "  upstreams = { up = { targets = { \"127.0.0.1:%d\" },\n"
    "    timeouts = { connect = 0.5, send = 0.5, read = 0.5 },\n"
    "    keepalive = { max_idle = 0 } } },\n"
    "  routes = {\n"
    "    { path = \"/p/*\", upstream = \"up\", max_body = 64,\n"
    "      plugins = { [\"request-id\"] = {},\n"
    "                  cors = { origins = { \"*\" } } } },\n"
    "    { path = \"/*\", upstream = \"up\" },\n"
    "  },\n"
    "}\n";

/* Starts the worker thread once. Returns 0 or -1 (message on stderr). */
static int fuzz_http_start(void)
{
    if (fuzz_http.started)
        return fuzz_http.started > 0 ? 0 : -1;
    fuzz_http.started = -1;
    const char *log = getenv("MG_FUZZ_HTTP_LOG");
    if (!log || !*log)
        log = "/dev/null";
    mg_log_init(log, MG_LOG_ERROR, "fuzz");
    fuzz_http.gw_fd = fh_listen(&fuzz_http.gw_port);
    fuzz_http.up_fd = fh_listen(&fuzz_http.up_port);
    if (fuzz_http.gw_fd < 0 || fuzz_http.up_fd < 0) {
        fprintf(stderr, "fuzz_http: cannot listen on 127.0.0.1: %s\n",
                strerror(errno));
        return -1;
    }
    char *path = fuzz_http.conf_path;
    snprintf(path, sizeof(fuzz_http.conf_path), "/tmp/mg-fuzz-http-XXXXXX.lua");
    int fd = mkstemps(path, 4);
    if (fd < 0) {
        fprintf(stderr, "fuzz_http: mkstemps: %s\n", strerror(errno));
        return -1;
    }
    FILE *f = fdopen(fd, "w");
    fprintf(f, fh_config_fmt, fuzz_http.gw_port, log, fuzz_http.up_port);
    fclose(f);
    char err[4096];
    /* The worker reads the file again (the Lua side of the config): it
     * stays until the process exits. */
    atexit(fh_remove_conf);
    int rc = mg_config_load(path, &fuzz_http.cfg, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "fuzz_http: config: %s\n", err);
        return -1;
    }
    fuzz_http.opts.listen_fds = &fuzz_http.gw_fd;
    fuzz_http.opts.nlisten = 1;
    fuzz_http.opts.slot = 1;
    fuzz_http.opts.config_path = fuzz_http.conf_path;
    if (pthread_create(&fuzz_http.thread, NULL, fh_worker_main, NULL) != 0) {
        fprintf(stderr, "fuzz_http: pthread_create failed\n");
        return -1;
    }
    fuzz_http.started = 1;
    return 0;
}

static uint64_t fh_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* An upstream connection: reads the proxied request until a head ends
 * (or the gateway goes quiet / closes), then answers and closes. */
typedef struct {
    int fd;
    int answered;
    char tail[4]; /* last bytes seen, to find "\r\n\r\n" across reads */
    size_t got;
    uint64_t since; /* when it was accepted */
} fh_up_t;

static void fh_up_answer(fh_up_t *u, const uint8_t *resp, size_t n)
{
    if (n)
        (void)!send(u->fd, resp, n, MSG_NOSIGNAL);
    shutdown(u->fd, SHUT_WR);
    u->answered = 1;
}

static int fh_head_ended(fh_up_t *u, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        memmove(u->tail, u->tail + 1, 3);
        u->tail[3] = b[i];
        u->got++;
        if (u->got >= 4 && memcmp(u->tail, "\r\n\r\n", 4) == 0)
            return 1;
    }
    return 0;
}

/*
 * One exchange: `req` from a client, `resp` from the upstream for every
 * upstream connection the gateway opens. Returns NULL when the checks hold,
 * else a static message.
 */
static const char *fuzz_http_one(const uint8_t *req, size_t req_len,
                                 const uint8_t *resp, size_t resp_len)
{
    if (fuzz_http_start() != 0)
        return "the gateway thread could not start";
    const char *bad = NULL;
    fh_up_t ups[FH_MAX_UP];
    size_t nups = 0;
    int cfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)fuzz_http.gw_port);
    /* Non-blocking from the start: a signal (libFuzzer's timers) cannot
     * interrupt a blocking connect half-way. */
    int crc = cfd < 0 ? -1 : 0;
    if (cfd >= 0) {
        fcntl(cfd, F_SETFL, fcntl(cfd, F_GETFL) | O_NONBLOCK);
        crc = connect(cfd, (struct sockaddr *)&a, sizeof(a));
        if (crc < 0 && (errno == EINPROGRESS || errno == EINTR)) {
            struct pollfd cp = {cfd, POLLOUT, 0};
            int soerr = 0;
            socklen_t sl = sizeof(soerr);
            while (poll(&cp, 1, 1000) < 0 && errno == EINTR)
                ;
            getsockopt(cfd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
            crc = (cp.revents & POLLOUT) && soerr == 0 ? 0 : -1;
            errno = soerr ? soerr : ETIMEDOUT;
        }
    }
    if (crc < 0) {
        snprintf(fuzz_http.msg, sizeof(fuzz_http.msg), "connect: %s",
                 strerror(errno));
        if (cfd >= 0)
            close(cfd);
        return fuzz_http.msg;
    }
    /* The request may be larger than the socket buffers while the gateway
     * waits for the upstream: it is sent from the poll loop. */
    size_t sent = 0;
    int cli_shut = 0;
    char first[9];
    size_t nfirst = 0, received = 0;
    uint64_t start = fh_now_ms();
    for (;;) {
        uint64_t now = fh_now_ms();
        if (now - start > FH_DEADLINE_MS) {
            snprintf(fuzz_http.msg, sizeof(fuzz_http.msg),
                     "the gateway did not close the client connection within "
                     "%d ms (%zu of %zu request bytes sent, %zu received)",
                     FH_DEADLINE_MS, sent, req_len, received);
            bad = fuzz_http.msg;
            break;
        }
        if (sent < req_len) {
            ssize_t k = send(cfd, req + sent, req_len - sent, MSG_NOSIGNAL);
            if (k > 0)
                sent += (size_t)k;
            else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK
                     && errno != EINTR)
                sent = req_len; /* the gateway closed: stop sending */
        }
        if (sent == req_len && !cli_shut) {
            shutdown(cfd, SHUT_WR);
            cli_shut = 1;
        }
        struct pollfd pf[2 + FH_MAX_UP];
        pf[0] = (struct pollfd){
            cfd, (short)(POLLIN | (sent < req_len ? POLLOUT : 0)), 0};
        pf[1] = (struct pollfd){fuzz_http.up_fd, POLLIN, 0};
        for (size_t i = 0; i < nups; i++)
            pf[2 + i] = (struct pollfd){ups[i].fd, POLLIN, 0};
        /* A gateway that sent a head but nothing after it for 20 ms gets
         * its answer anyway (a body the upstream does not parse). */
        int rc = poll(pf, 2 + nups, 10);
        if (rc < 0 && errno != EINTR) {
            bad = "poll failed";
            break;
        }
        now = fh_now_ms();
        if (rc > 0 && (pf[1].revents & POLLIN) && nups < FH_MAX_UP) {
            int ufd = accept4(fuzz_http.up_fd, NULL, NULL,
                              SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (ufd >= 0)
                ups[nups++] = (fh_up_t){ufd, 0, {0}, 0, now};
        }
        for (size_t i = 0; i < nups; i++) {
            fh_up_t *u = &ups[i];
            if (rc > 0 && (pf[2 + i].revents & (POLLIN | POLLHUP | POLLERR))) {
                char b[16384];
                ssize_t k = recv(u->fd, b, sizeof(b), 0);
                if (k > 0 && !u->answered && fh_head_ended(u, b, (size_t)k))
                    fh_up_answer(u, resp, resp_len);
                else if (k == 0 && !u->answered)
                    fh_up_answer(u, resp, resp_len);
            }
            if (!u->answered && now - u->since > 20)
                fh_up_answer(u, resp, resp_len);
        }
        if (rc > 0 && (pf[0].revents & (POLLIN | POLLHUP | POLLERR))) {
            char b[16384];
            ssize_t k = recv(cfd, b, sizeof(b), 0);
            if (k > 0) {
                for (ssize_t i = 0; i < k && nfirst < sizeof(first); i++)
                    first[nfirst++] = b[i];
                received += (size_t)k;
            } else if (k == 0 || (errno != EAGAIN && errno != EINTR)) {
                break; /* closed (or reset): the exchange is over */
            }
        }
    }
    /* Bytes that begin with the HTTP/2 client preface make an h2c
     * session (nghttp2 parses the rest): the answer is frames, the
     * gateway's SETTINGS first (a 9-byte frame header of type 4). */
    int h2c = req_len >= 24
              && memcmp(req, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 24) == 0;
    if (!bad && received > 0 && h2c && (nfirst < 9 || first[3] != 0x4)) {
        snprintf(fuzz_http.msg, sizeof(fuzz_http.msg),
                 "an h2c connection's first frame is not SETTINGS");
        bad = fuzz_http.msg;
    } else if (!bad && received > 0 && !h2c
               && (nfirst < 9
                   || (memcmp(first, "HTTP/1.1 ", 9) != 0
                       && memcmp(first, "HTTP/1.0 ", 9) != 0))) {
        snprintf(fuzz_http.msg, sizeof(fuzz_http.msg),
                 "the client received something that is not an HTTP/1.x "
                 "response: \"%.*s\"",
                 (int)nfirst, first);
        bad = fuzz_http.msg;
    }
    close(cfd);
    for (size_t i = 0; i < nups; i++)
        close(ups[i].fd);
    /* An upstream connection the gateway opened after we stopped looking
     * would stay in the backlog: take it now so it cannot answer the next
     * input. */
    int ufd;
    while ((ufd = accept4(fuzz_http.up_fd, NULL, NULL, SOCK_CLOEXEC)) >= 0)
        close(ufd);
    return bad;
}

#endif
