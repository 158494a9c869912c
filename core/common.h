/*
 * Types and conventions every moongate module shares: the string view that
 * crosses module boundaries, the error-code space, and the allocation helpers
 * that abort on failure (limits, not NULL checks, keep memory bounded).
 */
#ifndef MG_COMMON_H
#define MG_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* A borrowed byte range. Never assumed NUL-terminated. */
typedef struct {
    const char *p;
    size_t len;
} mg_str_t;

#define MG_STR(lit) ((mg_str_t){(lit), sizeof(lit) - 1})
#define MG_NULL_STR ((mg_str_t){NULL, 0})

/*
 * Return codes. 0 is success, negative values are errors: libuv's UV_E* for
 * I/O, and moongate's own below -4000 (clear of libuv's range). The two small
 * positive values are not errors.
 */
#define MG_OK 0
#define MG_AGAIN 1    /* would block: caller yields and is called back */
#define MG_DECLINED 2 /* not mine / not found */

#define MG_EBADPATH (-4001)  /* path cannot be normalized unambiguously */
#define MG_ECONFIG (-4002)   /* configuration is invalid */
#define MG_ETOOLARGE (-4003) /* a configured limit was exceeded */
#define MG_EPROTO (-4004)    /* peer violated the protocol */
#define MG_ETIMEOUT (-4005)  /* a configured timeout fired */

/* Human-readable text for any moongate or libuv error code. */
const char *mg_strerror(int err);

/* Milliseconds on CLOCK_MONOTONIC: the same clock in every process of the
 * gateway (shared deadlines, breaker and health state). */
uint64_t mg_monotonic_ms(void);

/* Allocation that aborts the process on failure (Redis, h2o style). */
void *mg_malloc(size_t size);
void *mg_calloc(size_t n, size_t size);
void *mg_realloc(void *p, size_t size);
char *mg_strndup(const char *s, size_t len);

static inline int mg_str_eq(mg_str_t a, mg_str_t b)
{
    return a.len == b.len && (a.len == 0 || memcmp(a.p, b.p, a.len) == 0);
}

/* ASCII case-insensitive equality, for header names and tokens. Inline:
 * the proxy calls it for every header it forwards. */
static inline int mg_str_caseeq(mg_str_t a, mg_str_t b)
{
    if (a.len != b.len)
        return 0;
    for (size_t i = 0; i < a.len; i++) {
        unsigned char x = (unsigned char)a.p[i], y = (unsigned char)b.p[i];
        if (x >= 'A' && x <= 'Z')
            x += 32;
        if (y >= 'A' && y <= 'Z')
            y += 32;
        if (x != y)
            return 0;
    }
    return 1;
}

static inline mg_str_t mg_str_from_cstr(const char *s)
{
    return (mg_str_t){s, s ? strlen(s) : 0};
}

#define MG_VERSION "0.1.0"

#define MG_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#endif
