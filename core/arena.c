/*
 * Bump allocator behind mg_arena_t. Blocks are 8 KiB unless a single
 * allocation needs more; a request that builds a large header block gets one
 * oversized block rather than a chain of small ones.
 */
#include "arena.h"

#include <stdlib.h>

#define BLOCK_SIZE 8192
#define ALIGN(n) (((n) + 15) & ~(size_t)15)

struct mg_arena_block_s {
    mg_arena_block_t *prev;
    size_t size;
    _Alignas(16) char data[];
};

void mg_arena_init(mg_arena_t *a)
{
    a->head = NULL;
    a->used = 0;
}

static void push_block(mg_arena_t *a, size_t min)
{
    size_t size = min > BLOCK_SIZE ? min : BLOCK_SIZE;
    mg_arena_block_t *b = mg_malloc(sizeof(*b) + size);
    b->prev = a->head;
    b->size = size;
    a->head = b;
    a->used = 0;
}

void *mg_arena_alloc(mg_arena_t *a, size_t size)
{
    size = ALIGN(size ? size : 1);
    if (!a->head || a->head->size - a->used < size)
        push_block(a, size);
    void *p = a->head->data + a->used;
    a->used += size;
    return p;
}

mg_str_t mg_arena_strdup(mg_arena_t *a, mg_str_t s)
{
    char *p = mg_arena_alloc(a, s.len + 1);
    if (s.len)
        memcpy(p, s.p, s.len);
    p[s.len] = '\0';
    return (mg_str_t){p, s.len};
}

void mg_arena_reset(mg_arena_t *a)
{
    while (a->head && a->head->prev) {
        mg_arena_block_t *prev = a->head->prev;
        free(a->head);
        a->head = prev;
    }
    /* Keep the oldest block only if it is a regular one. */
    if (a->head && a->head->size != BLOCK_SIZE) {
        free(a->head);
        a->head = NULL;
    }
    a->used = 0;
}

void mg_arena_free(mg_arena_t *a)
{
    while (a->head) {
        mg_arena_block_t *prev = a->head->prev;
        free(a->head);
        a->head = prev;
    }
    a->used = 0;
}
