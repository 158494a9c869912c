/*
 * The body of the config-loader fuzz harness, shared by
 * tests/fuzz/fuzz_config.c and tests/unit/test_corpus.c. The input is
 * written to a temp file and loaded with mg_config_load (Lua chunk, table
 * conversion, validation), then freed; ASan/LSan see any leak or overflow.
 *
 * The config is a Lua program run with the full standard library: it is
 * trusted operator input, and an endless loop, a huge string.rep or
 * os.exit() in it is the operator's problem, not an attack surface. So
 * inputs that could only hang or kill the fuzzer are skipped: longer than
 * 4 KiB, holding an ESC byte (a LuaJIT bytecode dump, which loadfile would
 * accept and which is unsafe by design), or naming one of the identifiers
 * in fuzz_config_banned (loops, functions, and the library entry points
 * that reach the OS, load code, build huge strings or run backtracking
 * patterns). What is left is the interesting part: arbitrary tables of
 * arbitrary values, run through the loader's conversion and validation.
 *
 * Checks: on success the config is non-NULL and its indexes are in range
 * (route upstream, zones sorted); on failure the config is NULL and the
 * error text is non-empty and NUL-terminated inside its buffer.
 * Returns NULL when every invariant holds (or the input was skipped), else
 * a static message.
 */
#ifndef MG_FUZZ_CONFIG_H
#define MG_FUZZ_CONFIG_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "config.h"

#define FUZZ_CONFIG_MAX 4096

static const char *const fuzz_config_banned[] = {
    "while",        "for",       "repeat",
    "goto",         "function",  "os",
    "io",           "require",   "dofile",
    "loadfile",     "load",      "loadstring",
    "debug",        "_G",        "getfenv",
    "setfenv",      "string",    "rep",
    "find",         "match",     "gmatch",
    "gsub",         "format",    "ffi",
    "jit",          "package",   "collectgarbage",
    "rawget",       "rawset",    "setmetatable",
    "getmetatable", "coroutine", "module",
    "newproxy",     "pcall",     "xpcall",
    "unpack",       "select",    "print",
    "error",        "assert",    NULL,
};

static int fuzz_config_ident(int c, int first)
{
    return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
           || (!first && c >= '0' && c <= '9');
}

/* True when the input must not be run (see the top of this file). Scans
 * every identifier-shaped word, inside strings and comments too. */
static int fuzz_config_skip(const uint8_t *data, size_t size)
{
    if (size > FUZZ_CONFIG_MAX || memchr(data, 0x1b, size))
        return 1;
    for (size_t i = 0; i < size;) {
        if (!fuzz_config_ident(data[i], 1)) {
            i++;
            continue;
        }
        size_t s = i;
        while (i < size && fuzz_config_ident(data[i], 0))
            i++;
        for (const char *const *b = fuzz_config_banned; *b; b++)
            if (strlen(*b) == i - s && memcmp(*b, data + s, i - s) == 0)
                return 1;
    }
    return 0;
}

static char fuzz_config_msg[256];
static char fuzz_config_file[64];

static const char *fuzz_config_one(const uint8_t *data, size_t size)
{
    if (fuzz_config_skip(data, size))
        return NULL;
    if (!fuzz_config_file[0]) {
        snprintf(fuzz_config_file, sizeof(fuzz_config_file),
                 "/tmp/mg_fuzz_config_%ld.lua", (long)getpid());
    }
    FILE *f = fopen(fuzz_config_file, "wb");
    if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0) {
        fprintf(stderr, "fuzz_config: cannot write %s\n", fuzz_config_file);
        abort();
    }
    char err[1024];
    memset(err, 'x', sizeof(err));
    mg_config_t *cfg = (mg_config_t *)1;
    int rc = mg_config_load(fuzz_config_file, &cfg, err, sizeof(err));
    unlink(fuzz_config_file);
    const char *bad = NULL;
    if (rc == 0) {
        if (!cfg)
            bad = "returned 0 without a config";
        for (size_t i = 0; !bad && i < cfg->nroutes; i++)
            if (cfg->routes[i].upstream < -1
                || cfg->routes[i].upstream >= (int)cfg->nupstreams)
                bad = "a route's upstream index is out of range";
        for (size_t i = 1; !bad && i < cfg->nzones; i++)
            if (strcmp(cfg->zones[i - 1].name, cfg->zones[i].name) >= 0)
                bad = "zones are not sorted by name";
        mg_config_free(cfg);
    } else {
        if (rc != MG_ECONFIG)
            bad = "failure code is not MG_ECONFIG";
        else if (cfg != NULL)
            bad = "failed but left *out set";
        else if (!memchr(err, '\0', sizeof(err)))
            bad = "error text is not NUL-terminated";
        else if (err[0] == '\0')
            bad = "failed without an error text";
    }
    if (bad) {
        snprintf(fuzz_config_msg, sizeof(fuzz_config_msg), "%s (rc %d)", bad,
                 rc);
        return fuzz_config_msg;
    }
    return NULL;
}

#endif
