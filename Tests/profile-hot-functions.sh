#!/usr/bin/env bash
# Regenerates Sources/TunnelCommandLine/hot-functions.order, the functions the two programs run for every
# packet. The release link packs them together (lld --symbol-ordering-file, see Package.swift): a packet after
# an idle spell then touches a few dozen pages of code instead of more than a hundred pages spread over 16 MB.
# That layout took about 40 us off a full-tunnel ping.
#
# Run it as root after `swift build -c release` when the packet path changed much (a function missing from
# the list is only left where the linker puts it; nothing breaks). It starts the release binaries in three
# network namespaces made and removed here, records both processes with perf (software clock, call graphs)
# while a ping flood, iperf3 both ways and a SOCKS download run, and writes the functions it saw: those of the
# ping first (the latency path), then the bulk paths, each hottest first.
# Needs: perf (Debian: linux-perf), iperf3, curl, python3, iproute2.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.build/release}
OUT=${OUT:-Sources/TunnelCommandLine/hot-functions.order}
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, TUN devices)" >&2; exit 1; }
for t in perf iperf3 curl python3 ip; do command -v $t >/dev/null || { echo "missing tool: $t" >&2; exit 1; }; done
[ -x "$BIN/tunnel-server" ] && [ -x "$BIN/tunnel-client" ] || { echo "no release binaries in $BIN" >&2; exit 1; }

W=$(mktemp -d)
C=hotfn-c S=hotfn-s WEB=hotfn-w
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.5
    for n in $C $S $WEB; do ip netns del $n 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT

for n in $C $S $WEB; do ip netns add $n; ip -n $n link set lo up; done
ip -n $S link add s0 type veth peer name c0 netns $C
ip -n $S link add s1 type veth peer name w0 netns $WEB
ip -n $S addr add 10.231.1.1/24 dev s0; ip -n $C addr add 10.231.1.2/24 dev c0
ip -n $S addr add 10.231.2.1/24 dev s1; ip -n $WEB addr add 10.231.2.2/24 dev w0
for x in "$S s0" "$S s1" "$C c0" "$WEB w0"; do set -- $x; ip -n $1 link set $2 up; done
ip -n $C route add default via 10.231.1.1

"$BIN/tunnel-server" keygen --out "$W/s.key" >"$W/s.pub"
"$BIN/tunnel-client" keygen --out "$W/c.key" >"$W/ak"
ip netns exec $S "$BIN/tunnel-server" --listen 10.231.1.1:7443 --key "$W/s.key" --authorized-keys "$W/ak" \
    --tun --tun-pool6 none --allow 10.231.2.0/24 --log-level error >/dev/null 2>"$W/server.log" &
SP=$!; PIDS+=($SP)
sleep 1
ip netns exec $C "$BIN/tunnel-client" --server 10.231.1.1:7443 --server-key "$(cat "$W/s.pub")" --key "$W/c.key" \
    --socks 127.0.0.1:1080 --full-tunnel --dns off --log-level error >/dev/null 2>"$W/client.log" &
CP=$!; PIDS+=($CP)
for _ in $(seq 100); do ip -n $C route | grep -q "0.0.0.0/1" && break; sleep 0.1; done
ip -n $C route | grep -q "0.0.0.0/1" || { echo "the full tunnel did not come up" >&2; cat "$W"/*.log >&2; exit 1; }

ip netns exec $WEB iperf3 -s -1 --logfile "$W/iperf-up.log" &
PIDS+=($!)
head -c 300000000 /dev/zero >"$W/blob"
(cd "$W" && exec ip netns exec $WEB python3 -m http.server --bind 10.231.2.2 8080 >/dev/null 2>&1) &
PIDS+=($!)
ip netns exec $C ping -c 20 -i 0.01 -q 10.231.2.2 >/dev/null

record() { # record NAME SECONDS COMMAND...: perf over both programs while COMMAND runs
    local name=$1 secs=$2; shift 2
    perf record -q -e cpu-clock -F 10000 -g -p "$SP,$CP" -o "$W/$name.data" -- sleep "$secs" >/dev/null 2>&1 &
    local rec=$!
    sleep 0.3
    "$@" >/dev/null 2>&1 || true
    wait $rec || true
}
symbols() { # symbols NAME: the programs' functions in NAME's samples (any frame), hottest first
    perf script --no-demangle -F ip,sym,dso -i "$W/$1.data" 2>/dev/null |
        awk '$NF ~ /\/tunnel-(client|server)\)$/ && $2 !~ /@plt$|^\[unknown\]$/ {print $2}' |
        sort | uniq -c | sort -rn | awk '{print $2}'
}

record ping 6 ip netns exec $C ping -q -c 10000 -i 0.0005 10.231.2.2
record up 5 ip netns exec $C iperf3 -c 10.231.2.2 -t 4
ip netns exec $WEB iperf3 -s -1 --logfile "$W/iperf-down.log" &
PIDS+=($!); sleep 0.3
record down 5 ip netns exec $C iperf3 -c 10.231.2.2 -t 4 -R
record socks 5 ip netns exec $C curl -s --max-time 4 --socks5 127.0.0.1:1080 -o /dev/null http://10.231.2.2:8080/blob

{ symbols ping; symbols up; symbols down; symbols socks; } | awk '!seen[$0]++' >"$W/order"
[ -s "$W/order" ] || { echo "no samples of the programs: is perf allowed (kernel.perf_event_paranoid)?" >&2; exit 1; }
cp "$W/order" "$OUT"
echo "wrote $(wc -l <"$OUT") functions to $OUT"
# The list is not an input SwiftPM tracks: the programs must be relinked to use it.
echo "relink: rm $BIN/tunnel-server $BIN/tunnel-client && swift build -c release"
