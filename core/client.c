/*
 * gw.http: HTTP/1.1 requests from Lua over the core's pooled upstream
 * connections, several in parallel for one coroutine. The Lua side
 * (lua/moongate/http.lua) builds each request's bytes and names its target
 * (an upstream of the request's generation, balanced as the proxy does, or
 * a literal address); this module connects, writes, parses the response
 * with llhttp into memory (bounded) and, when every request of the group
 * is done, wakes the coroutine with the results.
 *
 * A group belongs to its task. If the task is freed first (the client went
 * away), the group is orphaned: its requests finish or time out on their
 * own and it is freed then, never touching the task again.
 */
#include "client.h"

#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>

#include "config.h"
#include "ffi.h"
#include "generation.h"
#include "log.h"
#include "upstream.h"

#define MAX_BODY (16u << 20) /* a response larger than this fails */
#define MAX_HEAD 65536

typedef struct group_s group_t;

typedef struct {
    group_t *group;
    mg_upconn_t *uc;
    mg_target_t *target;
    llhttp_t parser;
    uv_buf_t out; /* request bytes (owned) */
    uint64_t timeout_ms;
    int status;
    char *head; /* "name\0value\0..." (owned) */
    size_t head_len, head_cap;
    char *body; /* (owned) */
    size_t body_len, body_cap;
    size_t pos;        /* parsed up to, in uc->rbuf */
    const char *error; /* NULL while fine */
    unsigned done : 1, complete : 1, in_field : 1, keepalive : 1, writing : 1,
        too_large : 1, got_bytes : 1, retried : 1;
} item_t;

struct group_s {
    mg_lua_task_t *task; /* NULL once orphaned */
    size_t n, remaining;
    uv_timer_t kick; /* delivers results not tied to I/O */
    item_t *items;
};

/* Per-VM: targets for literal addresses (upstream targets are the
 * worker's). */
typedef struct {
    mg_target_t **targets;
    size_t ntargets;
} client_state_t;

static llhttp_settings_t settings;

static void on_kick(uv_timer_t *t);

static void state_close(void *arg)
{
    client_state_t *s = arg;
    for (size_t i = 0; i < s->ntargets; i++)
        mg_target_free(s->targets[i]);
    free(s->targets);
    free(s);
}

static client_state_t *state_of(mg_lua_t *vm)
{
    mg_lua_ext_t *ext = mg_lua_ext(vm, MG_LUA_EXT_HTTP);
    if (!ext->state) {
        ext->state = mg_calloc(1, sizeof(client_state_t));
        ext->close = state_close;
    }
    return ext->state;
}

/* ------------------------------------------------------------------ */
/* Finishing                                                          */

static void on_kick_closed(uv_handle_t *h)
{
    group_t *g = h->data;
    for (size_t i = 0; i < g->n; i++) {
        free(g->items[i].out.base);
        free(g->items[i].head);
        free(g->items[i].body);
    }
    free(g->items);
    free(g);
}

/* Pushes one result: { status =, headers = { lower = v or {..} }, body = } */
static void push_result(lua_State *L, item_t *it)
{
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, it->status);
    lua_setfield(L, -2, "status");
    lua_newtable(L);
    for (size_t off = 0; off < it->head_len;) {
        const char *name = it->head + off;
        size_t nlen = strlen(name);
        const char *value = name + nlen + 1;
        size_t vlen = strlen(value);
        off += nlen + vlen + 2;
        lua_pushlstring(L, name, nlen);
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushlstring(L, value, vlen);
        } else {
            /* A repeated header becomes a list of its values. */
            if (!lua_istable(L, -1)) {
                lua_createtable(L, 2, 0);
                lua_insert(L, -2);
                lua_rawseti(L, -2, 1);
            }
            lua_pushlstring(L, value, vlen);
            lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
        }
        lua_rawset(L, -3);
    }
    lua_setfield(L, -2, "headers");
    lua_pushlstring(L, it->body ? it->body : "", it->body_len);
    lua_setfield(L, -2, "body");
}

static void deliver(group_t *g)
{
    mg_lua_task_t *t = g->task;
    if (t) {
        mg_lua_task_set_cancel(t, NULL, NULL);
        lua_State *L = mg_lua_task_prepare_wake(t);
        lua_createtable(L, (int)g->n, 0);
        lua_createtable(L, (int)g->n, 0);
        for (size_t i = 0; i < g->n; i++) {
            item_t *it = &g->items[i];
            if (it->error) {
                lua_pushboolean(L, 0);
                lua_rawseti(L, -3, (int)i + 1);
                lua_pushstring(L, it->error);
                lua_rawseti(L, -2, (int)i + 1);
            } else {
                push_result(L, it);
                lua_rawseti(L, -3, (int)i + 1);
            }
        }
        g->task = NULL;
        mg_lua_task_wake(t, 2); /* may free the task */
    }
    uv_close((uv_handle_t *)&g->kick, on_kick_closed);
}

static void item_done(item_t *it, const char *error)
{
    if (it->done)
        return;
    it->done = 1;
    it->error = error;
    group_t *g = it->group;
    if (it->uc) {
        mg_upconn_t *uc = it->uc;
        it->uc = NULL;
        uv_timer_stop(&uc->timer);
        if (!error && it->keepalive && !it->writing && it->pos == uc->rlen)
            mg_upconn_release(uc, 64, 60000);
        else {
            uc->owner = NULL;
            mg_upconn_close(uc);
        }
    }
    /* Delivered from the loop, never inside mg_ffi_http_add: the Lua side
     * has not yielded yet while it adds. */
    if (--g->remaining == 0)
        uv_timer_start(&g->kick, on_kick, 0, 0);
}

static void on_kick(uv_timer_t *t)
{
    group_t *g = t->data;
    if (g->remaining == 0)
        deliver(g);
}

/* ------------------------------------------------------------------ */
/* Response parsing                                                   */

static item_t *item_of(llhttp_t *p)
{
    return p->data;
}

static void head_append(item_t *it, const char *at, size_t n)
{
    if (it->head_len + n + 1 > it->head_cap) {
        it->head_cap = (it->head_len + n + 1) * 2;
        it->head = mg_realloc(it->head, it->head_cap);
    }
    memcpy(it->head + it->head_len, at, n);
    it->head_len += n;
}

static int on_field(llhttp_t *p, const char *at, size_t n)
{
    item_t *it = item_of(p);
    if (!it->in_field && it->head_len) {
        head_append(it, "", 1); /* ends the previous value */
    }
    it->in_field = 1;
    /* Names are stored lower-cased: Lua looks them up that way. */
    for (size_t i = 0; i < n; i++) {
        char ch = at[i] >= 'A' && at[i] <= 'Z' ? (char)(at[i] + 32) : at[i];
        head_append(it, &ch, 1);
    }
    return it->head_len > MAX_HEAD ? -1 : 0;
}

static int on_value(llhttp_t *p, const char *at, size_t n)
{
    item_t *it = item_of(p);
    if (it->in_field)
        head_append(it, "", 1); /* ends the name */
    it->in_field = 0;
    head_append(it, at, n);
    return it->head_len > MAX_HEAD ? -1 : 0;
}

static int on_headers_complete(llhttp_t *p)
{
    item_t *it = item_of(p);
    if (it->head_len) {
        if (it->in_field)
            head_append(it, "", 1); /* a name without value */
        head_append(it, "", 1);
    }
    it->in_field = 0;
    it->status = p->status_code;
    if (it->status < 200) { /* interim: forget it, the final one follows */
        it->head_len = 0;
        return 0;
    }
    return memcmp(it->out.base, "HEAD ", 5) == 0 ? 1 : 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    item_t *it = item_of(p);
    if (it->body_len + n > MAX_BODY) {
        it->too_large = 1;
        return -1;
    }
    if (it->body_len + n > it->body_cap) {
        it->body_cap = (it->body_len + n) * 2;
        it->body = mg_realloc(it->body, it->body_cap);
    }
    memcpy(it->body + it->body_len, at, n);
    it->body_len += n;
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    item_t *it = item_of(p);
    if (it->status < 200)
        return 0;
    it->complete = 1;
    it->keepalive = llhttp_should_keep_alive(p) ? 1 : 0;
    return HPE_PAUSED;
}

static void on_timeout(uv_timer_t *t)
{
    mg_upconn_t *uc = t->data;
    item_done(uc->owner, "timeout");
}

static void send_request(item_t *it);
static void on_connect(mg_upconn_t *uc, int status);

/* A pooled connection the upstream closed just as it was reused: an
 * idempotent request that got no byte back is sent once more on a fresh
 * connection, as the proxy does. */
static int retry(item_t *it)
{
    static const char *const idempotent[] = {"GET ",    "HEAD ",    "PUT ",
                                             "DELETE ", "OPTIONS ", "TRACE "};
    mg_upconn_t *uc = it->uc;
    int ok = 0;
    for (size_t i = 0; i < MG_ARRAY_SIZE(idempotent); i++)
        ok |= strncmp(it->out.base, idempotent[i], strlen(idempotent[i])) == 0;
    if (!ok || it->retried || it->got_bytes || !uc->reused || it->writing)
        return 0;
    it->retried = 1;
    it->uc = NULL;
    uc->owner = NULL;
    mg_upconn_close(uc);
    int rc = mg_upconn_get(it->target, it, it->timeout_ms, on_connect, &uc);
    if (rc != 0 && rc != MG_AGAIN)
        return 0;
    it->uc = uc;
    if (rc == 0)
        send_request(it);
    return 1;
}

static void on_data(mg_upconn_t *uc, ssize_t nread)
{
    item_t *it = uc->owner;
    if (nread > 0)
        it->got_bytes = 1;
    if (nread < 0 && !it->got_bytes && retry(it))
        return;
    if (nread < 0) {
        if (nread == UV_EOF && llhttp_finish(&it->parser) != HPE_USER
            && it->complete) {
            it->keepalive = 0;
            item_done(it, NULL);
            return;
        }
        item_done(it, nread == UV_EOF ? "connection closed"
                                      : uv_strerror((int)nread));
        return;
    }
    llhttp_errno_t err =
        llhttp_execute(&it->parser, uc->rbuf + it->pos, uc->rlen - it->pos);
    if (err == HPE_PAUSED)
        it->pos = (size_t)(llhttp_get_error_pos(&it->parser) - uc->rbuf);
    else if (err == HPE_OK)
        it->pos = uc->rlen = 0; /* everything is copied out */
    else {
        item_done(it,
                  it->too_large ? "response too large" : "invalid response");
        return;
    }
    if (it->complete) {
        item_done(it, NULL);
        return;
    }
    uv_timer_start(&uc->timer, on_timeout, it->timeout_ms, 0);
}

/* ------------------------------------------------------------------ */
/* Sending                                                            */

typedef struct {
    uv_write_t req;
    item_t *it;
} cwrite_t;

static void on_written(uv_write_t *req, int status)
{
    cwrite_t *w = (cwrite_t *)req;
    item_t *it = w->it;
    free(w);
    /* Cancelled means the connection was closed by item_done: the item
     * may already be freed with its group. */
    if (status == UV_ECANCELED)
        return;
    it->writing = 0;
    if (status < 0)
        item_done(it, uv_strerror(status));
}

static void send_request(item_t *it)
{
    mg_upconn_t *uc = it->uc;
    uc->on_read = on_data;
    uc->rmax = MAX_HEAD;
    if (!settings.on_headers_complete) {
        llhttp_settings_init(&settings);
        settings.on_header_field = on_field;
        settings.on_header_value = on_value;
        settings.on_headers_complete = on_headers_complete;
        settings.on_body = on_body;
        settings.on_message_complete = on_message_complete;
    }
    llhttp_init(&it->parser, HTTP_RESPONSE, &settings);
    it->parser.data = it;
    cwrite_t *w = mg_malloc(sizeof(*w));
    w->it = it;
    it->writing = 1;
    uv_timer_start(&uc->timer, on_timeout, it->timeout_ms, 0);
    int rc = mg_upconn_write(uc, &w->req, &it->out, 1, on_written);
    if (rc < 0) {
        free(w);
        it->writing = 0;
        item_done(it, uv_strerror(rc));
    }
}

static void on_connect(mg_upconn_t *uc, int status)
{
    item_t *it = uc->owner;
    if (status < 0) {
        it->uc = NULL; /* upstream.c closes it */
        uc->owner = NULL;
        item_done(it, status == MG_ETIMEOUT ? "timeout" : mg_strerror(status));
        return;
    }
    send_request(it);
}

/* ------------------------------------------------------------------ */
/* Starting (FFI)                                                     */

static void on_group_gone(void *arg);

void *mg_ffi_http_begin(mg_lua_task_t *t, int count)
{
    uv_loop_t *loop = mg_lua_task_loop(t);
    if (!loop || count <= 0)
        return NULL;
    group_t *g = mg_calloc(1, sizeof(*g));
    g->task = t;
    g->n = g->remaining = (size_t)count;
    g->items = mg_calloc((size_t)count, sizeof(item_t));
    for (int i = 0; i < count; i++)
        g->items[i].group = g;
    uv_timer_init(loop, &g->kick);
    g->kick.data = g;
    mg_lua_task_set_cancel(t, on_group_gone, g);
    /* Results are always delivered from the loop, never inside the call:
     * the Lua side has yielded by then. */
    uv_timer_start(&g->kick, on_kick, 0, 0);
    return g;
}

static void on_group_gone(void *arg)
{
    group_t *g = arg;
    g->task = NULL; /* the requests finish on their own, then it is freed */
}

/* Parses "host:port" / "[v6]:port" (IP literals and localhost only: name
 * resolution would block). */
static int parse_addr(const char *s, size_t len, mg_target_conf_t *tc)
{
    char host[64];
    const char *colon = NULL;
    for (size_t i = len; i > 0; i--)
        if (s[i - 1] == ':') {
            colon = s + i - 1;
            break;
        }
    if (!colon || (size_t)(colon - s) >= sizeof(host) || colon == s)
        return -1;
    size_t hl = (size_t)(colon - s);
    memcpy(host, s, hl);
    host[hl] = '\0';
    int port = atoi(colon + 1);
    if (port <= 0 || port > 65535)
        return -1;
    char *h = host;
    if (h[0] == '[' && hl > 2 && h[hl - 1] == ']') {
        h[hl - 1] = '\0';
        h++;
    }
    if (strcmp(h, "localhost") == 0)
        h = "127.0.0.1";
    memset(tc, 0, sizeof(*tc));
    if (uv_ip4_addr(h, port, (struct sockaddr_in *)&tc->addr) == 0)
        tc->addrlen = sizeof(struct sockaddr_in);
    else if (uv_ip6_addr(h, port, (struct sockaddr_in6 *)&tc->addr) == 0)
        tc->addrlen = sizeof(struct sockaddr_in6);
    else
        return -1;
    return 0;
}

static mg_target_t *literal_target(mg_lua_task_t *t, const char *addr,
                                   size_t alen)
{
    mg_target_conf_t tc;
    if (parse_addr(addr, alen, &tc))
        return NULL;
    client_state_t *s = state_of(mg_lua_task_vm(t));
    for (size_t i = 0; i < s->ntargets; i++)
        if (mg_target_matches(s->targets[i], &tc))
            return s->targets[i];
    char text[80];
    snprintf(text, sizeof(text), "%.*s", (int)alen, addr);
    tc.text = text;
    s->targets = mg_realloc(s->targets, (s->ntargets + 1) * sizeof(void *));
    s->targets[s->ntargets] = mg_target_new(mg_lua_task_loop(t), &tc);
    return s->targets[s->ntargets++];
}

static mg_target_t *upstream_target(mg_req_t *r, const char *name, size_t nlen)
{
    if (!r)
        return NULL;
    mg_gen_t *g = r->gen;
    for (size_t i = 0; i < g->cfg->nupstreams; i++)
        if (mg_str_eq(mg_str_from_cstr(g->cfg->upstreams[i].name),
                      (mg_str_t){name, nlen}))
            return mg_upstream_pick(&g->upstreams[i]);
    return NULL;
}

int mg_ffi_http_add(void *group, int index, mg_req_t *r, const char *upstream,
                    size_t ulen, const char *addr, size_t alen, const char *raw,
                    size_t rawlen, double timeout)
{
    group_t *g = group;
    if (!g || !g->task || index < 0 || (size_t)index >= g->n)
        return -1;
    mg_lua_task_t *t = g->task;
    item_t *it = &g->items[index];
    it->timeout_ms = timeout > 0 ? (uint64_t)(timeout * 1000.0) : 60000;
    it->target = ulen ? upstream_target(r, upstream, ulen)
                      : literal_target(t, addr, alen);
    if (!it->target) {
        item_done(it, ulen ? "no such upstream" : "invalid address");
        return 0;
    }
    it->out = uv_buf_init(mg_malloc(rawlen), (unsigned)rawlen);
    memcpy(it->out.base, raw, rawlen);
    mg_upconn_t *uc;
    int rc = mg_upconn_get(it->target, it, it->timeout_ms, on_connect, &uc);
    if (rc == 0 || rc == MG_AGAIN) {
        it->uc = uc;
        if (rc == 0)
            send_request(it);
    } else {
        item_done(it, mg_strerror(rc));
    }
    return 0;
}
