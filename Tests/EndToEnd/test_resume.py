"""Session resumption (issue 19, docs/PROTOCOL.md §7): streams outlive a broken tunnel connection.

The tunnel connection is cut with `ss -K` (a RST, as a NAT or a middlebox would send); the client makes a new
connection and resumes its session, and every application byte arrives once and in order."""

import hashlib
import signal
import socket
import subprocess
import threading
import time

import pytest

import harness
from harness import pattern_bytes, pattern_digest, recv_exact, socks5_request

MIB = 1 << 20


def grace_configs(tmp_path, grace):
    """Server and client configs with `resume_grace`; the client retries at least every half second."""
    server = tmp_path / f"server-{grace}.toml"
    server.write_text(f'resume_grace = "{grace}"\n')
    client = tmp_path / f"client-{grace}.toml"
    client.write_text(f'resume_grace = "{grace}"\nreconnect_max = "500ms"\n')
    return str(server), str(client)


def reset_tunnel(server_port):
    """Destroys the client's tunnel connection to `server_port` (the kernel sends a RST); returns how many."""
    out = subprocess.run(["ss", "-K", "-t", "-n", "dst", "127.0.0.1", "dport", "=", f":{server_port}"],
                         capture_output=True, text=True, check=False).stdout
    return sum(1 for line in out.splitlines() if "ESTAB" in line)


class Download(threading.Thread):
    """SOURCE n through the proxy, read at most `rate` bytes/s so that the resets land mid-transfer."""

    def __init__(self, socks_port, target_port, n, rate):
        super().__init__(daemon=True)
        self.n, self.rate, self.got, self.digest, self.error = n, rate, 0, None, None
        self.sock, rep, _, _ = socks5_request(socks_port, "127.0.0.1", target_port, timeout=60)
        assert rep == 0
        self.sock.sendall(f"SOURCE {n}\n".encode())

    def run(self):
        h = hashlib.sha256()
        buf = bytearray(MIB)
        start = time.time()
        try:
            while True:
                k = self.sock.recv_into(buf, 256 << 10)
                if k == 0:
                    break
                h.update(memoryview(buf)[:k])
                self.got += k
                ahead = self.got / self.rate - (time.time() - start)
                if ahead > 0:
                    time.sleep(ahead)
            self.digest = h.hexdigest()
        except OSError as e:
            self.error = e
        finally:
            self.sock.close()


class Upload(threading.Thread):
    """SINK n through the proxy at about `rate` bytes/s; the target answers with what it received."""

    def __init__(self, socks_port, target_port, n, rate):
        super().__init__(daemon=True)
        self.n, self.rate, self.sent, self.answer, self.error = n, rate, 0, None, None
        self.sock, rep, _, _ = socks5_request(socks_port, "127.0.0.1", target_port, timeout=60)
        assert rep == 0
        self.sock.sendall(f"SINK {n}\n".encode())

    def run(self):
        start = time.time()
        try:
            while self.sent < self.n:
                chunk = pattern_bytes(self.sent, min(256 << 10, self.n - self.sent))
                self.sock.sendall(chunk)
                self.sent += len(chunk)
                ahead = self.sent / self.rate - (time.time() - start)
                if ahead > 0:
                    time.sleep(ahead)
            self.answer = harness.recv_all(self.sock).decode().split()
        except OSError as e:
            self.error = e
        finally:
            self.sock.close()


class Echo(threading.Thread):
    """Numbered lines to an echo stream, each checked as it comes back: order and content."""

    def __init__(self, socks_port, target_port, seconds):
        super().__init__(daemon=True)
        self.seconds, self.count, self.error = seconds, 0, None
        self.sock, rep, _, _ = socks5_request(socks_port, "127.0.0.1", target_port, timeout=60)
        assert rep == 0
        self.sock.sendall(b"ECHO\n")

    def run(self):
        end = time.time() + self.seconds
        try:
            while time.time() < end:
                line = f"{self.count:08d} {'x' * 100}\n".encode()
                self.sock.sendall(line)
                back = recv_exact(self.sock, len(line))
                if back != line:
                    self.error = f"line {self.count}: got {back[:20]!r}"
                    return
                self.count += 1
                time.sleep(0.005)
        except OSError as e:
            self.error = e
        finally:
            self.sock.close()


def test_streams_survive_three_resets_of_the_tunnel_connection(tunnel, target, tmp_path):
    """A 64 MiB download, a 64 MiB upload and an echo stream run while the tunnel connection is reset three
    times: every byte arrives intact and in order, and both ends say they resumed."""
    server_config, client_config = grace_configs(tmp_path, "30s")
    tunnel.start(server_config=server_config, client_config=client_config)
    server_port = int(tunnel.server.address.rsplit(":", 1)[1])
    n = 64 * MIB
    down = Download(tunnel.socks_port, target.port, n, rate=24 * MIB)
    up = Upload(tunnel.socks_port, target.port, n, rate=24 * MIB)
    echo = Echo(tunnel.socks_port, target.port, seconds=3.5)
    for t in (down, up, echo):
        t.start()
    for breaks, fraction in enumerate((0.2, 0.45, 0.7), start=1):
        assert harness.wait_for(lambda: down.got >= fraction * n, timeout=30), "the download stalled"
        assert reset_tunnel(server_port) >= 1, "no tunnel connection was reset"
        # The next reset only once this one was resumed (each is its own break).
        assert harness.wait_for(lambda: tunnel.client.stderr_text().count("session resumed") == breaks, timeout=10)
        assert not (down.got == n and up.sent == n), "the transfers ended before the resets"
    for t in (down, up, echo):
        t.join(timeout=60)
        assert not t.is_alive()
    assert down.error is None and up.error is None and echo.error is None, (down.error, up.error, echo.error)
    assert down.got == n and down.digest == pattern_digest(n), "the download is not intact"
    assert up.answer == [str(n), pattern_digest(n)], "the upload is not intact"
    assert echo.count > 100
    client_log, server_log = tunnel.client.stderr_text(), tunnel.server.stderr_text()
    assert client_log.count("session resumed") == 3, client_log[-3000:]
    assert server_log.count("resumed its session") == 3, server_log[-3000:]
    assert "streams reset" not in client_log
    tunnel.client.signal(signal.SIGTERM)
    assert harness.wait_for(lambda: "session resumed over a new connection 3 times" in tunnel.client.stderr_text())


def test_an_outage_longer_than_the_grace_period_resets_the_streams(tunnel, target, tmp_path):
    """With the server gone for longer than resume_grace, the application sees a reset (never a clean end of a
    truncated download), and both the wait and the log say why."""
    server_config, client_config = grace_configs(tmp_path, "2s")
    tunnel.start(server_config=server_config, client_config=client_config)
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.sendall(b"INFINITE\n")
    recv_exact(s, 1 << 16)
    tunnel.server.proc.kill()
    lost = time.time()
    s.settimeout(15)
    with pytest.raises(ConnectionResetError):
        while s.recv(1 << 20):
            pass
    waited = time.time() - lost
    s.close()
    assert 1.5 < waited < 8, f"reset after {waited:.1f} s"
    assert harness.wait_for(lambda: "could not resume the session within 2.0 s" in tunnel.client.stderr_text())


def test_a_restarted_server_refuses_to_resume_and_the_streams_reset_then_new_ones_work(tunnel, target, tmp_path):
    """A server that restarted does not know the session: the client's streams reset at once (the application
    sees a reset) and new requests go through the new session."""
    server_config, client_config = grace_configs(tmp_path, "30s")
    tunnel.start(server_config=server_config, client_config=client_config)
    listen = tunnel.server.address
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.sendall(b"INFINITE\n")
    recv_exact(s, 1 << 16)
    tunnel.server.proc.kill()
    assert harness.wait_for(lambda: "resuming the session" in tunnel.client.stderr_text())
    tunnel.start_server(listen=listen, config=server_config, log="server2.log")
    s.settimeout(15)
    with pytest.raises(ConnectionResetError):
        while s.recv(1 << 20):
            pass
    s.close()
    assert harness.wait_for(lambda: "no longer knows this session" in tunnel.client.stderr_text())
    assert harness.wait_for(lambda: "tunnel up" in tunnel.client.stderr_text().split("no longer knows")[-1])
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.sendall(b"ECHO\nback")
    assert recv_exact(s, 4) == b"back"
    s.close()


def blackout(server_port, seconds, during=lambda: None):
    """Drops every packet to or from `server_port` on this host for `seconds` (no RST: a path gone silent)."""
    table = f"resume_test_{server_port}"
    rules = (f"add table inet {table}\n"
             f"add chain inet {table} out {{ type filter hook output priority 0; }}\n"
             f"add rule inet {table} out tcp dport {server_port} drop\n"
             f"add rule inet {table} out tcp sport {server_port} drop\n")
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
    try:
        time.sleep(seconds)
        during()
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)


@pytest.mark.parametrize("detection", ["keepalive", "unacked"])
def test_a_blackout_resumes_when_the_path_returns(tunnel, target, tmp_path, detection):
    """The tunnel connection's packets are all dropped for 6 s. The client finds the path dead, by silence
    (keepalive: dead_timeout 3 s) or by its own unacknowledged window updates (TCP_USER_TIMEOUT, unacked_timeout
    2 s, with the default 45 s dead_timeout), reconnects once the path returns and resumes, while the server
    still holds the old connection: the download completes intact."""
    server_config, client_config = grace_configs(tmp_path, "60s")
    with open(client_config, "a") as f:
        f.write('keepalive_interval = "1s"\ndead_timeout = "3s"\n' if detection == "keepalive"
                else 'unacked_timeout = "2s"\n')
    tunnel.start(server_config=server_config, client_config=client_config)
    server_port = int(tunnel.server.address.rsplit(":", 1)[1])
    n = 24 * MIB
    down = Download(tunnel.socks_port, target.port, n, rate=4 * MIB)
    down.start()
    assert harness.wait_for(lambda: down.got >= 2 * MIB, timeout=10)

    def lost_but_not_resumed():
        log = tunnel.client.stderr_text()
        assert "tunnel lost" in log and "session resumed" not in log, log[-2000:]
        if detection == "unacked":
            assert "timed out" in log.split("tunnel lost")[1].split("\n")[0], log[-2000:]

    blackout(server_port, 6, during=lost_but_not_resumed)
    assert harness.wait_for(lambda: "session resumed" in tunnel.client.stderr_text(), timeout=30), \
        tunnel.client.stderr_text()[-2000:]
    down.join(timeout=60)
    assert down.error is None, down.error
    assert down.got == n and down.digest == pattern_digest(n), "the download is not intact"
    assert "resumed its session" in tunnel.server.stderr_text()


def test_a_thousand_streams_with_data_in_flight_resume_and_memory_stays_bounded(tunnel, target, tmp_path):
    """1000 echo streams, each with 64 KiB on its way through the tunnel both ways, when the tunnel connection
    is reset: every stream resumes and gets its own bytes back in order, and neither end grows beyond what
    the data in flight explains."""
    import resource
    import selectors
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    server_config, client_config = grace_configs(tmp_path, "60s")
    tunnel.start(server_config=server_config, client_config=client_config)
    server_port = int(tunnel.server.address.rsplit(":", 1)[1])
    count, size = 1000, 64 << 10
    socks = []
    for _ in range(count):
        s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
        assert rep == 0
        s.sendall(b"ECHO\n")
        s.setblocking(False)
        socks.append(s)
    rss_client, rss_server = tunnel.client.rss_kb(), tunnel.server.rss_kb()
    payloads = [pattern_bytes(i * 7919, size) for i in range(count)]
    sent, got = [0] * count, [bytearray() for _ in range(count)]
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
    reset_done, peak_client, peak_server = False, 0, 0
    deadline = time.time() + 120
    while sum(len(g) for g in got) < count * size and time.time() < deadline:
        for key, events in sel.select(timeout=1):
            i, s = key.data, key.fileobj
            if events & selectors.EVENT_WRITE and sent[i] < size:
                try:
                    sent[i] += s.send(payloads[i][sent[i]:sent[i] + (16 << 10)])
                except BlockingIOError:
                    pass
                if sent[i] == size:
                    sel.modify(s, selectors.EVENT_READ, i)
            if events & selectors.EVENT_READ:
                data = s.recv(1 << 16)
                assert data, f"stream {i} ended after {len(got[i])} bytes"
                got[i] += data
        total = sum(len(g) for g in got)
        if not reset_done and total >= count * size // 3:
            assert reset_tunnel(server_port) >= 1
            reset_done = True
        peak_client = max(peak_client, tunnel.client.rss_kb())
        peak_server = max(peak_server, tunnel.server.rss_kb())
    assert reset_done
    for i in range(count):
        assert bytes(got[i]) == payloads[i], f"stream {i} got {len(got[i])} bytes, not its own in order"
    for s in socks:
        s.close()
    assert "session resumed" in tunnel.client.stderr_text()
    assert "resumed its session" in tunnel.server.stderr_text()
    # 64 MiB crossed each way; what either end holds beyond its start stays well under that.
    assert peak_client - rss_client < 96 << 10, (peak_client, rss_client)
    assert peak_server - rss_server < 96 << 10, (peak_server, rss_server)


def test_a_resume_with_a_wrong_proof_or_an_unknown_session_is_refused_and_other_sessions_run_on(tunnel, target, tmp_path):
    """An independent Noise implementation (noiseprotocol) asks the real server to resume: a session id nobody
    has gets status 1 (unknown); its own earlier session's id with a proof that is not bound to this handshake
    gets status 2 (refused). The real client's stream runs on untouched meanwhile."""
    import os
    import struct
    from noise_peer import NoisePeer, frame, read_private_key, tai64n
    T_PING, T_RESUME, T_RESUMED = 0x06, 0x0E, 0x0F
    server_config, client_config = grace_configs(tmp_path, "60s")
    tunnel.start(server_config=server_config, client_config=client_config)
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.sendall(b"ECHO\n")
    resumable = tai64n() + struct.pack(">BHI", 0x02, 4, 1 << 5)   # features: resumption

    def connect(timestamp_offset=0):
        peer = NoisePeer("127.0.0.1", tunnel.server.port, read_private_key(tunnel.peer_key), tunnel.server_pub)
        payload = peer.handshake(tai64n(time.time_ns() + timestamp_offset) + resumable[12:])
        tlvs, i, session_id = payload, 0, None
        while i < len(tlvs):
            t, n = struct.unpack(">BH", tlvs[i:i + 3])
            if t == 0x06:
                session_id = tlvs[i + 3:i + 3 + n]
            i += 3 + n
        return peer, session_id

    def resumed_status(peer):
        for t, _, _, payload in peer.recv_frames():
            if t == T_RESUMED:
                return payload[0]
        raise AssertionError("no RESUMED")

    # A session id nobody has.
    peer, own_id = connect()
    assert own_id is not None and len(own_id) == 16, "the server named the resumable session"
    peer.send_frames(frame(T_RESUME, 0, 0, os.urandom(16) + struct.pack(">Q", 0) + os.urandom(32)))
    assert resumed_status(peer) == 1
    # Its first session, confirmed (a PING), is resumable; a new connection names it with a proof that is
    # not bound to the new handshake: refused.
    peer.send_frames(frame(T_PING, 0, 0, b"12345678"))
    time.sleep(0.3)
    second, _ = connect(timestamp_offset=1_000_000)
    second.send_frames(frame(T_RESUME, 0, 0, own_id + struct.pack(">Q", 1) + os.urandom(32)))
    assert resumed_status(second) == 2
    second.close()
    peer.close()
    # The real client's session never noticed.
    for i in range(20):
        line = f"{i:04d}".encode()
        s.sendall(line)
        assert recv_exact(s, 4) == line
    s.close()
    assert "session resumed" not in tunnel.client.stderr_text()
    assert "tunnel lost" not in tunnel.client.stderr_text()
