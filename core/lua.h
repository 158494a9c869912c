/*
 * The Lua side of a worker: one LuaJIT VM per process, the plugin runtime
 * (lua/moongate/runtime.lua) loaded into it, a generation's plugin chains
 * built in it, and one coroutine ("task") per request that has plugins.
 * This module drives coroutines; what a request does with their decisions
 * is the pipeline's business (proxy.c).
 */
#ifndef MG_LUA_H
#define MG_LUA_H

#include <uv.h>

#include "common.h"
#include "http.h"

/* Not <lua.h>: with -Icore that would name this very file. */
typedef struct lua_State lua_State;

typedef struct mg_lua_s mg_lua_t;
typedef struct mg_lua_task_s mg_lua_task_t;

/* Route masks: which phases have plugins, and whether a handler answers. */
enum {
    MG_LUA_REWRITE = 1,
    MG_LUA_ACCESS = 2,
    MG_LUA_HEADER_FILTER = 4,
    MG_LUA_BODY_FILTER = 8,
    MG_LUA_LOG = 16,
    MG_LUA_HANDLER = 32,
};

/* What a task's coroutine decided when it stopped. */
enum {
    MG_LUA_WAIT = 1, /* suspended on I/O; the callback brings the rest */
    MG_LUA_PROXY,    /* rewrite/access done: go upstream */
    MG_LUA_RESPOND,  /* answer with mg_lua_task_response() */
    MG_LUA_NEXT,     /* a later phase ran */
    MG_LUA_DONE,     /* the coroutine finished */
    MG_LUA_ERROR,    /* it raised an error (logged with its traceback) */
};

typedef void (*mg_lua_task_cb)(mg_lua_task_t *t, int what, void *data);

/*
 * Creates a VM with the runtime loaded. `loop` may be NULL for a VM that
 * only validates configs. Returns NULL and the reason in err on failure.
 */
mg_lua_t *mg_lua_new(uv_loop_t *loop, char *err, size_t errlen);
void mg_lua_free(mg_lua_t *vm);

/* The directory holding lua/ and plugins/ (MOONGATE_HOME, or found from
 * the executable's location). */
const char *mg_lua_root(void);

/*
 * Loads the plugin chains of generation `id` from the config at `path`:
 * plugins resolved, loaded fresh and their configs checked. On success
 * fills masks[0..nroutes) and returns 0; else MG_ECONFIG with every error
 * (one per line) in err.
 */
int mg_lua_gen_load(mg_lua_t *vm, unsigned id, const char *path, uint8_t *masks,
                    size_t nroutes, char *err, size_t errlen);
void mg_lua_gen_free(mg_lua_t *vm, unsigned id);

/* Runs the plugins' init_worker() for a generation just made current, in a
 * coroutine of its own. Loop thread only. */
void mg_lua_gen_init_worker(mg_lua_t *vm, unsigned id);

/* Validates the Lua part of a config in a throwaway VM (master, check). */
int mg_lua_check(const char *path, size_t nroutes, char *err, size_t errlen);

/*
 * Describes the plugin chains of the config at `path`, built in a throwaway
 * VM (runtime.describe): *out gets `nroutes` JSON strings, one per route in
 * config order, each {"plugins":[...],"phases":{phase:[{name, priority
 * [, config]}]},"handler":bool}; configs only when `with_conf`. Caller
 * frees each string and the array. Returns 0, or MG_ECONFIG with the
 * errors in err. May block (file reads): master or CLI only.
 */
int mg_lua_describe(const char *path, int with_conf, size_t nroutes,
                    char ***out, char *err, size_t errlen);

/*
 * Starts the coroutine for request `r` on route `route_idx` (0-based) of
 * generation `gen_id`, and runs it until its first decision, which is
 * returned (MG_LUA_WAIT means `cb` will bring it later). Loop thread only.
 */
int mg_lua_request_start(mg_lua_t *vm, mg_req_t *r, unsigned gen_id,
                         size_t route_idx, mg_lua_task_cb cb, void *data,
                         mg_lua_task_t **out);

/* Runs a later phase ("header_filter", "log") synchronously. Returns
 * MG_LUA_NEXT, MG_LUA_DONE or MG_LUA_ERROR. */
int mg_lua_task_phase(mg_lua_task_t *t, const char *phase);

/*
 * Runs body_filter on one piece of the response body (`eof` on the last
 * call). On MG_LUA_NEXT `*out` is what the chain made of the piece; it
 * points into the coroutine's stack and is valid until the task runs
 * again, so the caller copies it before anything else. MG_LUA_ERROR when
 * a plugin raised (logged with its traceback).
 */
int mg_lua_task_body_filter(mg_lua_task_t *t, const char *data, size_t n,
                            int eof, mg_str_t *out);

/*
 * After MG_LUA_RESPOND: the status, body and headers the phase returned,
 * copied into the arena; the header array has room for one more (the
 * Content-Length header_filter is shown).
 */
void mg_lua_task_response(mg_lua_task_t *t, mg_arena_t *arena, int *status,
                          mg_str_t *body, mg_header_t **headers, size_t *n);

/*
 * For C code that made a task wait (a timer, an upstream call, a Redis
 * command): the coroutine's state, to push the results of the wait onto
 * (after mg_lua_task_prepare_wake), and the resume that delivers them as
 * the return values of the Lua side's coroutine.yield("wait"). What the
 * coroutine decides next goes to the task's callback (which may free it).
 * Loop thread only; never from inside Lua.
 */
lua_State *mg_lua_task_prepare_wake(mg_lua_task_t *t);
void mg_lua_task_wake(mg_lua_task_t *t, int nresults);

/*
 * Registers what to call if the task is freed while it waits (the client
 * went away): the waiting module drops its reference to the task there.
 * Pass NULL to clear once the wait is over.
 */
void mg_lua_task_set_cancel(mg_lua_task_t *t, void (*cancel)(void *arg),
                            void *arg);

/* The loop the task's waits run on (NULL in a check-only VM). */
uv_loop_t *mg_lua_task_loop(mg_lua_task_t *t);

/* The VM a task runs in. */
mg_lua_t *mg_lua_task_vm(mg_lua_task_t *t);

/*
 * Per-VM state of modules that serve Lua (the Redis client, the HTTP
 * client): one slot each, created by the module on first use, and its
 * `close` called once by mg_lua_free (before the loop is closed).
 */
enum { MG_LUA_EXT_REDIS, MG_LUA_EXT_HTTP, MG_LUA_EXT_MAX };
typedef struct {
    void *state;
    void (*close)(void *state);
} mg_lua_ext_t;

mg_lua_ext_t *mg_lua_ext(mg_lua_t *vm, int slot);

/* Closes every extension now (their handles close with the loop still
 * running). Idempotent; mg_lua_free calls it too. */
void mg_lua_close_ext(mg_lua_t *vm);

/* Ends a task: cancels its wait, releases its coroutine. */
void mg_lua_task_free(mg_lua_task_t *t);

/* `moongate lua FILE [args]`: runs FILE with the gw API on a fresh loop
 * until it and everything it waits for are done. Returns an exit status. */
int mg_lua_run_script(const char *file, int argc, char **argv);

#endif
