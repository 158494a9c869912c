/*
 * The access log: one JSON object per line per request, buffered in the
 * worker and written with one write(2) per flush (when the buffer fills,
 * once a second, and at exit). Several workers append to the same file
 * (O_APPEND, whole lines per write). Reopened on SIGUSR1 for logrotate.
 */
#ifndef MG_ACCESSLOG_H
#define MG_ACCESSLOG_H

#include <uv.h>

#include "http.h"

typedef struct mg_accesslog_s mg_accesslog_t;

/*
 * Opens `path` ("stdout" or a file, appended to). Returns NULL and the
 * reason in err when it cannot be opened. Loop thread only.
 */
mg_accesslog_t *mg_accesslog_open(uv_loop_t *loop, const char *path, char *err,
                                  size_t errlen);

/* The path it writes to (for a reload to tell whether it changed). */
const char *mg_accesslog_path(const mg_accesslog_t *l);

/* Appends the line for a finished (or abandoned) request. */
void mg_accesslog_write(mg_accesslog_t *l, mg_req_t *r);

/* Flushes and reopens the file (after logrotate moved it). */
void mg_accesslog_reopen(mg_accesslog_t *l);

/* Flushes, closes the file and its timer; frees once the timer closed. */
void mg_accesslog_close(mg_accesslog_t *l);

#endif
