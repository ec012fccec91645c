#!/usr/bin/env bash
# The whole product on this machine: installs the system packages, builds release, makes fresh keys, starts
# tunnel-server and tunnel-client on loopback, serves a page from a local web server, and fetches it with
# curl through the SOCKS5 port. Everything it starts is stopped on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

. "$ROOT/Examples/lib/packages.sh"
ensure_packages curl python3

. "$ROOT/Examples/lib/build.sh"
BIN="$ROOT/.build/release"

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== fresh keys"
SERVER_PUB=$("$BIN/tunnel-server" keygen --out "$WORK/server.key")
CLIENT_PUB=$("$BIN/tunnel-client" keygen --out "$WORK/client.key")
echo "$CLIENT_PUB example-laptop" > "$WORK/authorized_keys"
echo "server public key: $SERVER_PUB"
echo "client public key: $CLIENT_PUB"

# Waits for a readiness line on a process's stdout file and prints its HOST:PORT.
wait_ready() {
    local file=$1 pattern=$2
    for _ in $(seq 1 100); do
        if grep -q "$pattern" "$file" 2>/dev/null; then
            sed -n "s/.*$pattern \(.*\)$/\1/p" "$file" | head -n 1
            return 0
        fi
        sleep 0.1
    done
    echo "timed out waiting for '$pattern'" >&2
    return 1
}

echo "== tunnel-server"
# The web server below is on this host's loopback, which the server refuses to reach unless told (--allow).
"$BIN/tunnel-server" --listen 127.0.0.1:0 --key "$WORK/server.key" --authorized-keys "$WORK/authorized_keys" \
    --allow 127.0.0.0/8 --allow ::1/128 >"$WORK/server.out" 2>"$WORK/server.log" &
PIDS+=($!)
SERVER_ADDR=$(wait_ready "$WORK/server.out" "tunnel-server listening on")
echo "tunnel-server listening on $SERVER_ADDR"

echo "== tunnel-client"
"$BIN/tunnel-client" --server "$SERVER_ADDR" --server-key "$SERVER_PUB" --key "$WORK/client.key" \
    --socks 127.0.0.1:0 >"$WORK/client.out" 2>"$WORK/client.log" &
PIDS+=($!)
SOCKS_ADDR=$(wait_ready "$WORK/client.out" "SOCKS5 listening on")
echo "SOCKS5 listening on $SOCKS_ADDR"

echo "== a local web page"
mkdir -p "$WORK/www"
echo "<html><body><h1>Hello through the encrypted tunnel</h1></body></html>" > "$WORK/www/index.html"
python3 -m http.server 0 --bind 127.0.0.1 --directory "$WORK/www" >"$WORK/web.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
    WEB_PORT=$(sed -n 's/.*port \([0-9]*\).*/\1/p' "$WORK/web.out" | head -n 1)
    [ -n "$WEB_PORT" ] && break
    sleep 0.1
done

echo "== curl --socks5-hostname $SOCKS_ADDR http://localhost:$WEB_PORT/"
curl -sS --max-time 10 --socks5-hostname "$SOCKS_ADDR" "http://localhost:$WEB_PORT/"
echo
echo "== what the two ends logged"
cat "$WORK/server.log" "$WORK/client.log"
echo "OK: the page above came through tunnel-client -> tunnel-server -> web server."
