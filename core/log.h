/*
 * The error log: leveled, one line per entry, written with one write(2) so
 * lines from several processes never interleave. Each process names itself
 * once ("master", "worker 1"). Not the access log.
 */
#ifndef MG_LOG_H
#define MG_LOG_H

enum { MG_LOG_ERROR = 0, MG_LOG_WARN, MG_LOG_INFO, MG_LOG_DEBUG };

/*
 * Sets where entries go ("stderr" or a file path opened for append), the
 * lowest level written, and this process's name. Returns 0 or a negative
 * errno-style code when the file cannot be opened (the log stays on stderr).
 */
int mg_log_init(const char *path, int level, const char *who);

/* Renames this process in later entries (after fork). Copies `who`. */
void mg_log_set_who(const char *who);

/* Returns the level for "error", "warn", "info" or "debug", or -1. */
int mg_log_level_parse(const char *name);

/* True when entries at `level` are written (skip costly formatting). */
int mg_log_enabled(int level);

void mg_log(int level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Logs each line of `text` as its own entry, after `prefix`. */
void mg_log_lines(int level, const char *prefix, const char *text);

#define mg_log_error(...) mg_log(MG_LOG_ERROR, __VA_ARGS__)
#define mg_log_warn(...) mg_log(MG_LOG_WARN, __VA_ARGS__)
#define mg_log_info(...) mg_log(MG_LOG_INFO, __VA_ARGS__)
#define mg_log_debug(...)                                                      \
    do {                                                                       \
        if (mg_log_enabled(MG_LOG_DEBUG))                                      \
            mg_log(MG_LOG_DEBUG, __VA_ARGS__);                                 \
    } while (0)

#endif
