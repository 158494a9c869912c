/*
 * A per-request bump allocator: everything a request allocates comes from
 * its arena and is released in one call when the request ends (nginx and h2o
 * pools). The first block is kept across resets so a keep-alive connection
 * serving small requests does not touch malloc at all. Not thread-safe;
 * allocation failure aborts.
 */
#ifndef MG_ARENA_H
#define MG_ARENA_H

#include "common.h"

typedef struct mg_arena_block_s mg_arena_block_t;

typedef struct {
    mg_arena_block_t *head; /* current block; older blocks chained behind */
    size_t used;            /* bytes used in head */
} mg_arena_t;

void mg_arena_init(mg_arena_t *a);

/* Returns `size` bytes aligned to 16, valid until the next reset/free. */
void *mg_arena_alloc(mg_arena_t *a, size_t size);

/* Copies `s` into the arena; the copy is NUL-terminated for convenience. */
mg_str_t mg_arena_strdup(mg_arena_t *a, mg_str_t s);

/* Frees every block but the first, and empties it. */
void mg_arena_reset(mg_arena_t *a);

/* Frees all memory. The arena may be initialized again. */
void mg_arena_free(mg_arena_t *a);

#endif
