/*
 * Error-log implementation. Kept deliberately simple: formatting happens in a
 * stack buffer and each entry is a single write(2) on an O_APPEND descriptor,
 * which keeps lines from the master and every worker whole.
 */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int log_fd = STDERR_FILENO;
static int log_level = MG_LOG_INFO;
static char log_who[32] = "moongate";

static const char *const level_names[] = {"error", "warn", "info", "debug"};

int mg_log_init(const char *path, int level, const char *who)
{
    log_level = level;
    if (who)
        mg_log_set_who(who);
    if (!path || strcmp(path, "stderr") == 0) {
        log_fd = STDERR_FILENO;
        return 0;
    }
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return -errno;
    if (log_fd != STDERR_FILENO)
        close(log_fd);
    log_fd = fd;
    return 0;
}

void mg_log_set_who(const char *who)
{
    snprintf(log_who, sizeof(log_who), "%s", who);
}

int mg_log_level_parse(const char *name)
{
    for (size_t i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++)
        if (strcmp(name, level_names[i]) == 0)
            return (int)i;
    return -1;
}

int mg_log_enabled(int level)
{
    return level <= log_level;
}

void mg_log(int level, const char *fmt, ...)
{
    if (level > log_level)
        return;
    int saved_errno = errno;
    char line[2048];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    int n = (int)strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
    n += snprintf(line + n, sizeof(line) - (size_t)n,
                  ".%03dZ [%s] %s: ", (int)(tv.tv_usec / 1000),
                  level_names[level], log_who);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    va_end(ap);
    /* Truncated entries still end with a newline. */
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof(line) - 2)
        len = sizeof(line) - 2;
    line[len++] = '\n';
    ssize_t w = write(log_fd, line, len);
    (void)w;
    errno = saved_errno;
}

void mg_log_lines(int level, const char *prefix, const char *text)
{
    while (*text) {
        const char *nl = strchr(text, '\n');
        int len = nl ? (int)(nl - text) : (int)strlen(text);
        if (len > 0)
            mg_log(level, "%s%.*s", prefix, len, text);
        text += len + (nl ? 1 : 0);
    }
}
