/*
 * A growable byte buffer for building text responses off the hot path
 * (admin answers, the metrics exposition, explain output). Allocation
 * aborts on failure like the rest of moongate; not for request handling.
 */
#ifndef MG_STRBUF_H
#define MG_STRBUF_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "common.h"

typedef struct {
    char *p;    /* owned, NUL-terminated when len > 0 or after any append */
    size_t len; /* bytes used, excluding the NUL */
    size_t cap;
} mg_strbuf_t;

static inline void mg_strbuf_reserve(mg_strbuf_t *b, size_t more)
{
    if (b->len + more + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more + 1)
        cap *= 2;
    b->p = mg_realloc(b->p, cap);
    b->cap = cap;
}

static inline void mg_strbuf_add(mg_strbuf_t *b, const char *s, size_t n)
{
    mg_strbuf_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static inline void mg_strbuf_puts(mg_strbuf_t *b, const char *s)
{
    mg_strbuf_add(b, s, strlen(s));
}

__attribute__((format(printf, 2, 3))) static inline void
mg_strbuf_printf(mg_strbuf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n <= 0)
        return;
    mg_strbuf_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Appends s as a JSON string literal, quotes included. */
static inline void mg_strbuf_json_str(mg_strbuf_t *b, const char *s)
{
    mg_strbuf_add(b, "\"", 1);
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            mg_strbuf_add(b, e, 2);
        } else if (c < 0x20) {
            mg_strbuf_printf(b, "\\u%04x", c);
        } else {
            mg_strbuf_add(b, (const char *)&c, 1);
        }
    }
    mg_strbuf_add(b, "\"", 1);
}

static inline void mg_strbuf_free(mg_strbuf_t *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

#endif
