#!/usr/bin/env bash
# Three tunnel-servers behind HAProxy (TCP mode), two clients, in network namespaces made (and removed) here.
# Both clients fetch a page every 50 ms through their SOCKS port. Then one server is killed (SIGKILL: no
# goodbye) and another drained (SIGTERM: it stops accepting, tells its clients to go, lets open streams
# finish). The clients move to the remaining servers; the script prints how long the killed server's client
# went without a good request, and how many requests failed while the other server drained (none should).
# Needs root. Addresses: 10.234.0.0/16, inside the namespaces only.
#
#   client1 (10.234.1.2) --\                          /-- tunnel-server s1 :7001 (health :8001)
#                           balancer (HAProxy :7443) --+-- tunnel-server s2 :7002 (health :8002)  -- web 10.234.4.2
#   client2 (10.234.3.2) --/                          \-- tunnel-server s3 :7003 (health :8003)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
[ "$(id -u)" -eq 0 ] || { echo "run as root (it creates network namespaces)" >&2; exit 1; }

. "$ROOT/Examples/lib/packages.sh"
ensure_packages curl iproute2 haproxy python3

. "$ROOT/Examples/lib/build.sh"
BIN="$ROOT/.build/release"

C1=hac1$$ C2=hac2$$ LB=halb$$ SRV=hasrv$$ WEB=haweb$$
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 1
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in $C1 $C2 $LB $SRV $WEB; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
# Background processes are started with `ip netns exec` itself (not a shell function), so that $! is the
# program's own process (ip execs it) and a signal reaches the program, not a shell around it.
now() { date +%s.%N; }

echo "== namespaces: two clients -- balancer -- three servers -- web"
for ns in $C1 $C2 $LB $SRV $WEB; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
link() {  # link NS_A IF_A ADDR_A NS_B IF_B ADDR_B
    ip -n "$1" link add "$2" type veth peer name "$5" netns "$4"
    ip -n "$1" addr add "$3/24" dev "$2"; ip -n "$4" addr add "$6/24" dev "$5"
    ip -n "$1" link set "$2" up; ip -n "$4" link set "$5" up
}
link $LB l1 10.234.1.1 $C1 c0 10.234.1.2
link $LB l3 10.234.3.1 $C2 c0 10.234.3.2
link $LB l2 10.234.2.1 $SRV s0 10.234.2.2
link $SRV s4 10.234.4.1 $WEB w0 10.234.4.2
ip -n $C1 route add default via 10.234.1.1
ip -n $C2 route add default via 10.234.3.1
ip -n $SRV route add default via 10.234.2.1
ip -n $WEB route add default via 10.234.4.1

echo "== web host"
mkdir "$WORK/www"; echo "hello from the web host" > "$WORK/www/index.html"
ip netns exec $WEB python3 -m http.server --bind 10.234.4.2 --directory "$WORK/www" 8080 >"$WORK/web.log" 2>&1 & PIDS+=($!)
# (http.server looks its own address up in DNS before it listens: that can take seconds here.)
for _ in $(seq 150); do ip netns exec $SRV curl -s -o /dev/null http://10.234.4.2:8080/ && break; sleep 0.2; done

echo "== keys: one static key for the pool, one per client"
"$BIN/tunnel-server" keygen --out "$WORK/server.key" >"$WORK/server.pub"
"$BIN/tunnel-client" keygen --out "$WORK/c1.key" >"$WORK/c1.pub"
"$BIN/tunnel-client" keygen --out "$WORK/c2.key" >"$WORK/c2.pub"
printf '%s client1\n%s client2\n' "$(cat "$WORK/c1.pub")" "$(cat "$WORK/c2.pub")" >"$WORK/authorized_keys"

SERVER_PID=()
for n in 1 2 3; do
    ip netns exec $SRV "$BIN/tunnel-server" --listen "10.234.2.2:700$n" --health "10.234.2.2:800$n" --key "$WORK/server.key" \
        --authorized-keys "$WORK/authorized_keys" --allow 10.234.4.0/24 --control-socket "$WORK/s$n.sock" \
        >"$WORK/s$n.out" 2>"$WORK/s$n.log" &
    SERVER_PID[$n]=$!; PIDS+=($!)
done

echo "== HAProxy (Examples/ha-netns/haproxy.cfg)"
ip netns exec $LB haproxy -f "$ROOT/Examples/ha-netns/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 & PIDS+=($!)
sleep 1

for c in 1 2; do
    ns=$C1; [ $c = 2 ] && ns=$C2
    lbaddr=10.234.1.1; [ $c = 2 ] && lbaddr=10.234.3.1
    ip netns exec $ns "$BIN/tunnel-client" --server "$lbaddr:7443" --server-key "$(cat "$WORK/server.pub")" \
        --key "$WORK/c$c.key" --socks 127.0.0.1:1080 --control-socket none \
        >"$WORK/c$c.out" 2>"$WORK/c$c.log" &
    PIDS+=($!)
done
for c in 1 2; do
    for _ in $(seq 100); do grep -q "tunnel up" "$WORK/c$c.log" && break; sleep 0.1; done
    grep -q "tunnel up" "$WORK/c$c.log" || { echo "client$c did not come up"; cat "$WORK/c$c.log" "$WORK/haproxy.log"; exit 1; }
done

# Which server holds a client's session now (its `tunnel-server status`).
server_of() {
    for n in 1 2 3; do
        [ -S "$WORK/s$n.sock" ] || continue
        if "$BIN/tunnel-server" status --control-socket "$WORK/s$n.sock" --json 2>/dev/null | python3 -c '
import json, sys
report = json.load(sys.stdin)
sys.exit(0 if any(s["name"] == sys.argv[1] and s["state"] == "connected" for s in report["sessions"]) else 1)
' "client$1"; then echo "$n"; return; fi
    done
    echo "?"
}

# A page every 50 ms from each client, each on a new connection: "ok|fail START END" per request.
LOOP='while :; do s=$(date +%s.%N)
    if curl -s --max-time 5 --socks5-hostname 127.0.0.1:1080 http://10.234.4.2:8080/ -o /dev/null
    then echo "ok $s $(date +%s.%N)"; else echo "fail $s $(date +%s.%N)"; fi; sleep 0.05; done'
ip netns exec $C1 bash -c "$LOOP" >"$WORK/loop1" & PIDS+=($!)
ip netns exec $C2 bash -c "$LOOP" >"$WORK/loop2" & PIDS+=($!)
sleep 1.5
echo "client1 is on s$(server_of 1), client2 on s$(server_of 2)"

# The first good request begun after time $2 in loop file $1: its end, minus $2.
first_ok_after() { awk -v t="$2" '$1 == "ok" && $2 >= t { printf "%.0f\n", ($3 - t) * 1000; exit }' "$1"; }
fails_between() { awk -v a="$2" -v b="$3" '$1 == "fail" && $2 >= a && $2 <= b' "$1" | wc -l; }

victim=$(server_of 1)
echo "== kill -9 s$victim (client1's server)"
killed_at=$(now)
kill -9 "${SERVER_PID[$victim]}"
for _ in $(seq 100); do [ -n "$(first_ok_after "$WORK/loop1" "$killed_at")" ] && break; sleep 0.1; done
kill_ms=$(first_ok_after "$WORK/loop1" "$killed_at")
echo "client1: first good request ${kill_ms:-never} ms after the kill; now on s$(server_of 1)"
sleep 2

drained=$(server_of 2)
echo "== SIGTERM s$drained (client2's server): it drains"
drain_at=$(now)
kill -TERM "${SERVER_PID[$drained]}"
for _ in $(seq 100); do grep -c "tunnel up" "$WORK/c2.log" | grep -q '^[2-9]' && break; sleep 0.1; done
sleep 3
drain_end=$(now)
moved=$(grep "tunnel up" "$WORK/c2.log" | tail -1 | cut -c1-25)
fails=$(fails_between "$WORK/loop2" "$drain_at" "$drain_end")
oks=$(awk -v a="$drain_at" '$1 == "ok" && $2 >= a' "$WORK/loop2" | wc -l)
echo "client2: now on s$(server_of 2) (tunnel up again at $moved); during the drain $oks requests ok, $fails failed"

echo "RESULT kill_to_first_good_ms=${kill_ms:-never}"
echo "RESULT drain_failed=$fails drain_ok=$oks"
status=0
if [ -z "$kill_ms" ] || [ "$kill_ms" -gt 2000 ]; then echo "FAIL: client1 did not recover within 2 s"; status=1; fi
if [ "$fails" -ne 0 ] || [ "$oks" -lt 10 ]; then echo "FAIL: requests failed during the drain"; status=1; fi
if [ $status -ne 0 ]; then
    for f in c1.log c2.log s1.log s2.log s3.log haproxy.log; do echo "--- $f"; tail -60 "$WORK/$f"; done
else
    echo "OK: clients moved off a killed and a drained server while requests kept working"
fi
exit $status
