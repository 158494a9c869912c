/*
 * The shared table of peers.h: open addressing over MG_PEERS_MAX slots.
 * Claiming a slot is a CAS from free to "being claimed", then the key is
 * written and the slot published as ready; a reader meeting a slot being
 * claimed waits for it (a few instructions, unless the claimer died right
 * there, which the bounded wait survives by treating the slot as foreign).
 */
#include "peers.h"

#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#include "balancer.h"
#include "log.h"

static mg_peer_t *table;

int mg_peers_init(void)
{
    if (table)
        return 0;
    void *mem = mmap(NULL, MG_PEERS_MAX * sizeof(mg_peer_t),
                     PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return -errno;
    table = mem;
    return 0;
}

static size_t make_key(char *key, mg_str_t upstream, mg_str_t target)
{
    size_t n = 0;
    for (size_t i = 0; i < upstream.len && n < MG_PEER_KEY_MAX; i++)
        key[n++] = upstream.p[i];
    if (n < MG_PEER_KEY_MAX)
        key[n++] = '\0';
    for (size_t i = 0; i < target.len && n < MG_PEER_KEY_MAX; i++)
        key[n++] = target.p[i];
    return n;
}

/* Waits out a slot being claimed; returns its final `used`. */
static uint32_t settled(mg_peer_t *s)
{
    uint32_t u;
    for (int spins = 0; (u = atomic_load(&s->used)) == 1 && spins < 100000;
         spins++)
        sched_yield();
    return u;
}

mg_peer_t *mg_peers_get(mg_str_t upstream, mg_str_t target)
{
    char key[MG_PEER_KEY_MAX];
    size_t len = make_key(key, upstream, target);
    if (!table && mg_peers_init() < 0)
        goto full;
    size_t start = mg_balancer_hash(key, len) % MG_PEERS_MAX;
    for (size_t k = 0; k < MG_PEERS_MAX; k++) {
        mg_peer_t *s = &table[(start + k) % MG_PEERS_MAX];
        uint32_t u = atomic_load(&s->used);
        if (u == 0) {
            uint32_t free_slot = 0;
            if (atomic_compare_exchange_strong(&s->used, &free_slot, 1)) {
                memcpy(s->key, key, len);
                s->keylen = (uint32_t)len;
                atomic_store(&s->used, 2);
                return s;
            }
        }
        if (settled(s) == 2 && s->keylen == len
            && memcmp(s->key, key, len) == 0)
            return s;
    }
full:;
    static int warned;
    if (!warned++)
        mg_log_error("per-target shared state is full (%d targets): new "
                     "targets keep per-process state",
                     MG_PEERS_MAX);
    mg_peer_t *own = mg_calloc(1, sizeof(*own));
    own->used = 2;
    return own;
}
