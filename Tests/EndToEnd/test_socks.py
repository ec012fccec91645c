"""SOCKS5 CONNECT through the real tunnel with real clients: curl, python-socks and raw sockets."""

import concurrent.futures
import hashlib
import http.server
import socket
import struct
import subprocess
import threading
import time

import pytest
from python_socks.sync import Proxy

import harness
from harness import pattern_digest, recv_all, recv_exact, socks5_request


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("<html><body>hello through the tunnel</body></html>\n")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_curl_socks5_hostname_fetches_page(tunnel, http_server):
    tunnel.start()
    port = http_server.server_address[1]
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--socks5-hostname", f"127.0.0.1:{tunnel.socks_port}",
         f"http://localhost:{port}/index.html"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "hello through the tunnel" in out.stdout
    # The name went to the server for resolution: the server log has the domain, not an IP.
    assert f"localhost:{port}" in tunnel.server.stderr_text()


def test_curl_socks5_with_ip_and_ipv6(tunnel, http_server):
    tunnel.start()
    port = http_server.server_address[1]
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--socks5", f"127.0.0.1:{tunnel.socks_port}",
                          f"http://127.0.0.1:{port}/index.html"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "hello" in out.stdout
    v6 = harness.TargetServer("::1")
    try:
        s, rep, host, bport = socks5_request(tunnel.socks_port, "::1", v6.port)
        assert rep == 0
        s.sendall(b"ECHO\nsix")
        assert recv_exact(s, 3) == b"six"
        s.close()
    finally:
        v6.stop()


def test_python_socks_echo_and_bound_address(tunnel, target):
    tunnel.start()
    proxy = Proxy.from_url(tunnel.proxy_url(), rdns=True)
    sock = proxy.connect(dest_host="localhost", dest_port=target.port, timeout=10)
    sock.sendall(b"ECHO\nhello")
    assert recv_exact(sock, 5) == b"hello"
    sock.close()
    # The reply carries the server's real bound address (its outbound socket), not zeros.
    s, rep, host, port = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    assert host == "127.0.0.1" and port != 0
    s.close()


def test_pipelined_greeting_request_and_data(tunnel, target):
    """Greeting, request and the first data in one segment (optimistic clients do this)."""
    tunnel.start()
    s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    req = b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", target.port)
    s.sendall(req + b"ECHO\npipelined")
    assert recv_exact(s, 2) == b"\x05\x00"
    rep, _, _ = harness.read_socks5_reply(s)
    assert rep == 0
    assert recv_exact(s, 9) == b"pipelined"
    s.close()


def test_half_close_both_ways(tunnel, target):
    """The app half-closes; the echo target sees EOF, echoes the rest, and its EOF comes back."""
    tunnel.start()
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    payload = b"ECHO\n" + b"x" * 300000
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    data = recv_all(s)
    assert data == payload[5:]  # everything echoed, then a clean EOF
    s.close()
    time.sleep(0.3)
    # Both ends saw a graceful end (FIN both ways), not a RESET.
    assert "reset:" not in tunnel.client.stderr_text()
    assert "reset:" not in tunnel.server.stderr_text()


def test_large_transfer_integrity_download_and_upload(tunnel, target):
    """256 MiB each way through one stream, sha256-compared."""
    tunnel.start()
    n = 256 << 20
    got, digest, _ = harness.download_through_socks(tunnel.socks_port, target.port, n)
    assert got == n
    assert digest == pattern_digest(n)

    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port, timeout=60)
    assert rep == 0
    s.sendall(f"SINK {n}\n".encode())
    mv = memoryview(harness.PATTERN)
    sent = 0
    while sent < n:
        start = sent % len(harness.PATTERN)
        take = min(n - sent, len(harness.PATTERN) - start)
        s.sendall(mv[start:start + take])
        sent += take
    reply = recv_all(s).decode().split()
    s.close()
    assert int(reply[0]) == n
    assert reply[1] == pattern_digest(n)


def test_hundred_parallel_streams(tunnel, target):
    tunnel.start()
    size = 2 << 20

    def one(i):
        proxy = Proxy.from_url(tunnel.proxy_url(), rdns=True)
        sock = proxy.connect(dest_host="localhost", dest_port=target.port, timeout=30)
        sock.settimeout(60)
        if i % 2 == 0:
            sock.sendall(f"SOURCE {size}\n".encode())
            data = recv_all(sock)
            sock.close()
            return hashlib.sha256(data).hexdigest() == pattern_digest(size) and len(data) == size
        sock.sendall(f"SINK {size}\n".encode())
        sock.sendall(harness.pattern_bytes(0, size))
        reply = recv_all(sock).decode().split()
        sock.close()
        return int(reply[0]) == size and reply[1] == pattern_digest(size)

    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(one, range(100)))
    assert all(results), f"{results.count(False)} of 100 streams failed"


def test_connection_refused_reply(tunnel):
    tunnel.start()
    port = harness.free_port()
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", port)
    assert rep == 0x05
    s.close()
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--socks5-hostname", f"127.0.0.1:{tunnel.socks_port}",
                          f"http://localhost:{port}/"], capture_output=True, text=True)
    assert out.returncode == 97, out.stderr  # curl: proxy handshake error, connection refused


def test_a_local_service_with_a_full_queue_is_reached_once_it_has_room(tunnel):
    """The server's connect to its own host ends within connect(2), except when the service's accept queue is
    full: the SYN then waits for the kernel's retry, and the stream opens once there is room (not refused,
    not stuck)."""
    tunnel.start()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))  # a backlog of 0 queues one: the queue is full
    result = {}

    def request():
        result["reply"] = socks5_request(tunnel.socks_port, "127.0.0.1", port, timeout=15)

    asking = threading.Thread(target=request)
    asking.start()
    time.sleep(0.4)
    assert "reply" not in result, "answered while the service's queue was full"
    queued, _ = listener.accept()  # room again: the kernel's SYN retry (about 1 s after the first) gets in
    listener.settimeout(10)
    conn, _ = listener.accept()
    asking.join(10)
    s, rep, _, _ = result["reply"]
    assert rep == 0x00
    s.sendall(b"ping")
    assert recv_exact(conn, 4) == b"ping"
    conn.sendall(b"pong")
    assert recv_exact(s, 4) == b"pong"
    for c in (s, conn, queued, filler, listener):
        c.close()


def test_unresolvable_name_is_host_unreachable(tunnel):
    tunnel.start()
    s, rep, _, _ = socks5_request(tunnel.socks_port, "no-such-host.invalid", 80)
    assert rep == 0x04
    s.close()


def test_bind_and_unknown_commands_not_supported(tunnel):
    tunnel.start()
    for command in (2, 9):
        s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", 80, command=command)
        assert rep == 0x07
        assert s.recv(1) == b""  # closed after the reply
        s.close()


def test_unsupported_address_type(tunnel):
    tunnel.start()
    s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert recv_exact(s, 2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x09\x01\x02\x03\x04\x00\x50")
    rep, _, _ = harness.read_socks5_reply(s)
    assert rep == 0x08
    s.close()


def test_denied_destination_is_not_allowed(tunnel, target, tmp_path):
    config = tmp_path / "server.toml"
    config.write_text('deny = ["127.0.0.2/32", "::2"]\n')
    tunnel.start(server_config=str(config))
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.2", target.port)
    assert rep == 0x02
    s.close()
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0x00
    s.close()


def test_no_acceptable_method(tunnel):
    tunnel.start()
    s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    s.sendall(b"\x05\x01\x02")  # only username/password offered
    assert recv_exact(s, 2) == b"\x05\xff"
    assert s.recv(1) == b""
    s.close()


@pytest.mark.parametrize("junk", [
    b"\x16\x03\x01\x02\x00",                          # a TLS ClientHello: no proxy protocol
    b"GET / HTTP/1.1\r\n\r\n",                     # HTTP without an absolute URI: 400
    b"\x04\x01\x00\x50",                            # truncated SOCKS4, then close
    b"\x05",                                      # truncated greeting, then close
    b"\x05\x00",                                  # zero methods
    b"\x05\x01\x00\x05\x01\x00\x03\x00\x00\x50",  # empty domain name
    b"\x05\x01\x00\x04\x01\x00\x01",              # request with the wrong version
    b"\x05\xff" + bytes(255),                     # many methods, none acceptable
])
def test_malformed_socks_input_closes_only_that_connection(tunnel, target, junk):
    tunnel.start()
    bad = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    bad.sendall(junk)
    bad.shutdown(socket.SHUT_WR)
    bad.settimeout(12)
    reply = recv_all(bad)  # an error reply or nothing, then EOF; never a hang
    assert len(reply) <= 200
    bad.close()
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.sendall(b"ECHO\nstill serving")
    assert recv_exact(s, 13) == b"still serving"
    s.close()
    assert tunnel.client.proc.poll() is None and tunnel.server.proc.poll() is None


def test_request_data_and_eof_before_reply_are_all_delivered(tunnel, target):
    """An app that sends its request, its data and EOF without waiting for the reply still gets an answer."""
    tunnel.start()
    s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    req = b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", target.port)
    s.sendall(req + b"ECHO\nall at once")
    s.shutdown(socket.SHUT_WR)
    assert recv_exact(s, 2) == b"\x05\x00"
    rep, _, _ = harness.read_socks5_reply(s)
    assert rep == 0
    assert recv_all(s) == b"all at once"
    s.close()
