#!/usr/bin/env bash
# Full tunnel under load (issue 17): 8 parallel downloads (iperf3 -R -P 8) through tunnel-client --full-tunnel
# and tunnel-server --tun, with a ping beside them, and the packets each end's TUN device dropped on transmit
# (the kernel's queue of txqueuelen packets overflowing because the reader did not take them in time).
#
#   sudo Tests/full-tunnel-downloads.sh [SECONDS]       # BIN=.build/release, TXQ=<txqueuelen for the server TUN>
#                                                      # RATE=50mbit: a link of that rate between client and server
#
# Makes three network namespaces (client, server, web) joined by veth pairs, removes them afterwards. Prints the
# idle and busy ping (p50/p90, replies of sent), the downloads' rate and retransmissions, and the TUN drops.
# Needs: iperf3, iproute2, iptables, ping, python3.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.build/release}; SECS=${1:-15}; TXQ=${TXQ:-}; RATE=${RATE:-}
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, TUN devices)" >&2; exit 1; }
W=$(mktemp -d); C=ftd-c; S=ftd-s; WEB=ftd-w; WEB_IP=10.224.2.2; CP=; SP=
nsx() { ip netns exec "$@"; }
cleanup() {
    nsx $WEB pkill -f "iperf3 -s -B $WEB_IP" 2>/dev/null
    # the client first (it undoes its routes), then the server; each logs its TUN drops on the way out
    for p in $CP $SP; do
        kill "$p" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done
    grep -h "kernel dropped\|packets dropped" "$W"/c.log "$W"/s.log 2>/dev/null | sed 's/^[^ ]* //'
    for n in $C $S $WEB; do ip netns del $n 2>/dev/null; done
    rm -rf "$W"
}
trap cleanup EXIT
for n in $C $S $WEB; do ip netns add $n; nsx $n ip link set lo up; done
ip link add ftdc0 netns $C type veth peer name ftds0 netns $S
ip link add ftds1 netns $S type veth peer name ftdw0 netns $WEB
nsx $C ip addr add 10.224.1.1/24 dev ftdc0; nsx $C ip link set ftdc0 up
nsx $S ip addr add 10.224.1.2/24 dev ftds0; nsx $S ip link set ftds0 up
nsx $S ip addr add 10.224.2.1/24 dev ftds1; nsx $S ip link set ftds1 up
nsx $WEB ip addr add $WEB_IP/24 dev ftdw0; nsx $WEB ip link set ftdw0 up
if [ -n "$RATE" ]; then
    # Both directions of the client-server link; tbf's queue bounded at 20 ms, as a modem's or router's.
    nsx $C tc qdisc add dev ftdc0 root tbf rate "$RATE" burst 32kb latency 20ms
    nsx $S tc qdisc add dev ftds0 root tbf rate "$RATE" burst 32kb latency 20ms
fi
nsx $S sysctl -qw net.ipv4.ip_forward=1
nsx $S iptables -t nat -A POSTROUTING -o ftds1 -j MASQUERADE
for n in $C $S $WEB; do nsx $n sysctl -qw net.ipv4.tcp_congestion_control=cubic 2>/dev/null; done
nsx $WEB iperf3 -s -B $WEB_IP -D
# The crash journals go to the run's own directory, not the host's /var/lib.
echo "state_file = \"$W/server.state\"" >"$W/server.toml"
echo "state_file = \"$W/client.state\"" >"$W/client.toml"
"$BIN/tunnel-server" keygen --out "$W/s.key" >"$W/s.pub" 2>/dev/null
"$BIN/tunnel-client" keygen --out "$W/c.key" >"$W/auth" 2>/dev/null
ip netns exec $S "$BIN/tunnel-server" --listen 10.224.1.2:7443 --key "$W/s.key" --authorized-keys "$W/auth" \
    --tun --tun-pool 10.224.13.0/24 --allow 10.224.0.0/16 --config "$W/server.toml" >"$W/s.log" 2>&1 &
SP=$!
sleep 0.5
ip netns exec $C "$BIN/tunnel-client" --server 10.224.1.2:7443 --server-key "$(head -1 "$W/s.pub")" \
    --key "$W/c.key" --socks 127.0.0.1:1090 --full-tunnel --config "$W/client.toml" >"$W/c.log" 2>&1 &
CP=$!
dev=""
for _ in $(seq 100); do
    dev=$(nsx $C ip route get $WEB_IP 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
    [ -n "$dev" ] && [ "$dev" != ftdc0 ] && break
    sleep 0.1
done
[ -n "$dev" ] && [ "$dev" != ftdc0 ] || { echo "the full tunnel did not come up; client log:" >&2; cat "$W/c.log" >&2; exit 1; }
CT=$dev
ST=$(nsx $S ip -o link show type tun | awk -F': ' '{print $2}' | head -1)
[ -n "$TXQ" ] && nsx $S ip link set dev "$ST" txqueuelen "$TXQ"
sleep 1
pctl() { sort -g | awk -v p="$1" '{ a[NR] = $1 } END { i = int(p / 100 * NR + 0.999999); if (i < 1) i = 1; if (i > NR) i = NR; print a[i] }'; }
ping_stats() {
    local r; r=$(nsx $C ping -n -c "$1" -i 0.1 -W 2 $WEB_IP 2>&1 | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p')
    echo "p50 $(echo "$r" | pctl 50) ms, p90 $(echo "$r" | pctl 90) ms, $(echo "$r" | grep -c .) replies of $1"
}
stat() { nsx "$1" cat "/sys/class/net/$2/statistics/$3"; }
echo "ping idle: $(ping_stats 30)"
s0=$(stat $S "$ST" tx_dropped); c0=$(stat $C "$CT" tx_dropped)
sp0=$(stat $S "$ST" tx_packets); cp0=$(stat $C "$CT" tx_packets)
nsx $C iperf3 -c $WEB_IP -R -P 8 -t "$SECS" -J >"$W/iperf.json" 2>&1 &
IP=$!
sleep 2
# The downloads' own round trip (the senders' smoothed RTT, from ss in the web namespace), every second.
( for _ in $(seq $((SECS - 4))); do
    nsx $WEB ss -tin state established '( sport = :5201 )' | sed -n 's/.* rtt:\([0-9.]*\)\/.*/\1/p'
    sleep 1
done >"$W/rtt" ) &
echo "ping beside 8 downloads: $(ping_stats $(( (SECS - 4) * 10 )))"
echo "the downloads' own RTT (their senders' srtt): p50 $(pctl 50 <"$W/rtt") ms, p90 $(pctl 90 <"$W/rtt") ms"
wait $IP
s1=$(stat $S "$ST" tx_dropped); c1=$(stat $C "$CT" tx_dropped)
sp1=$(stat $S "$ST" tx_packets); cp1=$(stat $C "$CT" tx_packets)
python3 -c "
import json; e = json.load(open('$W/iperf.json'))['end']
print('8 downloads: %.0f Mbit/s, %d retransmissions' % (e['sum_received']['bits_per_second'] / 1e6, e['sum_sent'].get('retransmits', 0)))"
echo "TUN transmit drops: server $ST $((s1 - s0)) of $((sp1 - sp0 + s1 - s0)) packets, client $CT $((c1 - c0)) of $((cp1 - cp0 + c1 - c0))"
