#!/usr/bin/env bash
# The test suite: Swift unit tests (state machines, codecs, handlers), then end-to-end tests that start the
# real release binaries and drive them with curl, python-socks, raw sockets and a Python Noise peer.
# Tests that need network namespaces run when root (as in CI) and are skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

Tests/install-deps.sh
swift build -c release -Xswiftc -Xfrontend -Xswiftc -function-sections -Xswiftc -enforce-exclusivity=unchecked -Xswiftc -cross-module-optimization  # the release build, as README says
Tests/check-hot-functions.sh  # how much of the packet path's link order a refactor left stale (report only)
swift test
.venv-tests/bin/python -m pytest -q -p no:cacheprovider Tests/EndToEnd "$@"
