/*
 * gw.redis's engine (see redis.c): one Redis connection per worker VM over
 * hiredis's async API on the worker's libuv loop, shared by every request
 * (commands are pipelined on it), with per-command timeouts, reconnection
 * with backoff and fail-fast while Redis is down. Lua reaches it only
 * through the FFI entry points declared in ffi.h (mg_ffi_redis_*); the Lua
 * side is lua/moongate/redis.lua, the policy is documented in
 * docs/redis.md.
 */
#ifndef MG_REDIS_H
#define MG_REDIS_H

#include "ffi.h"
#include "lua.h"

/* What mg_ffi_redis_send is asked to do, and so what it wakes with. */
enum {
    MG_REDIS_COMMAND = 0,    /* one command: (value, nil) or (nil, err) */
    MG_REDIS_PIPELINE = 1,   /* n commands: (replies, errors) or (nil, err) */
    MG_REDIS_EVALSHA = 2,    /* one EVALSHA, EVAL on NOSCRIPT: as COMMAND */
    MG_REDIS_EVAL_BATCH = 3, /* one call joining this turn's batch of the
                                script (redis.c): its element of the
                                batch's reply, as COMMAND */
};

#endif
