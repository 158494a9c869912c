/*
 * The admin listener, served by the master. Why the master and not a
 * worker: every answer is master knowledge. /status lists the workers with
 * their pids and restart counts and the generation the master validated;
 * /reload must validate the new config and report the result, which is
 * exactly what the master does on SIGHUP; /metrics sums the shared counters
 * plus the master's own (restarts, reloads). A worker would have to ask the
 * master for each of these. Admin traffic is a few requests a minute, so
 * one poll() loop in the master is enough: it also keeps the admin API
 * alive while every worker is busy, dying or being replaced.
 *
 * The server is deliberately small: one request per connection
 * (Connection: close), a 16 KiB request head, a 64 KiB body that is read and
 * ignored, at most 16 connections, 5 s per connection. Sockets are
 * non-blocking, so a slow or silent client cannot stall the master; a
 * reload does block it while the config loads, as SIGHUP always did.
 *
 * It also serves the dashboard (admin/dashboard.html, docs/dashboard.md) at
 * GET / and GET /dashboard: one file read into memory at start and on each
 * reload, answered without the token (it holds no data: the page asks for
 * the token and sends it with its own /status and /metrics requests). Its
 * inline <style> and <script> are allowed by their sha256 in a strict
 * Content-Security-Policy computed when the file is read, so the page can
 * run only its own code and reach only this listener.
 */
#include "admin.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "listen.h"
#include "log.h"

#define MAX_CONNS (MG_ADMIN_MAX_POLLFDS - 1)
#define HEAD_MAX 16384
#define BODY_MAX 65536
#define CONN_TIMEOUT_MS 5000
#define PAGE_MAX (1024 * 1024)

typedef struct {
    int fd;      /* -1: free */
    int writing; /* the reply is built and going out */
    uint64_t deadline_ms;
    char *in; /* request bytes, HEAD_MAX + BODY_MAX at most */
    size_t in_len, head_len, body_want;
    mg_strbuf_t out;
    size_t out_pos;
} conn_t;

struct mg_admin_s {
    int fd;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    char *token;
    mg_admin_handlers_t h;
    /* The dashboard: the file's bytes and its security headers, or
     * page_error (why / answers 404). All owned. */
    char *page, *page_headers, *page_error;
    size_t page_len;
    conn_t conns[MAX_CONNS];
};

int mg_admin_open(const mg_admin_conf_t *conf, const mg_admin_handlers_t *h,
                  mg_admin_t **out)
{
    const mg_listen_conf_t *l = &conf->listen;
    int fd = mg_listen_socket(l, 64, 1); /* the workers must not hold it */
    if (fd < 0)
        return fd;
    mg_admin_t *a = mg_calloc(1, sizeof(*a));
    a->fd = fd;
    a->addr = l->addr;
    a->addrlen = l->addrlen;
    a->h = *h;
    for (size_t i = 0; i < MAX_CONNS; i++)
        a->conns[i].fd = -1;
    mg_admin_set_token(a, conf->token);
    *out = a;
    return 0;
}

int mg_admin_same_address(const mg_admin_t *a, const mg_admin_conf_t *conf)
{
    return a->addrlen == conf->listen.addrlen
           && memcmp(&a->addr, &conf->listen.addr, a->addrlen) == 0;
}

void mg_admin_set_token(mg_admin_t *a, const char *token)
{
    free(a->token);
    a->token = token ? mg_strndup(token, strlen(token)) : NULL;
}

static void conn_free(conn_t *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    free(c->in);
    c->in = NULL;
    mg_strbuf_free(&c->out);
    c->in_len = c->head_len = c->body_want = c->out_pos = 0;
    c->writing = 0;
}

void mg_admin_close(mg_admin_t *a)
{
    if (!a)
        return;
    for (size_t i = 0; i < MAX_CONNS; i++)
        conn_free(&a->conns[i]);
    close(a->fd);
    free(a->token);
    free(a->page);
    free(a->page_headers);
    free(a->page_error);
    free(a);
}

void mg_admin_close_fds(mg_admin_t *a)
{
    if (!a)
        return;
    close(a->fd);
    for (size_t i = 0; i < MAX_CONNS; i++)
        if (a->conns[i].fd >= 0)
            close(a->conns[i].fd);
}

/* ---- the dashboard page -------------------------------------------------- */

/* Adds " 'sha256-<base64>'" for every element <tag>...</tag> of the page
 * (written without attributes), hashing its exact text as browsers do. */
static void csp_hashes(const char *page, size_t len, const char *tag,
                       mg_strbuf_t *out)
{
    char open[16], close_tag[16];
    snprintf(open, sizeof(open), "<%s>", tag);
    snprintf(close_tag, sizeof(close_tag), "</%s>", tag);
    const char *p = page, *end = page + len;
    while ((p = memmem(p, (size_t)(end - p), open, strlen(open)))) {
        const char *body = p + strlen(open);
        const char *e =
            memmem(body, (size_t)(end - body), close_tag, strlen(close_tag));
        if (!e)
            return;
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned mdlen = 0;
        EVP_Digest(body, (size_t)(e - body), md, &mdlen, EVP_sha256(), NULL);
        unsigned char b64[4 * ((EVP_MAX_MD_SIZE + 2) / 3) + 1];
        EVP_EncodeBlock(b64, md, (int)mdlen);
        mg_strbuf_printf(out, " 'sha256-%s'", (const char *)b64);
        p = e + strlen(close_tag);
    }
}

int mg_admin_load_page(mg_admin_t *a, const char *path)
{
    free(a->page);
    free(a->page_headers);
    free(a->page_error);
    a->page = a->page_headers = a->page_error = NULL;
    a->page_len = 0;
    char msg[PATH_MAX + 128];
    FILE *f = fopen(path, "rb");
    if (!f) {
        int e = errno;
        snprintf(msg, sizeof(msg),
                 "dashboard not installed: cannot read %s: %s (set "
                 "MOONGATE_HOME to the directory holding admin/)",
                 path, strerror(e));
        a->page_error = mg_strndup(msg, strlen(msg));
        mg_log_error("%s", msg);
        return -e;
    }
    mg_strbuf_t b = {0};
    char buf[8192];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0 && b.len <= PAGE_MAX)
        mg_strbuf_add(&b, buf, n);
    int bad = ferror(f) || b.len > PAGE_MAX;
    fclose(f);
    if (bad) {
        snprintf(msg, sizeof(msg),
                 "dashboard not loaded: %s is unreadable or over 1 MiB", path);
        a->page_error = mg_strndup(msg, strlen(msg));
        mg_log_error("%s", msg);
        mg_strbuf_free(&b);
        return -EINVAL;
    }
    /* Nothing but the page's own hashed code runs, and it may talk only
     * to this origin: no CDN, no beacon, no framing by another site. */
    mg_strbuf_t h = {0};
    mg_strbuf_puts(&h, "Content-Security-Policy: default-src 'none'; "
                       "script-src");
    csp_hashes(b.p, b.len, "script", &h);
    mg_strbuf_puts(&h, "; style-src");
    csp_hashes(b.p, b.len, "style", &h);
    mg_strbuf_puts(&h, "; connect-src 'self'; img-src 'self'; "
                       "base-uri 'none'; form-action 'none'; "
                       "frame-ancestors 'none'\r\n"
                       "X-Content-Type-Options: nosniff\r\n"
                       "X-Frame-Options: DENY\r\n"
                       "Referrer-Policy: no-referrer\r\n");
    a->page = b.p;
    a->page_len = b.len;
    a->page_headers = h.p;
    return 0;
}

/* ---- answers ------------------------------------------------------------ */

static const char *reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 413: return "Payload Too Large";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Unknown";
    }
}

/* Builds the whole reply in c->out: head, then body. */
static void reply(conn_t *c, int status, const char *ctype,
                  const char *extra_headers, const mg_strbuf_t *body)
{
    mg_strbuf_free(&c->out);
    mg_strbuf_printf(&c->out,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n"
                     "Content-Length: %zu\r\nCache-Control: no-store\r\n"
                     "%sConnection: close\r\n\r\n",
                     status, reason(status), ctype, body ? body->len : 0,
                     extra_headers ? extra_headers : "");
    if (body && body->len)
        mg_strbuf_add(&c->out, body->p, body->len);
    c->writing = 1;
    c->out_pos = 0;
}

static void reply_error(conn_t *c, int status, const char *msg,
                        const char *extra_headers)
{
    mg_strbuf_t b = {0};
    mg_strbuf_puts(&b, "{\"error\":");
    mg_strbuf_json_str(&b, msg);
    mg_strbuf_puts(&b, "}\n");
    reply(c, status, "application/json", extra_headers, &b);
    mg_strbuf_free(&b);
}

/* The value of header `name` in the head (NUL-terminated lines), or NULL. */
static const char *header(const char *head, const char *name, size_t *len)
{
    size_t nlen = strlen(name);
    const char *p = strstr(head, "\r\n");
    while (p && p[2] != '\r') {
        const char *line = p + 2, *end = strstr(line, "\r\n");
        if (!end)
            return NULL;
        if ((size_t)(end - line) > nlen && line[nlen] == ':'
            && strncasecmp(line, name, nlen) == 0) {
            const char *v = line + nlen + 1;
            while (v < end && (*v == ' ' || *v == '\t'))
                v++;
            const char *e = end;
            while (e > v && (e[-1] == ' ' || e[-1] == '\t'))
                e--;
            *len = (size_t)(e - v);
            return v;
        }
        p = end;
    }
    return NULL;
}

/* Compares in time independent of where the first difference is. */
static int token_ok(const char *want, const char *got, size_t len)
{
    size_t wl = strlen(want);
    unsigned diff = (unsigned)(wl ^ len);
    for (size_t i = 0; i < wl; i++)
        diff |= (unsigned char)want[i] ^ (unsigned char)(i < len ? got[i] : 0);
    return diff == 0;
}

/* GET / and /dashboard: the page, open to anyone who reaches the listener
 * (it carries no data; its requests for data need the token). */
static void serve_page(mg_admin_t *a, conn_t *c, const char *method)
{
    if (strcmp(method, "GET") != 0) {
        reply_error(c, 405, "the dashboard takes GET only", "Allow: GET\r\n");
        return;
    }
    if (!a->page) {
        reply_error(c, 404, a->page_error, NULL);
        return;
    }
    mg_strbuf_t body = {.p = a->page, .len = a->page_len};
    reply(c, 200, "text/html; charset=utf-8", a->page_headers, &body);
}

static void route_request(mg_admin_t *a, conn_t *c, const char *method,
                          const char *path)
{
    if (strcmp(path, "/") == 0 || strcmp(path, "/dashboard") == 0) {
        serve_page(a, c, method);
        return;
    }
    if (a->token) {
        size_t len = 0;
        const char *v = header(c->in, "Authorization", &len);
        if (!v || len < 7 || strncasecmp(v, "Bearer ", 7) != 0
            || !token_ok(a->token, v + 7, len - 7)) {
            reply_error(
                c, 401, "missing or wrong admin token",
                "WWW-Authenticate: Bearer realm=\"moongate admin\"\r\n");
            return;
        }
    }
    static const struct {
        const char *path, *method;
    } endpoints[] = {
        {"/status", "GET"}, {"/metrics", "GET"}, {"/reload", "POST"}};
    for (size_t i = 0; i < MG_ARRAY_SIZE(endpoints); i++) {
        if (strcmp(path, endpoints[i].path) != 0)
            continue;
        if (strcmp(method, endpoints[i].method) != 0) {
            char allow[40], msg[1100];
            snprintf(allow, sizeof(allow), "Allow: %s\r\n",
                     endpoints[i].method);
            snprintf(msg, sizeof(msg), "%s takes %s only", path,
                     endpoints[i].method);
            reply_error(c, 405, msg, allow);
            return;
        }
        mg_strbuf_t body = {0};
        int status = i == 0   ? a->h.status(a->h.arg, &body)
                     : i == 1 ? a->h.metrics(a->h.arg, &body)
                              : a->h.reload(a->h.arg, &body);
        reply(c, status,
              i == 1 ? "text/plain; version=0.0.4; charset=utf-8"
                     : "application/json",
              NULL, &body);
        mg_strbuf_free(&body);
        return;
    }
    reply_error(c, 404,
                "no such admin endpoint (try /status, /metrics, "
                "/reload, /dashboard)",
                NULL);
}

/* The head is complete (NUL-terminated at head_len): check its framing,
 * then wait for the body or answer. */
static void on_head(mg_admin_t *a, conn_t *c)
{
    size_t len;
    if (header(c->in, "Transfer-Encoding", &len)) {
        reply_error(c, 400, "Transfer-Encoding is not accepted here", NULL);
        return;
    }
    const char *cl = header(c->in, "Content-Length", &len);
    if (cl) {
        char num[24];
        char *end;
        if (len == 0 || len >= sizeof(num)) {
            reply_error(c, 400, "bad Content-Length", NULL);
            return;
        }
        memcpy(num, cl, len);
        num[len] = '\0';
        unsigned long long n = strtoull(num, &end, 10);
        if (*end || num[0] < '0' || num[0] > '9') {
            reply_error(c, 400, "bad Content-Length", NULL);
            return;
        }
        if (n > BODY_MAX) {
            reply_error(c, 413, "admin request bodies are limited to 64 KiB",
                        NULL);
            return;
        }
        c->body_want = (size_t)n;
    }
}

static void serve(mg_admin_t *a, conn_t *c)
{
    char method[16], target[1024], version[16];
    if (sscanf(c->in, "%15[A-Z] %1023[^ \r\n] %15[^\r\n]", method, target,
               version)
            != 3
        || strncmp(version, "HTTP/1.", 7) != 0 || target[0] != '/') {
        reply_error(c, 400, "malformed request line", NULL);
        return;
    }
    char *q = strchr(target, '?');
    if (q)
        *q = '\0';
    route_request(a, c, method, target);
}

static void on_readable(mg_admin_t *a, conn_t *c)
{
    for (;;) {
        size_t cap = HEAD_MAX + BODY_MAX + 1;
        if (!c->in)
            c->in = mg_malloc(cap);
        ssize_t n = read(c->fd, c->in + c->in_len, cap - 1 - c->in_len);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n <= 0) {
            conn_free(c);
            return;
        }
        c->in_len += (size_t)n;
        c->in[c->in_len] = '\0';
        if (!c->head_len) {
            char *end = strstr(c->in, "\r\n\r\n");
            if (!end) {
                if (c->in_len >= HEAD_MAX || memchr(c->in, '\0', c->in_len))
                    reply_error(c, 431, "request head too large or binary",
                                NULL);
                if (c->writing)
                    return;
                continue;
            }
            c->head_len = (size_t)(end - c->in) + 4;
            if (c->head_len > HEAD_MAX) {
                reply_error(c, 431, "request head too large", NULL);
                return;
            }
            char saved = c->in[c->head_len];
            c->in[c->head_len] = '\0';
            on_head(a, c);
            c->in[c->head_len] = saved;
            if (c->writing)
                return;
        }
        if (c->in_len - c->head_len >= c->body_want) {
            c->in[c->head_len] = '\0';
            serve(a, c);
            return;
        }
    }
}

static void on_writable(conn_t *c)
{
    while (c->out_pos < c->out.len) {
        ssize_t n =
            write(c->fd, c->out.p + c->out_pos, c->out.len - c->out_pos);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n <= 0)
            break;
        c->out_pos += (size_t)n;
    }
    /* All sent (or the peer is gone): half-close so the client sees the
     * end before the reset an unread byte could cause, then close. */
    shutdown(c->fd, SHUT_WR);
    conn_free(c);
}

static void on_accept(mg_admin_t *a)
{
    for (;;) {
        int fd = accept4(a->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        conn_t *c = NULL;
        for (size_t i = 0; i < MAX_CONNS && !c; i++)
            if (a->conns[i].fd < 0)
                c = &a->conns[i];
        if (!c) {
            /* Full: a short refusal beats an accept queue that stalls. */
            static const char busy[] =
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                "application/json\r\nContent-Length: 35\r\nConnection: "
                "close\r\n\r\n{\"error\":\"admin listener is busy\"}\n";
            ssize_t ignored = write(fd, busy, sizeof(busy) - 1);
            (void)ignored;
            close(fd);
            continue;
        }
        c->fd = fd;
        c->deadline_ms = mg_monotonic_ms() + CONN_TIMEOUT_MS;
    }
}

size_t mg_admin_pollfds(mg_admin_t *a, struct pollfd *fds, size_t max,
                        int *timeout_ms)
{
    size_t n = 0;
    if (!a || max == 0)
        return 0;
    fds[n++] = (struct pollfd){.fd = a->fd, .events = POLLIN};
    uint64_t now = mg_monotonic_ms();
    for (size_t i = 0; i < MAX_CONNS && n < max; i++) {
        conn_t *c = &a->conns[i];
        if (c->fd < 0)
            continue;
        fds[n++] = (struct pollfd){.fd = c->fd,
                                   .events = c->writing ? POLLOUT : POLLIN};
        int left = c->deadline_ms > now ? (int)(c->deadline_ms - now) : 0;
        if (left < *timeout_ms)
            *timeout_ms = left;
    }
    return n;
}

void mg_admin_process(mg_admin_t *a, const struct pollfd *fds, size_t n)
{
    if (!a)
        return;
    for (size_t k = 1; k < n; k++) {
        conn_t *c = NULL;
        for (size_t i = 0; i < MAX_CONNS && !c; i++)
            if (a->conns[i].fd == fds[k].fd)
                c = &a->conns[i];
        if (!c || !fds[k].revents)
            continue;
        if (!c->writing)
            on_readable(a, c);
        if (c->fd >= 0 && c->writing)
            on_writable(c);
    }
    uint64_t now = mg_monotonic_ms();
    for (size_t i = 0; i < MAX_CONNS; i++)
        if (a->conns[i].fd >= 0 && now >= a->conns[i].deadline_ms)
            conn_free(&a->conns[i]); /* too slow: no answer owed */
    if (n > 0 && (fds[0].revents & POLLIN))
        on_accept(a);
}
