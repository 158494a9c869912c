/*
 * The config loader: runs the config file (a Lua chunk returning a table) in
 * a throw-away lua_State, converts the table into the plain C structures of
 * config.h and validates every field. It does not compile routes (router.c)
 * nor build runtime upstream state (the worker does, per generation).
 *
 * Errors are collected, not returned at the first one: an operator fixing a
 * config wants the whole list, one line each, in the form
 *     FILE: WHERE: FIELD: WHY
 * with WHERE one of `top level`, `upstreams.NAME` or `routes[N] "PATH"`.
 * Unknown fields are errors at every level so a typo never passes silently.
 *
 * The table is read only with raw accesses (lua_rawget, lua_next), so a
 * metatable in the config cannot run code during conversion; the conversion
 * still runs under lua_pcall so that a Lua error (out of memory) cannot
 * escape. The config under construction is kept consistent at every step
 * (counts set right after arrays are allocated and zeroed) so that
 * mg_config_free can release a half-built one.
 */
#include "config.h"
#include "balancer.h"
#include "lua.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <lauxlib.h>
#include <limits.h>
#include <llhttp.h>
#include <lua.h>
#include <lualib.h>
#include <math.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "log.h"

/* Durations above a year are surely typos (and keep the ms math exact). */
#define MAX_DURATION_S 31536000.0
/* Sizes travel through Lua numbers (doubles): integers are exact to 2^53. */
#define MAX_SIZE ((uint64_t)1 << 53)

/* Always stripped from client requests, whatever the config says. */
static const char *const builtin_identity[] = {
    "x-user-id",           "x-user-roles",     "x-consumer-id",
    "x-consumer-username", "x-consumer-roles", "x-consumer-custom-id",
};

static const struct {
    const char *name;
    unsigned bit;
} methods[] = {
    {"GET", HTTP_GET},         {"HEAD", HTTP_HEAD},
    {"POST", HTTP_POST},       {"PUT", HTTP_PUT},
    {"DELETE", HTTP_DELETE},   {"CONNECT", HTTP_CONNECT},
    {"OPTIONS", HTTP_OPTIONS}, {"TRACE", HTTP_TRACE},
    {"PATCH", HTTP_PATCH},
};

/*
 * Field lists per table. The reserved ones belong to features that are not
 * built yet, or that another part reads (Redis, plugins, route handlers,
 * upstream health checks and breakers): they are accepted and
 * ignored for now, so configs written for them already load.
 */
static const char *const top_fields[] = {
    "listen",          "workers",          "pid_file", "error_log", "log_level",
    "trusted_proxies", "identity_headers", "limits",   "upstreams", "routes",
    "shared",          "access_log",       "admin",    "watch",     NULL,
};
/* plugin_paths and plugins are read by the Lua runtime (runtime.lua). */
static const char *const top_reserved[] = {
    "redis",
    "plugin_paths",
    "plugins",
    NULL,
};
static const char *const limits_fields[] = {
    "max_uri",
    "max_header_bytes",
    "max_header_fields",
    "max_body",
    "header_timeout",
    "body_timeout",
    "keepalive_timeout",
    "send_timeout",
    "max_connections",
    "drain_timeout",
    "h2_max_concurrent_streams",
    NULL,
};
static const char *const upstream_fields[] = {
    "targets",     "balance", "timeouts", "keepalive", "max_pending",
    "hash_on",     "health",  "passive",  "breaker",   "retries",
    "dns_refresh", "tls",     NULL,
};
static const char *const upstream_tls_fields[] = {"ca",   "sni", "verify",
                                                  "cert", "key", NULL};
static const char *const health_fields[] = {
    "path", "interval", "timeout", "healthy", "unhealthy", "statuses", NULL,
};
static const char *const passive_fields[] = {
    "failures", "statuses", "timeouts", "down_for", NULL,
};
static const char *const breaker_fields[] = {
    "failures", "failure_ratio",    "window",   "min_requests",
    "open_for", "half_open_probes", "statuses", NULL,
};
static const char *const retries_fields[] = {
    "count",         "on", "budget", "retry_non_idempotent", "try_timeout",
    "total_timeout", NULL,
};
static const char *const timeouts_fields[] = {
    "connect", "send", "read", "tunnel_idle", NULL,
};
static const char *const keepalive_fields[] = {
    "max_idle",
    "idle_timeout",
    NULL,
};
static const char *const route_fields[] = {
    "path",         "upstream", "name",     "methods",  "hosts",
    "strip_prefix", "rewrite",  "timeouts", "max_body", NULL,
};
static const char *const route_reserved[] = {
    "plugins",
    "handler",
    "order",
    NULL,
};
static const char *const target_fields[] = {"weight", NULL};
static const char *const listen_fields[] = {"tls", "http2", NULL};
static const char *const tls_fields[] = {"cert", "key", "certificates",
                                         "ciphers", NULL};
static const char *const cert_fields[] = {"cert", "key", NULL};
static const char *const admin_fields[] = {"listen", "token", "allow_remote",
                                           NULL};

/* The loader's state: the Lua state, the error collector, the context. */
typedef struct {
    lua_State *L;
    const char *file;
    char *err; /* caller's buffer, may be NULL */
    size_t errlen;
    size_t errpos; /* bytes written, always < errlen */
    unsigned nerrors;
    char where[160]; /* "top level", "upstreams.users", "routes[2] ..." */
    char prefix[64]; /* prepended to field names: "limits.", ... */
    mg_config_t *cfg;
} ld_t;

/* ---- error collection ------------------------------------------------ */

/* Appends printf output to the error buffer, truncating safely. */
static void append(ld_t *ld, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void append(ld_t *ld, const char *fmt, ...)
{
    if (!ld->err || ld->errpos + 1 >= ld->errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    size_t room = ld->errlen - ld->errpos;
    int n = vsnprintf(ld->err + ld->errpos, room, fmt, ap);
    va_end(ap);
    if (n < 0)
        ld->err[ld->errpos] = '\0';
    else
        ld->errpos += (size_t)n < room ? (size_t)n : room - 1;
}

/*
 * Adds one error line. Control characters (a newline in a path or a Lua
 * message) become '?' so that every error stays on one line.
 */
static void add_line(ld_t *ld, const char *line)
{
    char buf[1024];
    size_t n = 0;
    for (; n < sizeof(buf) - 1 && line[n]; n++)
        buf[n] = iscntrl((unsigned char)line[n]) ? '?' : line[n];
    buf[n] = '\0';
    append(ld, "%s%s", ld->nerrors++ > 0 ? "\n" : "", buf);
}

/* Reports one error: "FILE: WHERE: PREFIXFIELD: WHY". */
static void fail(ld_t *ld, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void fail(ld_t *ld, const char *field, const char *fmt, ...)
{
    char why[512], line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    snprintf(line, sizeof(line), "%s: %s: %s%s: %s", ld->file, ld->where,
             ld->prefix, field, why);
    add_line(ld, line);
}

/* Reports an error about the file as a whole (Lua errors, bad return). */
static void fail_file(ld_t *ld, const char *msg)
{
    char line[1024];
    size_t flen = strlen(ld->file);
    /* Lua's messages already start with "FILE:LINE:"; don't say it twice. */
    if (strncmp(msg, ld->file, flen) == 0 && msg[flen] == ':')
        snprintf(line, sizeof(line), "%s", msg);
    else
        snprintf(line, sizeof(line), "%s: %s", ld->file, msg);
    add_line(ld, line);
}

static void set_where(ld_t *ld, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void set_where(ld_t *ld, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ld->where, sizeof(ld->where), fmt, ap);
    va_end(ap);
}

static void set_prefix(ld_t *ld, const char *prefix)
{
    snprintf(ld->prefix, sizeof(ld->prefix), "%s", prefix);
}

/* "a string", "a number", ... for "expected X, got Y" messages. */
static const char *type_of(lua_State *L, int idx)
{
    return lua_typename(L, lua_type(L, idx));
}

/* A short rendering of a scalar value for messages: "\"abc\"", "1.5". */
static const char *show(lua_State *L, int idx, char *buf, size_t len)
{
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        snprintf(buf, len, "\"%.60s\"", lua_tostring(L, idx));
        break;
    case LUA_TNUMBER: snprintf(buf, len, "%.14g", lua_tonumber(L, idx)); break;
    case LUA_TBOOLEAN:
        snprintf(buf, len, "%s", lua_toboolean(L, idx) ? "true" : "false");
        break;
    default: snprintf(buf, len, "%s", type_of(L, idx));
    }
    return buf;
}

static void fail_type(ld_t *ld, const char *field, int idx,
                      const char *expected)
{
    fail(ld, field, "expected %s, got %s", expected, type_of(ld->L, idx));
}

/* ---- table shape ------------------------------------------------------ */

static int absindex(lua_State *L, int idx)
{
    return idx > 0 || idx <= LUA_REGISTRYINDEX ? idx : lua_gettop(L) + idx + 1;
}

static int in_list(const char *s, const char *const *list)
{
    for (; list && *list; list++)
        if (strcmp(s, *list) == 0)
            return 1;
    return 0;
}

/* Reports every key of the record at `t` that is neither known nor
 * reserved. Non-string keys are unknown fields too ("[1]"), except the
 * positional keys 1..npos. */
static void check_fields_pos(ld_t *ld, int t, const char *const *known,
                             const char *const *reserved, int npos)
{
    lua_State *L = ld->L;
    t = absindex(L, t);
    lua_pushnil(L);
    while (lua_next(L, t)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) == LUA_TSTRING) {
            const char *k = lua_tostring(L, -1);
            if (!in_list(k, known) && !in_list(k, reserved))
                fail(ld, k, "unknown field");
        } else if (lua_type(L, -1) != LUA_TNUMBER || lua_tonumber(L, -1) < 1
                   || lua_tonumber(L, -1) > npos
                   || lua_tonumber(L, -1) != floor(lua_tonumber(L, -1))) {
            char v[80], f[96];
            snprintf(f, sizeof(f), "[%s]", show(L, -1, v, sizeof(v)));
            fail(ld, f, "unknown field");
        }
    }
}

static void check_fields(ld_t *ld, int t, const char *const *known,
                         const char *const *reserved)
{
    check_fields_pos(ld, t, known, reserved, 0);
}

/*
 * Checks that the value at `idx` is a list (a table with keys 1..n and
 * nothing else) and stores n. Returns 0, or -1 after reporting.
 */
static int list_len(ld_t *ld, int idx, const char *field, size_t *n)
{
    lua_State *L = ld->L;
    if (lua_type(L, idx) != LUA_TTABLE) {
        fail_type(ld, field, idx, "a list");
        return -1;
    }
    idx = absindex(L, idx);
    size_t len = lua_objlen(L, idx), count = 0;
    int ok = 1;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        count++;
        if (lua_type(L, -1) != LUA_TNUMBER) {
            ok = 0;
            continue;
        }
        lua_Number k = lua_tonumber(L, -1);
        if (k < 1 || k > (lua_Number)len || k != floor(k))
            ok = 0;
    }
    if (!ok || count != len) {
        fail(ld, field, "expected a list (keys 1..n without holes)");
        return -1;
    }
    *n = len;
    return 0;
}

/* ---- scalar converters: value at `idx`, errors name `field` ------------ */

static int to_string(ld_t *ld, int idx, const char *field, char **out)
{
    if (lua_type(ld->L, idx) != LUA_TSTRING) {
        fail_type(ld, field, idx, "a string");
        return -1;
    }
    size_t len;
    const char *s = lua_tolstring(ld->L, idx, &len);
    if (strlen(s) != len) {
        fail(ld, field, "must not contain NUL bytes");
        return -1;
    }
    free(*out);
    *out = mg_strndup(s, len);
    return 0;
}

static int to_uint(ld_t *ld, int idx, const char *field, unsigned min,
                   unsigned max, unsigned *out)
{
    lua_State *L = ld->L;
    if (lua_type(L, idx) != LUA_TNUMBER) {
        fail_type(ld, field, idx, "an integer");
        return -1;
    }
    lua_Number v = lua_tonumber(L, idx);
    if (v != floor(v)) {
        fail(ld, field, "expected an integer, got %.14g", v);
        return -1;
    }
    if (v < min || v > max) {
        fail(ld, field, "must be between %u and %u, got %.14g", min, max, v);
        return -1;
    }
    *out = (unsigned)v;
    return 0;
}

/* "<n>", "<n>k", "<n>m", "<n>g" (binary multiples). Returns 0 or -1. */
static int parse_size(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    const char *p = s;
    if (!isdigit((unsigned char)*p))
        return -1;
    for (; isdigit((unsigned char)*p); p++) {
        v = v * 10 + (uint64_t)(*p - '0');
        if (v > MAX_SIZE)
            return -1;
    }
    unsigned shift = 0;
    switch (tolower((unsigned char)*p)) {
    case '\0': break;
    case 'k': shift = 10; break;
    case 'm': shift = 20; break;
    case 'g': shift = 30; break;
    default: return -1;
    }
    if (*p && p[1])
        return -1;
    if (v > (MAX_SIZE >> shift))
        return -1;
    *out = v << shift;
    return 0;
}

static int to_size(ld_t *ld, int idx, const char *field, uint64_t *out)
{
    lua_State *L = ld->L;
    char buf[80];
    if (lua_type(L, idx) == LUA_TSTRING) {
        if (parse_size(lua_tostring(L, idx), out) == 0)
            return 0;
    } else if (lua_type(L, idx) == LUA_TNUMBER) {
        lua_Number v = lua_tonumber(L, idx);
        if (v >= 0 && v <= (lua_Number)MAX_SIZE && v == floor(v)) {
            *out = (uint64_t)v;
            return 0;
        }
    } else {
        fail_type(ld, field, idx, "a size (bytes, or a string like \"8k\")");
        return -1;
    }
    fail(ld, field,
         "invalid size %s (expected bytes, or \"<n>k\", "
         "\"<n>m\", \"<n>g\")",
         show(L, idx, buf, sizeof(buf)));
    return -1;
}

/* Seconds (fractions allowed) to milliseconds, rounded. */
static int to_duration(ld_t *ld, int idx, const char *field, uint64_t *ms)
{
    lua_State *L = ld->L;
    if (lua_type(L, idx) != LUA_TNUMBER) {
        fail_type(ld, field, idx, "a number of seconds");
        return -1;
    }
    lua_Number v = lua_tonumber(L, idx);
    if (!(v >= 0 && v <= MAX_DURATION_S)) {
        fail(ld, field, "must be between 0 and %.0f seconds, got %.14g",
             MAX_DURATION_S, v);
        return -1;
    }
    *ms = (uint64_t)(v * 1000.0 + 0.5);
    return 0;
}

/* ---- getters: field `key` of the record at `t` -------------------------
 * Each returns 0 when the field is absent (*out untouched), 1 when it was
 * set, -1 after reporting an error. */

static int push_field(ld_t *ld, int t, const char *key)
{
    t = absindex(ld->L, t);
    lua_pushstring(ld->L, key);
    lua_rawget(ld->L, t);
    if (lua_isnil(ld->L, -1)) {
        lua_pop(ld->L, 1);
        return 0;
    }
    return 1;
}

#define GETTER(name, conv, type)                                               \
    static int name(ld_t *ld, int t, const char *key, type *out)               \
    {                                                                          \
        if (!push_field(ld, t, key))                                           \
            return 0;                                                          \
        int rc = conv(ld, -1, key, out);                                       \
        lua_pop(ld->L, 1);                                                     \
        return rc < 0 ? -1 : 1;                                                \
    }

GETTER(get_string, to_string, char *)
GETTER(get_size, to_size, uint64_t)
GETTER(get_duration, to_duration, uint64_t)

static int get_uint(ld_t *ld, int t, const char *key, unsigned min,
                    unsigned max, unsigned *out)
{
    if (!push_field(ld, t, key))
        return 0;
    int rc = to_uint(ld, -1, key, min, max, out);
    lua_pop(ld->L, 1);
    return rc < 0 ? -1 : 1;
}

/*
 * Pushes the record (table) field `key` of `t` and returns 1; returns 0 with
 * nothing pushed when absent or (after reporting) not a table. Unknown keys
 * in it are reported against `known`.
 */
static int push_record(ld_t *ld, int t, const char *key,
                       const char *const *known, const char *const *reserved)
{
    if (!push_field(ld, t, key))
        return 0;
    if (lua_type(ld->L, -1) != LUA_TTABLE) {
        fail_type(ld, key, -1, "a table");
        lua_pop(ld->L, 1);
        return 0;
    }
    char saved[sizeof(ld->prefix)];
    memcpy(saved, ld->prefix, sizeof(saved));
    size_t n = strlen(ld->prefix);
    snprintf(ld->prefix + n, sizeof(ld->prefix) - n, "%s.", key);
    check_fields(ld, -1, known, reserved);
    memcpy(ld->prefix, saved, sizeof(saved));
    return 1;
}

/* ---- addresses --------------------------------------------------------- */

/*
 * Parses "host:port", "[v6]:port" or (listen only) ":port" and resolves the
 * host with getaddrinfo (first result). Reports errors naming `field`.
 */
static int parse_addr(ld_t *ld, const char *field, const char *text, int listen,
                      struct sockaddr_storage *ss, socklen_t *sslen)
{
    char host[256];
    const char *colon = strrchr(text, ':'), *port = colon ? colon + 1 : NULL;
    size_t hlen = colon ? (size_t)(colon - text) : 0;
    int v6 = text[0] == '[';
    if (v6 && (hlen < 2 || text[hlen - 1] != ']'))
        colon = NULL;
    if (!v6 && colon && memchr(text, ':', hlen))
        colon = NULL; /* a bare IPv6 address: must be bracketed */
    if (!colon || hlen >= sizeof(host) || (hlen == 0 && !listen)) {
        fail(ld, field, "invalid address \"%s\" (expected host:port%s)", text,
             listen ? ", [v6]:port or :port" : " or [v6]:port");
        return -1;
    }
    memcpy(host, text + v6, hlen - 2 * v6);
    host[hlen - 2 * v6] = '\0';

    char *end;
    long p = strtol(port, &end, 10);
    if (!isdigit((unsigned char)*port) || *end || strlen(port) > 5 || p > 65535
        || (p == 0 && !listen)) {
        fail(ld, field, "invalid port \"%s\"", port);
        return -1;
    }

    struct addrinfo hints = {0}, *res;
    hints.ai_family = v6 ? AF_INET6 : AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | (v6 ? AI_NUMERICHOST : 0);
    int rc = getaddrinfo(hlen ? host : "0.0.0.0", port, &hints, &res);
    if (rc != 0) {
        fail(ld, field, "cannot resolve \"%s\": %s", host, gai_strerror(rc));
        return -1;
    }
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *sslen = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* "10.0.0.0/8", "::1/128", or a bare address (a single host). */
static int parse_cidr(const char *text, mg_cidr_t *c)
{
    char ip[INET6_ADDRSTRLEN];
    const char *slash = strchr(text, '/');
    size_t len = slash ? (size_t)(slash - text) : strlen(text);
    if (len >= sizeof(ip))
        return -1;
    memcpy(ip, text, len);
    ip[len] = '\0';
    memset(c, 0, sizeof(*c));
    if (inet_pton(AF_INET, ip, c->addr) == 1)
        c->family = AF_INET, c->prefix = 32;
    else if (inet_pton(AF_INET6, ip, c->addr) == 1)
        c->family = AF_INET6, c->prefix = 128;
    else
        return -1;
    if (slash) {
        char *end;
        const char *p = slash + 1;
        long bits = strtol(p, &end, 10);
        if (!isdigit((unsigned char)*p) || *end || end - p > 3
            || bits > (long)c->prefix)
            return -1;
        c->prefix = (unsigned)bits;
    }
    for (unsigned i = 0; i < 16; i++) {
        unsigned keep = c->prefix > i * 8 ? c->prefix - i * 8 : 0;
        if (keep < 8)
            c->addr[i] &= (uint8_t)(0xff00u >> keep);
    }
    return 0;
}

/* ---- top level ---------------------------------------------------------- */

/* ld->prefix = a + b, truncated (a and b may not overlap the prefix). */
static void prefix_join(ld_t *ld, const char *a, const char *b)
{
    size_t la = strnlen(a, sizeof(ld->prefix) - 1);
    size_t lb = strnlen(b, sizeof(ld->prefix) - 1 - la);
    memcpy(ld->prefix, a, la);
    memcpy(ld->prefix + la, b, lb);
    ld->prefix[la + lb] = '\0';
}

/* A path from the config: relative ones are taken from the config file's
 * directory (as nginx takes them from its conf directory). */
static char *config_relative(const ld_t *ld, const char *path)
{
    const char *slash = strrchr(ld->file, '/');
    if (path[0] == '/' || !slash)
        return mg_strndup(path, strlen(path));
    size_t dir = (size_t)(slash - ld->file) + 1, len = strlen(path);
    char *p = mg_malloc(dir + len + 1);
    memcpy(p, ld->file, dir);
    memcpy(p + dir, path, len + 1);
    return p;
}

/* { cert = "x.pem", key = "x.key" } at -1, both required: appended to
 * *certs as config-relative paths. */
static void load_cert_pair(ld_t *ld, mg_tls_conf_t *tc)
{
    char *cert = NULL, *key = NULL;
    if (get_string(ld, -1, "cert", &cert) == 0)
        fail(ld, "cert", "required");
    if (get_string(ld, -1, "key", &key) == 0)
        fail(ld, "key", "required");
    if (cert && key) {
        tc->certs =
            mg_realloc(tc->certs, (tc->ncerts + 1) * sizeof(*tc->certs));
        tc->certs[tc->ncerts].cert = config_relative(ld, cert);
        tc->certs[tc->ncerts].key = config_relative(ld, key);
        tc->ncerts++;
    }
    free(cert);
    free(key);
}

/*
 * tls = { cert = , key = , certificates = { { cert = , key = }, ... },
 * ciphers = } at -1: cert/key is the default certificate, the others are
 * chosen by SNI. The files are loaded now, so `moongate check` and a reload
 * report an unreadable file, bad PEM or a key that does not match.
 */
static void load_tls(ld_t *ld, mg_listen_conf_t *lc, const char *saved)
{
    lua_State *L = ld->L;
    mg_tls_conf_t tc = {0};
    char *ciphers = NULL;
    unsigned before = ld->nerrors;
    if (push_field(ld, -1, "cert") || push_field(ld, -1, "key")) {
        lua_pop(L, 1);
        load_cert_pair(ld, &tc);
    }
    size_t n = 0;
    if (push_field(ld, -1, "certificates")) {
        if (list_len(ld, -1, "certificates", &n) == 0) {
            char pre[sizeof(ld->prefix)];
            memcpy(pre, ld->prefix, sizeof(pre));
            for (size_t i = 0; i < n; i++) {
                lua_rawgeti(L, -1, (int)i + 1);
                char item[40];
                snprintf(item, sizeof(item), "certificates[%zu].", i + 1);
                prefix_join(ld, pre, item);
                if (lua_type(L, -1) != LUA_TTABLE) {
                    fail_type(ld, "", -1, "a table { cert = , key = }");
                } else {
                    check_fields(ld, -1, cert_fields, NULL);
                    load_cert_pair(ld, &tc);
                }
                lua_pop(L, 1);
            }
            memcpy(ld->prefix, pre, sizeof(pre));
        }
        lua_pop(L, 1);
    }
    get_string(ld, -1, "ciphers", &ciphers);
    if (ld->nerrors == before && tc.ncerts == 0)
        fail(ld, "cert", "required (or a non-empty certificates list)");
    if (ld->nerrors == before) {
        char err[512];
        tc.ciphers = ciphers;
        tc.h2 = lc->http2;
        lc->tls = mg_tls_new(&tc, err, sizeof(err));
        if (!lc->tls) {
            prefix_join(ld, saved, "");
            fail(ld, "tls", "%s", err);
        }
    }
    for (size_t i = 0; i < tc.ncerts; i++) {
        free(tc.certs[i].cert);
        free(tc.certs[i].key);
    }
    free(tc.certs);
    free(ciphers);
}

static int get_bool(ld_t *ld, int t, const char *key, int *out);

/* { "127.0.0.1:8443", tls = { ... } } at -1, named `f` ("listen[2]"). */
static void load_listen_entry(ld_t *ld, mg_listen_conf_t *lc, const char *f)
{
    lua_State *L = ld->L;
    char saved[sizeof(ld->prefix)];
    memcpy(saved, ld->prefix, sizeof(saved));
    lua_rawgeti(L, -1, 1);
    if (lua_isnil(L, -1))
        fail(ld, f, "the address is required as the first element");
    else if (to_string(ld, -1, f, &lc->text) == 0)
        parse_addr(ld, f, lc->text, 1, &lc->addr, &lc->addrlen);
    lua_pop(L, 1);
    char me[40];
    snprintf(me, sizeof(me), "%s.", f);
    prefix_join(ld, saved, me);
    check_fields_pos(ld, -1, listen_fields, NULL, 1);
    /* Before tls: ALPN offers h2 only when the listener speaks it. */
    get_bool(ld, -1, "http2", &lc->http2);
    char mine[sizeof(ld->prefix)];
    memcpy(mine, ld->prefix, sizeof(mine));
    if (push_record(ld, -1, "tls", tls_fields, NULL)) {
        prefix_join(ld, mine, "tls.");
        load_tls(ld, lc, mine);
        lua_pop(L, 1);
    }
    memcpy(ld->prefix, saved, sizeof(saved));
}

static void load_listen(ld_t *ld, int t)
{
    lua_State *L = ld->L;
    mg_config_t *cfg = ld->cfg;
    size_t n = 1;
    if (!push_field(ld, t, "listen")) {
        fail(ld, "listen", "required");
        return;
    }
    int single = lua_type(L, -1) == LUA_TSTRING;
    if (!single && list_len(ld, -1, "listen", &n) < 0)
        goto out;
    if (n == 0) {
        fail(ld, "listen", "must not be empty");
        goto out;
    }
    cfg->listen = mg_calloc(n, sizeof(*cfg->listen));
    cfg->nlisten = n;
    for (size_t i = 0; i < n; i++) {
        char f[32];
        snprintf(f, sizeof(f), "listen[%zu]", i + 1);
        if (!single)
            lua_rawgeti(L, -1, (int)i + 1);
        mg_listen_conf_t *lc = &cfg->listen[i];
        lc->http2 = 1;
        if (!single && lua_type(L, -1) == LUA_TTABLE)
            load_listen_entry(ld, lc, f);
        else if (to_string(ld, -1, single ? "listen" : f, &lc->text) == 0)
            parse_addr(ld, single ? "listen" : f, lc->text, 1, &lc->addr,
                       &lc->addrlen);
        if (!single)
            lua_pop(L, 1);
    }
out:
    lua_pop(L, 1);
}

static void load_workers(ld_t *ld, int t)
{
    lua_State *L = ld->L;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    ld->cfg->workers = cpus < 1 ? 1 : cpus > 256 ? 256 : (unsigned)cpus;
    if (!push_field(ld, t, "workers"))
        return;
    if (lua_type(L, -1) == LUA_TSTRING) {
        if (strcmp(lua_tostring(L, -1), "auto") != 0)
            fail(ld, "workers", "expected \"auto\" or an integer, got \"%s\"",
                 lua_tostring(L, -1));
    } else if (lua_type(L, -1) == LUA_TNUMBER) {
        to_uint(ld, -1, "workers", 1, 256, &ld->cfg->workers);
    } else {
        fail_type(ld, "workers", -1, "\"auto\" or an integer");
    }
    lua_pop(L, 1);
}

/* Default pid file: "moongate.pid" in the config file's directory. */
static char *default_pid_file(const char *file)
{
    const char *slash = strrchr(file, '/');
    if (!slash)
        return mg_strndup("moongate.pid", 12);
    size_t dir = (size_t)(slash - file) + 1;
    char *p = mg_malloc(dir + sizeof("moongate.pid"));
    memcpy(p, file, dir);
    memcpy(p + dir, "moongate.pid", sizeof("moongate.pid"));
    return p;
}

static void load_log(ld_t *ld, int t)
{
    char *level = NULL;
    mg_config_t *cfg = ld->cfg;
    cfg->error_log = mg_strndup("stderr", 6);
    cfg->log_level = MG_LOG_INFO;
    get_string(ld, t, "error_log", &cfg->error_log);
    if (get_string(ld, t, "log_level", &level) == 1) {
        int lv = mg_log_level_parse(level);
        if (lv < 0)
            fail(ld, "log_level",
                 "expected one of error, warn, info, debug, "
                 "got \"%s\"",
                 level);
        else
            cfg->log_level = lv;
    }
    free(level);
    /* access_log = "path" | "stdout" | false (the default: off). */
    if (push_field(ld, t, "access_log")) {
        lua_State *L = ld->L;
        if (lua_type(L, -1) == LUA_TSTRING && lua_objlen(L, -1) > 0)
            cfg->access_log =
                mg_strndup(lua_tostring(L, -1), lua_objlen(L, -1));
        else if (!(lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1)))
            fail_type(ld, "access_log", -1, "a path, \"stdout\" or false");
        lua_pop(L, 1);
    }
}

/*
 * Pushes the list field `key` and returns its length, or returns -1 with
 * nothing pushed when absent or invalid (reported).
 */
static long push_list(ld_t *ld, int t, const char *key)
{
    size_t n;
    if (!push_field(ld, t, key))
        return -1;
    if (list_len(ld, -1, key, &n) < 0) {
        lua_pop(ld->L, 1);
        return -1;
    }
    return (long)n;
}

static void load_trusted(ld_t *ld, int t)
{
    lua_State *L = ld->L;
    mg_config_t *cfg = ld->cfg;
    long n = push_list(ld, t, "trusted_proxies");
    if (n < 0)
        return;
    cfg->trusted_proxies = mg_calloc((size_t)n, sizeof(mg_cidr_t));
    for (long i = 0; i < n; i++) {
        char f[48];
        snprintf(f, sizeof(f), "trusted_proxies[%ld]", i + 1);
        lua_rawgeti(L, -1, (int)i + 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            fail_type(ld, f, -1, "a string");
        else if (parse_cidr(lua_tostring(L, -1),
                            &cfg->trusted_proxies[cfg->ntrusted_proxies]))
            fail(ld, f, "invalid CIDR \"%s\"", lua_tostring(L, -1));
        else
            cfg->ntrusted_proxies++;
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

static int is_token(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && !strchr("!#$%&'*+-.^_`|~", *s))
            return 0;
    return 1;
}

/* Adds a header name lower-cased, unless already listed. */
static void add_identity(mg_config_t *cfg, const char *name)
{
    size_t len = strlen(name);
    char *lc = mg_strndup(name, len);
    for (size_t i = 0; i < len; i++)
        lc[i] = (char)tolower((unsigned char)lc[i]);
    for (size_t i = 0; i < cfg->nidentity_headers; i++)
        if (strcmp(cfg->identity_headers[i], lc) == 0) {
            free(lc);
            return;
        }
    cfg->identity_headers[cfg->nidentity_headers++] = lc;
}

static void load_identity(ld_t *ld, int t)
{
    lua_State *L = ld->L;
    mg_config_t *cfg = ld->cfg;
    size_t nb = MG_ARRAY_SIZE(builtin_identity);
    long n = push_list(ld, t, "identity_headers");
    cfg->identity_headers =
        mg_calloc(nb + (n > 0 ? (size_t)n : 0), sizeof(char *));
    for (size_t i = 0; i < nb; i++)
        add_identity(cfg, builtin_identity[i]);
    if (n < 0)
        return;
    for (long i = 0; i < n; i++) {
        char f[48];
        snprintf(f, sizeof(f), "identity_headers[%ld]", i + 1);
        lua_rawgeti(L, -1, (int)i + 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            fail_type(ld, f, -1, "a string");
        else if (!is_token(lua_tostring(L, -1)))
            fail(ld, f, "invalid header name \"%s\"", lua_tostring(L, -1));
        else
            add_identity(cfg, lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

static void load_limits(ld_t *ld, int t)
{
    mg_limits_t *l = &ld->cfg->limits;
    l->max_uri = 8 << 10;
    l->max_header_bytes = 32 << 10;
    l->max_header_fields = 100;
    l->max_body = 1 << 20;
    l->header_timeout_ms = 10000;
    l->body_timeout_ms = 10000;
    l->keepalive_timeout_ms = 60000;
    l->send_timeout_ms = 60000;
    l->max_connections = 10000;
    l->drain_timeout_ms = 30000;
    l->h2_max_concurrent_streams = 100;
    if (!push_record(ld, t, "limits", limits_fields, NULL))
        return;
    set_prefix(ld, "limits.");
    get_size(ld, -1, "max_uri", &l->max_uri);
    get_size(ld, -1, "max_header_bytes", &l->max_header_bytes);
    get_uint(ld, -1, "max_header_fields", 1, 65535, &l->max_header_fields);
    get_size(ld, -1, "max_body", &l->max_body);
    get_duration(ld, -1, "header_timeout", &l->header_timeout_ms);
    get_duration(ld, -1, "body_timeout", &l->body_timeout_ms);
    get_duration(ld, -1, "keepalive_timeout", &l->keepalive_timeout_ms);
    get_duration(ld, -1, "send_timeout", &l->send_timeout_ms);
    get_uint(ld, -1, "max_connections", 1, 1u << 24, &l->max_connections);
    get_duration(ld, -1, "drain_timeout", &l->drain_timeout_ms);
    get_uint(ld, -1, "h2_max_concurrent_streams", 1, 100000,
             &l->h2_max_concurrent_streams);
    set_prefix(ld, "");
    lua_pop(ld->L, 1);
}

/* ---- upstreams ---------------------------------------------------------- */

/* Overrides the fields of *to present in the `timeouts` record of `t`. */
static void load_timeouts(ld_t *ld, int t, mg_timeouts_t *to)
{
    if (!push_record(ld, t, "timeouts", timeouts_fields, NULL))
        return;
    set_prefix(ld, "timeouts.");
    get_duration(ld, -1, "connect", &to->connect_ms);
    get_duration(ld, -1, "send", &to->send_ms);
    get_duration(ld, -1, "read", &to->read_ms);
    if (get_duration(ld, -1, "tunnel_idle", &to->tunnel_idle_ms) == 1
        && to->tunnel_idle_ms == 0)
        fail(ld, "tunnel_idle", "must be more than 0");
    set_prefix(ld, "");
    lua_pop(ld->L, 1);
}

/* The host of a valid "host:port" when it is a name rather than an IP
 * literal (a copy), else NULL. */
static char *name_of(const char *text)
{
    const char *colon = strrchr(text, ':');
    unsigned char buf[sizeof(struct in6_addr)];
    char host[256];
    size_t n = (size_t)(colon - text);
    if (text[0] == '[' || n >= sizeof(host))
        return NULL;
    memcpy(host, text, n);
    host[n] = '\0';
    if (inet_pton(AF_INET, host, buf) == 1)
        return NULL;
    return mg_strndup(host, n);
}

/* One target at the top of the stack: "host:port" or { "host:port",
 * weight = n }. */
static void load_target(ld_t *ld, size_t i, mg_target_conf_t *tc)
{
    lua_State *L = ld->L;
    char f[32];
    snprintf(f, sizeof(f), "targets[%zu]", i + 1);
    tc->weight = 1;
    int table = lua_type(L, -1) == LUA_TTABLE;
    if (table) {
        char p[40];
        snprintf(p, sizeof(p), "%s.", f);
        set_prefix(ld, p);
        check_fields_pos(ld, -1, target_fields, NULL, 1);
        get_uint(ld, -1, "weight", 1, 1000, &tc->weight);
        set_prefix(ld, "");
        lua_rawgeti(L, -1, 1);
    } else if (lua_type(L, -1) != LUA_TSTRING) {
        fail_type(ld, f, -1, "\"host:port\" or { \"host:port\", weight = n }");
        return;
    }
    if (to_string(ld, -1, f, &tc->text) == 0
        && strncmp(tc->text, "https://", 8) == 0) {
        tc->https = 1;
        memmove(tc->text, tc->text + 8, strlen(tc->text + 8) + 1);
    }
    if (tc->text
        && parse_addr(ld, f, tc->text, 0, &tc->addr, &tc->addrlen) == 0)
        tc->host = name_of(tc->text);
    if (table)
        lua_pop(L, 1);
}

static void load_targets(ld_t *ld, int t, mg_upstream_conf_t *u)
{
    lua_State *L = ld->L;
    if (!push_field(ld, t, "targets")) {
        fail(ld, "targets", "required");
        return;
    }
    size_t n = 0;
    if (list_len(ld, -1, "targets", &n) == 0 && n == 0)
        fail(ld, "targets", "must have at least one target");
    if (n > 0) {
        u->targets = mg_calloc(n, sizeof(*u->targets));
        u->ntargets = n;
    }
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, -1, (int)i + 1);
        load_target(ld, i, &u->targets[i]);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* A number in [0, 1]. */
static int get_ratio(ld_t *ld, int t, const char *key, double *out)
{
    if (!push_field(ld, t, key))
        return 0;
    lua_State *L = ld->L;
    int rc = 1;
    if (lua_type(L, -1) != LUA_TNUMBER) {
        fail_type(ld, key, -1, "a number between 0 and 1");
        rc = -1;
    } else if (!(lua_tonumber(L, -1) >= 0 && lua_tonumber(L, -1) <= 1)) {
        fail(ld, key, "must be between 0 and 1, got %.14g",
             lua_tonumber(L, -1));
        rc = -1;
    } else {
        *out = lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    return rc;
}

static int get_bool(ld_t *ld, int t, const char *key, int *out)
{
    if (!push_field(ld, t, key))
        return 0;
    int rc = 1;
    if (lua_type(ld->L, -1) != LUA_TBOOLEAN) {
        fail_type(ld, key, -1, "a boolean");
        rc = -1;
    } else {
        *out = lua_toboolean(ld->L, -1);
    }
    lua_pop(ld->L, 1);
    return rc;
}

static void status_add(mg_status_set_t *s, int status)
{
    s->bits[status / 64] |= (uint64_t)1 << (status % 64);
}

static void status_range(mg_status_set_t *s, int from, int to)
{
    for (int i = from; i <= to; i++)
        status_add(s, i);
}

/* The value at the top of the stack as a status (100-599); reports
 * against `field`. */
static int to_status(ld_t *ld, const char *field, int *out)
{
    unsigned v;
    if (to_uint(ld, -1, field, 100, 599, &v) < 0)
        return -1;
    *out = (int)v;
    return 0;
}

/*
 * A list of statuses, or for `retries.on` of statuses and the words
 * "connect" and "timeout" (words != NULL receives them as bits 1, 2).
 * Replaces *set when present.
 */
static void get_statuses(ld_t *ld, int t, const char *key, mg_status_set_t *set,
                         int *words)
{
    lua_State *L = ld->L;
    long n = push_list(ld, t, key);
    if (n < 0)
        return;
    memset(set, 0, sizeof(*set));
    if (words)
        *words = 0;
    for (long i = 0; i < n; i++) {
        char f[48];
        int st;
        snprintf(f, sizeof(f), "%s[%ld]", key, i + 1);
        lua_rawgeti(L, -1, (int)i + 1);
        if (words && lua_type(L, -1) == LUA_TSTRING) {
            const char *w = lua_tostring(L, -1);
            if (strcmp(w, "connect") == 0)
                *words |= 1;
            else if (strcmp(w, "timeout") == 0)
                *words |= 2;
            else
                fail(ld, f,
                     "expected \"connect\", \"timeout\" or a status, "
                     "got \"%s\"",
                     w);
        } else if (lua_type(L, -1) != LUA_TNUMBER) {
            fail_type(ld, f, -1,
                      words ? "a status or \"connect\"/\"timeout\""
                            : "a status");
        } else if (to_status(ld, f, &st) == 0) {
            status_add(set, st);
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* hash_on = "ip" | "consumer" | "path" | "header:NAME" */
static void load_hash_on(ld_t *ld, mg_upstream_conf_t *u)
{
    char *h = NULL;
    u->hash_on = MG_HASH_ON_IP;
    if (get_string(ld, -1, "hash_on", &h) != 1)
        return;
    if (strcmp(h, "ip") == 0)
        u->hash_on = MG_HASH_ON_IP;
    else if (strcmp(h, "consumer") == 0)
        u->hash_on = MG_HASH_ON_CONSUMER;
    else if (strcmp(h, "path") == 0)
        u->hash_on = MG_HASH_ON_PATH;
    else if (strncmp(h, "header:", 7) == 0 && is_token(h + 7)) {
        u->hash_on = MG_HASH_ON_HEADER;
        u->hash_header = mg_strndup(h + 7, strlen(h + 7));
    } else
        fail(ld, "hash_on",
             "expected \"ip\", \"consumer\", \"path\" or \"header:NAME\", "
             "got \"%s\"",
             h);
    if (u->balance_kind != MG_BALANCE_HASH)
        fail(ld, "hash_on", "only used with balance = \"hash\"");
    free(h);
}

static void load_health(ld_t *ld, mg_upstream_conf_t *u)
{
    mg_health_conf_t *h = &u->health;
    h->path = mg_strndup("/health", 7);
    h->interval_ms = 5000;
    h->timeout_ms = 1000;
    h->healthy = 2;
    h->unhealthy = 3;
    status_range(&h->statuses, 200, 399);
    if (!push_record(ld, -1, "health", health_fields, NULL))
        return;
    h->enabled = 1;
    set_prefix(ld, "health.");
    if (get_string(ld, -1, "path", &h->path) == 1 && h->path[0] != '/')
        fail(ld, "path", "must start with '/'");
    for (const char *c = h->path; *c; c++)
        if ((unsigned char)*c <= ' ' || *c == 0x7f) {
            fail(ld, "path", "must not contain spaces or control characters");
            break;
        }
    if (get_duration(ld, -1, "interval", &h->interval_ms) == 1
        && h->interval_ms < 10)
        fail(ld, "interval", "must be at least 0.01 seconds");
    if (get_duration(ld, -1, "timeout", &h->timeout_ms) == 1
        && h->timeout_ms == 0)
        fail(ld, "timeout", "must be more than 0");
    get_uint(ld, -1, "healthy", 1, 1000, &h->healthy);
    get_uint(ld, -1, "unhealthy", 1, 1000, &h->unhealthy);
    get_statuses(ld, -1, "statuses", &h->statuses, NULL);
    set_prefix(ld, "");
    lua_pop(ld->L, 1);
}

static void load_passive(ld_t *ld, mg_upstream_conf_t *u)
{
    mg_passive_conf_t *p = &u->passive;
    p->failures = 3;
    status_add(&p->statuses, 500);
    status_range(&p->statuses, 502, 504);
    p->timeouts = 1;
    p->down_ms = 10000;
    if (!push_record(ld, -1, "passive", passive_fields, NULL))
        return;
    p->enabled = 1;
    set_prefix(ld, "passive.");
    get_uint(ld, -1, "failures", 1, 1000, &p->failures);
    get_statuses(ld, -1, "statuses", &p->statuses, NULL);
    get_bool(ld, -1, "timeouts", &p->timeouts);
    if (get_duration(ld, -1, "down_for", &p->down_ms) == 1 && !p->down_ms)
        fail(ld, "down_for", "must be more than 0");
    set_prefix(ld, "");
    lua_pop(ld->L, 1);
}

static void load_breaker(ld_t *ld, mg_upstream_conf_t *u)
{
    mg_breaker_conf_t *b = &u->breaker;
    b->failures = 5;
    b->failure_ratio = 0.5;
    b->window_ms = 10000;
    b->min_requests = 20;
    b->open_ms = 30000;
    b->half_open_probes = 3;
    status_add(&b->statuses, 500);
    status_range(&b->statuses, 502, 504);
    if (!push_record(ld, -1, "breaker", breaker_fields, NULL))
        return;
    b->enabled = 1;
    set_prefix(ld, "breaker.");
    get_uint(ld, -1, "failures", 0, 100000, &b->failures);
    get_ratio(ld, -1, "failure_ratio", &b->failure_ratio);
    if (get_duration(ld, -1, "window", &b->window_ms) == 1
        && b->window_ms < 100)
        fail(ld, "window", "must be at least 0.1 seconds");
    get_uint(ld, -1, "min_requests", 1, 1000000, &b->min_requests);
    if (get_duration(ld, -1, "open_for", &b->open_ms) == 1 && !b->open_ms)
        fail(ld, "open_for", "must be more than 0");
    get_uint(ld, -1, "half_open_probes", 1, 1000, &b->half_open_probes);
    get_statuses(ld, -1, "statuses", &b->statuses, NULL);
    if (b->failures == 0 && b->failure_ratio == 0)
        fail(ld, "failures",
             "failures and failure_ratio are both 0: the breaker could "
             "never open");
    set_prefix(ld, "");
    lua_pop(ld->L, 1);
}

static void load_retries(ld_t *ld, mg_upstream_conf_t *u)
{
    mg_retry_conf_t *r = &u->retries;
    r->count = 1;
    r->on_connect = 1;
    r->budget = 0.2;
    if (!push_record(ld, -1, "retries", retries_fields, NULL))
        return;
    set_prefix(ld, "retries.");
    get_uint(ld, -1, "count", 0, 10, &r->count);
    int words = 1;
    get_statuses(ld, -1, "on", &r->statuses, &words);
    r->on_connect = words & 1;
    r->on_timeout = (words & 2) != 0;
    get_ratio(ld, -1, "budget", &r->budget);
    get_bool(ld, -1, "retry_non_idempotent", &r->non_idempotent);
    get_duration(ld, -1, "try_timeout", &r->try_timeout_ms);
    get_duration(ld, -1, "total_timeout", &r->total_timeout_ms);
    set_prefix(ld, "");
    lua_pop(ld->L, 1);
}

/* The host of "host:port" or "[v6]:port" (caller frees). */
static char *host_part(const char *text)
{
    const char *colon = strrchr(text, ':');
    size_t n = colon ? (size_t)(colon - text) : strlen(text);
    if (text[0] == '[' && n >= 2)
        return mg_strndup(text + 1, n - 2);
    return mg_strndup(text, n);
}

/*
 * tls = true | false | { ca =, sni =, verify =, cert =, key = } on the
 * upstream at -1, and https:// targets (which turn it on): builds the
 * client context and gives each target its SNI / verified name.
 */
static void load_upstream_tls(ld_t *ld, mg_upstream_conf_t *u)
{
    lua_State *L = ld->L;
    unsigned before = ld->nerrors;
    size_t https = 0;
    for (size_t i = 0; i < u->ntargets; i++)
        https += u->targets[i].https ? 1 : 0;
    if (https && https != u->ntargets)
        fail(ld, "targets", "mixes https:// and plain targets");
    int want = https > 0, is_false = 0;
    char *ca = NULL, *sni = NULL, *cert = NULL, *key = NULL;
    mg_tls_client_conf_t cc = {.verify = 1};
    if (push_field(ld, -1, "tls")) {
        if (lua_type(L, -1) == LUA_TBOOLEAN) {
            want |= lua_toboolean(L, -1);
            is_false = !lua_toboolean(L, -1);
            lua_pop(L, 1);
        } else {
            lua_pop(L, 1);
            if (push_record(ld, -1, "tls", upstream_tls_fields, NULL)) {
                want = 1;
                set_prefix(ld, "tls.");
                get_string(ld, -1, "ca", &ca);
                get_string(ld, -1, "sni", &sni);
                get_string(ld, -1, "cert", &cert);
                get_string(ld, -1, "key", &key);
                if (push_field(ld, -1, "verify")) {
                    if (lua_type(L, -1) == LUA_TBOOLEAN)
                        cc.verify = lua_toboolean(L, -1);
                    else
                        fail_type(ld, "verify", -1, "a boolean");
                    lua_pop(L, 1);
                }
                if (!cert != !key)
                    fail(ld, cert ? "key" : "cert", "required with a client %s",
                         cert ? "cert" : "key");
                set_prefix(ld, "");
                lua_pop(L, 1);
            }
        }
    }
    if (is_false && https)
        fail(ld, "tls", "is false, but the targets are https://");
    if (want && ld->nerrors == before) {
        char *paths[3] = {ca ? config_relative(ld, ca) : NULL,
                          cert ? config_relative(ld, cert) : NULL,
                          key ? config_relative(ld, key) : NULL};
        char err[512];
        cc.ca = paths[0];
        cc.cert = paths[1];
        cc.key = paths[2];
        u->tls = mg_tls_client_new(&cc, err, sizeof(err));
        if (!u->tls)
            fail(ld, "tls", "%s", err);
        for (size_t i = 0; u->tls && i < u->ntargets; i++) {
            mg_target_conf_t *tc = &u->targets[i];
            tc->tls = u->tls;
            tc->tls_name =
                sni ? mg_strndup(sni, strlen(sni)) : host_part(tc->text);
        }
        for (int i = 0; i < 3; i++)
            free(paths[i]);
    }
    free(ca);
    free(sni);
    free(cert);
    free(key);
}

/* The upstream record at the top of the stack. */
static void load_upstream(ld_t *ld, mg_upstream_conf_t *u)
{
    u->balance = mg_strndup("round_robin", 11);
    u->timeouts = (mg_timeouts_t){5000, 60000, 60000, 60000};
    u->keepalive_max_idle = 64;
    u->keepalive_idle_ms = 60000;
    u->max_pending = 1024;
    u->dns_refresh_ms = 30000;
    check_fields(ld, -1, upstream_fields, NULL);
    load_targets(ld, -1, u);
    if (get_duration(ld, -1, "dns_refresh", &u->dns_refresh_ms) == 1
        && u->dns_refresh_ms && u->dns_refresh_ms < 100)
        fail(ld, "dns_refresh", "must be 0 (never) or at least 0.1 seconds");
    for (size_t i = 0; i < u->ntargets; i++)
        u->targets[i].resolve_ms = u->targets[i].host ? u->dns_refresh_ms : 0;
    if (get_string(ld, -1, "balance", &u->balance) == 1
        && mg_balancer_kind_parse(u->balance) < 0)
        fail(ld, "balance",
             "expected one of \"round_robin\", \"weighted\", "
             "\"least_conn\", \"hash\", \"p2c\", got \"%s\"",
             u->balance);
    u->balance_kind = mg_balancer_kind_parse(u->balance);
    load_hash_on(ld, u);
    load_health(ld, u);
    load_passive(ld, u);
    load_breaker(ld, u);
    load_retries(ld, u);
    load_timeouts(ld, -1, &u->timeouts);
    if (push_record(ld, -1, "keepalive", keepalive_fields, NULL)) {
        set_prefix(ld, "keepalive.");
        get_uint(ld, -1, "max_idle", 0, 65535, &u->keepalive_max_idle);
        get_duration(ld, -1, "idle_timeout", &u->keepalive_idle_ms);
        set_prefix(ld, "");
        lua_pop(ld->L, 1);
    }
    get_uint(ld, -1, "max_pending", 0, 1u << 24, &u->max_pending);
    load_upstream_tls(ld, u);
}

static int cmp_upstream(const void *a, const void *b)
{
    return strcmp(((const mg_upstream_conf_t *)a)->name,
                  ((const mg_upstream_conf_t *)b)->name);
}

/*
 * Upstreams are stored sorted by name, so indexes and error order do not
 * depend on Lua's hash order. Every string-keyed entry gets a slot, even an
 * invalid one, so routes naming it get no second, misleading error.
 */
static int cmp_zone(const void *a, const void *b)
{
    return strcmp(((const mg_zone_conf_t *)a)->name,
                  ((const mg_zone_conf_t *)b)->name);
}

/* shared = { name = size, ... }: the shared-memory zones. */
static void load_shared(ld_t *ld, int t)
{
    lua_State *L = ld->L;
    mg_config_t *cfg = ld->cfg;
    if (!push_field(ld, t, "shared"))
        return;
    if (lua_type(L, -1) != LUA_TTABLE) {
        fail_type(ld, "shared", -1, "a table of name = size");
        lua_pop(L, 1);
        return;
    }
    size_t n = 0;
    for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1))
        n++;
    cfg->zones = mg_calloc(n ? n : 1, sizeof(*cfg->zones));
    for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1)) {
        char v[80];
        const char *name =
            lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "";
        size_t len = strlen(name);
        int ok = len > 0 && len < 32;
        for (size_t i = 0; i < len; i++)
            ok &= isalnum((unsigned char)name[i]) || name[i] == '_';
        if (!ok) {
            fail(ld, "shared",
                 "zone names are 1-31 letters, digits or _, "
                 "got %s",
                 show(L, -2, v, sizeof(v)));
            continue;
        }
        char field[48];
        snprintf(field, sizeof(field), "shared.%s", name);
        mg_zone_conf_t *z = &cfg->zones[cfg->nzones];
        if (to_size(ld, -1, field, &z->size) != 0)
            continue;
        if (z->size < (64u << 10)) {
            fail(ld, field, "must be at least 64k");
            continue;
        }
        z->name = mg_strndup(name, len);
        cfg->nzones++;
    }
    qsort(cfg->zones, cfg->nzones, sizeof(*cfg->zones), cmp_zone);
    lua_pop(L, 1);
}

static void load_upstreams(ld_t *ld, int t)
{
    lua_State *L = ld->L;
    mg_config_t *cfg = ld->cfg;
    if (!push_field(ld, t, "upstreams"))
        return;
    if (lua_type(L, -1) != LUA_TTABLE) {
        fail_type(ld, "upstreams", -1, "a table of name = upstream");
        lua_pop(L, 1);
        return;
    }
    size_t n = 0;
    for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1))
        n++;
    cfg->upstreams = mg_calloc(n ? n : 1, sizeof(*cfg->upstreams));
    for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1)) {
        char v[80];
        if (lua_type(L, -2) != LUA_TSTRING || !lua_objlen(L, -2)) {
            fail(ld, "upstreams", "names must be non-empty strings, got %s",
                 show(L, -2, v, sizeof(v)));
            continue;
        }
        size_t len;
        const char *name = lua_tolstring(L, -2, &len);
        cfg->upstreams[cfg->nupstreams++].name = mg_strndup(name, len);
    }
    qsort(cfg->upstreams, cfg->nupstreams, sizeof(*cfg->upstreams),
          cmp_upstream);
    for (size_t i = 0; i < cfg->nupstreams; i++) {
        mg_upstream_conf_t *u = &cfg->upstreams[i];
        set_where(ld, "upstreams.%s", u->name);
        lua_pushstring(L, u->name);
        lua_rawget(L, -2);
        if (lua_type(L, -1) == LUA_TTABLE)
            load_upstream(ld, u);
        else
            fail_type(ld, "upstream", -1, "a table");
        lua_pop(L, 1);
    }
    set_where(ld, "top level");
    lua_pop(L, 1);
}

/* ---- routes ------------------------------------------------------------- */

static void load_methods(ld_t *ld, mg_route_conf_t *r)
{
    lua_State *L = ld->L;
    long n = push_list(ld, -1, "methods");
    if (n < 0)
        return;
    if (n == 0)
        fail(ld, "methods", "must not be empty (leave it out for any method)");
    for (long i = 0; i < n; i++) {
        char f[32];
        snprintf(f, sizeof(f), "methods[%ld]", i + 1);
        lua_rawgeti(L, -1, (int)i + 1);
        size_t k = 0;
        if (lua_type(L, -1) != LUA_TSTRING) {
            fail_type(ld, f, -1, "a string");
        } else {
            while (k < MG_ARRAY_SIZE(methods)
                   && strcmp(methods[k].name, lua_tostring(L, -1)) != 0)
                k++;
            if (k < MG_ARRAY_SIZE(methods))
                r->methods |= 1ull << methods[k].bit;
            else
                fail(ld, f,
                     "unknown method \"%s\" (expected one of GET, "
                     "HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, "
                     "PATCH)",
                     lua_tostring(L, -1));
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

static void load_hosts(ld_t *ld, mg_route_conf_t *r)
{
    lua_State *L = ld->L;
    long n = push_list(ld, -1, "hosts");
    if (n < 0)
        return;
    if (n == 0)
        fail(ld, "hosts", "must not be empty (leave it out for any host)");
    r->hosts = mg_calloc(n ? (size_t)n : 1, sizeof(char *));
    for (long i = 0; i < n; i++) {
        char f[32];
        snprintf(f, sizeof(f), "hosts[%ld]", i + 1);
        lua_rawgeti(L, -1, (int)i + 1);
        char **h = &r->hosts[r->nhosts];
        if (to_string(ld, -1, f, h) == 0 && !**h)
            fail(ld, f, "must not be empty");
        if (*h)
            r->nhosts++;
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/*
 * strip_prefix: a literal string starting with '/', false, or true for "the
 * pattern's literal part before its trailing slash-star": "/users/" "*"
 * strips "/users", the catch-all pattern strips nothing.
 */
static void load_strip(ld_t *ld, mg_route_conf_t *r)
{
    lua_State *L = ld->L;
    if (!push_field(ld, -1, "strip_prefix"))
        return;
    if (lua_type(L, -1) == LUA_TSTRING) {
        if (to_string(ld, -1, "strip_prefix", &r->strip_prefix) == 0
            && r->strip_prefix[0] != '/')
            fail(ld, "strip_prefix", "must start with '/'");
    } else if (lua_type(L, -1) != LUA_TBOOLEAN) {
        fail_type(ld, "strip_prefix", -1, "a string or true");
    } else if (lua_toboolean(L, -1) && r->path) {
        size_t len = strlen(r->path);
        if (len < 2 || strcmp(r->path + len - 2, "/*") != 0)
            fail(ld, "strip_prefix", "true needs a path ending in \"/*\"");
        else if (memchr(r->path, '{', len))
            fail(ld, "strip_prefix",
                 "true needs a literal path, but the "
                 "path has parameters");
        else if (len > 2)
            r->strip_prefix = mg_strndup(r->path, len - 2);
    }
    lua_pop(L, 1);
}

static int find_upstream(const mg_config_t *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->nupstreams; i++)
        if (strcmp(cfg->upstreams[i].name, name) == 0)
            return (int)i;
    return -1;
}

/* path, name and upstream; sets the route's context for later errors. */
static void load_route_head(ld_t *ld, size_t i, mg_route_conf_t *r)
{
    set_where(ld, "routes[%zu]", i + 1);
    if (get_string(ld, -1, "path", &r->path) == 0)
        fail(ld, "path", "required");
    if (r->path) {
        set_where(ld, "routes[%zu] \"%s\"", i + 1, r->path);
        if (r->path[0] != '/')
            fail(ld, "path", "must start with '/'");
    }
    get_string(ld, -1, "name", &r->name);
    if (!r->name && r->path)
        r->name = mg_strndup(r->path, strlen(r->path));

    char *up = NULL;
    r->upstream = -1;
    /* A route answered by a Lua handler needs no upstream. */
    lua_pushliteral(ld->L, "handler");
    lua_rawget(ld->L, -2);
    r->has_handler = lua_isfunction(ld->L, -1);
    if (!lua_isnil(ld->L, -1) && !r->has_handler)
        fail(ld, "handler", "expected a function, got %s",
             luaL_typename(ld->L, -1));
    lua_pop(ld->L, 1);
    if (get_string(ld, -1, "upstream", &up) == 0 && !r->has_handler)
        fail(ld, "upstream", "required (or a handler)");
    if (up) {
        r->upstream = find_upstream(ld->cfg, up);
        if (r->upstream < 0)
            fail(ld, "upstream", "no upstream named \"%s\"", up);
    }
    free(up);
}

/* The route record at the top of the stack. */
static void load_route(ld_t *ld, size_t i, mg_route_conf_t *r)
{
    mg_config_t *cfg = ld->cfg;
    load_route_head(ld, i, r);
    check_fields(ld, -1, route_fields, route_reserved);
    load_methods(ld, r);
    load_hosts(ld, r);
    load_strip(ld, r);
    if (get_string(ld, -1, "rewrite", &r->rewrite) == 1 && r->rewrite[0] != '/')
        fail(ld, "rewrite", "must start with '/'");
    r->timeouts = r->upstream >= 0 ? cfg->upstreams[r->upstream].timeouts
                                   : (mg_timeouts_t){5000, 60000, 60000, 60000};
    load_timeouts(ld, -1, &r->timeouts);
    r->max_body = cfg->limits.max_body;
    get_size(ld, -1, "max_body", &r->max_body);
}

static void load_routes(ld_t *ld, int t)
{
    lua_State *L = ld->L;
    mg_config_t *cfg = ld->cfg;
    long n = push_list(ld, t, "routes");
    if (n <= 0) {
        if (n == 0)
            lua_pop(L, 1);
        return;
    }
    cfg->routes = mg_calloc((size_t)n, sizeof(*cfg->routes));
    cfg->nroutes = (size_t)n;
    for (long i = 0; i < n; i++) {
        lua_rawgeti(L, -1, (int)i + 1);
        if (lua_type(L, -1) == LUA_TTABLE) {
            load_route(ld, (size_t)i, &cfg->routes[i]);
        } else {
            char f[32];
            snprintf(f, sizeof(f), "routes[%ld]", i + 1);
            fail_type(ld, f, -1, "a table");
        }
        set_where(ld, "top level");
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* ---- admin --------------------------------------------------------------- */

static int is_loopback(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        return (ntohl(a->sin_addr.s_addr) >> 24) == 127;
    }
    if (ss->ss_family == AF_INET6) {
        const struct in6_addr *a =
            &((const struct sockaddr_in6 *)ss)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(a)
               || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
    }
    return 0;
}

/* admin = { listen = "127.0.0.1:9901", token = "...", allow_remote = bool }:
 * loopback only unless allow_remote, since /reload changes what runs. */
static void load_admin(ld_t *ld, int t)
{
    lua_State *L = ld->L;
    mg_admin_conf_t *a = &ld->cfg->admin;
    if (!push_record(ld, t, "admin", admin_fields, NULL))
        return;
    snprintf(ld->prefix, sizeof(ld->prefix), "admin.");
    if (push_field(ld, -1, "allow_remote")) {
        if (lua_type(L, -1) == LUA_TBOOLEAN)
            a->allow_remote = lua_toboolean(L, -1);
        else
            fail_type(ld, "allow_remote", -1, "a boolean");
        lua_pop(L, 1);
    }
    if (get_string(ld, -1, "listen", &a->listen.text) == 0)
        fail(ld, "listen", "required");
    if (a->listen.text
        && parse_addr(ld, "listen", a->listen.text, 1, &a->listen.addr,
                      &a->listen.addrlen)
               == 0
        && !a->allow_remote && !is_loopback(&a->listen.addr))
        fail(ld, "listen",
             "\"%s\" is not a loopback address; the admin API can reload "
             "the gateway, so set admin.allow_remote = true (and a token) "
             "to expose it",
             a->listen.text);
    if (get_string(ld, -1, "token", &a->token) == 1 && !a->token[0])
        fail(ld, "token", "must not be empty");
    for (size_t i = 0; a->listen.text && i < ld->cfg->nlisten; i++)
        if (ld->cfg->listen[i].text
            && ld->cfg->listen[i].addrlen == a->listen.addrlen
            && memcmp(&ld->cfg->listen[i].addr, &a->listen.addr,
                      a->listen.addrlen)
                   == 0)
            fail(ld, "listen", "\"%s\" is also a proxy listener",
                 a->listen.text);
    ld->prefix[0] = '\0';
    lua_pop(L, 1);
}

/* ---- Lua glue ----------------------------------------------------------- */

/* env(name[, default]): the environment variable, else default (or nil). */
static int lua_env(lua_State *L)
{
    const char *v = getenv(luaL_checkstring(L, 1));
    if (v)
        lua_pushstring(L, v);
    else
        lua_settop(L, 2);
    return 1;
}

/* Runs under lua_pcall: (config table, loader) -> nothing. */
static int convert(lua_State *L)
{
    ld_t *ld = lua_touserdata(L, 2);
    lua_settop(L, 1);
    luaL_checkstack(L, 40, "config nesting");
    set_where(ld, "top level");
    check_fields(ld, 1, top_fields, top_reserved);
    load_listen(ld, 1);
    load_workers(ld, 1);
    if (get_string(ld, 1, "pid_file", &ld->cfg->pid_file) == 0)
        ld->cfg->pid_file = default_pid_file(ld->file);
    load_log(ld, 1);
    load_trusted(ld, 1);
    load_identity(ld, 1);
    load_limits(ld, 1);
    load_shared(ld, 1);
    load_upstreams(ld, 1);
    load_routes(ld, 1);
    load_admin(ld, 1);
    if (push_field(ld, 1, "watch")) {
        if (lua_type(L, -1) == LUA_TBOOLEAN)
            ld->cfg->watch = lua_toboolean(L, -1);
        else
            fail_type(ld, "watch", -1, "a boolean");
        lua_pop(L, 1);
    }
    return 0;
}

static void fail_lua(ld_t *ld)
{
    const char *msg = lua_tostring(ld->L, -1);
    fail_file(ld, msg ? msg : "(error object is not a string)");
}

/* Loads and runs the chunk, then converts the table it returns. */
static void run(ld_t *ld)
{
    lua_State *L = ld->L;
    luaL_openlibs(L);
    lua_pushcfunction(L, lua_env);
    lua_setglobal(L, "env");
    /* A config may require the gw API for its inline plugins and handlers
     * (they only run in the workers' VMs; here they are just values). */
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/lua/?.lua;%s", mg_lua_root(), lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 2);
    if (luaL_loadfile(L, ld->file) != 0 || lua_pcall(L, 0, 1, 0) != 0) {
        fail_lua(ld);
        return;
    }
    if (lua_type(L, -1) != LUA_TTABLE) {
        char msg[96];
        snprintf(msg, sizeof(msg), "the chunk must return a table, got %s",
                 type_of(L, -1));
        fail_file(ld, msg);
        return;
    }
    lua_pushcfunction(L, convert);
    lua_insert(L, -2);
    lua_pushlightuserdata(L, ld);
    if (lua_pcall(L, 2, 0, 0) != 0)
        fail_lua(ld);
}

/* ---- public ------------------------------------------------------------- */

int mg_config_load(const char *path, mg_config_t **out, char *err,
                   size_t errlen)
{
    ld_t ld = {.file = path, .err = err, .errlen = errlen};
    *out = NULL;
    if (err && errlen)
        err[0] = '\0';
    ld.cfg = mg_calloc(1, sizeof(*ld.cfg));
    ld.cfg->file = mg_strndup(path, strlen(path));
    ld.L = luaL_newstate();
    if (!ld.L) {
        fail_file(&ld, "cannot create a Lua state");
    } else {
        run(&ld);
        lua_close(ld.L);
    }
    if (ld.nerrors) {
        mg_config_free(ld.cfg);
        return MG_ECONFIG;
    }
    *out = ld.cfg;
    return 0;
}

static void free_strv(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

static void free_upstream(mg_upstream_conf_t *u)
{
    for (size_t i = 0; i < u->ntargets; i++) {
        free(u->targets[i].text);
        free(u->targets[i].host);
        free(u->targets[i].tls_name);
    }
    free(u->targets);
    free(u->name);
    free(u->balance);
    free(u->hash_header);
    free(u->health.path);
    mg_tls_client_unref(u->tls);
}

static void free_route(mg_route_conf_t *r)
{
    free(r->name);
    free(r->path);
    free_strv(r->hosts, r->nhosts);
    free(r->strip_prefix);
    free(r->rewrite);
}

void mg_config_free(mg_config_t *cfg)
{
    if (!cfg)
        return;
    for (size_t i = 0; i < cfg->nlisten; i++) {
        free(cfg->listen[i].text);
        mg_tls_unref(cfg->listen[i].tls);
    }
    free(cfg->listen);
    for (size_t i = 0; i < cfg->nupstreams; i++)
        free_upstream(&cfg->upstreams[i]);
    free(cfg->upstreams);
    for (size_t i = 0; i < cfg->nroutes; i++)
        free_route(&cfg->routes[i]);
    free(cfg->routes);
    for (size_t i = 0; i < cfg->nzones; i++)
        free(cfg->zones[i].name);
    free(cfg->zones);
    free_strv(cfg->identity_headers, cfg->nidentity_headers);
    free(cfg->trusted_proxies);
    free(cfg->file);
    free(cfg->pid_file);
    free(cfg->error_log);
    free(cfg->access_log);
    free(cfg->admin.listen.text);
    free(cfg->admin.token);
    free(cfg);
}

static int prefix_match(const uint8_t *a, const uint8_t *net, unsigned bits)
{
    unsigned whole = bits / 8, rest = bits % 8;
    if (memcmp(a, net, whole) != 0)
        return 0;
    return rest == 0
           || ((a[whole] ^ net[whole]) & (uint8_t)(0xff00u >> rest)) == 0;
}

/*
 * A v4-mapped v6 address (a v4 client on a dual-stack socket) is an IPv4
 * client: it is matched against the IPv4 blocks only.
 */
int mg_cidr_match(const mg_cidr_t *blocks, size_t n,
                  const struct sockaddr *addr)
{
    const uint8_t *a;
    int family = addr->sa_family;
    if (family == AF_INET) {
        a = (const uint8_t *)&((const struct sockaddr_in *)addr)->sin_addr;
    } else if (family == AF_INET6) {
        const struct in6_addr *a6 =
            &((const struct sockaddr_in6 *)addr)->sin6_addr;
        a = a6->s6_addr;
        if (IN6_IS_ADDR_V4MAPPED(a6)) {
            family = AF_INET;
            a += 12;
        }
    } else {
        return 0;
    }
    for (size_t i = 0; i < n; i++)
        if (blocks[i].family == family
            && prefix_match(a, blocks[i].addr, blocks[i].prefix))
            return 1;
    return 0;
}
