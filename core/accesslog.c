/*
 * Access-log lines. Fields: time, request_id, client_ip, method, path
 * (normalized; the raw target when the request never got that far), query,
 * status, route, consumer (ctx.consumer.id set by an auth plugin), upstream,
 * bytes_in (request body), bytes_out (everything written to the client),
 * latency_ms (head received to response written) and upstream_ms (request sent
 * upstream to its response complete).
 */
#include "accesslog.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "ffi.h"
#include "log.h"

#define BUF_SIZE 65536
#define LINE_MAX_BYTES 8192

struct mg_accesslog_s {
    uv_timer_t flush_timer;
    char *path;
    int fd;
    size_t len;
    char buf[BUF_SIZE];
};

static int open_file(const char *path)
{
    if (strcmp(path, "stdout") == 0)
        return dup(STDOUT_FILENO);
    return open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
}

static void flush(mg_accesslog_t *l)
{
    size_t off = 0;
    while (off < l->len) {
        ssize_t n = write(l->fd, l->buf + off, l->len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            mg_log_error("access log %s: %s (lines dropped)", l->path,
                         strerror(errno));
            break;
        }
        off += (size_t)n;
    }
    l->len = 0;
}

static void on_flush(uv_timer_t *t)
{
    flush(t->data);
}

mg_accesslog_t *mg_accesslog_open(uv_loop_t *loop, const char *path, char *err,
                                  size_t errlen)
{
    int fd = open_file(path);
    if (fd < 0) {
        snprintf(err, errlen, "access log %s: %s", path, strerror(errno));
        return NULL;
    }
    mg_accesslog_t *l = mg_calloc(1, sizeof(*l));
    l->fd = fd;
    l->path = mg_strndup(path, strlen(path));
    uv_timer_init(loop, &l->flush_timer);
    l->flush_timer.data = l;
    uv_timer_start(&l->flush_timer, on_flush, 1000, 1000);
    uv_unref((uv_handle_t *)&l->flush_timer);
    return l;
}

const char *mg_accesslog_path(const mg_accesslog_t *l)
{
    return l->path;
}

/* Appends s as a JSON string (quotes included); bounded by `end`. */
static char *json_str(char *w, char *end, mg_str_t s)
{
    static const char hex[] = "0123456789abcdef";
    if (w < end)
        *w++ = '"';
    for (size_t i = 0; i < s.len && end - w > 7; i++) {
        unsigned char ch = (unsigned char)s.p[i];
        if (ch == '"' || ch == '\\') {
            *w++ = '\\';
            *w++ = (char)ch;
        } else if (ch < 0x20 || ch >= 0x7f) {
            w += sprintf(w, "\\u00%c%c", hex[ch >> 4], hex[ch & 15]);
        } else {
            *w++ = (char)ch;
        }
    }
    if (w < end)
        *w++ = '"';
    return w;
}

static char *json_str_or_null(char *w, char *end, mg_str_t s)
{
    if (!s.p) {
        if (end - w > 4)
            w += sprintf(w, "null");
        return w;
    }
    return json_str(w, end, s);
}

void mg_accesslog_write(mg_accesslog_t *l, mg_req_t *r)
{
    if (l->len + LINE_MAX_BYTES > BUF_SIZE)
        flush(l);
    char *w = l->buf + l->len, *end = w + LINE_MAX_BYTES - 2;
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    w += strftime(w, 64, "{\"time\":\"%Y-%m-%dT%H:%M:%S", &tm);
    w += sprintf(w, ".%03dZ\",\"request_id\":", (int)(tv.tv_usec / 1000));
    w = json_str_or_null(w, end,
                         r->request_id.len ? r->request_id : MG_NULL_STR);
    w += sprintf(w, ",\"client_ip\":");
    w = json_str(w, end,
                 r->gen ? mg_req_client_ip(r) : mg_str_from_cstr(r->client_ip));
    w += sprintf(w, ",\"method\":");
    w = json_str_or_null(w, end,
                         r->method_name.len ? r->method_name : MG_NULL_STR);
    w += sprintf(w, ",\"path\":");
    w = json_str_or_null(w, end, r->path.p ? r->path : r->target);
    w += sprintf(w, ",\"query\":");
    w = json_str_or_null(w, end, r->query.len ? r->query : MG_NULL_STR);
    w += sprintf(w, ",\"status\":%d,\"route\":", r->resp_status);
    w = json_str_or_null(
        w, end, r->route ? mg_str_from_cstr(r->route->name) : MG_NULL_STR);
    w += sprintf(w, ",\"consumer\":");
    w = json_str_or_null(w, end, r->consumer.p ? r->consumer : MG_NULL_STR);
    w += sprintf(w, ",\"upstream\":");
    w = json_str_or_null(w, end,
                         r->upstream_name ? mg_str_from_cstr(r->upstream_name)
                                          : MG_NULL_STR);
    uint64_t now = uv_hrtime();
    w += snprintf(w, (size_t)(end - w),
                  ",\"bytes_in\":%llu,\"bytes_out\":%llu,\"latency_ms\":%.3f,"
                  "\"upstream_ms\":",
                  (unsigned long long)r->body_received,
                  (unsigned long long)r->bytes_out,
                  r->start_ns ? (double)(now - r->start_ns) / 1e6 : 0.0);
    if (r->upstream_ns)
        w += snprintf(w, (size_t)(end - w), "%.3f",
                      (double)r->upstream_ns / 1e6);
    else
        w += snprintf(w, (size_t)(end - w), "null");
    *w++ = '}';
    *w++ = '\n';
    l->len = (size_t)(w - l->buf);
}

void mg_accesslog_reopen(mg_accesslog_t *l)
{
    flush(l);
    int fd = open_file(l->path);
    if (fd < 0) {
        mg_log_error("access log %s: cannot reopen: %s", l->path,
                     strerror(errno));
        return;
    }
    close(l->fd);
    l->fd = fd;
}

static void on_timer_closed(uv_handle_t *h)
{
    mg_accesslog_t *l = h->data;
    free(l->path);
    free(l);
}

void mg_accesslog_close(mg_accesslog_t *l)
{
    if (!l)
        return;
    flush(l);
    close(l->fd);
    uv_close((uv_handle_t *)&l->flush_timer, on_timer_closed);
}
