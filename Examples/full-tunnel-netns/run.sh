#!/usr/bin/env bash
# Full-tunnel mode on this machine, safely: three network namespaces made (and removed) here stand for a
# laptop, a VPN server and a web host that only the server can reach. The server runs `tunnel-server --tun`,
# the laptop `tunnel-client --full-tunnel`; then ping, curl and a DNS lookup from the laptop go through the
# tunnel, and the laptop's routes and resolver are shown before, during and after. Needs root.
# Addresses: 10.230.0.0/16 and fd30::/16, inside the namespaces only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
[ "$(id -u)" -eq 0 ] || { echo "run as root (it creates network namespaces and TUN devices)" >&2; exit 1; }
[ -e /dev/net/tun ] || { echo "no /dev/net/tun: load the tun module" >&2; exit 1; }

. "$ROOT/Examples/lib/packages.sh"
ensure_packages curl iproute2 nftables iputils-ping python3

. "$ROOT/Examples/lib/build.sh"
BIN="$ROOT/.build/release"

LAPTOP=ftlaptop$$ SERVER=ftserver$$ WEB=ftweb$$
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in $LAPTOP $SERVER $WEB; do ip netns del "$ns" 2>/dev/null || true; rm -rf "/etc/netns/$ns"; done
    rm -rf "$WORK"
}
trap cleanup EXIT
inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

echo "== namespaces: laptop -- server -- web"
for ns in $LAPTOP $SERVER $WEB; do
    ip netns add "$ns"; ip -n "$ns" link set lo up
    mkdir -p "/etc/netns/$ns"   # each gets its own /etc/resolv.conf (ip netns exec mounts it)
done
echo "nameserver 10.230.1.1" > "/etc/netns/$LAPTOP/resolv.conf"   # the laptop's ISP resolver
echo "nameserver 10.230.2.2" > "/etc/netns/$SERVER/resolv.conf"   # the server asks the web host's DNS
echo "nameserver 10.230.2.2" > "/etc/netns/$WEB/resolv.conf"
ip -n $SERVER link add s0 type veth peer name l0 netns $LAPTOP
ip -n $SERVER link add s1 type veth peer name w0 netns $WEB
ip -n $SERVER addr add 10.230.1.1/24 dev s0; ip -n $LAPTOP addr add 10.230.1.2/24 dev l0
ip -n $SERVER addr add 10.230.2.1/24 dev s1; ip -n $WEB addr add 10.230.2.2/24 dev w0
ip -n $SERVER -6 addr add fd30:2::1/64 dev s1 nodad; ip -n $WEB -6 addr add fd30:2::2/64 dev w0 nodad
for pair in "$SERVER s0" "$SERVER s1" "$LAPTOP l0" "$WEB w0"; do set -- $pair; ip -n "$1" link set "$2" up; done
ip -n $LAPTOP route add default via 10.230.1.1

echo "== web host: a page and a DNS name (web.example)"
mkdir "$WORK/www"; echo "hello from the web host, through the tunnel" > "$WORK/www/index.html"
ip netns exec $WEB python3 -m http.server --bind :: --directory "$WORK/www" 8080 >"$WORK/web.log" 2>&1 & PIDS+=($!)
ip netns exec $WEB python3 "$ROOT/Tests/EndToEnd/dns_server.py" 10.230.2.2 web.example=10.230.2.2,fd30:2::2 >"$WORK/dns.log" 2>&1 & PIDS+=($!)
sleep 1

echo "== keys"
SERVER_PUB=$("$BIN/tunnel-server" keygen --out "$WORK/server.key")
"$BIN/tunnel-client" keygen --out "$WORK/laptop.key" | sed 's/$/ laptop/' > "$WORK/authorized_keys"

echo "== tunnel-server --tun (in the server namespace)"
# The web host is on a private network, which the server keeps its clients away from unless told (--allow).
ip netns exec $SERVER "$BIN/tunnel-server" --listen 10.230.1.1:7443 --key "$WORK/server.key" \
    --authorized-keys "$WORK/authorized_keys" --tun --allow 10.230.2.0/24 --allow fd30:2::/64 \
    >"$WORK/server.out" 2>"$WORK/server.log" & PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$WORK/server.out" 2>/dev/null && break; sleep 0.1; done

echo "== the laptop before: routes and resolver"
inns $LAPTOP ip route; inns $LAPTOP cat /etc/resolv.conf
echo "   (curl to the web host without the tunnel fails: it has no route back)"
inns $LAPTOP curl -s --max-time 2 http://10.230.2.2:8080/ || echo "   curl failed, as expected"

echo "== tunnel-client --full-tunnel (in the laptop namespace)"
ip netns exec $LAPTOP "$BIN/tunnel-client" --server 10.230.1.1:7443 --server-key "$SERVER_PUB" --key "$WORK/laptop.key" \
    --full-tunnel >"$WORK/client.out" 2>"$WORK/client.log" & CLIENT=$!
PIDS+=($CLIENT)
for _ in $(seq 100); do grep -q "full tunnel up" "$WORK/client.log" 2>/dev/null && break; sleep 0.1; done
grep "full tunnel up\|DNS through" "$WORK/client.log" | sed 's/^.*\] /   /'

echo "== the laptop during: routes and resolver"
inns $LAPTOP ip route; inns $LAPTOP ip -6 route | grep -v fe80 || true; inns $LAPTOP cat /etc/resolv.conf
echo "== through the tunnel"
inns $LAPTOP ping -c 3 -i 0.2 10.230.2.2 | tail -2
inns $LAPTOP ping -6 -c 3 -i 0.2 fd30:2::2 | tail -2
inns $LAPTOP getent hosts web.example
inns $LAPTOP curl -sS --max-time 10 http://web.example:8080/
inns $LAPTOP curl -sS --max-time 10 "http://[fd30:2::2]:8080/"

echo "== stopping the client (SIGTERM): everything comes back"
kill -TERM $CLIENT; wait $CLIENT || true
inns $LAPTOP ip route; inns $LAPTOP cat /etc/resolv.conf
echo "== done"
