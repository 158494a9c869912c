/*
 * The worker's LuaJIT VM and the coroutines it runs. Request data crosses
 * into Lua through the FFI (core/ffi.c); this file only uses the Lua C API
 * to start, resume and read coroutines, which the FFI cannot do.
 *
 * A task is a coroutine plus its C side: the timer it waits on and the
 * callback that receives the decisions it makes after a wait. Every resume
 * goes through resume(), which turns what the coroutine yielded into one
 * of the MG_LUA_* codes, so the yield protocol lives in one place (and in
 * runtime.lua, its other end).
 */
#include "lua.h"

#include <lauxlib.h>
#include <limits.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "log.h"

typedef struct lua_timer_s lua_timer_t;

struct mg_lua_s {
    lua_State *L;
    uv_loop_t *loop;
    lua_timer_t *timers; /* gw.timer: pending ones, by id */
    int ref_runtime;     /* the runtime module table */
    int idle_refs[64];   /* parked request coroutines, ready for reuse */
    lua_State *idle[64];
    unsigned nidle;
    mg_lua_ext_t ext[MG_LUA_EXT_MAX];
};

struct mg_lua_task_s {
    mg_lua_t *vm;
    lua_State *co;
    int co_ref;
    uv_timer_t *timer; /* allocated on the first gw.sleep */
    mg_lua_task_cb cb;
    void *data;
    int nresults;              /* values the last yield left on co's stack */
    unsigned parked : 1;       /* finished its request: reusable */
    void (*cancel)(void *arg); /* drops a pending wait (see lua.h) */
    void *cancel_arg;
};

static char root_dir[PATH_MAX];

const char *mg_lua_root(void)
{
    if (root_dir[0])
        return root_dir;
    const char *env = getenv("MOONGATE_HOME");
    if (env && *env) {
        snprintf(root_dir, sizeof(root_dir), "%s", env);
        return root_dir;
    }
    /* build/moongate or build/asan/moongate: look upwards for lua/. */
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        exe[n] = '\0';
        for (int up = 0; up < 4; up++) {
            char *slash = strrchr(exe, '/');
            if (!slash)
                break;
            *slash = '\0';
            char probe[PATH_MAX + 32];
            snprintf(probe, sizeof(probe), "%s/lua/moongate/runtime.lua", exe);
            if (access(probe, R_OK) == 0) {
                snprintf(root_dir, sizeof(root_dir), "%s", exe);
                return root_dir;
            }
        }
    }
    snprintf(root_dir, sizeof(root_dir), ".");
    return root_dir;
}

/* Pushes runtime[name]. */
static void push_runtime_fn(mg_lua_t *vm, const char *name)
{
    lua_rawgeti(vm->L, LUA_REGISTRYINDEX, vm->ref_runtime);
    lua_getfield(vm->L, -1, name);
    lua_remove(vm->L, -2);
}

mg_lua_t *mg_lua_new(uv_loop_t *loop, char *err, size_t errlen)
{
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    const char *root = mg_lua_root();
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/lua/?.lua;%s/lua/?/init.lua;%s", root, root,
                    lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 2);

    lua_getglobal(L, "require");
    lua_pushstring(L, "moongate.runtime");
    if (lua_pcall(L, 1, 1, 0)) {
        snprintf(err, errlen, "cannot load the Lua runtime from %s/lua: %s",
                 root, lua_tostring(L, -1));
        lua_close(L);
        return NULL;
    }
    lua_pushstring(L, root);
    lua_setfield(L, -2, "root");
    mg_lua_t *vm = mg_calloc(1, sizeof(*vm));
    vm->L = L;
    vm->loop = loop;
    vm->ref_runtime = luaL_ref(L, LUA_REGISTRYINDEX);
    return vm;
}

mg_lua_ext_t *mg_lua_ext(mg_lua_t *vm, int slot)
{
    return &vm->ext[slot];
}

mg_lua_t *mg_lua_task_vm(mg_lua_task_t *t)
{
    return t->vm;
}

static void timers_close_all(mg_lua_t *vm);

void mg_lua_close_ext(mg_lua_t *vm)
{
    timers_close_all(vm);
    for (int i = 0; i < MG_LUA_EXT_MAX; i++) {
        if (vm->ext[i].close)
            vm->ext[i].close(vm->ext[i].state);
        vm->ext[i].close = NULL;
        vm->ext[i].state = NULL;
    }
}

void mg_lua_free(mg_lua_t *vm)
{
    if (!vm)
        return;
    mg_lua_close_ext(vm);
    lua_close(vm->L);
    free(vm);
}

int mg_lua_gen_load(mg_lua_t *vm, unsigned id, const char *path, uint8_t *masks,
                    size_t nroutes, char *err, size_t errlen)
{
    lua_State *L = vm->L;
    push_runtime_fn(vm, "load_generation");
    lua_pushinteger(L, id);
    lua_pushstring(L, path);
    if (lua_pcall(L, 2, 2, 0)) {
        snprintf(err, errlen, "%s: %s", path, lua_tostring(L, -1));
        lua_pop(L, 1);
        return MG_ECONFIG;
    }
    if (lua_isnil(L, -2)) {
        snprintf(err, errlen, "%s", lua_tostring(L, -1));
        lua_pop(L, 2);
        return MG_ECONFIG;
    }
    for (size_t i = 0; i < nroutes; i++) {
        lua_rawgeti(L, -2, (int)i + 1);
        masks[i] = (uint8_t)lua_tointeger(L, -1);
        lua_pop(L, 1);
    }
    lua_pop(L, 2);
    return 0;
}

static void timer_cancel(mg_lua_t *vm, int id);

void mg_lua_gen_free(mg_lua_t *vm, unsigned id)
{
    push_runtime_fn(vm, "free_generation");
    lua_pushinteger(vm->L, id);
    /* It returns the ids of the generation's timers: cancelled with it. */
    if (lua_pcall(vm->L, 1, 1, 0) == 0 && lua_istable(vm->L, -1)) {
        size_t n = lua_objlen(vm->L, -1);
        for (size_t i = 1; i <= n; i++) {
            lua_rawgeti(vm->L, -1, (int)i);
            timer_cancel(vm, (int)lua_tointeger(vm->L, -1));
            lua_pop(vm->L, 1);
        }
    }
    lua_pop(vm->L, 1);
    /* Plugin modules of the old generation become garbage: collect now
     * rather than let many reloads pile up. */
    lua_gc(vm->L, LUA_GCCOLLECT, 0);
}

int mg_lua_check(const char *path, size_t nroutes, char *err, size_t errlen)
{
    mg_lua_t *vm = mg_lua_new(NULL, err, errlen);
    if (!vm)
        return MG_ECONFIG;
    uint8_t *masks = mg_calloc(nroutes + 1, 1);
    int rc = mg_lua_gen_load(vm, 0, path, masks, nroutes, err, errlen);
    free(masks);
    mg_lua_free(vm);
    return rc;
}

int mg_lua_describe(const char *path, int with_conf, size_t nroutes,
                    char ***out, char *err, size_t errlen)
{
    mg_lua_t *vm = mg_lua_new(NULL, err, errlen);
    if (!vm)
        return MG_ECONFIG;
    lua_State *L = vm->L;
    int rc = 0;
    push_runtime_fn(vm, "describe");
    lua_pushstring(L, path);
    lua_pushboolean(L, with_conf);
    if (lua_pcall(L, 2, 2, 0) || lua_isnil(L, -2)) {
        snprintf(err, errlen, "%s", lua_tostring(L, -1));
        rc = MG_ECONFIG;
    } else {
        char **v = mg_calloc(nroutes + 1, sizeof(char *));
        for (size_t i = 0; i < nroutes; i++) {
            lua_rawgeti(L, -2, (int)i + 1);
            size_t len = 0;
            const char *s = lua_tolstring(L, -1, &len);
            v[i] = s ? mg_strndup(s, len) : mg_strndup("null", 4);
            lua_pop(L, 1);
        }
        *out = v;
    }
    mg_lua_free(vm);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Tasks                                                              */

/*
 * A task on a fresh coroutine whose body is runtime[fn]; the caller pushes
 * the arguments (the task itself first, by convention) and resumes.
 */
/*
 * Pointers go to Lua as numbers: LuaJIT's JIT cannot pass a lightuserdata
 * to an FFI function (the trace aborts and everything on that path stays
 * interpreted), while casting a number to a pointer compiles. User-space
 * addresses on x86-64 and arm64 fit a double's 53-bit mantissa.
 */
static void push_ptr(lua_State *L, const void *p)
{
    lua_pushnumber(L, (lua_Number)(uintptr_t)p);
}

static mg_lua_task_t *task_new(mg_lua_t *vm, const char *fn, mg_lua_task_cb cb,
                               void *data)
{
    mg_lua_task_t *t = mg_calloc(1, sizeof(*t));
    t->vm = vm;
    t->cb = cb;
    t->data = data;
    t->co = lua_newthread(vm->L);
    t->co_ref = luaL_ref(vm->L, LUA_REGISTRYINDEX);
    push_runtime_fn(vm, fn);
    lua_xmove(vm->L, t->co, 1);
    push_ptr(t->co, t);
    return t;
}

static int resume(mg_lua_task_t *t, int nargs)
{
    lua_State *co = t->co;
    int rc = lua_resume(co, nargs);
    if (rc == 0) {
        lua_settop(co, 0);
        return MG_LUA_DONE;
    }
    if (rc != LUA_YIELD) {
        const char *msg = lua_tostring(co, -1);
        luaL_traceback(t->vm->L, co,
                       msg ? msg : "(error object is not a string)", 0);
        mg_log_lines(MG_LOG_ERROR, "lua: ", lua_tostring(t->vm->L, -1));
        lua_pop(t->vm->L, 1);
        lua_settop(co, 0);
        return MG_LUA_ERROR;
    }
    size_t len = 0;
    const char *what =
        lua_type(co, 1) == LUA_TSTRING ? lua_tolstring(co, 1, &len) : NULL;
    t->nresults = lua_gettop(co);
    /* By length first: this runs after every phase of every request. */
    if (len == 4 && memcmp(what, "next", 4) == 0)
        return MG_LUA_NEXT;
    if (len == 5 && memcmp(what, "proxy", 5) == 0)
        return MG_LUA_PROXY;
    if (len == 4 && memcmp(what, "wait", 4) == 0)
        return MG_LUA_WAIT;
    if (len == 7 && memcmp(what, "respond", 7) == 0)
        return MG_LUA_RESPOND;
    if (len == 4 && memcmp(what, "park", 4) == 0) {
        t->parked = 1;
        return MG_LUA_DONE;
    }
    mg_log_error("lua: a plugin yielded outside the gw API (coroutine.yield "
                 "in a phase?)");
    return MG_LUA_ERROR;
}

/* Clears what the last yield left before resuming with new values. */
static void reset_stack(mg_lua_task_t *t)
{
    lua_settop(t->co, 0);
    t->nresults = 0;
}

int mg_lua_request_start(mg_lua_t *vm, mg_req_t *r, unsigned gen_id,
                         size_t route_idx, mg_lua_task_cb cb, void *data,
                         mg_lua_task_t **out)
{
    lua_State *L = vm->L;
    mg_lua_task_t *t = mg_calloc(1, sizeof(*t));
    t->vm = vm;
    t->cb = cb;
    t->data = data;
    *out = t;
    if (vm->nidle) {
        /* A parked runner: its yield("park") returns these arguments. */
        vm->nidle--;
        t->co = vm->idle[vm->nidle];
        t->co_ref = vm->idle_refs[vm->nidle];
        lua_settop(t->co, 0);
    } else {
        t->co = lua_newthread(L);
        t->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        push_runtime_fn(vm, "runner");
        lua_xmove(L, t->co, 1);
    }
    push_ptr(t->co, t);
    lua_pushinteger(t->co, gen_id);
    lua_pushinteger(t->co, (lua_Integer)route_idx + 1);
    push_ptr(t->co, r);
    return resume(t, 4);
}

int mg_lua_task_phase(mg_lua_task_t *t, const char *phase)
{
    reset_stack(t);
    lua_pushstring(t->co, phase);
    return resume(t, 1);
}

int mg_lua_task_body_filter(mg_lua_task_t *t, const char *data, size_t n,
                            int eof, mg_str_t *out)
{
    reset_stack(t);
    lua_pushliteral(t->co, "body_filter");
    lua_pushlstring(t->co, data, n);
    lua_pushboolean(t->co, eof);
    int what = resume(t, 3);
    if (what != MG_LUA_NEXT)
        return MG_LUA_ERROR; /* raised, or (wrongly) yielded */
    size_t len = 0;
    const char *s = lua_tolstring(t->co, 2, &len); /* "next", out */
    *out = (mg_str_t){s ? s : "", s ? len : 0};
    return MG_LUA_NEXT;
}

void mg_lua_task_response(mg_lua_task_t *t, mg_arena_t *arena, int *status,
                          mg_str_t *body, mg_header_t **headers, size_t *n)
{
    /* Stack: "respond", status, body, { name, value, name, value, ... } */
    lua_State *co = t->co;
    size_t len;
    const char *s;
    *status = (int)lua_tointeger(co, 2);
    s = lua_tolstring(co, 3, &len);
    *body = mg_arena_strdup(arena, (mg_str_t){s ? s : "", s ? len : 0});
    size_t count = lua_objlen(co, 4) / 2;
    *headers = mg_arena_alloc(arena, sizeof(mg_header_t) * (count + 1));
    for (size_t i = 0; i < count; i++) {
        lua_rawgeti(co, 4, (int)(2 * i + 1));
        s = lua_tolstring(co, -1, &len);
        (*headers)[i].name = mg_arena_strdup(arena, (mg_str_t){s, len});
        lua_rawgeti(co, 4, (int)(2 * i + 2));
        s = lua_tolstring(co, -1, &len);
        (*headers)[i].value = mg_arena_strdup(arena, (mg_str_t){s, len});
        lua_pop(co, 2);
    }
    *n = count;
}

static void on_timer_closed(uv_handle_t *h)
{
    free(h);
}

void mg_lua_task_free(mg_lua_task_t *t)
{
    if (!t)
        return;
    if (t->cancel)
        t->cancel(t->cancel_arg);
    if (t->timer)
        uv_close((uv_handle_t *)t->timer, on_timer_closed);
    mg_lua_t *vm = t->vm;
    if (!t->parked) {
        /* Ended early (client gone, gateway error): its ctx must refuse
         * use from a timer that kept it, the request's memory is gone. */
        push_runtime_fn(vm, "abandon");
        lua_pushthread(t->co);
        lua_xmove(t->co, vm->L, 1);
        lua_pcall(vm->L, 1, 0, 0);
    }
    if (t->parked && vm->nidle < MG_ARRAY_SIZE(vm->idle)) {
        vm->idle[vm->nidle] = t->co;
        vm->idle_refs[vm->nidle++] = t->co_ref;
    } else {
        luaL_unref(vm->L, LUA_REGISTRYINDEX, t->co_ref);
    }
    free(t);
}

lua_State *mg_lua_task_prepare_wake(mg_lua_task_t *t)
{
    reset_stack(t);
    return t->co;
}

void mg_lua_task_wake(mg_lua_task_t *t, int nresults)
{
    int what = resume(t, nresults);
    if (what != MG_LUA_WAIT)
        t->cb(t, what, t->data); /* may free t */
}

void mg_lua_task_set_cancel(mg_lua_task_t *t, void (*cancel)(void *arg),
                            void *arg)
{
    t->cancel = cancel;
    t->cancel_arg = arg;
}

uv_loop_t *mg_lua_task_loop(mg_lua_task_t *t)
{
    return t->vm->loop;
}

static void on_sleep_done(uv_timer_t *timer)
{
    mg_lua_task_t *t = timer->data;
    mg_lua_task_prepare_wake(t);
    mg_lua_task_wake(t, 0);
}

/* gw.sleep: arms the task's timer; the Lua side then yields "wait". */
int mg_ffi_sleep(mg_lua_task_t *t, double seconds)
{
    if (!t->vm->loop)
        return -1;
    if (!t->timer) {
        t->timer = mg_malloc(sizeof(uv_timer_t));
        uv_timer_init(t->vm->loop, t->timer);
        t->timer->data = t;
    }
    /* The loop's cached clock may be old (Lua ran since the poll): a
     * timer armed on it would fire early. */
    uv_update_time(t->vm->loop);
    uv_timer_start(t->timer, on_sleep_done, (uint64_t)(seconds * 1000.0), 0);
    return 0;
}

/* ------------------------------------------------------------------ */
/* gw.timer                                                           */

/*
 * A timer runs its Lua function in a coroutine of its own (a task with no
 * request), so the function may wait like a request can. The Lua side
 * keeps id -> function; C keeps id -> libuv timer.
 */
struct lua_timer_s {
    uv_timer_t h;
    mg_lua_t *vm;
    int id;
    lua_timer_t *next;
};

static void on_lua_timer_closed(uv_handle_t *h)
{
    free(h);
}

static void timer_unlink(mg_lua_t *vm, lua_timer_t *lt)
{
    for (lua_timer_t **pp = &vm->timers; *pp; pp = &(*pp)->next)
        if (*pp == lt) {
            *pp = lt->next;
            return;
        }
}

static void timer_cancel(mg_lua_t *vm, int id)
{
    for (lua_timer_t *lt = vm->timers; lt; lt = lt->next)
        if (lt->id == id) {
            timer_unlink(vm, lt);
            uv_close((uv_handle_t *)&lt->h, on_lua_timer_closed);
            return;
        }
}

static void on_timer_task(mg_lua_task_t *t, int what, void *data)
{
    if (what != MG_LUA_WAIT)
        mg_lua_task_free(t);
}

static void on_lua_timer(uv_timer_t *h)
{
    lua_timer_t *lt = (lua_timer_t *)h;
    mg_lua_t *vm = lt->vm;
    int id = lt->id;
    if (!uv_timer_get_repeat(h)) {
        timer_unlink(vm, lt);
        uv_close((uv_handle_t *)h, on_lua_timer_closed);
    }
    mg_lua_task_t *t = task_new(vm, "run_timer", on_timer_task, NULL);
    lua_pushinteger(t->co, id);
    int what = resume(t, 2);
    on_timer_task(t, what, NULL);
}

void mg_lua_gen_init_worker(mg_lua_t *vm, unsigned id)
{
    if (!vm->loop)
        return;
    mg_lua_task_t *t = task_new(vm, "init_worker", on_timer_task, NULL);
    lua_pushinteger(t->co, id);
    on_timer_task(t, resume(t, 2), NULL);
}

int mg_ffi_timer_start(mg_lua_task_t *t, int id, double delay, double interval)
{
    mg_lua_t *vm = t->vm;
    if (!vm->loop)
        return -1;
    lua_timer_t *lt = mg_calloc(1, sizeof(*lt));
    lt->vm = vm;
    lt->id = id;
    uv_timer_init(vm->loop, &lt->h);
    uint64_t first = (uint64_t)(delay * 1000.0);
    uint64_t every = (uint64_t)(interval * 1000.0);
    uv_timer_start(&lt->h, on_lua_timer, first,
                   interval > 0 && !every ? 1 : every);
    lt->next = vm->timers;
    vm->timers = lt;
    return 0;
}

void mg_ffi_timer_cancel(mg_lua_task_t *t, int id)
{
    timer_cancel(t->vm, id);
}

/* Timers keep no loop alive once the worker stops: closed with the VM's
 * extensions. */
static void timers_close_all(mg_lua_t *vm)
{
    while (vm->timers)
        timer_cancel(vm, vm->timers->id);
}

/* ------------------------------------------------------------------ */
/* moongate lua FILE                                                  */

typedef struct {
    int status;
    int finished;
    uv_loop_t *loop;
} script_state_t;

static void on_script(mg_lua_task_t *t, int what, void *data)
{
    script_state_t *s = data;
    if (what == MG_LUA_WAIT)
        return;
    s->finished = 1;
    s->status = what == MG_LUA_DONE ? 0 : 1;
    /* Like `resty`: the script's end is the program's end; pending timers
     * are dropped. */
    uv_stop(s->loop);
}

int mg_lua_run_script(const char *file, int argc, char **argv)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char err[1024];
    mg_lua_t *vm = mg_lua_new(&loop, err, sizeof(err));
    if (!vm) {
        fprintf(stderr, "moongate: %s\n", err);
        return 1;
    }
    script_state_t state = {0, 0, &loop};
    mg_lua_task_t *t = task_new(vm, "run_script", on_script, &state);
    lua_pushstring(t->co, file);
    for (int i = 0; i < argc; i++)
        lua_pushstring(t->co, argv[i]);
    int what = resume(t, 2 + argc);
    on_script(t, what, &state);
    if (!state.finished)
        uv_run(&loop, UV_RUN_DEFAULT);
    if (!state.finished) {
        fprintf(stderr,
                "moongate: %s: stopped waiting with nothing left to "
                "wake it\n",
                file);
        state.status = 1;
    }
    /* A script may end with os.exit(); this is the normal way out. */
    mg_lua_task_free(t);
    mg_lua_close_ext(vm);
    uv_run(&loop, UV_RUN_DEFAULT); /* let the handles close */
    mg_lua_free(vm);
    uv_loop_close(&loop);
    return state.status;
}
