-- The one place the C functions moongate exports to Lua are declared. It
-- mirrors core/ffi.h; MG_FFI_VERSION must match mg_ffi_version() or the
-- runtime refuses to start (the two cannot drift silently).
local ffi = require("ffi")

local _M = { version = 6 }

ffi.cdef [[
typedef struct { const char *p; size_t len; } mg_str_t;
typedef struct mg_req_s mg_req_t;
typedef struct mg_lua_task_s mg_lua_task_t;

int mg_ffi_version(void);

void mg_ffi_req_method(mg_req_t *r, mg_str_t *out);
void mg_ffi_req_path(mg_req_t *r, mg_str_t *out);
void mg_ffi_req_query(mg_req_t *r, mg_str_t *out);
void mg_ffi_req_host(mg_req_t *r, mg_str_t *out);
void mg_ffi_req_scheme(mg_req_t *r, mg_str_t *out);
void mg_ffi_req_client_ip(mg_req_t *r, mg_str_t *out);
void mg_ffi_req_id(mg_req_t *r, mg_str_t *out);
int mg_ffi_req_set_path(mg_req_t *r, const char *p, size_t len);
int mg_ffi_req_set_query(mg_req_t *r, const char *p, size_t len);
int mg_ffi_req_param(mg_req_t *r, const char *name, size_t nlen, mg_str_t *value);

int mg_ffi_header_count(mg_req_t *r, int resp);
int mg_ffi_header_at(mg_req_t *r, int resp, int i, mg_str_t *name, mg_str_t *value);
int mg_ffi_header_get(mg_req_t *r, int resp, const char *name, size_t nlen, mg_str_t *value);
int mg_ffi_header_set(mg_req_t *r, int resp, const char *name, size_t nlen,
                      const char *value, size_t vlen, int replace);

int64_t mg_ffi_req_content_length(mg_req_t *r);
void mg_ffi_req_set_consumer(mg_req_t *r, const char *id, size_t len);
int mg_ffi_resp_status(mg_req_t *r);
int mg_ffi_resp_set_status(mg_req_t *r, int status);

void mg_ffi_log(int level, const char *msg, size_t len);
int mg_ffi_sleep(mg_lua_task_t *t, double seconds);
double mg_ffi_now(void);

int mg_ffi_req_read_body(mg_lua_task_t *t, mg_req_t *r);
void mg_ffi_req_body(mg_req_t *r, mg_str_t *out);
int mg_ffi_req_set_body(mg_req_t *r, const char *s, size_t len);

int mg_ffi_timer_start(mg_lua_task_t *t, int id, double delay, double interval);
void mg_ffi_timer_cancel(mg_lua_task_t *t, int id);

typedef struct mg_shdict_s mg_shdict_t;
typedef struct {
    int type;            /* 0 nil, 1 number, 2 string, 3 boolean */
    double number;
    const char *str;
    size_t len;
    uint32_t flags;
} mg_shdict_value_t;
mg_shdict_t *mg_ffi_shdict_find(const char *name, size_t len);
int mg_ffi_shdict_get(mg_shdict_t *d, const char *k, size_t kl,
                      mg_shdict_value_t *v, char *buf, size_t cap);
int mg_ffi_shdict_store(mg_shdict_t *d, int op, const char *k, size_t kl,
                        const mg_shdict_value_t *v, double ttl, int *evicted);
int mg_ffi_shdict_incr(mg_shdict_t *d, const char *k, size_t kl, double delta,
                       int has_init, double init, double init_ttl, double *out);
int mg_ffi_shdict_delete(mg_shdict_t *d, const char *k, size_t kl);
int mg_ffi_shdict_window_hit(mg_shdict_t *d, const char *k, size_t kl,
                             double window, int slices, double limit, double *out);
void mg_ffi_shdict_window_undo(mg_shdict_t *d, const char *k, size_t kl, int slices, double slice);
int mg_ffi_shdict_ttl(mg_shdict_t *d, const char *k, size_t kl, double *out);
int mg_ffi_shdict_expire(mg_shdict_t *d, const char *k, size_t kl, double ttl);
double mg_ffi_shdict_delete_prefix(mg_shdict_t *d, const char *p, size_t len);
void mg_ffi_shdict_flush_all(mg_shdict_t *d);
void mg_ffi_shdict_stats(mg_shdict_t *d, double *out);

void *mg_ffi_http_begin(mg_lua_task_t *t, int count);
int mg_ffi_http_add(void *group, int index, mg_req_t *r, const char *upstream,
                    size_t ulen, const char *addr, size_t alen,
                    const char *raw, size_t rawlen, double timeout);

/* gw.redis */
int mg_ffi_redis_configure(mg_lua_task_t *t, int serial, const char *host, size_t hlen,
                           int port, const char *user, size_t ulen, const char *pass,
                           size_t plen, int db, double connect_timeout, double timeout);
int mg_ffi_redis_send(mg_lua_task_t *t, int serial, int kind, int n, const int *argc,
                      const char **argv, const size_t *lens, const char *script,
                      size_t slen, const char **err);
void mg_ffi_redis_sha1(const char *s, size_t len, char *out);

/* gw.metrics */
int mg_ffi_metrics_define(const char *name, const char *help, const char *labelnames);
int mg_ffi_metrics_series(int fam, const char *labels);
void mg_ffi_metrics_add(int series, uint64_t n);
/* libc (not the binary's exports, so outside the version check): the
 * wall clock with sub-millisecond resolution, for gw.now_us. */
typedef struct { long tv_sec; long tv_nsec; } mg_timespec_t;
int clock_gettime(int clk_id, mg_timespec_t *tp);
]]

return _M
