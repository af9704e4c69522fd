# clip — developer and operator entry points.
# `make demo` and `make test` are the two setup commands in the README: each installs what it
# needs (Debian packages, then a virtualenv in .venv) and then does its job.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

# Debian packages the daemon, the tests and the demo use.
APT_PACKAGES := containerd runc fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev \
	docker-registry redis-server skopeo stargz-snapshotter tar gzip zstd iproute2 \
	golang-github-containerd-containerd-dev podman debootstrap ca-certificates

# What `make bench` needs beyond them: Go and stargz-snapshotter's Go library, from which the
# benchmark builds its own stargz daemon (bench/stargz). If they cannot be installed the
# benchmark still runs and its report says in one line why stargz was not measured.
BENCH_APT_PACKAGES := golang-go golang-github-containerd-stargz-snapshotter-dev

.PHONY: system-deps venv proto lint unit integration test demo demo-clean bench-deps bench \
	bench-quick clean

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -q; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml setup.py snapshotter/index/_native.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: system-deps $(VENV)/.installed

# Regenerate the Python modules for proto/*.proto (see proto/README.md).
proto: venv
	$(PY) proto/generate.py

lint: venv
	$(VENV)/bin/ruff check snapshotter tests integration bench proto
	$(VENV)/bin/mypy snapshotter
	gcc -fsyntax-only -Wall -Wextra -Werror \
		-I"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
		snapshotter/index/_native.c

unit: venv
	$(PY) -m pytest tests

integration: venv
	$(PY) -m pytest integration

test: venv lint
	$(PY) -m pytest

demo: venv
	$(PY) -m integration.demo

demo-clean:
	if [ -x $(PY) ]; then $(PY) -m integration.demo --clean; else rm -rf .work/demo; fi

bench-deps: system-deps
	-@missing=$$(for p in $(BENCH_APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages for the benchmark:" $$missing; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing \
		|| { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -q --no-install-recommends $$missing; }; \
	fi

bench: venv bench-deps
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	$(PY) -m bench

# A smaller benchmark run for development; results go to bench/work/, not bench/results/.
bench-quick: venv bench-deps
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
