"""Plain HTTP through the local port's HTTP proxy (absolute-URI requests, what `http_proxy` users such as apt,
pip, git over http, wget and aria2c send): responses far larger than any window stream through, as they
arrive; keep-alive survives them; and every stream whose application left is released."""

import hashlib
import http.client
import os
import signal
import socket
import struct
import subprocess
import time

import pytest

import harness
from harness import pattern_digest, recv_exact, socks5_request


def origin_connections(tunnel, port):
    """The server's established connections to the origin's port."""
    return harness.connections_to(tunnel.server.proc.pid, port)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_curl_downloads_tens_of_mib(tunnel, origin, tmp_path, framing):
    tunnel.start()
    n = 48 << 20
    path = f"/pattern/{n}" + ("/chunked" if framing == "chunked" else "")
    out = tmp_path / "body"
    result = subprocess.run(["curl", "-sS", "--max-time", "60", "-o", str(out), "--proxy",
                             f"http://127.0.0.1:{tunnel.socks_port}", f"http://127.0.0.1:{origin.port}{path}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.path.getsize(out) == n and sha256_file(out) == pattern_digest(n)


def test_wget_through_http_proxy(tunnel, origin, tmp_path):
    if subprocess.run(["which", "wget"], capture_output=True).returncode != 0:
        pytest.skip("wget is not installed")
    tunnel.start()
    n = 20 << 20
    out = tmp_path / "body"
    env = dict(os.environ, http_proxy=f"http://127.0.0.1:{tunnel.socks_port}")
    result = subprocess.run(["wget", "-q", "-O", str(out), f"http://127.0.0.1:{origin.port}/pattern/{n}"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sha256_file(out) == pattern_digest(n)


def test_keep_alive_across_large_responses(tunnel, origin):
    tunnel.start()
    conn = http.client.HTTPConnection("127.0.0.1", tunnel.socks_port, timeout=30)
    for n, path in ((3 << 20, "/pattern/%d"), (5 << 20, "/pattern/%d/chunked"), (12, "/x?%d")):
        conn.request("GET", f"http://127.0.0.1:{origin.port}" + path % n)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200
        if path.startswith("/pattern"):
            assert len(body) == n and hashlib.sha256(body).hexdigest() == pattern_digest(n)
    # One application connection carried all three: the proxy kept it alive.
    assert conn.sock is not None
    conn.close()


def test_a_slow_origins_first_bytes_arrive_before_its_last(tunnel, origin):
    tunnel.start()
    s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    s.sendall(f"GET http://127.0.0.1:{origin.port}/slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    started = time.time()
    data = b""
    while b"first" not in data:
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    assert time.time() - started < 1.0, "the first bytes waited for the rest of the response"
    while b"0\r\n\r\n" not in data:
        data += s.recv(4096)
    assert b"second" in data and time.time() - started >= 1.0
    s.close()


def test_100_continue_reaches_the_client(tunnel, origin):
    tunnel.start()
    s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    s.sendall(f"POST http://127.0.0.1:{origin.port}/post HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
              f"Content-Length: 5\r\n\r\n".encode())
    s.settimeout(3)
    interim = s.recv(4096)
    assert interim.startswith(b"HTTP/1.1 100"), interim
    s.sendall(b"hello")
    s.settimeout(10)
    data = b""
    while b"echo:hello" not in data:
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    assert b"HTTP/1.1 200" in data
    s.close()


def test_abandoned_downloads_are_released_and_the_tunnel_keeps_serving(tunnel, origin, target):
    tunnel.start()
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
        s.sendall(f"GET http://127.0.0.1:{origin.port}/pattern/{64 << 20} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        recv_exact(s, 100_000)
        s.close()   # the application gives up (a FIN, as curl --max-time does)
    assert harness.wait_for(lambda: not origin_connections(tunnel, origin.port), timeout=10), \
        f"{len(origin_connections(tunnel, origin.port))} origin connections left open"
    out = subprocess.run(["curl", "-sS", "--max-time", "15", "--proxy", f"http://127.0.0.1:{tunnel.socks_port}",
                          f"http://127.0.0.1:{origin.port}/after"], capture_output=True, text=True)
    assert "path=/after" in out.stdout, out.stderr
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.sendall(b"ECHO\nok")
    assert recv_exact(s, 2) == b"ok"
    s.close()


def test_a_connect_after_plain_requests_is_released_when_the_application_leaves_first(tunnel, origin, target):
    tunnel.start()
    s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    s.sendall(f"GET http://127.0.0.1:{origin.port}/one HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"path=/one" not in data:
        data += s.recv(4096)
    tunnel.server.signal(signal.SIGSTOP)   # hold the CONNECT's answer back
    s.sendall(f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    time.sleep(0.3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()    # the application leaves (a reset, as a browser's cancel) before the 200
    time.sleep(0.3)
    tunnel.server.signal(signal.SIGCONT)
    time.sleep(1)
    assert harness.wait_for(lambda: not origin_connections(tunnel, target.port), timeout=5), \
        "the server kept the CONNECT's destination connection"


def test_requests_queued_while_reconnecting_are_not_opened_after_their_application_left(tunnel, origin, tmp_path):
    config = tmp_path / "client.toml"
    config.write_text('reconnect_max = "500ms"\nconnect_wait = "20s"\n')
    tunnel.start(client_config=str(config))
    listen = tunnel.server.address
    tunnel.server.proc.kill()
    assert harness.wait_for(lambda: "tunnel lost" in tunnel.client.stderr_text())
    # A plain HTTP request and a UDP ASSOCIATE wait for the tunnel; their applications give up.
    plain = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    plain.sendall(f"GET http://127.0.0.1:{origin.port}/queued HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    udp = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    udp.sendall(b"\x05\x01\x00\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    assert recv_exact(udp, 2) == b"\x05\x00"
    time.sleep(0.3)
    plain.close()
    udp.close()
    time.sleep(0.3)
    tunnel.start_server(listen=listen, log="server2.log")
    assert harness.wait_for(lambda: tunnel.client.stderr_text().count("tunnel up") >= 2, timeout=15)
    time.sleep(1)
    assert "requested" not in tunnel.server.stderr_text(), tunnel.server.stderr_text()[-2000:]


def test_a_message_with_both_transfer_encoding_and_content_length_loses_the_length(tunnel):
    """RFC 9112 §6.3: a message with both is framed by its transfer coding, and an intermediary must not pass
    the Content-Length on: a server (or application) that read it instead would see the rest of the body as a
    second, smuggled message. Both directions."""
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    seen = {}

    def serve():
        conn, _ = listener.accept()
        conn.settimeout(10)
        data = b""
        while b"0\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        seen["request"] = data
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        time.sleep(0.5)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    tunnel.start()
    port = listener.getsockname()[1]
    s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    s.sendall(f"POST http://127.0.0.1:{port}/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n"
              f"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode())
    response = b""
    while b"0\r\n\r\n" not in response:
        chunk = s.recv(4096)
        assert chunk, response
        response += chunk
    s.close()
    thread.join(timeout=5)
    listener.close()
    head = response.split(b"\r\n\r\n")[0].lower()
    assert b"transfer-encoding: chunked" in head and b"content-length" not in head, response
    request_head = seen["request"].split(b"\r\n\r\n")[0].lower()
    assert b"transfer-encoding: chunked" in request_head and b"content-length" not in request_head, seen["request"]
    assert seen["request"].endswith(b"5\r\nhello\r\n0\r\n\r\n")
