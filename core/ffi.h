/*
 * The functions LuaJIT calls through the FFI (lua/moongate/cdef.lua mirrors
 * this list; MG_FFI_VERSION guards against drift). They are synchronous,
 * allocate only from the request arena, and never call back into Lua.
 * Request pointers are the ones the runtime received for a request still
 * in progress.
 */
#ifndef MG_FFI_H
#define MG_FFI_H

#include "http.h"

#define MG_FFI_VERSION 6

typedef struct mg_lua_task_s mg_lua_task_t;

int mg_ffi_version(void);

/*
 * Getters write through an out pointer rather than return a struct: LuaJIT
 * cannot compile calls to C functions returning structs by value, and a
 * plugin's hot path would stay in the interpreter.
 */

/* The client address as trusted_proxies decide it (not an FFI call: the
 * access log uses it too). */
mg_str_t mg_req_client_ip(mg_req_t *r);

void mg_ffi_req_method(mg_req_t *r, mg_str_t *out);
void mg_ffi_req_path(mg_req_t *r, mg_str_t *out);
void mg_ffi_req_query(mg_req_t *r, mg_str_t *out);
void mg_ffi_req_host(mg_req_t *r, mg_str_t *out);
/* "https" on a TLS listener, else "http". */
void mg_ffi_req_scheme(mg_req_t *r, mg_str_t *out);
void mg_ffi_req_client_ip(mg_req_t *r, mg_str_t *out);
void mg_ffi_req_id(mg_req_t *r, mg_str_t *out);
/* 0, -1 for a path that does not normalize (it must stay canonical), -2
 * outside rewrite/access/handler. */
int mg_ffi_req_set_path(mg_req_t *r, const char *p, size_t len);
int mg_ffi_req_set_query(mg_req_t *r, const char *p, size_t len);
/* 0 and *value, or MG_DECLINED. */
int mg_ffi_req_param(mg_req_t *r, const char *name, size_t nlen,
                     mg_str_t *value);

/* Headers of the request (resp = 0) or of the response (resp = 1). */
int mg_ffi_header_count(mg_req_t *r, int resp);
int mg_ffi_header_at(mg_req_t *r, int resp, int i, mg_str_t *name,
                     mg_str_t *value);
/* First value, case-insensitive: 0 and *value, or MG_DECLINED. */
int mg_ffi_header_get(mg_req_t *r, int resp, const char *name, size_t nlen,
                      mg_str_t *value);
/* Removes every line of `name` when replace is set, then appends
 * name: value unless value is NULL. -1 when that side cannot change now,
 * -2 for a name that is not a token, -3 for a value with CR, LF or NUL. */
int mg_ffi_header_set(mg_req_t *r, int resp, const char *name, size_t nlen,
                      const char *value, size_t vlen, int replace);

/* The request body's declared length: >= 0, -1 without a body, -2 when
 * chunked (length unknown until read). */
int64_t mg_ffi_req_content_length(mg_req_t *r);

/* Records who the auth plugins said is calling (access log). */
void mg_ffi_req_set_consumer(mg_req_t *r, const char *id, size_t len);

int mg_ffi_resp_status(mg_req_t *r);
int mg_ffi_resp_set_status(mg_req_t *r, int status);

void mg_ffi_log(int level, const char *msg, size_t len);
int mg_ffi_sleep(mg_lua_task_t *t, double seconds);
double mg_ffi_now(void);

/* gw.request.get_body / set_body (proxy.c): read_body returns 0 (the body
 * is at hand: mg_ffi_req_body), MG_AGAIN (yield; woken when read) or -1
 * (not in rewrite/access/handler). set_body needs the body read first. */
int mg_ffi_req_read_body(mg_lua_task_t *t, mg_req_t *r);
void mg_ffi_req_body(mg_req_t *r, mg_str_t *out);
int mg_ffi_req_set_body(mg_req_t *r, const char *s, size_t len);

/* gw.timer (lua.c): id chosen by the Lua side; interval 0 = once. */
int mg_ffi_timer_start(mg_lua_task_t *t, int id, double delay, double interval);
void mg_ffi_timer_cancel(mg_lua_task_t *t, int id);

/* gw.shared (zones.c). op: 0 set, 1 add, 2 replace. TTLs in seconds
 * (0 = no expiry). Return codes as in shdict.h. */
#include "shdict.h"
mg_shdict_t *mg_ffi_shdict_find(const char *name, size_t len);
int mg_ffi_shdict_get(mg_shdict_t *d, const char *k, size_t kl,
                      mg_shdict_value_t *v, char *buf, size_t cap);
int mg_ffi_shdict_store(mg_shdict_t *d, int op, const char *k, size_t kl,
                        const mg_shdict_value_t *v, double ttl, int *evicted);
int mg_ffi_shdict_incr(mg_shdict_t *d, const char *k, size_t kl, double delta,
                       int has_init, double init, double init_ttl, double *out);
int mg_ffi_shdict_delete(mg_shdict_t *d, const char *k, size_t kl);
/* mg_shdict_window_hit; window in seconds; out[5]: admitted (0/1), hits
 * before, retry and reset seconds, the slice counted. */
int mg_ffi_shdict_window_hit(mg_shdict_t *d, const char *k, size_t kl,
                             double window, int slices, double limit,
                             double *out);
void mg_ffi_shdict_window_undo(mg_shdict_t *d, const char *k, size_t kl,
                               int slices, double slice);
int mg_ffi_shdict_ttl(mg_shdict_t *d, const char *k, size_t kl, double *out);
int mg_ffi_shdict_expire(mg_shdict_t *d, const char *k, size_t kl, double ttl);
/* How many entries whose key starts with the prefix were removed. */
double mg_ffi_shdict_delete_prefix(mg_shdict_t *d, const char *p, size_t len);
void mg_ffi_shdict_flush_all(mg_shdict_t *d);
void mg_ffi_shdict_stats(mg_shdict_t *d, double *out);

/* gw.http (client.c): a group of `count` requests for task t; then each
 * added by index (raw = the whole request; upstream name, or an
 * "ip:port" address); the task yields and wakes with (results, errors). */
void *mg_ffi_http_begin(mg_lua_task_t *t, int count);
int mg_ffi_http_add(void *group, int index, mg_req_t *r, const char *upstream,
                    size_t ulen, const char *addr, size_t alen, const char *raw,
                    size_t rawlen, double timeout);

/* -- gw.redis (redis.c, lua/moongate/redis.lua) --
 * configure: the worker's Redis settings, version `serial` (host: an IP
 * literal or a name; user/pass empty = no AUTH; db 0 = no SELECT;
 * timeouts in seconds). Returns 0, -1 without an event loop.
 * send: n commands of kind MG_REDIS_* (redis.h), argc[i] arguments each,
 * flattened into argv/lens (copied); script = the EVAL fallback of an
 * EVALSHA. Returns MG_AGAIN (yield; woken with two values), MG_DECLINED
 * (settings not at `serial`: configure, then send again) or -1 with a
 * static reason in *err (nothing was sent: fail fast).
 * sha1: the hex SHA1 of s into out[41]. */
int mg_ffi_redis_configure(mg_lua_task_t *t, int serial, const char *host,
                           size_t hlen, int port, const char *user, size_t ulen,
                           const char *pass, size_t plen, int db,
                           double connect_timeout, double timeout);
int mg_ffi_redis_send(mg_lua_task_t *t, int serial, int kind, int n,
                      const int *argc, const char **argv, const size_t *lens,
                      const char *script, size_t slen, const char **err);
void mg_ffi_redis_sha1(const char *s, size_t len, char *out);

/* -- gw.metrics (metrics.c, lua/moongate/metrics.lua) --
 * define: a counter family (name ends in _total; help one line); returns
 * its index (the same one for the same name, in every worker), -1 for a
 * name taken by a family with other label names, -2 when the table is
 * full. series: the series of family `fam` with the label text `labels`
 * ('a="x",b="y"', escaped by the caller); its index, or -2 when full.
 * add: adds n to a series. Without a metrics area (moongate lua) define and
 * series return 0 and add does nothing. */
int mg_ffi_metrics_define(const char *name, const char *help,
                          const char *labelnames);
int mg_ffi_metrics_series(int fam, const char *labels);
void mg_ffi_metrics_add(int series, uint64_t n);

#endif
