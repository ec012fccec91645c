"""The event loops: our own (epoll, the default of both programs) and SwiftNIO's (`--event-loop nio`), with real
clients.

The whole suite runs on the defaults; TUNNEL_TEST_CLIENT_ARGS='--event-loop nio' (or TUNNEL_TEST_SERVER_ARGS) runs it
on NIO's loop. These tests name the loop, so both stay exercised in every run.
"""

import concurrent.futures
import os
import http.server
import socket
import subprocess
import threading

import harness
from harness import pattern_digest, recv_all, socks5_request
from test_udp import DNSLikeServer, associate, parse_reply, udp_header

EPOLL = ["--event-loop", "epoll"]
NIO = ["--event-loop", "nio"]


def test_a_download_and_an_upload_larger_than_every_buffer_arrive_intact(tunnel, target):
    tunnel.start(client_extra=EPOLL)
    n = 48 << 20
    got, digest, _ = harness.download_through_socks(tunnel.socks_port, target.port, n)
    assert got == n and digest == pattern_digest(n)

    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port, timeout=60)
    assert rep == 0
    s.sendall(f"SINK {n}\n".encode())
    s.sendall(harness.pattern_bytes(0, n))
    assert recv_all(s).decode().split() == [str(n), pattern_digest(n)]
    s.close()


def test_half_close_both_ways_and_many_parallel_streams(tunnel, target):
    tunnel.start(client_extra=EPOLL)

    def echo(i):
        s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
        assert rep == 0
        payload = b"ECHO\n" + bytes([i % 256]) * (20000 + i)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = recv_all(s)
        s.close()
        return data == payload[5:]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert all(pool.map(echo, range(200)))
    assert "reset:" not in tunnel.client.stderr_text()


def test_curl_through_socks5_socks4a_and_http_connect(tunnel, target, tmp_path):
    tunnel.start(client_extra=EPOLL)
    page = tmp_path / "page.html"
    page.write_bytes(b"x" * 300000)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://localhost:{server.server_address[1]}/page.html"
        for proxy in (["--socks5-hostname", f"127.0.0.1:{tunnel.socks_port}"],
                      ["--socks4a", f"127.0.0.1:{tunnel.socks_port}"],
                      ["-p", "-x", f"http://127.0.0.1:{tunnel.socks_port}"],
                      ["-x", f"http://127.0.0.1:{tunnel.socks_port}"]):
            out = subprocess.run(["curl", "-sS", "--max-time", "10", *proxy, url], capture_output=True)
            assert out.returncode == 0, (proxy, out.stderr)
            assert out.stdout == page.read_bytes(), proxy
    finally:
        server.shutdown()


def test_a_closed_port_gets_its_reply_code(tunnel):
    tunnel.start(client_extra=EPOLL)
    _, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", harness.free_port())
    assert rep == 5  # connection refused, as on the default loop


def test_udp_associate_round_trips(tunnel):
    """The relay's UDP socket is a datagram channel of the same loop: datagrams up to 58 KB go and come back."""
    tunnel.start(client_extra=EPOLL)
    server = DNSLikeServer()
    try:
        control, relay = associate(tunnel.socks_port)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(5)
        for i in range(30):
            payload = bytes([i]) * (1 + i * 2000)
            u.sendto(udp_header("127.0.0.1", server.port) + payload, relay)
            host, port, data = parse_reply(u.recvfrom(65535)[0])
            assert (host, port, data) == ("127.0.0.1", server.port, b"echo:" + payload)
        u.close()
        control.close()
    finally:
        server.stop()


def carries_a_stream_a_refusal_and_a_datagram(tunnel, target):
    """An echo stream with a half-close, a closed port's reply 0x05, and a UDP round trip."""
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.sendall(b"ECHO\n" + b"n" * 300000)
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b"n" * 300000
    _, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", harness.free_port())
    assert rep == 5
    server = DNSLikeServer()
    try:
        control, relay = associate(tunnel.socks_port)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(5)
        u.sendto(udp_header("127.0.0.1", server.port) + b"hi", relay)
        assert parse_reply(u.recvfrom(65535)[0])[2] == b"echo:hi"
        control.close()
    finally:
        server.stop()


def test_nio_loop_still_carries_streams_and_datagrams(tunnel, target):
    tunnel.start(client_extra=NIO)
    carries_a_stream_a_refusal_and_a_datagram(tunnel, target)


def test_the_full_tunnel_cannot_be_asked_on_our_loop(tunnel, tmp_path):
    """It still needs NIO's loop: named explicitly, our loop is refused with a clear line (by default the client
    picks NIO's for it)."""
    out = subprocess.run([harness.CLIENT_BIN, "--server", "127.0.0.1:1", "--server-key", tunnel.server_pub,
                          "--key", tunnel.client_key, "--full-tunnel", "--event-loop", "epoll"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode != 0
    assert "--event-loop epoll does not carry the full tunnel yet" in out.stderr


def test_the_server_on_nios_loops_still_carries_streams_and_datagrams(tunnel, target):
    tunnel.start(server_extra=NIO)
    carries_a_stream_a_refusal_and_a_datagram(tunnel, target)


def loop_cpu_ticks(pid, prefix):
    """CPU ticks (user + system) of each thread of `pid` whose name starts with `prefix`, by name."""
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        if name.startswith(prefix):
            ticks[name] = int(fields[11]) + int(fields[12])
    return ticks


def test_the_servers_loops_share_the_tunnels(tunnel, target):
    """One loop per core: a second client's tunnel runs on the next loop, and both carry their downloads."""
    if (os.cpu_count() or 1) < 2:
        import pytest
        pytest.skip("one core: one loop")
    tunnel.start_server(extra=EPOLL)
    first = tunnel.start_client(log="client1.log")
    tunnel.wait_until_connected(first)
    second = tunnel.start_client(key=tunnel.peer_key, log="client2.log")
    tunnel.wait_until_connected(second)
    before = loop_cpu_ticks(tunnel.server.proc.pid, "tunnel-server-")
    assert len(before) == os.cpu_count(), before

    def download(port):
        n = 128 << 20
        got, digest, _ = harness.download_through_socks(port, target.port, n)
        return got == n and digest == pattern_digest(n)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert all(pool.map(download, [first.port, second.port]))
    after = loop_cpu_ticks(tunnel.server.proc.pid, "tunnel-server-")
    busy = [name for name in after if after[name] - before.get(name, 0) >= 5]
    assert len(busy) >= 2, (before, after)


def test_the_full_tunnel_server_cannot_be_asked_on_our_loops(tunnel):
    out = subprocess.run([harness.SERVER_BIN, "--listen", "127.0.0.1:0", "--key", tunnel.server_key,
                          "--authorized-keys", tunnel.authorized, "--tun", "--event-loop", "epoll"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode != 0
    assert "--event-loop epoll does not carry the full tunnel (--tun) yet" in out.stderr
