"""One local port, every proxy protocol an application may speak: SOCKS5 (with and without username/password),
SOCKS4 and SOCKS4a, and HTTP (CONNECT and plain http:// requests with keep-alive across hosts)."""

import base64
import os
import socket
import subprocess
import time

import pytest
import socks as pysocks
from python_socks.sync import Proxy

import harness
from harness import CLIENT_BIN, recv_all, recv_exact, socks5_request
from webserver import Origin


@pytest.fixture
def origin():
    o = Origin("origin-a")
    yield o
    o.stop()


@pytest.fixture
def origin_b():
    o = Origin("origin-b")
    yield o
    o.stop()


def curl(*args):
    return subprocess.run(["curl", "-sS", "--max-time", "15", *args], capture_output=True, text=True)


def with_credentials(tunnel, user="alice", password="s3cret pass"):
    return ["--socks-user", user, "--socks-pass", password]


# MARK: - curl, every protocol

@pytest.mark.parametrize("option,host", [
    ("--socks5-hostname", "localhost"), ("--socks5", "127.0.0.1"), ("--socks4a", "localhost"), ("--socks4", "127.0.0.1"),
])
def test_curl_through_each_socks_flavour(tunnel, origin, option, host):
    tunnel.start()
    out = curl(option, f"127.0.0.1:{tunnel.socks_port}", f"http://{host}:{origin.port}/x")
    assert out.returncode == 0, out.stderr
    assert "hello from origin-a path=/x" in out.stdout


def test_curl_plain_http_through_http_proxy(tunnel, origin):
    tunnel.start()
    out = curl("--proxy", f"http://127.0.0.1:{tunnel.socks_port}", f"http://localhost:{origin.port}/plain?q=1")
    assert out.returncode == 0, out.stderr
    assert "path=/plain?q=1" in out.stdout
    assert f"host=localhost:{origin.port}" in out.stdout
    assert "proxy-headers=[]" in out.stdout  # Proxy-Connection and friends were removed


def test_curl_https_through_http_connect(tunnel, tmp_path):
    tls = Origin("tls-origin", tls_dir=str(tmp_path))
    try:
        tunnel.start()
        out = curl("-k", "--proxy", f"http://127.0.0.1:{tunnel.socks_port}", f"https://localhost:{tls.port}/secure")
        assert out.returncode == 0, out.stderr
        assert "hello from tls-origin path=/secure" in out.stdout
    finally:
        tls.stop()


def test_curl_proxytunnel_forces_connect_for_http(tunnel, origin):
    tunnel.start()
    out = curl("--proxytunnel", "--proxy", f"http://127.0.0.1:{tunnel.socks_port}", f"http://127.0.0.1:{origin.port}/t")
    assert out.returncode == 0, out.stderr
    assert "path=/t" in out.stdout


def test_http_chunked_close_delimited_head_and_post(tunnel, origin):
    tunnel.start()
    proxy = f"http://127.0.0.1:{tunnel.socks_port}"
    out = curl("--proxy", proxy, f"http://localhost:{origin.port}/chunked")
    assert out.stdout == "chunk-one chunk-two origin-a", out.stderr
    out = curl("--proxy", proxy, f"http://localhost:{origin.port}/close")
    assert out.stdout == "close-delimited from origin-a", out.stderr
    out = curl("--proxy", proxy, "-I", f"http://localhost:{origin.port}/")
    assert "Content-Length: 12345" in out.stdout, out.stderr
    out = curl("--proxy", proxy, "--data-binary", "payload-123", f"http://localhost:{origin.port}/post")
    assert out.stdout == "echo:payload-123", out.stderr
    out = curl("--proxy", proxy, "-H", "Transfer-Encoding: chunked", "--data-binary", "chunked-body",
               f"http://localhost:{origin.port}/post")
    assert out.stdout == "echo:chunked-body", out.stderr


def read_response(s):
    """One HTTP/1.1 response with Content-Length from a socket: (status line, headers, body)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise EOFError("closed before the head ended")
        head += chunk
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    body = recv_exact(s, int(headers.get("content-length", "0")))
    return lines[0], headers, body


def test_keep_alive_across_requests_to_different_hosts(tunnel, origin, origin_b):
    tunnel.start()
    s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    for i, (o, tag) in enumerate([(origin, "origin-a"), (origin, "origin-a"), (origin_b, "origin-b"), (origin, "origin-a")]):
        s.sendall(f"GET http://localhost:{o.port}/req{i} HTTP/1.1\r\nHost: localhost:{o.port}\r\n\r\n".encode())
        status, headers, body = read_response(s)
        assert status == "HTTP/1.1 200 OK"
        assert f"hello from {tag} path=/req{i}".encode() in body
    # Pipelined: two requests in one write come back in order.
    s.sendall(f"GET http://localhost:{origin.port}/p1 HTTP/1.1\r\nHost: x\r\n\r\n"
              f"GET http://localhost:{origin_b.port}/p2 HTTP/1.1\r\nHost: y\r\n\r\n".encode())
    assert b"path=/p1" in read_response(s)[2]
    assert b"path=/p2" in read_response(s)[2]
    s.close()


def test_http_errors_are_real_http_responses(tunnel, origin):
    tunnel.start()
    closed_port = harness.free_port()
    for request, expected in [
        (f"GET http://127.0.0.1:{closed_port}/ HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 502"),
        ("GET /relative HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 400"),
        ("GET http://no-such-host.invalid/ HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 502"),
        (f"CONNECT 127.0.0.1:{closed_port} HTTP/1.1\r\n\r\n", "HTTP/1.1 502"),
        ("BREW http://pot/ HTCPCP/1.0\r\n\r\n", "HTTP/1.1 400"),
        ("GET http://h/ HTTP/1.1\r\nBad Header\r\n\r\n", "HTTP/1.1 400"),
    ]:
        s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
        s.sendall(request.encode())
        response = harness.recv_until_closed(s).decode(errors="replace")
        s.close()
        assert response.startswith(expected), (request, response)
        assert "Content-Length:" in response
    # The port still serves.
    out = curl("--proxy", f"http://127.0.0.1:{tunnel.socks_port}", f"http://localhost:{origin.port}/ok")
    assert "path=/ok" in out.stdout


# MARK: - Credentials

def test_socks5_username_password(tunnel, origin):
    tunnel.start(client_extra=with_credentials(tunnel))
    port = tunnel.socks_port
    out = curl("--socks5-hostname", f"127.0.0.1:{port}", "--proxy-user", "alice:s3cret pass", f"http://localhost:{origin.port}/a")
    assert "path=/a" in out.stdout, out.stderr
    wrong = curl("--socks5-hostname", f"127.0.0.1:{port}", "--proxy-user", "alice:nope", f"http://localhost:{origin.port}/a")
    assert wrong.returncode == 97
    none = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://localhost:{origin.port}/a")
    assert none.returncode == 97
    # python-socks and PySocks, two independent client implementations
    sock = Proxy.from_url(f"socks5://alice:s3cret%20pass@127.0.0.1:{port}", rdns=True).connect("localhost", origin.port, timeout=10)
    sock.sendall(b"GET /ps HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"path=/ps" in read_response(sock)[2]
    sock.close()
    s = pysocks.socksocket()
    s.set_proxy(pysocks.SOCKS5, "127.0.0.1", port, rdns=True, username="alice", password="s3cret pass")
    s.settimeout(10)
    s.connect(("localhost", origin.port))
    s.sendall(b"GET /pysocks HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"path=/pysocks" in read_response(s)[2]
    s.close()
    bad = pysocks.socksocket()
    bad.set_proxy(pysocks.SOCKS5, "127.0.0.1", port, username="alice", password="wrong")
    bad.settimeout(10)
    with pytest.raises(pysocks.ProxyError):
        bad.connect(("localhost", origin.port))
    bad.close()


def test_raw_rfc1929_status_codes(tunnel, origin):
    tunnel.start(client_extra=with_credentials(tunnel, "u", "p"))
    s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert recv_exact(s, 2) == b"\x05\xff"  # no-auth is refused when credentials are required
    s.close()
    s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    s.sendall(b"\x05\x02\x00\x02")
    assert recv_exact(s, 2) == b"\x05\x02"
    s.sendall(b"\x01\x01u\x01x")
    assert recv_exact(s, 2) == b"\x01\x01"
    assert s.recv(1) == b""
    s.close()


def test_socks4_user_id_and_http_basic_with_credentials(tunnel, origin):
    tunnel.start(client_extra=with_credentials(tunnel, "alice", "pw"))
    port = tunnel.socks_port
    # SOCKS4 has only a user id: it must carry NAME:PASSWORD (curl sends an encoded ':' in the name as it is).
    ok = curl("--socks4a", f"alice%3Apw@127.0.0.1:{port}", f"http://localhost:{origin.port}/s4")
    assert "path=/s4" in ok.stdout, ok.stderr
    for user in ("alice", "mallory", "alice%3Awrong", "alice%3A"):
        bad = curl("--socks4a", f"{user}@127.0.0.1:{port}", f"http://localhost:{origin.port}/s4")
        assert bad.returncode != 0 and "path=/s4" not in bad.stdout, user
        bad = curl("--socks4", f"{user}@127.0.0.1:{port}", f"http://127.0.0.1:{origin.port}/s4")
        assert bad.returncode != 0 and "path=/s4" not in bad.stdout, user
    ok = curl("--proxy", f"http://alice:pw@127.0.0.1:{port}", f"http://localhost:{origin.port}/basic")
    assert "path=/basic" in ok.stdout, ok.stderr
    denied = curl("-i", "--proxy", f"http://127.0.0.1:{port}", f"http://localhost:{origin.port}/basic")
    assert "407" in denied.stdout
    assert "Proxy-Authenticate: Basic" in denied.stdout


def test_open_proxy_is_refused_without_credentials(tunnel):
    tunnel.start_server()
    args = [CLIENT_BIN, "--server", tunnel.server.address, "--server-key", tunnel.server_pub, "--key", tunnel.client_key]
    out = subprocess.run(args + ["--socks", "0.0.0.0:0"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 2
    assert "not a loopback address" in out.stderr and "--allow-open-proxy" in out.stderr
    out = subprocess.run(args + ["--socks", "0.0.0.0:0", "--socks-user", "u"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 2 and "go together" in out.stderr
    # Either credentials or the explicit flag make it start.
    for extra in (["--socks-user", "u", "--socks-pass", "p"], ["--allow-open-proxy"]):
        p = harness.Process(args + ["--socks", "0.0.0.0:0", *extra], r"SOCKS5 listening on (\S+)",
                            str(tunnel.dir) + "/open.log")
        p.kill()


def test_the_password_can_come_from_a_file_and_one_on_the_command_line_is_warned_about(tunnel, origin, tmp_path):
    """--socks-pass is visible to every local user in ps; --socks-pass-file keeps it off the command line."""
    secret = tmp_path / "socks.pass"
    secret.write_text("s3cret pass\n")
    os.chmod(secret, 0o600)
    tunnel.start(client_extra=["--socks-user", "alice", "--socks-pass-file", str(secret)])
    assert "s3cret" not in " ".join(tunnel.client.args)
    port = tunnel.socks_port
    ok = curl("--socks5-hostname", f"alice:s3cret%20pass@127.0.0.1:{port}", f"http://localhost:{origin.port}/f")
    assert ok.returncode == 0 and "path=/f" in ok.stdout, ok.stderr
    wrong = curl("--socks5-hostname", f"alice:s3cret@127.0.0.1:{port}", f"http://localhost:{origin.port}/f")
    assert wrong.returncode != 0
    assert "visible to every user" not in tunnel.client.stderr_text()

    args = [CLIENT_BIN, "--server", tunnel.server.address, "--server-key", tunnel.server_pub, "--key", tunnel.client_key,
            "--socks", "127.0.0.1:0", "--socks-user", "alice"]
    on_argv = harness.Process(args + ["--socks-pass", "s3cret pass"], r"SOCKS5 listening on (\S+)", str(tmp_path / "argv.log"))
    try:
        assert "--socks-pass is visible to every user" in on_argv.stderr_text()
        assert "--socks-pass-file" in on_argv.stderr_text()
    finally:
        on_argv.kill()
    # Both at once, an empty file, a missing file: a config error naming the problem.
    empty = tmp_path / "empty.pass"
    empty.write_text("\n")
    for extra, needle in ((["--socks-pass", "x", "--socks-pass-file", str(secret)], "give one of them"),
                          (["--socks-pass-file", str(empty)], "the first line is empty"),
                          (["--socks-pass-file", str(tmp_path / "missing")], "cannot open")):
        out = subprocess.run(args + extra, capture_output=True, text=True, timeout=10)
        assert out.returncode == 2 and needle in out.stderr, out.stderr


@pytest.mark.parametrize("junk", [
    b"\x05\x01\x02\x01\xff",                     # credentials claiming 255 bytes, then close
    b"\x04\x01\x00\x50\x00\x00\x00\x01" + b"a" * 400,   # SOCKS4a user id that never ends
    b"CONNECT " + b"a" * 70000,                   # an HTTP head that never ends
    b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",  # unusable request framing
    b"GET http://h/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
])
def test_bad_input_on_every_protocol_path(tunnel, origin, junk):
    tunnel.start(client_extra=with_credentials(tunnel) if junk.startswith(b"\x05\x01\x02") else [])
    s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=15)
    try:
        s.sendall(junk)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    reply = harness.recv_until_closed(s)
    s.close()
    assert len(reply) < 400
    assert tunnel.client.proc.poll() is None
    out = curl("--socks5-hostname", f"127.0.0.1:{tunnel.socks_port}", "--proxy-user", "alice:s3cret pass",
               f"http://localhost:{origin.port}/still")
    assert "path=/still" in out.stdout, out.stderr
