/*
 * `moongate explain -c FILE METHOD URL [-H 'Name: value']...`: shows what
 * the gateway would do with one request without starting it.
 */
#ifndef MG_EXPLAIN_H
#define MG_EXPLAIN_H

#include "config.h"

/*
 * Explains the request described by argv (METHOD URL [-H header]...) under
 * `cfg` (validated, loaded from cfg->file; borrowed), printing to stdout.
 * Returns the exit status: 0 when a route matches, 1 when the request
 * would be refused or matches no route, 2 on bad arguments.
 */
int mg_explain_run(const mg_config_t *cfg, int argc, char **argv);

#endif
