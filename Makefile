# The two commands of the README: `make run` and `make test`. Both install what they need.
SHELL := /bin/bash
export PATH := $(PATH):/opt/swift/usr/bin

ARGS ?=

.PHONY: deps build release run test clean

deps:
	@scripts/install-deps.sh

build: deps
	swift build

release: deps
	swift build -c release

# Runs the daemon in the foreground (root, for /dev/net/tun). Extra flags: make run ARGS="--workers 4"
run: release
	.build/release/mqtapd $(ARGS)

# Every test: unit tests without root, then the privileged ones on real devices.
# Serial, so fd-count checks see only their own test's fds.
test: deps
	swift build --build-tests
	swift test --skip-build --no-parallel

clean:
	rm -rf .build
