# moongate — one Makefile, outputs under build/. `make help` lists targets.

CC      ?= cc
BUILD   ?= build
PKGS    := luajit libuv libllhttp openssl hiredis libnghttp2
V       ?= 0
Q       := $(if $(filter 1,$(V)),,@)

PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)

OPT      ?= -O2
SAN      ?=
CFLAGS   += -std=c11 -D_GNU_SOURCE -g $(OPT) $(SAN) -Wall -Wextra -Werror \
            -Wno-unused-parameter -fno-strict-aliasing $(PKG_CFLAGS)
# -E exports mg_ffi_* so LuaJIT's ffi.C finds them.
LDFLAGS  += -Wl,-E $(SAN)
LDLIBS   += $(PKG_LIBS) -lm

CORE_SRC  := $(wildcard core/*.c)
CORE_OBJ  := $(CORE_SRC:core/%.c=$(BUILD)/obj/%.o)
LIB_OBJ   := $(filter-out $(BUILD)/obj/main.o,$(CORE_OBJ))
UNIT_SRC  := $(wildcard tests/unit/test_*.c)
UNIT_BIN  := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/%)

ASAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer \
              -fno-sanitize-recover=undefined

.PHONY: all help deps run test test-unit test-e2e test-asan asan bench \
        lint fmt clean soak

all: $(BUILD)/moongate                 ## release build (-O2, -Werror)

help:                                   ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | \
	    sed -e 's/:.*## /\t/' | expand -t 14

deps:                                   ## install dependencies (root, Debian 12)
	$(Q)sh scripts/install-deps.sh

$(BUILD)/obj/%.o: core/%.c $(wildcard core/*.h)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(CFLAGS) -c -o $@ $<

$(BUILD)/moongate: $(CORE_OBJ)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/tests/%: tests/unit/%.c $(LIB_OBJ) tests/unit/unit.h
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(CFLAGS) -Icore $(LDFLAGS) -o $@ $< $(LIB_OBJ) $(LDLIBS)

run: deps all                           ## build and start the demo gateway
	$(Q)sh scripts/run-demo.sh

unit-bins: $(UNIT_BIN)

test: deps                              ## every suite, release and ASan builds
	$(Q)$(MAKE) --no-print-directory all unit-bins
	$(Q)$(MAKE) --no-print-directory BUILD=build/asan OPT=-O1 \
	    SAN="$(ASAN_FLAGS)" all unit-bins
	$(Q)$(MAKE) --no-print-directory BUILD=build/fuzz CC=clang OPT=-O1 \
	    SAN="$(FUZZ_SAN)" fuzz-bins
	$(Q)sh tests/run-all.sh

test-unit: all unit-bins                ## C unit tests only
	$(Q)sh tests/run-all.sh unit

test-e2e: all                           ## end-to-end tests of the real binary
	$(Q)sh tests/run-all.sh e2e

asan:                                   ## ASan+UBSan build in build/asan
	$(Q)$(MAKE) --no-print-directory BUILD=build/asan OPT=-O1 \
	    SAN="$(ASAN_FLAGS)" all unit-bins

bench: deps all                         ## side-by-side load test against nginx
	$(Q)sh bench/run.sh

# The soak test (tests/soak.py): mixed traffic, reloads, RSS sampled; not
# part of `make test`. SOAK_SECONDS=120 for a short try.
SOAK_SECONDS ?= 600

soak: all                               ## 10-minute soak: RSS and failures
	$(Q)SOAK_SECONDS=$(SOAK_SECONDS) /usr/bin/python3 tests/soak.py

lint:                                   ## static checks
	$(Q)cppcheck --quiet --error-exitcode=1 --std=c11 \
	    --enable=warning,portability --inline-suppr core
	$(Q)clang-format --dry-run --Werror core/*.c core/*.h

fmt:                                    ## format the C sources in place
	$(Q)clang-format -i core/*.c core/*.h tests/unit/*.c tests/unit/*.h

# libFuzzer harnesses (tests/fuzz/README.md): core objects and harnesses
# built with clang into build/fuzz, each run FUZZ_SECONDS on its corpus.
FUZZ_SECONDS ?= 30
FUZZ_NAMES   := path router config shdict request response
FUZZ_SAN     := -fsanitize=fuzzer-no-link,address,undefined \
                -fno-omit-frame-pointer -fno-sanitize-recover=undefined

.PHONY: fuzz fuzz-bins

fuzz:                                   ## build and run the fuzz harnesses
	$(Q)$(MAKE) --no-print-directory BUILD=build/fuzz CC=clang OPT=-O1 \
	    SAN="$(FUZZ_SAN)" fuzz-bins
	$(Q)sh tests/fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_NAMES)

fuzz-bins: $(FUZZ_NAMES:%=$(BUILD)/fuzz_%)

$(BUILD)/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_%.h tests/fuzz/fuzz_http.h $(LIB_OBJ)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(CFLAGS) -Icore -Itests/fuzz $(LDFLAGS) -fsanitize=fuzzer \
	    -o $@ $< $(LIB_OBJ) $(LDLIBS)

clean:                                  ## remove build/
	rm -rf build
