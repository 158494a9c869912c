/*
 * Listening sockets: what the master opens for the workers' listeners and
 * for its own admin listener, the same way.
 */
#ifndef MG_LISTEN_H
#define MG_LISTEN_H

#include "config.h"

/*
 * A non-blocking socket bound to l->addr and listening with `backlog`
 * (SO_REUSEADDR; IPv6 addresses only, never v4-mapped). `cloexec`: not
 * inherited by the processes the caller forks. Returns the fd or a
 * negative errno.
 */
int mg_listen_socket(const mg_listen_conf_t *l, int backlog, int cloexec);

#endif
