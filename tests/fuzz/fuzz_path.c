/*
 * libFuzzer harness for mg_path_normalize (core/path.c). The checks live in
 * fuzz_path.h so tests/unit/test_corpus.c replays the corpus with them.
 * An invariant violation aborts, which libFuzzer reports as a crash.
 */
#include "fuzz_path.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *bad = fuzz_path_one(data, size);
    if (bad) {
        fprintf(stderr, "fuzz_path: invariant broken: %s\n", bad);
        abort();
    }
    return 0;
}
