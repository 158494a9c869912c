/*
 * gw.redis: one Redis connection per worker VM, shared by every request of
 * the worker (their commands are pipelined on it), driven by hiredis's
 * async API on the worker's libuv loop. Created on first use, closed with
 * the VM's extensions. Not a pool of connections, not pub/sub, not
 * cluster-aware: a request's commands wait their turn on one connection,
 * which is what keeps a worker's Redis footprint at one socket.
 *
 * Life of a call. mg_ffi_redis_send formats the commands, writes them to
 * hiredis, records the call (cmd_t) in the client's pending list and
 * returns MG_AGAIN; the Lua side yields. hiredis calls on_reply once per
 * command; when the last reply is in, the record moves to the ready list
 * and the end of the loop turn (a uv_check handle; a 0 ms timer, the
 * "kick", for what becomes ready later) wakes the task with the replies
 * converted to Lua values. Deliveries always happen from there, never inside a
 * hiredis callback or an FFI call: Lua never runs inside hiredis, and an
 * FFI call never resumes a coroutine.
 *
 * Ownership of a record. Three parties may hold it: hiredis (one reference
 * per command written, until its callback runs -- with a NULL reply when
 * the connection goes away), the task (until the result is delivered, or
 * until the task is freed first: the cancel hook registered with
 * mg_lua_task_set_cancel then clears rec->task, and the answer is dropped),
 * and the client's lists. A record is freed once it is delivered (or
 * orphaned) and hiredis holds no reference to it.
 *
 * Failure policy (SECURITY.md point 10, docs/redis.md). Every command has
 * a deadline (the configured timeout); the connection has a connect
 * deadline. When one passes, Redis is treated as hung: the connection is
 * dropped and every command on it fails with "timeout" (replies come in
 * order, so the others were stuck behind it). A refused, reset or closed
 * connection fails its commands with that reason. After a failure the
 * client is DOWN: calls fail at once with the reason of the last failure
 * until a backoff has passed (0 after a healthy connection, then 100 ms
 * doubling to 5 s; reset whenever Redis answers), then the next call
 * reconnects. Reconnection is lazy: an idle worker does not poll Redis.
 *
 * Batched scripts (gw.redis.eval_batched). Calls of one script made in
 * one turn of the loop join an open batch instead of going out alone;
 * after the loop has run every callback of the turn (a uv_check handle)
 * the batch goes out as one EVALSHA whose KEYS and ARGV hold every call's
 * (layout in docs/redis.md) and whose reply holds one element per call.
 * Each call stays a record of its own in the pending list (deadline,
 * cancel, delivery as above); the batch holds a reference on each until
 * its reply is handed out. Under load this turns N round trips, N script
 * starts and N replies into one of each, which is what Redis-backed rate
 * limiting spends most of its time on.
 *
 * Loop thread only. Host names are resolved with uv_getaddrinfo (the
 * thread pool); hiredis is only ever given an IP literal, so nothing here
 * blocks.
 */
#include "redis.h"

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <hiredis/sds.h>
#include <lua.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "strbuf.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
#define MAX_PENDING 10000   /* calls in flight per worker; more fail fast */
#define BATCH_MAX_CALLS 256 /* a fuller batch goes out at once */
#define MAX_SCRIPTS 16      /* script texts kept for NOSCRIPT answers */

enum { DOWN, RESOLVING, CONNECTING, READY }; /* client states */
enum { PENDING, QUEUED, DONE };              /* record states */

typedef struct client_s client_t;
typedef struct cmd_s cmd_t;
typedef struct reply_s reply_t;
typedef struct batch_s batch_t;

/* A reply copied out of hiredis (which frees its own after the callback). */
struct reply_s {
    int type;
    long long integer;
    char *str;
    size_t len;
    size_t elements;
    reply_t **element;
};

struct cmd_s {
    client_t *c;
    mg_lua_task_t *task; /* NULL once delivered or orphaned */
    cmd_t *prev, *next;  /* in c->pending or c->ready */
    uint64_t deadline;   /* loop time, ms */
    const char *err;     /* static reason when the call failed */
    int kind, n, got, refs, state;
    char **unsent; /* formatted commands awaiting a connection */
    size_t *unsent_len;
    char *evalsha; /* EVALSHA only: the command as written, turned into
                      an EVAL if Redis answers NOSCRIPT */
    size_t evalsha_len;
    reply_t *replies[]; /* n, filled in order */
};

typedef struct {
    cmd_t *head, *tail;
} list_t;

typedef struct {
    uv_getaddrinfo_t req; /* first: the callback casts back */
    client_t *c;          /* NULL once abandoned */
} resolve_t;

/* Calls of one script joined into one EVALSHA (see the top). */
struct batch_s {
    client_t *c;
    batch_t *next; /* in c->open while it takes calls */
    char sha[40];
    cmd_t **calls; /* each with a reference held by the batch */
    int ncalls, cap;
    unsigned nkeys, nargs;
    mg_strbuf_t keys, counts, args; /* RESP bulk strings */
    char *sent; /* the EVALSHA as written, for a NOSCRIPT answer */
    size_t sent_len;
    int refs;    /* hiredis: 1 while a command of the batch is out */
    int retried; /* NOSCRIPT was answered with EVAL */
};

/* A script's text by its SHA1, for EVAL after a NOSCRIPT answer. */
typedef struct {
    char sha[40];
    char *text;
    size_t len;
} script_t;

struct client_s {
    uv_loop_t *loop;
    /* Settings, from the Lua side; serial says which version they are. */
    int serial;
    char *host, *user, *pass;
    int port, db;
    uint64_t connect_timeout_ms, timeout_ms;
    /* Connection. */
    int state;
    redisAsyncContext *ac; /* CONNECTING, READY */
    resolve_t *resolving;  /* RESOLVING */
    uint64_t connect_deadline;
    uint64_t retry_at;    /* DOWN: no new attempt before this */
    uint64_t backoff_ms;  /* the next failure's delay; 0 while healthy */
    const char *last_err; /* why the client is DOWN */
    /* Calls. */
    list_t pending, ready;
    size_t npending;
    uv_timer_t deadline; /* the earliest deadline */
    uv_timer_t kick;     /* delivers c->ready */
    batch_t *open;       /* batches taking calls this turn */
    uv_check_t check;    /* sends them after the turn's callbacks */
    script_t scripts[MAX_SCRIPTS];
    unsigned nscripts;
    int closing, open_handles;
};

static void lost(client_t *c, const char *why, const char *detail, int freeing);
static int is_noscript(const redisReply *rep);
static char *eval_of(client_t *c, const char *evalsha, size_t len,
                     size_t *out_len);
static void batches_discard(client_t *c);
static void batches_send(client_t *c);
static void keep_or_free(cmd_t *r, char *cmd, size_t len);

/* ------------------------------------------------------------------ */
/* Records                                                            */

static void list_push(list_t *l, cmd_t *r)
{
    r->next = NULL;
    r->prev = l->tail;
    if (l->tail)
        l->tail->next = r;
    else
        l->head = r;
    l->tail = r;
}

static void list_remove(list_t *l, cmd_t *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        l->head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        l->tail = r->prev;
    r->prev = r->next = NULL;
}

/* Sizes in a flat copy stay multiples of 8, so every part is aligned. */
static size_t round8(size_t n)
{
    return (n + 7) & ~(size_t)7;
}

static size_t reply_size(const redisReply *r)
{
    size_t n = sizeof(reply_t);
    if (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS
        || r->type == REDIS_REPLY_ERROR) {
        n += round8(r->len + 1);
    } else if (r->type == REDIS_REPLY_ARRAY) {
        n += (r->elements + 1) * sizeof(reply_t *);
        for (size_t i = 0; i < r->elements; i++)
            n += reply_size(r->element[i]);
    }
    return n;
}

static reply_t *reply_place(const redisReply *r, char **at)
{
    reply_t *out = (reply_t *)(void *)*at;
    *at += sizeof(reply_t);
    memset(out, 0, sizeof(*out));
    out->type = r->type;
    out->integer = r->integer;
    if (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS
        || r->type == REDIS_REPLY_ERROR) {
        out->str = *at;
        memcpy(out->str, r->str, r->len);
        out->str[r->len] = '\0';
        out->len = r->len;
        *at += round8(r->len + 1);
    } else if (r->type == REDIS_REPLY_ARRAY) {
        out->elements = r->elements;
        out->element = (reply_t **)(void *)*at;
        *at += (r->elements + 1) * sizeof(reply_t *);
        for (size_t i = 0; i < r->elements; i++)
            out->element[i] = reply_place(r->element[i], at);
    }
    return out;
}

/* A reply copied out of hiredis in one allocation (freed with free()):
 * a batch hands out hundreds per turn of the loop. */
static reply_t *reply_copy(const redisReply *r)
{
    char *at = mg_malloc(reply_size(r));
    return reply_place(r, &at);
}

static void cmd_free(cmd_t *r)
{
    for (int i = 0; i < r->n; i++)
        free(r->replies[i]);
    if (r->unsent) {
        for (int i = 0; i < r->n; i++)
            free(r->unsent[i]);
        free(r->unsent);
        free(r->unsent_len);
    }
    free(r->evalsha);
    free(r);
}

/* Freed once delivered (or orphaned) and hiredis holds no reference. */
static void maybe_free(cmd_t *r)
{
    if (r->state == DONE && r->refs == 0)
        cmd_free(r);
}

/* The task was freed while it waited (the client went away). */
static void on_task_gone(void *arg)
{
    cmd_t *r = arg;
    r->task = NULL;
}

/* ------------------------------------------------------------------ */
/* Delivery                                                           */

/* Pushes a reply. `nested`: inside an array or a pipeline's list, where a
 * nil would make a hole: there nil is gw.redis.null (cjson.null, a NULL
 * light userdata) and an error reply is { false, "ERR ..." }. hiredis
 * nests arrays at most 7 deep, so the recursion is bounded. */
static void push_value(lua_State *L, const reply_t *r, int nested)
{
    switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS: lua_pushlstring(L, r->str, r->len); break;
    case REDIS_REPLY_INTEGER: lua_pushnumber(L, (lua_Number)r->integer); break;
    case REDIS_REPLY_ARRAY:
        lua_checkstack(L, 4);
        lua_createtable(L, (int)r->elements, 0);
        for (size_t i = 0; i < r->elements; i++) {
            push_value(L, r->element[i], 1);
            lua_rawseti(L, -2, (int)i + 1);
        }
        break;
    case REDIS_REPLY_ERROR:
        lua_createtable(L, 2, 0);
        lua_pushboolean(L, 0);
        lua_rawseti(L, -2, 1);
        lua_pushlstring(L, r->str, r->len);
        lua_rawseti(L, -2, 2);
        break;
    default: /* REDIS_REPLY_NIL */
        if (nested)
            lua_pushlightuserdata(L, NULL);
        else
            lua_pushnil(L);
    }
}

/* The two values the Lua side's yield returns (see redis.h). */
static void push_results(lua_State *L, const cmd_t *r)
{
    if (r->err) {
        lua_pushnil(L);
        lua_pushstring(L, r->err);
        return;
    }
    if (r->kind != MG_REDIS_PIPELINE) {
        const reply_t *rep = r->replies[0];
        if (rep->type == REDIS_REPLY_ERROR) {
            lua_pushnil(L);
            lua_pushlstring(L, rep->str, rep->len);
        } else {
            push_value(L, rep, 0);
            lua_pushnil(L);
        }
        return;
    }
    lua_createtable(L, r->n, 0);
    lua_createtable(L, 0, 0);
    for (int i = 0; i < r->n; i++) {
        const reply_t *rep = r->replies[i];
        if (rep->type == REDIS_REPLY_ERROR) {
            lua_pushboolean(L, 0);
            lua_rawseti(L, -3, i + 1);
            lua_pushlstring(L, rep->str, rep->len);
            lua_rawseti(L, -2, i + 1);
        } else {
            push_value(L, rep, 1);
            lua_rawseti(L, -3, i + 1);
        }
    }
}

static void deliver(cmd_t *r)
{
    mg_lua_task_t *t = r->task;
    r->state = DONE;
    r->task = NULL;
    if (t) {
        mg_lua_task_set_cancel(t, NULL, NULL);
        lua_State *L = mg_lua_task_prepare_wake(t);
        push_results(L, r);
        mg_lua_task_wake(t, 2); /* may free t, may send more commands */
    }
    maybe_free(r);
}

static void deliver_ready(client_t *c)
{
    /* Detach the batch: what the woken coroutines finish meanwhile goes
     * to the next delivery. */
    list_t batch = c->ready;
    c->ready.head = c->ready.tail = NULL;
    while (batch.head) {
        cmd_t *r = batch.head;
        list_remove(&batch, r);
        deliver(r);
    }
}

static void on_kick(uv_timer_t *h)
{
    deliver_ready(h->data);
}

static void on_check(uv_check_t *h);

/* The client has work for the end of this loop turn (on_check). */
static void check_start(client_t *c)
{
    if (!uv_is_active((uv_handle_t *)&c->check))
        uv_check_start(&c->check, on_check);
}

/* The outcome of r is known (its replies, or err): deliver it soon. */
static void make_ready(client_t *c, cmd_t *r, const char *err)
{
    if (err)
        r->err = err;
    r->state = QUEUED;
    list_push(&c->ready, r);
    /* Delivered at the end of this loop turn, or by the kick (a 0 ms
     * timer: the next turn does not wait in poll) if made ready then. */
    if (!uv_is_active((uv_handle_t *)&c->kick))
        uv_timer_start(&c->kick, on_kick, 0, 0);
    check_start(c);
}

static void unpend(client_t *c, cmd_t *r, const char *err)
{
    list_remove(&c->pending, r);
    c->npending--;
    make_ready(c, r, err);
}

/* ------------------------------------------------------------------ */
/* Deadlines                                                          */

static void on_deadline(uv_timer_t *h)
{
    client_t *c = h->data;
    uint64_t now = uv_now(c->loop), next = UINT64_MAX;
    if (c->state == RESOLVING || c->state == CONNECTING) {
        if (now >= c->connect_deadline) {
            lost(c, "timeout", "connect timed out", 0);
            return;
        }
        next = c->connect_deadline;
    }
    for (cmd_t *r = c->pending.head; r; r = r->next) {
        if (r->deadline <= now) {
            lost(c, "timeout", "no answer within the command timeout", 0);
            return;
        }
        if (r->deadline < next)
            next = r->deadline;
    }
    if (next != UINT64_MAX)
        uv_timer_start(h, on_deadline, next - now, 0);
}

/* Makes sure the deadline timer fires no later than `at`. */
static void arm_deadline(client_t *c, uint64_t at)
{
    uint64_t now = uv_now(c->loop), in = at > now ? at - now : 0;
    if (!uv_is_active((uv_handle_t *)&c->deadline)
        || uv_timer_get_due_in(&c->deadline) > in)
        uv_timer_start(&c->deadline, on_deadline, in, 0);
}

/* ------------------------------------------------------------------ */
/* hiredis on libuv                                                   */

/*
 * Not hiredis's adapters/libuv.h: in 0.14 (Debian 12) it drops a poll
 * callback whose status is an error, and libuv reports a refused connect
 * (POLLERR) exactly that way -- and stops the poll -- so the failure
 * would only surface as a timeout. Here an error status makes hiredis do
 * the I/O it was waiting for, which finds the socket error (as later
 * hiredis releases do).
 */
typedef struct {
    redisAsyncContext *ac; /* NULL once hiredis cleaned up */
    uv_poll_t poll;
    int events;
} watch_t;

static void on_poll(uv_poll_t *h, int status, int events)
{
    watch_t *w = h->data;
    if (status < 0)
        events = w->events;
    if (w->ac && (events & UV_READABLE))
        redisAsyncHandleRead(w->ac);
    if (w->ac && (events & UV_WRITABLE)) /* the read may have freed it */
        redisAsyncHandleWrite(w->ac);
}

static void watch_set(watch_t *w, int events)
{
    w->events = events;
    if (events)
        uv_poll_start(&w->poll, events, on_poll);
    else
        uv_poll_stop(&w->poll);
}

static void watch_add_read(void *p)
{
    watch_t *w = p;
    watch_set(w, w->events | UV_READABLE);
}

static void watch_del_read(void *p)
{
    watch_t *w = p;
    watch_set(w, w->events & ~UV_READABLE);
}

static void watch_add_write(void *p)
{
    watch_t *w = p;
    watch_set(w, w->events | UV_WRITABLE);
}

static void watch_del_write(void *p)
{
    watch_t *w = p;
    watch_set(w, w->events & ~UV_WRITABLE);
}

static void on_watch_closed(uv_handle_t *h)
{
    free(h->data);
}

/* hiredis is freeing the context: the handle goes with the loop's next
 * turn. */
static void watch_cleanup(void *p)
{
    watch_t *w = p;
    w->ac = NULL;
    uv_close((uv_handle_t *)&w->poll, on_watch_closed);
}

static int watch_attach(redisAsyncContext *ac, uv_loop_t *loop)
{
    watch_t *w = mg_calloc(1, sizeof(*w));
    if (uv_poll_init(loop, &w->poll, ac->c.fd) != 0) {
        free(w);
        return -1;
    }
    w->ac = ac;
    w->poll.data = w;
    ac->ev.data = w;
    ac->ev.addRead = watch_add_read;
    ac->ev.delRead = watch_del_read;
    ac->ev.addWrite = watch_add_write;
    ac->ev.delWrite = watch_del_write;
    ac->ev.cleanup = watch_cleanup;
    return 0;
}

/* ------------------------------------------------------------------ */
/* The connection                                                     */

/* A short, stable reason for what hiredis saw (its errstr goes to the
 * log). */
static const char *reason_of(const redisAsyncContext *ac)
{
    const char *s = ac->c.errstr;
    switch (ac->c.err) {
    case 0:
    case REDIS_ERR_EOF: return "closed";
    case REDIS_ERR_PROTOCOL: return "protocol error";
    case REDIS_ERR_IO:
        if (strcasestr(s, "refused"))
            return "connection refused";
        if (strcasestr(s, "reset"))
            return "connection reset";
        if (strcasestr(s, "timed out"))
            return "timeout";
        if (strcasestr(s, "unreachable"))
            return "unreachable";
        return "connection error";
    default: return "connection error";
    }
}

/*
 * The connection failed or is given up: every pending call fails with
 * `why`, and the client is DOWN until its backoff has passed. `detail`
 * (may be NULL: then nothing is logged) says more in the error log.
 * `freeing`: hiredis itself is freeing the context (we are in one of its
 * callbacks for that): it must not be freed again here.
 */
static void lost(client_t *c, const char *why, const char *detail, int freeing)
{
    redisAsyncContext *ac = c->ac;
    c->ac = NULL;
    if (c->resolving) {
        c->resolving->c = NULL;
        uv_cancel((uv_req_t *)&c->resolving->req);
        c->resolving = NULL;
    }
    c->state = DOWN;
    c->last_err = why;
    c->retry_at = uv_now(c->loop) + c->backoff_ms;
    if (detail && !c->closing) {
        if (c->backoff_ms)
            mg_log_warn("redis %s:%d: %s (%s); next attempt in %llu ms",
                        c->host, c->port, why, detail,
                        (unsigned long long)c->backoff_ms);
        else
            mg_log_warn("redis %s:%d: %s (%s); reconnecting on the next "
                        "call",
                        c->host, c->port, why, detail);
    }
    c->backoff_ms = c->backoff_ms ? c->backoff_ms * 2 : BACKOFF_MIN_MS;
    if (c->backoff_ms > BACKOFF_MAX_MS)
        c->backoff_ms = BACKOFF_MAX_MS;
    while (c->pending.head)
        unpend(c, c->pending.head, why);
    batches_discard(c);
    uv_timer_stop(&c->deadline);
    /* Runs the pending hiredis callbacks with NULL replies now (or when
     * the current callback returns): the records above are QUEUED, so
     * they only drop their references. */
    if (ac && !freeing)
        redisAsyncFree(ac);
}

static int write_cmd(client_t *c, cmd_t *r, const char *cmd, size_t len);

static void on_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    cmd_t *r = priv;
    client_t *c = r->c;
    redisReply *rep = reply;
    r->refs--;
    if (!rep) {
        /* The first NULL reply of the current connection is the news that
         * it is gone (hiredis frees it next). */
        if (ac == c->ac)
            lost(c, reason_of(ac), ac->c.errstr, 1);
        maybe_free(r);
        return;
    }
    c->backoff_ms = 0; /* Redis answers */
    if (r->state != PENDING) {
        maybe_free(r);
        return;
    }
    if (r->evalsha && is_noscript(rep)) {
        /* Not in this server's script cache: EVAL sends and caches it.
         * The deadline stays the call's. */
        size_t len;
        char *cmd = eval_of(c, r->evalsha, r->evalsha_len, &len);
        free(r->evalsha);
        r->evalsha = NULL;
        if (cmd) {
            int rc = write_cmd(c, r, cmd, len);
            free(cmd);
            if (rc < 0)
                unpend(c, r, "closed");
            return;
        } /* the text is gone: NOSCRIPT goes to the caller, which EVALs */
    }
    if (r->task)
        r->replies[r->got] = reply_copy(rep);
    if (++r->got == r->n)
        unpend(c, r, NULL);
}

/* Decimal digits of n into w; returns the end. */
static char *put_uint(char *w, size_t n)
{
    char tmp[24];
    int i = 0;
    do
        tmp[i++] = (char)('0' + n % 10);
    while ((n /= 10) != 0);
    while (i)
        *w++ = tmp[--i];
    return w;
}

/* A RESP header, "*<n>" (array) or "$<n>" (bulk string) and CRLF, at w;
 * returns the end. */
static char *put_resp_head(char *w, char type, size_t n)
{
    *w++ = type;
    w = put_uint(w, n);
    *w++ = '\r';
    *w++ = '\n';
    return w;
}

/*
 * Formats a command as a RESP array of bulk strings into a malloc'd buffer
 * (freed with free()); returns its length. Not hiredis's
 * redisFormatCommandArgv: its sprintf per argument cost more than the rest
 * of a rate-limited request.
 */
static size_t resp_format(char **out, int argc, const char **argv,
                          const size_t *lens)
{
    size_t cap = 16;
    for (int i = 0; i < argc; i++)
        cap += lens[i] + 26; /* "$" + digits + CRLF + CRLF */
    char *buf = mg_malloc(cap), *w = put_resp_head(buf, '*', (size_t)argc);
    for (int i = 0; i < argc; i++) {
        w = put_resp_head(w, '$', lens[i]);
        memcpy(w, argv[i], lens[i]);
        w += lens[i];
        *w++ = '\r';
        *w++ = '\n';
    }
    *out = buf;
    return (size_t)(w - buf);
}

/* Writes one formatted command of r; 0, or -1 when hiredis refuses
 * (the connection is going away). */
static int write_cmd(client_t *c, cmd_t *r, const char *cmd, size_t len)
{
    if (redisAsyncFormattedCommand(c->ac, on_reply, r, cmd, len) != REDIS_OK)
        return -1;
    r->refs++;
    return 0;
}

/* Writes what r formatted while the address was being resolved. */
static void flush(client_t *c, cmd_t *r)
{
    int ok = 1;
    for (int i = 0; i < r->n; i++) {
        if (ok && write_cmd(c, r, r->unsent[i], r->unsent_len[i]) < 0)
            ok = 0;
        keep_or_free(r, r->unsent[i], r->unsent_len[i]);
    }
    free(r->unsent);
    free(r->unsent_len);
    r->unsent = NULL;
    r->unsent_len = NULL;
    if (!ok)
        unpend(c, r, "closed");
}

/* An EVALSHA record keeps its formatted command (for a NOSCRIPT answer);
 * any other command is freed once hiredis has copied it. */
static void keep_or_free(cmd_t *r, char *cmd, size_t len)
{
    if (r->kind == MG_REDIS_EVALSHA && !r->evalsha) {
        r->evalsha = cmd;
        r->evalsha_len = len;
    } else {
        free(cmd);
    }
}

/* ------------------------------------------------------------------ */
/* Script texts                                                       */

/* Keeps a copy of a script's text under its SHA1 (40 hex digits), the
 * oldest one making room: a NOSCRIPT answer (a restarted or flushed
 * Redis) is answered with EVAL without every call carrying the text. */
static void script_keep(client_t *c, const char *sha, const char *text,
                        size_t len)
{
    for (unsigned i = 0; i < c->nscripts && i < MAX_SCRIPTS; i++)
        if (memcmp(c->scripts[i].sha, sha, 40) == 0)
            return;
    script_t *s = &c->scripts[c->nscripts++ % MAX_SCRIPTS];
    free(s->text);
    memcpy(s->sha, sha, 40);
    s->text = mg_malloc(len ? len : 1);
    memcpy(s->text, text, len);
    s->len = len;
}

static const script_t *script_find(const client_t *c, const char *sha)
{
    for (unsigned i = 0; i < c->nscripts && i < MAX_SCRIPTS; i++)
        if (memcmp(c->scripts[i].sha, sha, 40) == 0)
            return &c->scripts[i];
    return NULL;
}

static int is_noscript(const redisReply *rep)
{
    return rep->type == REDIS_REPLY_ERROR && rep->len >= 8
           && memcmp(rep->str, "NOSCRIPT", 8) == 0;
}

/*
 * "*N CRLF $7 CRLF EVALSHA CRLF $40 CRLF <sha> CRLF <rest>" -> "*N CRLF
 * $4 CRLF EVAL CRLF $<len> CRLF <script> CRLF <rest>" in a malloc'd
 * buffer, or NULL when the script's text is no longer kept.
 */
static char *eval_of(client_t *c, const char *evalsha, size_t len,
                     size_t *out_len)
{
    const char *head_end = memchr(evalsha, '\n', len);
    size_t head = (size_t)(head_end - evalsha) + 1;
    size_t sha_at = head + sizeof("$7\r\nEVALSHA\r\n$40\r\n") - 1;
    size_t rest = sha_at + 40 + 2;
    const script_t *s = script_find(c, evalsha + sha_at);
    if (!s)
        return NULL;
    char *out = mg_malloc(len + s->len + 64), *w = out;
    memcpy(w, evalsha, head);
    w += head;
    memcpy(w, "$4\r\nEVAL\r\n", 10);
    w = put_resp_head(w + 10, '$', s->len);
    memcpy(w, s->text, s->len);
    w += s->len;
    *w++ = '\r';
    *w++ = '\n';
    memcpy(w, evalsha + rest, len - rest);
    w += len - rest;
    *out_len = (size_t)(w - out);
    return out;
}

/* ------------------------------------------------------------------ */
/* Batched scripts                                                    */

static void put_bulk(mg_strbuf_t *b, const char *s, size_t n)
{
    char head[32];
    char *w = put_resp_head(head, '$', n);
    mg_strbuf_add(b, head, (size_t)(w - head));
    mg_strbuf_add(b, s, n);
    mg_strbuf_add(b, "\r\n", 2);
}

static void put_bulk_uint(mg_strbuf_t *b, size_t n)
{
    char num[24];
    char *end = put_uint(num, n);
    put_bulk(b, num, (size_t)(end - num));
}

static void batch_free(batch_t *b)
{
    for (int i = 0; i < b->ncalls; i++) {
        b->calls[i]->refs--;
        maybe_free(b->calls[i]);
    }
    free(b->calls);
    mg_strbuf_free(&b->keys);
    mg_strbuf_free(&b->counts);
    mg_strbuf_free(&b->args);
    free(b->sent);
    free(b);
}

/*
 * The end of a loop turn, after its I/O callbacks: replies read in this
 * turn reach their requests now, the batches this turn opened go out, and
 * what was formatted is written at once -- each a loop turn sooner than a
 * timer or a poll for writability would. Deliveries run here, outside any
 * hiredis or FFI call, as from the kick.
 */
static void on_check(uv_check_t *h)
{
    client_t *c = h->data;
    deliver_ready(c);
    if (!c->ready.head)
        uv_timer_stop(&c->kick);
    if (c->open && c->state != RESOLVING) /* then connect_ip sends them */
        batches_send(c);
    if (c->state == READY && c->ac && sdslen(c->ac->c.obuf) > 0)
        redisAsyncHandleWrite(c->ac); /* on failure: lost(), via hiredis */
    if (!c->open && !c->ready.head)
        uv_check_stop(&c->check);
}

/* The open batch of this script, a new one when there is none. */
static batch_t *batch_for(client_t *c, const char *sha)
{
    for (batch_t *b = c->open; b; b = b->next)
        if (memcmp(b->sha, sha, 40) == 0)
            return b;
    batch_t *b = mg_calloc(1, sizeof(*b));
    b->c = c;
    memcpy(b->sha, sha, 40);
    b->next = c->open;
    c->open = b;
    check_start(c);
    return b;
}

static void batch_unlink(client_t *c, batch_t *b)
{
    batch_t **pp = &c->open;
    while (*pp != b)
        pp = &(*pp)->next;
    *pp = b->next;
    b->next = NULL;
}

/* Adds a call formatted as "EVALSHA sha numkeys key... arg..." (the Lua
 * side checked numkeys). The batch takes a reference on the record. */
static void batch_add(batch_t *b, cmd_t *r, int argc, const char **argv,
                      const size_t *lens)
{
    unsigned nkeys = 0;
    for (size_t i = 0; i < lens[2]; i++)
        nkeys = nkeys * 10 + (unsigned)(argv[2][i] - '0');
    unsigned nargs = (unsigned)argc - 3 - nkeys;
    for (unsigned i = 0; i < nkeys; i++)
        put_bulk(&b->keys, argv[3 + i], lens[3 + i]);
    for (unsigned i = 0; i < nargs; i++)
        put_bulk(&b->args, argv[3 + nkeys + i], lens[3 + nkeys + i]);
    put_bulk_uint(&b->counts, nkeys);
    put_bulk_uint(&b->counts, nargs);
    b->nkeys += nkeys;
    b->nargs += nargs;
    if (b->ncalls == b->cap) {
        b->cap = b->cap ? 2 * b->cap : 8;
        b->calls = mg_realloc(b->calls, sizeof(*b->calls) * (size_t)b->cap);
    }
    b->calls[b->ncalls++] = r;
    r->refs++;
}

static void batch_fail(client_t *c, batch_t *b, const char *why)
{
    for (int i = 0; i < b->ncalls; i++)
        if (b->calls[i]->state == PENDING)
            unpend(c, b->calls[i], why);
}

static void on_batch_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    batch_t *b = priv;
    client_t *c = b->c;
    redisReply *rep = reply;
    b->refs--;
    if (!rep) {
        if (ac == c->ac)
            lost(c, reason_of(ac), ac->c.errstr, 1);
        batch_free(b);
        return;
    }
    c->backoff_ms = 0;
    if (!b->retried && is_noscript(rep)) {
        b->retried = 1;
        size_t len;
        char *cmd = eval_of(c, b->sent, b->sent_len, &len);
        if (cmd) {
            int rc =
                redisAsyncFormattedCommand(c->ac, on_batch_reply, b, cmd, len);
            free(cmd);
            if (rc == REDIS_OK) {
                b->refs++;
                return;
            }
            batch_fail(c, b, "closed");
            batch_free(b);
            return;
        }
    }
    /* One element per call, or k per call laid flat (n * k elements,
     * cheaper for Redis to send than n lists): call i gets its k as a
     * list. An error (the script failed) goes to every call. */
    size_t k = 0;
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements
        && rep->elements % (size_t)b->ncalls == 0)
        k = rep->elements / (size_t)b->ncalls;
    if (!k && rep->type != REDIS_REPLY_ERROR) {
        batch_fail(c, b,
                   "the batched script's reply has not one element "
                   "per call");
    } else {
        for (int i = 0; i < b->ncalls; i++) {
            cmd_t *r = b->calls[i];
            if (r->state != PENDING)
                continue;
            if (r->task && !k) {
                r->replies[0] = reply_copy(rep);
            } else if (r->task && k == 1) {
                r->replies[0] = reply_copy(rep->element[i]);
            } else if (r->task) {
                redisReply part = {.type = REDIS_REPLY_ARRAY,
                                   .elements = k,
                                   .element = rep->element + (size_t)i * k};
                r->replies[0] = reply_copy(&part);
            }
            unpend(c, r, NULL);
        }
    }
    batch_free(b);
}

/*
 * "EVALSHA sha numkeys <every key> <calls> <keys, args of call 1> ...
 * <every arg>": ARGV[1] is the number of calls, ARGV[2i] and ARGV[2i+1]
 * call i's number of keys and of args, then every call's args in order.
 */
static void batch_send(client_t *c, batch_t *b)
{
    mg_strbuf_t cmd = {0};
    char head[32];
    size_t argc = 3 + b->nkeys + 1 + 2 * (size_t)b->ncalls + b->nargs;
    char *w = put_resp_head(head, '*', argc);
    mg_strbuf_reserve(&cmd, b->keys.len + b->counts.len + b->args.len + 128);
    mg_strbuf_add(&cmd, head, (size_t)(w - head));
    put_bulk(&cmd, "EVALSHA", 7);
    put_bulk(&cmd, b->sha, 40);
    put_bulk_uint(&cmd, b->nkeys);
    mg_strbuf_add(&cmd, b->keys.p, b->keys.len);
    put_bulk_uint(&cmd, (size_t)b->ncalls);
    mg_strbuf_add(&cmd, b->counts.p, b->counts.len);
    mg_strbuf_add(&cmd, b->args.p, b->args.len);
    mg_strbuf_free(&b->keys);
    mg_strbuf_free(&b->counts);
    mg_strbuf_free(&b->args);
    b->sent = cmd.p;
    b->sent_len = cmd.len;
    if (redisAsyncFormattedCommand(c->ac, on_batch_reply, b, b->sent,
                                   b->sent_len)
        != REDIS_OK) {
        batch_fail(c, b, "closed");
        batch_free(b);
        return;
    }
    b->refs++;
}

/* Sends every open batch (the client is CONNECTING or READY). */
static void batches_send(client_t *c)
{
    batch_t *b = c->open;
    c->open = NULL;
    while (b) {
        batch_t *next = b->next;
        b->next = NULL;
        batch_send(c, b);
        b = next;
    }
}

/* The connection is lost before the open batches went out: their calls
 * were failed by lost(); only the references go. */
static void batches_discard(client_t *c)
{
    batch_t *b = c->open;
    c->open = NULL;
    while (b) {
        batch_t *next = b->next;
        batch_free(b);
        b = next;
    }
}

static void on_setup_reply(redisAsyncContext *ac, redisReply *rep, client_t *c,
                           const char *what)
{
    if (ac != c->ac)
        return;
    if (!rep) {
        lost(c, reason_of(ac), ac->c.errstr, 1);
        return;
    }
    if (rep->type == REDIS_REPLY_ERROR) {
        /* Redis answers, but this connection is useless: back off. */
        lost(c, what, rep->str, 0);
        return;
    }
    c->backoff_ms = 0;
}

static void on_auth(redisAsyncContext *ac, void *reply, void *priv)
{
    on_setup_reply(ac, reply, priv, "auth failed");
}

static void on_select(redisAsyncContext *ac, void *reply, void *priv)
{
    on_setup_reply(ac, reply, priv, "select failed");
}

static void on_connect(const redisAsyncContext *cac, int status)
{
    client_t *c = cac->data;
    if (cac != c->ac)
        return;
    if (status == REDIS_OK) {
        c->state = READY;
        mg_log_info("redis %s:%d: connected", c->host, c->port);
    } else {
        /* hiredis frees the context when this returns. */
        lost(c, reason_of(cac), cac->c.errstr, 1);
    }
}

static void on_disconnect(const redisAsyncContext *cac, int status)
{
    client_t *c = cac->data;
    if (cac == c->ac) /* an idle connection closed by Redis */
        lost(c, status == REDIS_OK ? "closed" : reason_of(cac),
             cac->c.errstr[0] ? cac->c.errstr : "closed by the server", 1);
}

/* Connects to an IP literal: CONNECTING, or DOWN when it fails at once.
 * AUTH and SELECT go first; then the calls that waited for the address. */
static void connect_ip(client_t *c, const char *ip)
{
    redisAsyncContext *ac = redisAsyncConnect(ip, c->port);
    if (!ac) {
        lost(c, "connection error", "cannot allocate a context", 0);
        return;
    }
    if (ac->err) {
        char detail[128];
        snprintf(detail, sizeof(detail), "%s", ac->c.errstr);
        const char *why = reason_of(ac);
        redisAsyncFree(ac);
        lost(c, why, detail, 0);
        return;
    }
    if (watch_attach(ac, c->loop) < 0) {
        redisAsyncFree(ac);
        lost(c, "connection error", "cannot watch the socket", 0);
        return;
    }
    ac->data = c;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    c->ac = ac;
    c->state = CONNECTING;
    arm_deadline(c, c->connect_deadline);
    if (c->pass[0]) {
        const char *argv[3] = {"AUTH", c->user, c->pass};
        size_t lens[3] = {4, strlen(c->user), strlen(c->pass)};
        if (c->user[0])
            redisAsyncCommandArgv(ac, on_auth, c, 3, argv, lens);
        else {
            argv[1] = c->pass;
            lens[1] = lens[2];
            redisAsyncCommandArgv(ac, on_auth, c, 2, argv, lens);
        }
    }
    if (c->db) {
        char db[16];
        snprintf(db, sizeof(db), "%d", c->db);
        const char *argv[2] = {"SELECT", db};
        size_t lens[2] = {6, strlen(db)};
        redisAsyncCommandArgv(ac, on_select, c, 2, argv, lens);
    }
    for (cmd_t *r = c->pending.head, *next; r; r = next) {
        next = r->next;
        if (r->unsent)
            flush(c, r);
    }
    if (c->open)
        batches_send(c);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    resolve_t *rs = (resolve_t *)req;
    client_t *c = rs->c;
    char ip[64] = "";
    if (status == 0 && res)
        uv_ip_name(res->ai_addr, ip, sizeof(ip));
    uv_freeaddrinfo(res);
    free(rs);
    if (!c)
        return; /* abandoned: timed out, reconfigured or closed */
    c->resolving = NULL;
    if (!ip[0]) {
        lost(c, "cannot resolve host",
             status ? uv_strerror(status) : "no address", 0);
        return;
    }
    connect_ip(c, ip);
}

static int is_ip(const char *host)
{
    unsigned char buf[16];
    return uv_inet_pton(AF_INET, host, buf) == 0
           || uv_inet_pton(AF_INET6, host, buf) == 0;
}

/* DOWN -> RESOLVING or CONNECTING, or DOWN again at once on failure. */
static void connect_start(client_t *c)
{
    c->connect_deadline = uv_now(c->loop) + c->connect_timeout_ms;
    if (is_ip(c->host)) {
        connect_ip(c, c->host);
        return;
    }
    resolve_t *rs = mg_calloc(1, sizeof(*rs));
    rs->c = c;
    char port[16];
    snprintf(port, sizeof(port), "%d", c->port);
    struct addrinfo hints = {0};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc =
        uv_getaddrinfo(c->loop, &rs->req, on_resolved, c->host, port, &hints);
    if (rc) {
        free(rs);
        lost(c, "cannot resolve host", uv_strerror(rc), 0);
        return;
    }
    c->resolving = rs;
    c->state = RESOLVING;
    arm_deadline(c, c->connect_deadline);
}

/* ------------------------------------------------------------------ */
/* The client                                                         */

static void on_handle_closed(uv_handle_t *h)
{
    client_t *c = h->data;
    if (--c->open_handles)
        return;
    for (unsigned i = 0; i < MAX_SCRIPTS; i++)
        free(c->scripts[i].text);
    free(c->host);
    free(c->user);
    free(c->pass);
    free(c);
}

/* The VM's extensions close (worker exit, end of `moongate lua`): what
 * still waits is told "closed" now; later calls fail the same way. */
static void client_close(void *arg)
{
    client_t *c = arg;
    c->closing = 1;
    if (c->state != DOWN)
        lost(c, "closed", NULL, 0);
    uv_timer_stop(&c->kick);
    on_kick(&c->kick);
    uv_close((uv_handle_t *)&c->deadline, on_handle_closed);
    uv_close((uv_handle_t *)&c->kick, on_handle_closed);
    uv_close((uv_handle_t *)&c->check, on_handle_closed);
}

static client_t *client_of(mg_lua_task_t *t, uv_loop_t *loop)
{
    mg_lua_ext_t *ext = mg_lua_ext(mg_lua_task_vm(t), MG_LUA_EXT_REDIS);
    if (!ext->state) {
        client_t *c = mg_calloc(1, sizeof(*c));
        c->loop = loop;
        c->state = DOWN;
        c->last_err = "not connected";
        c->host = mg_strndup("127.0.0.1", 9);
        c->user = mg_strndup("", 0);
        c->pass = mg_strndup("", 0);
        c->port = 6379;
        c->timeout_ms = c->connect_timeout_ms = 1000;
        uv_timer_init(loop, &c->deadline);
        c->deadline.data = c;
        uv_timer_init(loop, &c->kick);
        c->kick.data = c;
        uv_check_init(loop, &c->check);
        c->check.data = c;
        c->open_handles = 3;
        ext->state = c;
        ext->close = client_close;
    }
    return ext->state;
}

static int same_str(const char *a, const char *b, size_t blen)
{
    return strlen(a) == blen && memcmp(a, b, blen) == 0;
}

static uint64_t to_ms(double seconds)
{
    double ms = seconds * 1000.0;
    if (!(ms >= 1.0))
        return 1;
    if (ms > 86400000.0)
        return 86400000;
    return (uint64_t)ms;
}

int mg_ffi_redis_configure(mg_lua_task_t *t, int serial, const char *host,
                           size_t hlen, int port, const char *user, size_t ulen,
                           const char *pass, size_t plen, int db,
                           double connect_timeout, double timeout)
{
    uv_loop_t *loop = mg_lua_task_loop(t);
    if (!loop)
        return -1;
    client_t *c = client_of(t, loop);
    c->serial = serial;
    c->connect_timeout_ms = to_ms(connect_timeout);
    c->timeout_ms = to_ms(timeout);
    if (same_str(c->host, host, hlen) && c->port == port
        && same_str(c->user, user, ulen) && same_str(c->pass, pass, plen)
        && c->db == db)
        return 0;
    free(c->host);
    free(c->user);
    free(c->pass);
    c->host = mg_strndup(host, hlen);
    c->user = mg_strndup(user, ulen);
    c->pass = mg_strndup(pass, plen);
    c->port = port;
    c->db = db;
    /* Calls in flight on the old server fail ("closed"); the next call
     * connects to the new one at once. */
    if (c->state != DOWN) {
        mg_log_info("redis: settings changed; reconnecting to %s:%d", c->host,
                    c->port);
        lost(c, "closed", NULL, 0);
    }
    c->state = DOWN;
    c->retry_at = 0;
    c->backoff_ms = 0;
    c->last_err = "not connected";
    return 0;
}

int mg_ffi_redis_send(mg_lua_task_t *t, int serial, int kind, int n,
                      const int *argc, const char **argv, const size_t *lens,
                      const char *script, size_t slen, const char **err)
{
    uv_loop_t *loop = mg_lua_task_loop(t);
    if (!loop) {
        *err = "no event loop here";
        return -1;
    }
    client_t *c = client_of(t, loop);
    if (c->closing) {
        *err = "closed";
        return -1;
    }
    if (serial != c->serial)
        return MG_DECLINED; /* the Lua side configures, then calls again */
    if (c->npending >= MAX_PENDING) {
        *err = "too many pending commands";
        return -1;
    }
    if (c->state == DOWN) {
        if (uv_now(loop) < c->retry_at) {
            *err = c->last_err; /* fail fast inside the backoff */
            return -1;
        }
        connect_start(c);
        if (c->state == DOWN) {
            *err = c->last_err;
            return -1;
        }
    }
    cmd_t *r = mg_calloc(1, sizeof(*r) + (size_t)n * sizeof(reply_t *));
    r->c = c;
    r->task = t;
    r->kind = kind;
    r->n = n;
    r->state = PENDING;
    r->deadline = uv_now(loop) + c->timeout_ms;
    list_push(&c->pending, r);
    c->npending++;
    if (kind == MG_REDIS_EVALSHA || kind == MG_REDIS_EVAL_BATCH)
        script_keep(c, argv[1], script, slen);
    if (kind == MG_REDIS_EVAL_BATCH) {
        batch_t *b = batch_for(c, argv[1]);
        batch_add(b, r, argc[0], argv, lens);
        if (b->ncalls >= BATCH_MAX_CALLS
            && (c->state == CONNECTING || c->state == READY)) {
            batch_unlink(c, b);
            batch_send(c, b);
        }
        arm_deadline(c, r->deadline);
        mg_lua_task_set_cancel(t, on_task_gone, r);
        return MG_AGAIN;
    }
    if (c->state == RESOLVING) {
        r->unsent = mg_calloc((size_t)n, sizeof(char *));
        r->unsent_len = mg_calloc((size_t)n, sizeof(size_t));
    }
    int ok = 1;
    for (int i = 0, off = 0; i < n; off += argc[i], i++) {
        char *cmd = NULL;
        size_t len = resp_format(&cmd, argc[i], argv + off, lens + off);
        if (r->unsent) {
            r->unsent[i] = cmd;
            r->unsent_len[i] = len;
            continue;
        }
        if (ok && write_cmd(c, r, cmd, len) < 0)
            ok = 0;
        keep_or_free(r, cmd, len);
    }
    if (!ok)
        unpend(c, r, "closed"); /* delivered at the end of the turn */
    check_start(c);             /* written then, with the turn's others */
    arm_deadline(c, r->deadline);
    mg_lua_task_set_cancel(t, on_task_gone, r);
    return MG_AGAIN;
}

void mg_ffi_redis_sha1(const char *s, size_t len, char *out)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    EVP_Digest(s, len, md, &mdlen, EVP_sha1(), NULL);
    for (unsigned int i = 0; i < mdlen && i < 20; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    out[40] = '\0';
}
