# pyvmm: `make run` sets up and boots the default guest; `make test` runs the tests.
# Python runs from a virtualenv in .venv (Debian 12's system Python refuses
# `pip install` outside one).
SYSTEM_PYTHON ?= python3
VENV ?= .venv
# make bench BENCH_ARGS="--quick --only boot,exits" (see python -m bench --help)
BENCH_ARGS ?=
PYTHON = $(VENV)/bin/python
APT_PACKAGES = build-essential python3-dev python3-venv linux-libc-dev linux-source-6.1 busybox-static \
               flex bison bc libelf-dev libssl-dev cpio lz4 file e2fsprogs iproute2 xz-utils libseccomp-dev acl

.PHONY: setup deps install guest run test unit bench clean fuzz fuzz-deps fuzz-build

setup: deps install guest

deps:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(PYTHON):
	$(SYSTEM_PYTHON) -m venv $(VENV)

# compileall: the bytecode a non-editable install would have.  Without it, and with
# PYTHONDONTWRITEBYTECODE set (as on this project's hosts), every `pyvmm` start
# compiled its modules again: 150 ms more to a guest's first instruction.
install: $(PYTHON)
	$(PYTHON) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(PYTHON) -m compileall -q vmm

guest:
	bash guests/build.sh

run: setup
	$(PYTHON) -m vmm run

# Two pytest-xdist workers (-n auto capped at 2: one per core here; each
# guest test runs one emulated vCPU): the default-guest boots run side by
# side, and worksteal rebalances when one worker sits in a long boot.
# --durations: the slowest tests in every CI log.
PYTEST_ARGS ?= -n auto --maxprocesses 2 --dist worksteal --durations=15
test: setup
	$(PYTHON) -m pytest -q $(PYTEST_ARGS) tests

unit: install
	$(PYTHON) -m pytest -q tests/unit tests/native

bench: setup
	$(PYTHON) -m pip install -q -e '.[test,bench]' --config-settings editable_mode=compat
	$(PYTHON) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info vmm/_native*.so vmm/_native.c

# --- fuzzing (README "Fuzzing"): libFuzzer + ASan/UBSan harnesses for
# native/src (native/fuzz/) and atheris targets for the Python side (fuzz/).
# make fuzz FUZZ_SECONDS=60 runs every target that long; FUZZ_ARGS go to
# fuzz/run.py (e.g. FUZZ_ARGS="--only virtq,mmio").  Debian 12: clang is
# clang-14; libclang-rt-14-dev ships the fuzzer/ASan/UBSan runtimes.
FUZZ_SECONDS ?= 60
FUZZ_ARGS ?=
FUZZ_APT_PACKAGES = clang libclang-rt-14-dev
FUZZ_CC ?= clang
FUZZ_CFLAGS = -g -O1 -std=gnu11 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
              -Inative/include
FUZZ_WRAP = -Wl,--wrap=pv_vq_pop,--wrap=pv_vq_push
FUZZ_BIN = build/fuzz

fuzz-deps:
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(APT_PACKAGES) $(FUZZ_APT_PACKAGES)"

$(FUZZ_BIN)/virtq: native/fuzz/fuzz_virtq.c native/fuzz/fuzz_common.h native/src/virtq.c native/include/*.h
	@mkdir -p $(FUZZ_BIN)
	$(FUZZ_CC) $(FUZZ_CFLAGS) native/fuzz/fuzz_virtq.c native/src/virtq.c -o $@

$(FUZZ_BIN)/blk: native/fuzz/fuzz_blk.c native/fuzz/fuzz_common.h native/fuzz/fuzz_image.h native/src/virtq.c native/src/blk.c native/include/*.h
	@mkdir -p $(FUZZ_BIN)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_WRAP) native/fuzz/fuzz_blk.c native/src/virtq.c native/src/blk.c -o $@

$(FUZZ_BIN)/fast: native/fuzz/fuzz_fast.c native/fuzz/fuzz_common.h native/fuzz/fuzz_settle.h native/fuzz/fuzz_image.h native/src/virtq.c native/src/blk.c native/src/fastpath.c native/src/fasturing.c native/src/uring.c native/src/uring_int.h native/src/fast_int.h native/src/fastnet.c native/src/net.c native/include/*.h
	@mkdir -p $(FUZZ_BIN)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_WRAP) native/fuzz/fuzz_fast.c native/src/virtq.c native/src/blk.c native/src/fastpath.c native/src/fasturing.c native/src/uring.c native/src/fastnet.c native/src/net.c -o $@

$(FUZZ_BIN)/net: native/fuzz/fuzz_net.c native/fuzz/fuzz_common.h native/src/virtq.c native/src/net.c native/src/fastnet.c native/src/fastpath.c native/src/blk.c native/src/fasturing.c native/src/uring.c native/src/uring_int.h native/src/fast_int.h native/include/*.h
	@mkdir -p $(FUZZ_BIN)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_WRAP) native/fuzz/fuzz_net.c native/src/virtq.c native/src/net.c native/src/fastnet.c native/src/fastpath.c native/src/blk.c native/src/fasturing.c native/src/uring.c -o $@

$(FUZZ_BIN)/vsock: native/fuzz/fuzz_vsock.c native/fuzz/fuzz_common.h native/src/virtq.c native/src/vsock.c native/src/vsock_tx.c native/src/vsock_int.h native/include/*.h
	@mkdir -p $(FUZZ_BIN)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_WRAP) native/fuzz/fuzz_vsock.c native/src/virtq.c native/src/vsock.c native/src/vsock_tx.c -o $@

$(FUZZ_BIN)/uring: native/fuzz/fuzz_uring.c native/fuzz/fuzz_common.h native/fuzz/fuzz_settle.h native/src/virtq.c native/src/blk.c native/src/uring.c native/src/uring_int.h native/src/fast_int.h native/include/*.h
	@mkdir -p $(FUZZ_BIN)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(FUZZ_WRAP) native/fuzz/fuzz_uring.c native/src/virtq.c native/src/blk.c native/src/uring.c -o $@

fuzz-build: fuzz-deps $(FUZZ_BIN)/virtq $(FUZZ_BIN)/blk $(FUZZ_BIN)/fast $(FUZZ_BIN)/net $(FUZZ_BIN)/vsock $(FUZZ_BIN)/uring $(PYTHON)
	$(PYTHON) -m pip install -q -e '.[test,fuzz]' --config-settings editable_mode=compat

fuzz: fuzz-build
	$(PYTHON) fuzz/run.py --seconds $(FUZZ_SECONDS) $(FUZZ_ARGS)
