/*
 * gw.http's engine (see client.c): HTTP/1.1 requests made from Lua over the
 * core's upstream pools, in parallel, waking the coroutine once all are
 * answered. The FFI entry points are declared in ffi.h.
 */
#ifndef MG_CLIENT_H
#define MG_CLIENT_H

#include "ffi.h"
#include "lua.h"

#endif
