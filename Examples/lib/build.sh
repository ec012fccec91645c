# Sourced by the example scripts (which run with `set -euo pipefail`): checks for the Swift toolchain and
# builds release, showing its progress.
if ! command -v swift >/dev/null 2>&1; then
    echo "swift is not installed: this project needs Swift 6.1 or newer (see README, 'Set up')." >&2
    exit 1
fi
echo "== building (release; the first build takes a few minutes, later ones seconds)"
# One line per step ([done/total] Compiling ...), so a long first build shows where it is.
if ! swift build -c release -Xswiftc -Xfrontend -Xswiftc -function-sections -Xswiftc -enforce-exclusivity=unchecked -Xswiftc -cross-module-optimization 2>&1 \
    | { grep --line-buffered -E '^\[[0-9]+/[0-9]+\]|error|Build complete|Fetching|Computing' || true; } \
    | sed -u 's/^/   /'; then
    echo "the build failed; run 'swift build -c release' by hand to see every message" >&2
    exit 1
fi
