# The two commands of the README: `make run` and `make test`. Both install what they need:
# `make run` (and `make install`) only what building and running need, `make test` (and
# `make bench`) the test and benchmark tools as well.
SHELL := /bin/bash
export PATH := $(PATH):/opt/swift/usr/bin

ARGS ?=
VENV := .venv-test
# SwiftPM leaves a few TemporaryDirectory.* behind in $TMPDIR on every run: kept under .build
# (which `make clean` removes), not in /tmp.
SWIFT := mkdir -p .build/tmp && TMPDIR="$(CURDIR)/.build/tmp" swift

.PHONY: deps test-deps build release run install test soak bench bench-tools bench-baseline clean

PREFIX ?= /usr/local

# Build and run: the compiler's packages, libmicrohttpd, jansson, pkg-config, iproute2.
deps:
	@scripts/install-deps.sh

# The tests' and benchmarks' tools (QEMU, buildah, wrk, valgrind, promtool, …); no service is
# started or enabled.
test-deps:
	@scripts/install-deps.sh --test

build: deps
	$(SWIFT) build

# The Swift runtime linked in (as the Dockerfile builds): the binaries run without the toolchain.
release: deps
	$(SWIFT) build -c release --static-swift-stdlib

# Runs the daemon in the foreground (as root, for /dev/net/tun), serving
# /run/mqtapd/api.sock. Extra flags: make run ARGS="--workers 4 --listen tcp:127.0.0.1:8080 --token-file /etc/mqtapd/token"
run: release
	.build/release/mqtapd $(ARGS)

# Both binaries on PATH (the systemd units run $(PREFIX)/bin/mqtapd): make install PREFIX=/usr.
install: release
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 .build/release/mqtapd .build/release/mqtap $(DESTDIR)$(PREFIX)/bin/
	# The CNI plugin where runtimes look for plugins ($(PREFIX)/lib/cni is in podman's list).
	install -d $(DESTDIR)$(PREFIX)/lib/cni
	install -m 0755 .build/release/mqtap-cni $(DESTDIR)$(PREFIX)/lib/cni/
	scripts/check-static.sh $(DESTDIR)$(PREFIX)/bin/mqtapd $(DESTDIR)$(PREFIX)/bin/mqtap

# Python tools for the live tests (pinned in Tests/live/requirements.txt), from PyPI.
$(VENV)/.installed: Tests/live/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r Tests/live/requirements.txt
	touch $@

# Every test: the spec and the Dockerfile linted, Swift unit and privileged tests (serial, so
# fd-count checks see only their own fds), then the live tests against the real binary
# (every endpoint and error, responses validated against openapi.yaml, schemathesis).
test: deps test-deps $(VENV)/.installed bench-tools
	$(VENV)/bin/openapi-spec-validator openapi.yaml
	$(VENV)/bin/hadolint Dockerfile
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build --no-parallel
	scripts/container-test.sh
	scripts/check-static.sh .build-static/release/mqtapd .build-static/release/mqtap
	cd Tests/live && MQTAPD_BIN="$(CURDIR)/.build/debug/mqtapd" "$(CURDIR)/$(VENV)/bin/python" -m pytest -q -p no:cacheprovider

# The 5-minute soak (the regular test command runs it for 30 s).
soak: deps test-deps $(VENV)/.installed
	$(SWIFT) build
	cd Tests/live && MQTAPD_SOAK_SECONDS=300 MQTAPD_BIN="$(CURDIR)/.build/debug/mqtapd" \
		"$(CURDIR)/$(VENV)/bin/python" -m pytest -q -p no:cacheprovider test_soak.py

# The benchmark tools: a generator and the C reference receiver.
bench-tools: bench/gen bench/ref bench/uring bench/fwd
bench/gen: bench/gen.c
	cc -O2 -Wall -Wextra -o $@ $<
bench/ref: bench/ref.c bench/tap.h
	cc -O2 -Wall -Wextra -pthread -o $@ $<
bench/uring: bench/uring.c bench/tap.h
	cc -O2 -Wall -Wextra -pthread -o $@ $<
bench/fwd: bench/fwd.c
	cc -O2 -Wall -Wextra -pthread -o $@ $<

# The counters baseline: the commit before e8bd636 (each queue's tx counters on a cache line of
# their own). The benchmarks' two-way forwarding runs its mqtapd against this one's.
COUNTERS_BASELINE ?= 957402559e6690b6e7ac1b5e5eed0bd176067779
BASELINE_SRC := .build/baseline-src

# Its mqtapd, built from the commit's tree as `release` builds the current one; rebuilt only
# when missing or built from another commit. Package.resolved (untracked) goes along, so the
# packages resolve to the same versions (from the same local mirrors: git's url.insteadOf).
bench-baseline: .build/baseline/mqtapd
ifneq ($(shell cat .build/baseline/commit 2>/dev/null),$(COUNTERS_BASELINE))
.PHONY: .build/baseline/mqtapd
endif
.build/baseline/mqtapd: | deps
	rm -rf $(BASELINE_SRC) .build/baseline
	mkdir -p $(BASELINE_SRC) .build/baseline
	set -o pipefail; git archive $(COUNTERS_BASELINE) | tar -x -C $(BASELINE_SRC)
	[ ! -f Package.resolved ] || cp Package.resolved $(BASELINE_SRC)/
	$(SWIFT) build --package-path $(BASELINE_SRC) -c release --static-swift-stdlib --product mqtapd
	cp $(BASELINE_SRC)/.build/release/mqtapd $@
	echo $(COUNTERS_BASELINE) > .build/baseline/commit

# The benchmarks (about 9 minutes; the first run also builds the counters baseline): writes
# bench/RESULTS.md. Needs root.
bench: deps test-deps release bench-baseline bench-tools
	COUNTERS_BASELINE=$(COUNTERS_BASELINE) python3 bench/run.py

clean:
	rm -rf .build $(VENV) bench/gen bench/ref bench/uring bench/fwd
