# pyvmm: `make run` sets up and boots the default guest; `make test` runs the tests.
# Python runs from a virtualenv in .venv (Debian 12's system Python refuses
# `pip install` outside one).
SYSTEM_PYTHON ?= python3
VENV ?= .venv
# make bench BENCH_ARGS="--quick --only boot,exits" (see python -m bench --help)
BENCH_ARGS ?=
PYTHON = $(VENV)/bin/python
APT_PACKAGES = build-essential python3-dev python3-venv linux-libc-dev linux-source-6.1 busybox-static \
               flex bison bc libelf-dev libssl-dev cpio lz4 file e2fsprogs iproute2 xz-utils

.PHONY: setup deps install guest run test unit bench clean

setup: deps install guest

deps:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(PYTHON):
	$(SYSTEM_PYTHON) -m venv $(VENV)

install: $(PYTHON)
	$(PYTHON) -m pip install -q -e '.[test]' --config-settings editable_mode=compat

guest:
	bash guests/build.sh

run: setup
	$(PYTHON) -m vmm run

test: setup
	$(PYTHON) -m pytest -q tests

unit: install
	$(PYTHON) -m pytest -q tests/unit tests/native

bench: setup
	$(PYTHON) -m pip install -q -e '.[test,bench]' --config-settings editable_mode=compat
	$(PYTHON) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info vmm/_native*.so vmm/_native.c
