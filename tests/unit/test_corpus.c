/*
 * Replays every committed fuzz corpus file (tests/fuzz/corpus/<harness>/)
 * through the same checks the libFuzzer harnesses run, so `make test`
 * covers them under the release and ASan builds without clang or
 * libFuzzer. The checks live in tests/fuzz/fuzz_<harness>.h, shared with
 * the harnesses; a crash found by fuzzing becomes a regression test by
 * copying its input into the corpus (tests/fuzz/README.md).
 */
#include "../fuzz/fuzz_config.h"
#include "../fuzz/fuzz_path.h"
#include "../fuzz/fuzz_request.h"
#include "../fuzz/fuzz_response.h"
#include "../fuzz/fuzz_router.h"
#include "../fuzz/fuzz_shdict.h"
#include "unit.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef const char *(*one_fn)(const uint8_t *data, size_t size);

/* The tests run from the repository root or from a build directory. */
static const char *corpus_root(void)
{
    static const char *const where[] = {
        "tests/fuzz/corpus",
        "../tests/fuzz/corpus",
        "../../tests/fuzz/corpus",
        "../../../tests/fuzz/corpus",
    };
    for (size_t i = 0; i < MG_ARRAY_SIZE(where); i++)
        if (access(where[i], R_OK | X_OK) == 0)
            return where[i];
    return NULL;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Reads a whole file into a malloc'ed buffer of exactly its size (so ASan
 * sees reads past the input's end); returns NULL on error. */
static uint8_t *slurp(const char *file, size_t *size)
{
    FILE *f = fopen(file, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    uint8_t *buf = malloc(cap);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap)
            buf = realloc(buf, cap *= 2);
    }
    fclose(f);
    uint8_t *exact = malloc(n ? n : 1);
    memcpy(exact, buf, n);
    free(buf);
    *size = n;
    return exact;
}

/*
 * Runs `one` on every regular file of corpus/<name>, in name order. Prints
 * each file that breaks an invariant; returns how many did, or -1 when the
 * directory is missing or empty. *nfiles is the number replayed.
 */
static int replay(const char *name, one_fn one, int *nfiles)
{
    const char *root = corpus_root();
    char dir[512];
    *nfiles = 0;
    if (!root)
        return -1;
    snprintf(dir, sizeof(dir), "%s/%s", root, name);
    DIR *dh = opendir(dir);
    if (!dh)
        return -1;
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *de;
    while ((de = readdir(dh)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        if (n == cap)
            names = realloc(names, (cap = cap ? cap * 2 : 16) * sizeof(*names));
        names[n++] = strdup(de->d_name);
    }
    closedir(dh);
    if (n)
        qsort(names, n, sizeof(*names), by_name);
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        char file[1024];
        size_t size;
        snprintf(file, sizeof(file), "%s/%s", dir, names[i]);
        uint8_t *data = slurp(file, &size);
        if (!data) {
            fprintf(stderr, "  %s: cannot read\n", file);
            bad++;
        } else {
            const char *msg = one(data, size);
            if (msg) {
                fprintf(stderr, "  %s: %s\n", file, msg);
                bad++;
            }
            (*nfiles)++;
        }
        free(data);
        free(names[i]);
    }
    free(names);
    return *nfiles ? bad : -1;
}

#define REPLAY(name, fn)                                                       \
    do {                                                                       \
        int nfiles_;                                                           \
        int bad_ = replay(name, fn, &nfiles_);                                 \
        if (bad_ < 0)                                                          \
            FAIL_AT("no corpus files found for %s", name);                     \
        if (bad_ > 0)                                                          \
            FAIL_AT("%d of %d corpus/%s files break an invariant (above)",     \
                    bad_, nfiles_, name);                                      \
    } while (0)

static void path_corpus_replays_clean(void)
{
    REPLAY("path", fuzz_path_one);
}

static void router_corpus_replays_clean(void)
{
    REPLAY("router", fuzz_router_one);
    fuzz_router_done();
}

static void config_corpus_replays_clean(void)
{
    REPLAY("config", fuzz_config_one);
}

static void shdict_corpus_replays_clean(void)
{
    REPLAY("shdict", fuzz_shdict_one);
}

/* These two run the real worker in a thread of this process (fuzz_http.h):
 * the exchanges go over loopback TCP. */
static void request_corpus_replays_clean(void)
{
    REPLAY("request", fuzz_request_one);
}

static void response_corpus_replays_clean(void)
{
    REPLAY("response", fuzz_response_one);
}

int main(void)
{
    RUN(path_corpus_replays_clean);
    RUN(router_corpus_replays_clean);
    RUN(config_corpus_replays_clean);
    RUN(shdict_corpus_replays_clean);
    RUN(request_corpus_replays_clean);
    RUN(response_corpus_replays_clean);
    UNIT_EXIT();
}
