/*
 * The configuration: a Lua file returning a table, loaded with LuaJIT into
 * plain C structures and validated in full. Every error names the file, the
 * place in the table (route index and pattern, upstream name) and the field.
 * This module knows nothing of sockets or requests; the worker compiles a
 * loaded config into a generation (routes, upstream runtime state).
 */
#ifndef MG_CONFIG_H
#define MG_CONFIG_H

#include <netinet/in.h>
#include <sys/socket.h>

#include "common.h"
#include "tls.h"

typedef struct mg_config_s mg_config_t;

/* A listen address: "0.0.0.0:8080", "127.0.0.1:0", "[::1]:8080", ":8080". */
typedef struct {
    char *text; /* as written in the config */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    mg_tls_t *tls; /* `{ ADDR, tls = { ... } }`: this config's certificates
                      (a reference); NULL: plain HTTP */
    int http2;     /* `http2 = false` turns HTTP/2 off (default on): ALPN
                      h2 over TLS, h2c prior knowledge on plain */
} mg_listen_conf_t;

/* An IPv4 or IPv6 CIDR block; an IPv4 block also matches v4-mapped v6. */
typedef struct {
    int family;       /* AF_INET or AF_INET6 */
    uint8_t addr[16]; /* network byte order, host bits cleared */
    unsigned prefix;  /* bits */
} mg_cidr_t;

/* All durations are milliseconds, all sizes bytes. */
typedef struct {
    uint64_t connect_ms, send_ms, read_ms;
    uint64_t tunnel_idle_ms; /* an upgraded connection (WebSocket) with no
                                byte either way for this long is closed */
} mg_timeouts_t;

typedef struct {
    char *text;                   /* "127.0.0.1:9001" as written */
    struct sockaddr_storage addr; /* resolved at load time */
    socklen_t addrlen;
    unsigned weight;      /* default 1 */
    char *host;           /* the host when it is a name, not an IP literal:
                             re-resolved every resolve_ms; NULL otherwise */
    uint64_t resolve_ms;  /* the upstream's dns_refresh; 0: never */
    int https;            /* written as "https://host:port" */
    mg_tls_client_t *tls; /* the upstream's TLS context (borrowed), or
                             NULL: plain HTTP */
    char *tls_name;       /* SNI and the name verified: `tls.sni`, else
                             the target's host (or IP) */
} mg_target_conf_t;

/* A set of HTTP status codes (0..639), e.g. `statuses = { 502, 503 }`. */
typedef struct {
    uint64_t bits[10];
} mg_status_set_t;

static inline int mg_status_set_has(const mg_status_set_t *s, int status)
{
    return status >= 0 && status < 640
           && (s->bits[status / 64] >> (status % 64) & 1);
}

/* `hash_on`: where the consistent-hash key comes from. */
enum { MG_HASH_ON_IP, MG_HASH_ON_HEADER, MG_HASH_ON_CONSUMER, MG_HASH_ON_PATH };

/* `health = { ... }`: active checks (HTTP GET), off unless configured. */
typedef struct {
    int enabled;
    char *path;               /* default "/health" */
    uint64_t interval_ms;     /* default 5 s */
    uint64_t timeout_ms;      /* default 1 s */
    unsigned healthy;         /* successes in a row to restore, default 2 */
    unsigned unhealthy;       /* failures in a row to take down, default 3 */
    mg_status_set_t statuses; /* healthy statuses, default 200-399 */
} mg_health_conf_t;

/* `passive = { ... }`: real traffic marks a target down. */
typedef struct {
    int enabled;
    unsigned failures;        /* in a row to take down, default 3 */
    mg_status_set_t statuses; /* count as failures, default 500, 502-504 */
    int timeouts;             /* a timeout counts, default true */
    uint64_t down_ms;         /* without active checks: down this long,
                                 default 10 s (with them: until they
                                 restore it) */
} mg_passive_conf_t;

/* `breaker = { ... }`: per-target circuit breaker, off unless configured. */
typedef struct {
    int enabled;
    unsigned failures;         /* consecutive, default 5; 0: off */
    double failure_ratio;      /* over the window, default 0.5; 0: off */
    uint64_t window_ms;        /* default 10 s */
    unsigned min_requests;     /* in the window before the ratio counts,
                                  default 20 */
    uint64_t open_ms;          /* cool-down, default 30 s */
    unsigned half_open_probes; /* default 3 */
    mg_status_set_t statuses;  /* failures, default 500, 502-504 */
} mg_breaker_conf_t;

/* `retries = { ... }`. */
typedef struct {
    unsigned count;            /* extra tries, default 1 */
    int on_connect;            /* connect failure (default on) */
    int on_timeout;            /* connect/read timeout before any response
                                  byte (default off) */
    mg_status_set_t statuses;  /* retried statuses (default none) */
    double budget;             /* retries / requests, default 0.2 */
    int non_idempotent;        /* retry_non_idempotent, default false */
    uint64_t try_timeout_ms;   /* per try read timeout, 0: timeouts.read */
    uint64_t total_timeout_ms; /* no new try after this, 0: none */
} mg_retry_conf_t;

typedef struct {
    char *name;
    mg_target_conf_t *targets;
    size_t ntargets;
    char *balance;     /* "round_robin" (default), "weighted",
                          "least_conn", "hash", "p2c" */
    int balance_kind;  /* mg_balancer_kind_t */
    int hash_on;       /* MG_HASH_ON_*, default ip */
    char *hash_header; /* hash_on = "header:NAME" */
    mg_health_conf_t health;
    mg_passive_conf_t passive;
    mg_breaker_conf_t breaker;
    mg_retry_conf_t retries;
    uint64_t dns_refresh_ms;     /* host-name targets re-resolved, default
                                    30 s; 0: only at load */
    mg_timeouts_t timeouts;      /* defaults 5 s connect, 60 s send/read/
                                    tunnel_idle */
    unsigned keepalive_max_idle; /* idle conns kept per target, default 64 */
    uint64_t keepalive_idle_ms;  /* default 60 s */
    unsigned max_pending;        /* requests waiting for a conn, default
                                    1024; beyond: 503 */
    mg_tls_client_t *tls;        /* `tls` or https:// targets; NULL: plain */
} mg_upstream_conf_t;

typedef struct {
    char *name;       /* `name` field, or the path pattern */
    char *path;       /* pattern, see router.h */
    uint64_t methods; /* bit (1 << llhttp method); 0 = any */
    char **hosts;
    size_t nhosts;
    int upstream;           /* index into config->upstreams; -1 for a
                               route answered by its Lua handler */
    int has_handler;        /* `handler` is a Lua function */
    char *strip_prefix;     /* NULL = none; literal prefix removed from the
                               proxied path when it starts with it. `true`
                               in the config means the pattern's literal
                               part before a trailing '*'. */
    char *rewrite;          /* NULL = none; template, "{name}" replaced by
                               a path parameter, "{*}" by the wildcard */
    mg_timeouts_t timeouts; /* the upstream's, overridden per field */
    uint64_t max_body;      /* the global limit unless set per route */
    /* The route's series in the shared metrics (metrics.h), set by the
     * worker when it builds a generation; 0 until then. */
    unsigned metrics_series;
} mg_route_conf_t;

typedef struct {
    uint64_t max_uri;              /* 8 KiB -> 414 */
    uint64_t max_header_bytes;     /* 32 KiB -> 431 */
    unsigned max_header_fields;    /* 100 -> 431 */
    uint64_t max_body;             /* 1 MiB -> 413, default for routes */
    uint64_t header_timeout_ms;    /* 10 s -> 408 and close */
    uint64_t body_timeout_ms;      /* 10 s between body reads -> 408 */
    uint64_t keepalive_timeout_ms; /* 60 s idle keep-alive */
    uint64_t send_timeout_ms;      /* 60 s: a client that takes no response
                                      byte for that long is cut off */
    unsigned max_connections;      /* per worker, default 10000 */
    uint64_t drain_timeout_ms; /* graceful stop / worker replacement, 30 s */
    unsigned h2_max_concurrent_streams; /* HTTP/2 SETTINGS, default 100 */
} mg_limits_t;

/* A shared-memory zone: `shared = { limits = "16m" }`. */
typedef struct {
    char *name;
    uint64_t size;
} mg_zone_conf_t;

/* The admin listener: `admin = { listen = "127.0.0.1:9901", token = .. }`. */
typedef struct {
    mg_listen_conf_t listen; /* listen.text NULL: no admin listener */
    char *token;             /* NULL: no token required */
    int allow_remote;        /* a non-loopback address was allowed */
} mg_admin_conf_t;

struct mg_config_s {
    char *file; /* path it was loaded from */
    mg_listen_conf_t *listen;
    size_t nlisten;
    unsigned workers; /* "auto" resolves to the number of cores */
    char *pid_file;   /* default "moongate.pid" beside the config */
    char *error_log;  /* path, or "stderr" (default) */
    char *access_log; /* path, "stdout", or NULL: off (the default) */
    int log_level;    /* MG_LOG_* from log.h, default info */
    mg_cidr_t *trusted_proxies;
    size_t ntrusted_proxies;
    char **identity_headers; /* stripped from every client request:
                                the built-in list plus configured ones */
    size_t nidentity_headers;
    mg_limits_t limits;
    mg_upstream_conf_t *upstreams;
    size_t nupstreams;
    mg_route_conf_t *routes;
    size_t nroutes;
    mg_zone_conf_t *zones; /* sorted by name */
    size_t nzones;
    mg_admin_conf_t admin;
    int watch; /* reload when the config file changes (master.c) */
};

/*
 * Loads and validates the config file at `path`. The Lua chunk runs with a
 * global `env(name[, default])` returning the environment variable. On
 * success *out owns a new config (free with mg_config_free) and 0 is
 * returned. On failure returns MG_ECONFIG and writes every error found, one
 * per line ("FILE: routes[2] \"/users/{id}\": upstream: no upstream
 * named \"user\""), into err (truncated to errlen, always NUL-terminated).
 * May block (file read, name resolution): master or start-up only, or a
 * worker's reload, never inside a request.
 */
int mg_config_load(const char *path, mg_config_t **out, char *err,
                   size_t errlen);

void mg_config_free(mg_config_t *cfg);

/* True when `addr` (AF_INET or AF_INET6) falls in one of the blocks. */
int mg_cidr_match(const mg_cidr_t *blocks, size_t n,
                  const struct sockaddr *addr);

#endif
