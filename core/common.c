/*
 * Shared helpers: error text and aborting allocation.
 */
#include "common.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <uv.h>

const char *mg_strerror(int err)
{
    switch (err) {
    case MG_OK: return "ok";
    case MG_AGAIN: return "would block";
    case MG_DECLINED: return "declined";
    case MG_EBADPATH: return "invalid path";
    case MG_ECONFIG: return "invalid configuration";
    case MG_ETOOLARGE: return "limit exceeded";
    case MG_EPROTO: return "protocol error";
    case MG_ETIMEOUT: return "timeout";
    default: return err < 0 ? uv_strerror(err) : "unknown";
    }
}

static void *check(void *p, size_t size)
{
    if (!p && size) {
        fprintf(stderr, "moongate: out of memory (%zu bytes)\n", size);
        abort();
    }
    return p;
}

void *mg_malloc(size_t size)
{
    return check(malloc(size), size);
}

void *mg_calloc(size_t n, size_t size)
{
    return check(calloc(n, size), n * size);
}

void *mg_realloc(void *p, size_t size)
{
    return check(realloc(p, size), size);
}

char *mg_strndup(const char *s, size_t len)
{
    char *d = mg_malloc(len + 1);
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

uint64_t mg_monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}
