/*
 * The master process (see master.c).
 */
#ifndef MG_MASTER_H
#define MG_MASTER_H

#include "config.h"

/*
 * Runs the gateway: listeners, workers, signals, until stopped. Takes
 * ownership of `cfg`, already validated. Returns the exit status.
 */
int mg_master_run(const char *config_path, mg_config_t *cfg);

#endif
