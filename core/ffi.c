/*
 * FFI exports: the request and response as plugins see them. Everything
 * here is a small accessor over mg_req_t; copies go to the request arena,
 * so they live exactly as long as the request.
 */
#include "ffi.h"

#include <stdio.h>
#include <sys/time.h>

#include "generation.h"
#include "log.h"
#include "path.h"

int mg_ffi_version(void)
{
    return MG_FFI_VERSION;
}

void mg_ffi_req_method(mg_req_t *r, mg_str_t *out)
{
    *out = r->method_name;
}

void mg_ffi_req_path(mg_req_t *r, mg_str_t *out)
{
    *out = r->path;
}

void mg_ffi_req_query(mg_req_t *r, mg_str_t *out)
{
    *out = r->query;
}

void mg_ffi_req_host(mg_req_t *r, mg_str_t *out)
{
    *out = r->host;
}

void mg_ffi_req_scheme(mg_req_t *r, mg_str_t *out)
{
    *out = r->tls ? MG_STR("https") : MG_STR("http");
}

static int ip_trusted(const mg_config_t *cfg, const char *ip)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    if (uv_ip4_addr(ip, 0, (struct sockaddr_in *)&ss)
        && uv_ip6_addr(ip, 0, (struct sockaddr_in6 *)&ss))
        return -1; /* not an address */
    return mg_cidr_match(cfg->trusted_proxies, cfg->ntrusted_proxies,
                         (const struct sockaddr *)&ss);
}

/*
 * The client's address: the TCP peer, unless the peer is a trusted proxy;
 * then X-Forwarded-For is walked from the right, past trusted proxies, to
 * the first address that is not one (nginx's real_ip_recursive). A
 * malformed entry stops the walk: what is left of it cannot be believed.
 */
mg_str_t mg_req_client_ip(mg_req_t *r)
{
    if (r->real_ip.p)
        return r->real_ip;
    r->real_ip = mg_str_from_cstr(r->client_ip);
    if (!mg_proxy_peer_trusted(r))
        return r->real_ip;
    const mg_config_t *cfg = r->gen->cfg;
    for (size_t i = r->nheaders; i-- > 0;) {
        if (!mg_str_caseeq(r->headers[i].name, MG_STR("x-forwarded-for")))
            continue;
        mg_str_t v = r->headers[i].value;
        size_t end = v.len;
        while (end > 0) {
            size_t start = end;
            while (start > 0 && v.p[start - 1] != ',')
                start--;
            size_t a = start, b = end;
            while (a < b && (v.p[a] == ' ' || v.p[a] == '	'))
                a++;
            while (b > a && (v.p[b - 1] == ' ' || v.p[b - 1] == '	'))
                b--;
            char ip[46];
            if (b - a == 0 || b - a >= sizeof(ip))
                return r->real_ip;
            memcpy(ip, v.p + a, b - a);
            ip[b - a] = '\0';
            int trusted = ip_trusted(cfg, ip);
            if (trusted < 0)
                return r->real_ip;
            r->real_ip = mg_arena_strdup(r->arena, (mg_str_t){ip, b - a});
            if (!trusted)
                return r->real_ip;
            end = start ? start - 1 : 0;
        }
    }
    return r->real_ip;
}

void mg_ffi_req_id(mg_req_t *r, mg_str_t *out)
{
    *out = r->request_id;
}

int mg_ffi_req_set_path(mg_req_t *r, const char *p, size_t len)
{
    if (!r->req_mutable)
        return -2;
    char *out = mg_arena_alloc(r->arena, len + 1);
    size_t n;
    if (mg_path_normalize(p, len, out, &n))
        return -1;
    r->path = (mg_str_t){out, n};
    r->path_set = 1;
    return 0;
}

int mg_ffi_req_set_query(mg_req_t *r, const char *p, size_t len)
{
    if (!r->req_mutable)
        return -1;
    r->query = mg_arena_strdup(r->arena, (mg_str_t){p, len});
    return 0;
}

int mg_ffi_req_param(mg_req_t *r, const char *name, size_t nlen,
                     mg_str_t *value)
{
    for (size_t i = 0; i < r->nparams; i++)
        if (mg_str_eq(r->param_names[i], (mg_str_t){name, nlen})) {
            *value = r->param_values[i];
            return 0;
        }
    return MG_DECLINED;
}

typedef struct {
    mg_header_t **list;
    size_t *n, *cap;
} header_list_t;

static header_list_t list_of(mg_req_t *r, int resp)
{
    if (resp)
        return (header_list_t){&r->resp_headers, &r->nresp_headers,
                               &r->resp_headers_cap};
    return (header_list_t){&r->headers, &r->nheaders, &r->headers_cap};
}

int mg_ffi_header_count(mg_req_t *r, int resp)
{
    return (int)*list_of(r, resp).n;
}

int mg_ffi_header_at(mg_req_t *r, int resp, int i, mg_str_t *name,
                     mg_str_t *value)
{
    header_list_t l = list_of(r, resp);
    if (i < 0 || (size_t)i >= *l.n)
        return MG_DECLINED;
    *name = (*l.list)[i].name;
    *value = (*l.list)[i].value;
    return 0;
}

int mg_ffi_header_get(mg_req_t *r, int resp, const char *name, size_t nlen,
                      mg_str_t *value)
{
    header_list_t l = list_of(r, resp);
    for (size_t i = 0; i < *l.n; i++)
        if (mg_str_caseeq((*l.list)[i].name, (mg_str_t){name, nlen})) {
            *value = (*l.list)[i].value;
            return 0;
        }
    return MG_DECLINED;
}

/* RFC 9110 tchar: what a header name is made of. */
static int is_tchar(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
        || (c >= '0' && c <= '9') || c == '-')
        return 1; /* what names are made of, nearly always */
    return c && strchr("!#$%&'*+.^_`|~", c) != NULL;
}

int mg_ffi_header_set(mg_req_t *r, int resp, const char *name, size_t nlen,
                      const char *value, size_t vlen, int replace)
{
    /* Checked here rather than with Lua patterns, which the JIT does not
     * compile: plugins set headers on every request. */
    if (nlen == 0)
        return -2;
    for (size_t i = 0; i < nlen; i++)
        if (!is_tchar((unsigned char)name[i]))
            return -2;
    for (size_t i = 0; value && i < vlen; i++)
        if (value[i] == '\r' || value[i] == '\n' || value[i] == '\0')
            return -3;
    if (resp ? !r->resp_mutable : !r->req_mutable)
        return -1;
    header_list_t l = list_of(r, resp);
    mg_str_t key = {name, nlen};
    if (replace) {
        size_t k = 0;
        for (size_t i = 0; i < *l.n; i++)
            if (!mg_str_caseeq((*l.list)[i].name, key))
                (*l.list)[k++] = (*l.list)[i];
        *l.n = k;
    }
    if (!value)
        return 0;
    if (*l.n == *l.cap) {
        /* Arena memory: the old array is simply left behind. */
        size_t cap = *l.cap * 2 + 8;
        mg_header_t *grown = mg_arena_alloc(r->arena, cap * sizeof(**l.list));
        if (*l.n)
            memcpy(grown, *l.list, *l.n * sizeof(**l.list));
        *l.list = grown;
        *l.cap = cap;
    }
    mg_header_t *h = &(*l.list)[(*l.n)++];
    h->name = mg_arena_strdup(r->arena, key);
    h->value = mg_arena_strdup(r->arena, (mg_str_t){value, vlen});
    if (!resp && mg_str_caseeq(key, MG_STR("host")))
        r->host = h->value;
    return 0;
}

int64_t mg_ffi_req_content_length(mg_req_t *r)
{
    return r->chunked ? -2 : r->content_length;
}

void mg_ffi_req_set_consumer(mg_req_t *r, const char *id, size_t len)
{
    r->consumer = mg_arena_strdup(r->arena, (mg_str_t){id, len});
}

int mg_ffi_resp_status(mg_req_t *r)
{
    return r->resp_status;
}

int mg_ffi_resp_set_status(mg_req_t *r, int status)
{
    if (!r->resp_mutable || status < 200 || status > 599)
        return -1;
    r->resp_status = status;
    return 0;
}

void mg_ffi_log(int level, const char *msg, size_t len)
{
    if (level < MG_LOG_ERROR || level > MG_LOG_DEBUG)
        level = MG_LOG_INFO;
    mg_log(level, "lua: %.*s", (int)len, msg);
}

void mg_ffi_req_client_ip(mg_req_t *r, mg_str_t *out)
{
    *out = mg_req_client_ip(r);
}

double mg_ffi_now(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + (double)(tv.tv_usec / 1000) / 1000.0;
}
