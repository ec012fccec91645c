#!/usr/bin/env bash
# Reports how many functions of Sources/TunnelCommandLine/hot-functions.order the release binaries no longer
# contain (renamed or moved by a refactor): those are left wherever the linker puts them, and the full-tunnel
# ping gets slower. Rerun Tests/profile-hot-functions.sh (as root) when the count grows. Informational: the
# exit status is 0 unless the binaries are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.build/release}
ORDER=Sources/TunnelCommandLine/hot-functions.order
[ -x "$BIN/tunnel-server" ] && [ -x "$BIN/tunnel-client" ] || { echo "no release binaries in $BIN" >&2; exit 1; }
command -v nm >/dev/null || { echo "hot-functions check skipped: nm missing (binutils)"; exit 0; }
symbols=$(mktemp)
trap 'rm -f "$symbols"' EXIT
{ nm "$BIN/tunnel-server"; nm "$BIN/tunnel-client"; } | awk '{print $NF}' | sort -u >"$symbols"
total=$(sort -u "$ORDER" | wc -l)
missing=$(sort -u "$ORDER" | comm -23 - "$symbols" | wc -l)
echo "hot-functions.order: $missing of $total functions are not in the release binaries"
if [ "$missing" -gt $((total / 10)) ]; then
    echo "  more than 10% stale: rerun Tests/profile-hot-functions.sh as root (see README, Performance)"
fi
