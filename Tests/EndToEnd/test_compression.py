"""--compress: per-stream deflate that pays for itself on text, costs nothing on incompressible data, and cannot
be turned into a decompression bomb."""

import concurrent.futures
import hashlib
import os
import re
import socket
import struct
import subprocess
import time
import zlib

import pytest

import harness
from harness import recv_all, socks5_request
from noise_peer import (F_FIN, T_DATA, T_OPEN, T_OPEN_RESULT, NoisePeer, frame, read_private_key, tai64n)

F_COMPRESSED, F_CONTEXT_START = 0x04, 0x08


def text_like(n):
    """HTML/JSON-like text with varying numbers (like real pages and API responses)."""
    out = []
    size = 0
    i = 0
    while size < n:
        line = (f'{{"id": {i}, "user": "user{i % 1013}", "email": "user{i % 1013}@example.com", '
                f'"score": {(i * 7919) % 100000}, "tags": ["a{i % 7}", "b{i % 11}"]}}\n'
                f'<tr><td class="name">Item {i}</td><td>{(i * 31) % 977}.{i % 100:02d} EUR</td></tr>\n')
        out.append(line)
        size += len(line)
        i += 1
    return "".join(out).encode()[:n]


class ContentServer:
    """Serves exactly the bytes asked for: `TEXT n\\n` or `RANDOM n\\n` or `MIXED n\\n` (text and random halves)."""

    def __init__(self):
        self.text = text_like(8 << 20)
        self.random = os.urandom(8 << 20)
        self.target = harness.TargetServer()  # reuse its accept loop for SOURCE/SINK/ECHO too
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        import threading
        threading.Thread(target=self.accept, daemon=True).start()

    def content(self, kind, n):
        if kind == "TEXT":
            base = self.text
        elif kind == "RANDOM":
            base = self.random
        else:
            half = n // 2
            return (self.text * (half // len(self.text) + 1))[:half] + (self.random * (n // len(self.random) + 1))[:n - half]
        return (base * (n // len(base) + 1))[:n]

    def accept(self):
        import threading
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        try:
            line = b""
            while not line.endswith(b"\n"):
                line += conn.recv(1)
            kind, n = line.decode().split()
            conn.sendall(self.content(kind, int(n)))
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self):
        self.sock.close()
        self.target.stop()


@pytest.fixture(scope="module")
def content():
    c = ContentServer()
    yield c
    c.stop()


def fetch(socks_port, content, kind, n):
    s, rep, _, _ = socks5_request(socks_port, "127.0.0.1", content.port, timeout=60)
    assert rep == 0
    s.sendall(f"{kind} {n}\n".encode())
    data = recv_all(s)
    s.close()
    return data


def tunnel_bytes_received(tunnel):
    """Bytes the client's tunnel socket received from the server (kernel counter, from `ss -ti`)."""
    port = tunnel.server.port
    out = subprocess.run(["ss", "-tinH", f"dport = :{port}"], capture_output=True, text=True).stdout
    values = [int(v) for v in re.findall(r"bytes_received:(\d+)", out)]
    assert values, out
    return sum(values)


def test_agreement_is_logged_on_both_ends(tunnel):
    tunnel.start(client_extra=["--compress"])
    assert "compression on" in tunnel.client.stderr_text()
    assert harness.wait_for(lambda: "compression on" in tunnel.server.stderr_text())


def test_server_may_refuse_compression(tunnel, tmp_path):
    config = tmp_path / "server.toml"
    config.write_text("allow_compression = false\n")
    tunnel.start(client_extra=["--compress"], server_config=str(config))
    assert "compression refused by the server" in tunnel.client.stderr_text()


@pytest.mark.parametrize("kind", ["TEXT", "RANDOM", "MIXED"])
def test_round_trips_over_many_streams(tunnel, content, kind):
    tunnel.start(client_extra=["--compress"])
    n = 3 << 20
    expected = hashlib.sha256(content.content(kind, n)).hexdigest()
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        digests = list(pool.map(lambda _: hashlib.sha256(fetch(tunnel.socks_port, content, kind, n)).hexdigest(), range(24)))
    assert digests == [expected] * 24
    # Uploads compress too (the client's direction): the sink checks the digest.
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", content.target.port, timeout=60)
    data = content.content(kind, n)
    s.sendall(f"SINK {n}\n".encode() + data)
    reply = recv_all(s).decode().split()
    s.close()
    assert int(reply[0]) == n and reply[1] == hashlib.sha256(data).hexdigest()


def test_text_shrinks_below_30_percent_and_random_costs_almost_nothing(tmp_path, content):
    import conftest
    n = 64 << 20
    results = {}
    for compress in (False, True):
        directory = tmp_path / f"c{int(compress)}"
        directory.mkdir()
        tunnel = conftest.Tunnel(str(directory))
        try:
            tunnel.start(client_extra=["--compress"] if compress else [])
            for kind in ("TEXT", "RANDOM"):
                before = tunnel_bytes_received(tunnel)
                data = fetch(tunnel.socks_port, content, kind, n)
                assert len(data) == n
                time.sleep(0.2)
                results[(compress, kind)] = tunnel_bytes_received(tunnel) - before
        finally:
            tunnel.stop()
    assert results[(True, "TEXT")] < 0.30 * n, results
    assert results[(True, "RANDOM")] <= results[(False, "RANDOM")] * 1.005, results
    print("bytes on the tunnel for 64 MiB:", results)


def test_decompression_bomb_closes_the_connection(tunnel, content):
    tunnel.start_server()
    peer = NoisePeer("127.0.0.1", tunnel.server.port, read_private_key(tunnel.peer_key), tunnel.server_pub)
    # Ask for compression in the handshake: TLV features (0x02) = compression.
    peer.handshake(payload=tai64n() + struct.pack(">BHI", 0x02, 4, 1))
    target = b"\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", content.target.port)
    peer.send_frames(frame(T_OPEN, 0, 1, b"\x01" + struct.pack(">I", 1 << 20) + target))
    while not any(t == T_OPEN_RESULT for t, _, _, _ in peer.recv_frames()):
        pass
    deflater = zlib.compressobj(1, zlib.DEFLATED, -12, 5)
    bomb = deflater.compress(b"\x00" * (1 << 20)) + deflater.flush(zlib.Z_SYNC_FLUSH)
    rss_before = tunnel.server.rss_kb()
    peer.send_frames(frame(T_DATA, F_COMPRESSED | F_CONTEXT_START, 1, struct.pack(">H", 16384) + bomb))
    peer.wait_closed(timeout=5)
    peer.close()
    assert harness.wait_for(lambda: "does not inflate to its declared" in tunnel.server.stderr_text())
    assert tunnel.server.rss_kb() - rss_before < 8 << 10
    # Everyone else is still served.
    tunnel.start_client(extra=["--compress"])
    tunnel.wait_until_connected()
    assert len(fetch(tunnel.socks_port, content, "TEXT", 1 << 20)) == 1 << 20
