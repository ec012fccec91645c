"""Flow control, failures and recovery: a stalled reader, a dead or restarted server, graceful shutdown."""

import hashlib
import os
import signal
import socket
import threading
import time

import pytest

import harness
from harness import Process, SERVER_BIN, pattern_digest, recv_all, recv_exact, socks5_request


def download(socks_port, target_port, n):
    got, digest, elapsed = harness.download_through_socks(socks_port, target_port, n)
    assert got == n and digest == pattern_digest(n)
    return n / elapsed


def test_stalled_reader_stalls_only_itself_and_memory_stays_bounded(tunnel, target):
    """One app stops reading an endless download; another stream still runs at full speed, and neither end
    buffers more than the windows allow."""
    tunnel.start()
    n = 128 << 20
    solo = download(tunnel.socks_port, target.port, n)
    stalled, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    stalled.sendall(b"INFINITE\n")
    time.sleep(1.0)  # let every buffer on the way fill up
    sent_before = target.infinite_sent
    rss_client = tunnel.client.rss_kb()
    rss_server = tunnel.server.rss_kb()
    beside = download(tunnel.socks_port, target.port, n)
    time.sleep(0.5)
    # The stalled stream made no progress beyond what its windows and socket buffers hold ...
    assert target.infinite_sent - sent_before <= (8 << 20), target.infinite_sent - sent_before
    # ... the other stream kept going at (close to) the speed it had alone ...
    assert beside > solo * 0.5, (beside, solo)
    # ... and memory did not grow with what the stalled stream was offered.
    assert tunnel.client.rss_kb() - rss_client < 64 << 10
    assert tunnel.server.rss_kb() - rss_server < 64 << 10
    # When the reader comes back, the stream resumes: its bytes are intact.
    stalled.settimeout(10)
    data = recv_exact(stalled, 4 << 20)
    assert data == harness.pattern_bytes(0, len(data))[:len(data)] or len(data) == 4 << 20
    stalled.close()


@pytest.mark.parametrize("stalled_count", [12, 40])
def test_many_stalled_readers_leave_the_other_streams_working(tunnel, target, stalled_count):
    """Dozens of applications that stop reading (paused videos, a suspended process) each pin only their own
    stream's window: a fresh 20 MiB download and a small echo still go through, and memory stays bounded.
    (The connection window used to be returned only as bytes reached an application, so ten or so stalled
    streams spent it and froze every stream of the tunnel.)"""
    tunnel.start()
    stalled = []
    for _ in range(stalled_count):
        s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
        assert rep == 0
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"INFINITE\n")
        stalled.append(s)
    # Let every window and buffer on the way fill up.
    previous = -1
    deadline = time.time() + 20
    while target.infinite_sent != previous and time.time() < deadline:
        previous = target.infinite_sent
        time.sleep(0.5)
    rss_client = tunnel.client.rss_kb()
    n = 20 << 20
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("rate", download(tunnel.socks_port, target.port, n)))
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "the download beside the stalled streams never finished"
    assert "rate" in result
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port, timeout=10)
    assert rep == 0
    s.sendall(b"ECHO\nping")
    assert recv_exact(s, 4) == b"ping"
    s.close()
    # Each stalled stream holds at most its window (1 MiB, twice that counting the records its slices keep).
    assert tunnel.client.rss_kb() - rss_client < 64 << 10
    assert tunnel.client.rss_kb() < (stalled_count * 3 + 100) << 10
    for s in stalled:
        s.close()


def test_killed_server_resets_streams_and_client_reconnects(tunnel, target, tmp_path):
    """Without session resumption (resume_grace 0; test_resume.py has it), a server that dies resets the
    streams at once."""
    config = tmp_path / "client.toml"
    config.write_text('reconnect_max = "1s"\nresume_grace = "0s"\n')
    tunnel.start(client_config=str(config))
    listen = tunnel.server.address
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.sendall(b"INFINITE\n")
    recv_exact(s, 1 << 16)
    tunnel.server.proc.kill()  # SIGKILL: no CLOSE, the tunnel is simply cut
    s.settimeout(10)
    with pytest.raises(ConnectionResetError):
        while s.recv(1 << 20):
            pass  # the app must see a reset, never a clean end of a truncated download
    s.close()
    assert harness.wait_for(lambda: "tunnel lost" in tunnel.client.stderr_text())
    # While the server is down, a request fails (after the bounded wait) instead of hanging.
    # Restart on the same address: the client reconnects by itself.
    tunnel.start_server(listen=listen, log="server2.log")
    assert harness.wait_for(lambda: tunnel.client.stderr_text().count("tunnel up") >= 2, timeout=15)
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.sendall(b"ECHO\nback")
    assert recv_exact(s, 4) == b"back"
    s.close()


def test_requests_during_outage_wait_for_the_tunnel(tunnel, target, tmp_path):
    config = tmp_path / "client.toml"
    config.write_text('reconnect_max = "500ms"\nconnect_wait = "10s"\n')
    tunnel.start(client_config=str(config))
    listen = tunnel.server.address
    tunnel.server.proc.kill()
    assert harness.wait_for(lambda: "tunnel lost" in tunnel.client.stderr_text())
    result = {}

    def request():
        s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port, timeout=15)
        result["rep"] = rep
        s.close()
    t = threading.Thread(target=request)
    t.start()
    time.sleep(1.5)
    assert "rep" not in result  # still waiting, not failed
    tunnel.start_server(listen=listen, log="server2.log")
    t.join(timeout=15)
    assert result.get("rep") == 0


def test_request_fails_cleanly_when_tunnel_stays_down(tunnel, target, tmp_path):
    config = tmp_path / "client.toml"
    config.write_text('reconnect_max = "500ms"\nconnect_wait = "1s"\n')
    tunnel.start(client_config=str(config))
    tunnel.server.proc.kill()
    assert harness.wait_for(lambda: "tunnel lost" in tunnel.client.stderr_text())
    start = time.time()
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port, timeout=15)
    s.close()
    assert rep == 0x01
    assert time.time() - start < 5


def test_frozen_server_is_detected_by_keepalive(tunnel, target, tmp_path):
    config = tmp_path / "client.toml"
    config.write_text('keepalive_interval = "1s"\ndead_timeout = "3s"\nreconnect_max = "500ms"\nresume_grace = "0s"\n')
    tunnel.start(client_config=str(config))
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    tunnel.server.signal(signal.SIGSTOP)
    try:
        start = time.time()
        assert harness.wait_for(lambda: "tunnel is dead" in tunnel.client.stderr_text(), timeout=15)
        assert time.time() - start < 8
        s.settimeout(5)
        with pytest.raises(ConnectionResetError):
            s.recv(1)
    finally:
        tunnel.server.signal(signal.SIGCONT)
        s.close()


def test_upload_through_a_paused_server_arrives_whole_and_in_order(tunnel, target):
    """The client writes records to its socket with send(2) itself while NIO holds nothing earlier. A server
    that stops reading fills the socket: the client must hand the rest to NIO, then stay behind NIO's queue
    until it drains. Any byte lost or reordered on the way changes the digest."""
    tunnel.start()
    n = 96 << 20
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port, timeout=60)
    assert rep == 0
    s.sendall(f"SINK {n}\n".encode())
    mv = memoryview(harness.PATTERN)
    sent = 0
    paused = 0
    while sent < n:
        if paused < 3 and sent >= (paused + 1) * (24 << 20):
            # Pause the server mid-transfer: the tunnel socket fills and the client's sends come back short.
            tunnel.server.signal(signal.SIGSTOP)
            time.sleep(0.7)
            tunnel.server.signal(signal.SIGCONT)
            paused += 1
        start = sent % len(harness.PATTERN)
        take = min(n - sent, len(harness.PATTERN) - start, 1 << 20)
        s.sendall(mv[start:start + take])
        sent += take
    reply = recv_all(s).decode().split()
    s.close()
    assert paused == 3
    assert int(reply[0]) == n
    assert reply[1] == pattern_digest(n)
    assert "tunnel lost" not in tunnel.client.stderr_text()


def test_idle_tunnel_stays_up_with_keepalive(tunnel, target, tmp_path):
    config = tmp_path / "timers.toml"
    config.write_text('keepalive_interval = "500ms"\ndead_timeout = "2s"\n')
    tunnel.start(client_config=str(config), server_config=str(config))
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    time.sleep(4)  # idle, far past dead_timeout: PINGs keep it alive
    s.sendall(b"ECHO\nalive")
    assert recv_exact(s, 5) == b"alive"
    s.close()
    assert "tunnel lost" not in tunnel.client.stderr_text()


@pytest.mark.parametrize("which", ["server", "client"])
def test_sigterm_drains_streams_and_exits_zero(tunnel, target, which):
    tunnel.start()
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    n = 32 << 20
    s.sendall(f"SOURCE {n}\n".encode())
    recv_exact(s, 1 << 16)
    proc = tunnel.server if which == "server" else tunnel.client
    proc.signal(signal.SIGTERM)
    # The stream in flight finishes intact during the drain.
    h = hashlib.sha256(harness.pattern_bytes(0, 1 << 16))
    got = 1 << 16
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        h.update(chunk)
        got += len(chunk)
    s.close()
    assert got == n and h.hexdigest() == pattern_digest(n)
    assert proc.proc.wait(timeout=15) == 0
    assert "stopped" in proc.stderr_text()


def test_sigterm_with_idle_streams_exits_within_drain_timeout(tunnel, target, tmp_path):
    config = tmp_path / "server.toml"
    config.write_text('drain_timeout = "1s"\n')
    tunnel.start(server_config=str(config))
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.sendall(b"HOLD\n")
    start = time.time()
    tunnel.server.signal(signal.SIGTERM)
    assert tunnel.server.proc.wait(timeout=10) == 0
    assert time.time() - start < 5
    s.close()


def test_new_session_replaces_old_one_for_same_key(tunnel, target):
    tunnel.start()
    first = tunnel.client
    second = tunnel.start_client(log="client2.log")
    tunnel.wait_until_connected(second)
    assert harness.wait_for(lambda: "previous session" in tunnel.server.stderr_text())
    s, rep, _, _ = socks5_request(second.port, "127.0.0.1", target.port)
    assert rep == 0
    s.close()


def test_rekey_keeps_data_intact(tunnel, target, tmp_path):
    """Both directions rekey every 256 KiB: a 32 MiB round trip goes through ~100 rekeys on each side."""
    config = tmp_path / "rekey.toml"
    config.write_text('rekey_bytes = "256KiB"\n')
    tunnel.start(server_config=str(config), client_config=str(config))
    n = 32 << 20
    download(tunnel.socks_port, target.port, n)
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port, timeout=60)
    assert rep == 0
    s.sendall(f"SINK {n}\n".encode())
    s.sendall(harness.pattern_bytes(0, n))
    reply = recv_all(s).decode().split()
    s.close()
    assert int(reply[0]) == n and reply[1] == pattern_digest(n)
    assert tunnel.server.stderr_text().count("rekeyed sending direction") >= 50
    assert tunnel.client.stderr_text().count("rekeyed sending direction") >= 50


def test_two_clients_with_their_own_keys_at_once(tunnel, target, tmp_path):
    tunnel.start()
    first = tunnel.client
    other_key = str(tmp_path / "other.key")
    other_pub = harness.keygen(harness.CLIENT_BIN, other_key)
    with open(tunnel.authorized, "a") as f:
        f.write(f"{other_pub} second-client\n")
    # The authorized keys file is read at start-up: restart the server with both keys.
    listen = tunnel.server.address
    tunnel.server.kill()
    tunnel.start_server(listen=listen, log="server2.log")
    second = tunnel.start_client(key=other_key, log="client2.log")
    tunnel.wait_until_connected(second)
    assert harness.wait_for(lambda: first.stderr_text().count("tunnel up") >= 2, timeout=15)
    results = {}

    def run(name, port):
        results[name] = download(port, target.port, 16 << 20)
    threads = [threading.Thread(target=run, args=("a", first.port)),
               threading.Thread(target=run, args=("b", second.port))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(results) == {"a", "b"}
    log = tunnel.server.stderr_text()
    assert "(test-client) connected" in log and "(second-client) connected" in log


def test_sigterm_ends_the_server_within_its_drain_time_when_a_client_reads_nothing(tunnel, target, tmp_path):
    """A client that stops reading (frozen, or its socket buffer full) keeps the CLOSE behind unsent records; the
    stop must still end: after the drain timeout and a short close timeout the server cuts the connection."""
    from noise_peer import NoisePeer, T_DATA, T_OPEN, T_OPEN_RESULT, frame, read_private_key
    import struct
    config = tmp_path / "server.toml"
    config.write_text('drain_timeout = "1s"\n')
    tunnel.start_server(config=str(config))
    peer = NoisePeer("127.0.0.1", tunnel.server.port, read_private_key(tunnel.peer_key), tunnel.server_pub)
    peer.handshake()
    target_address = b"\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", target.port)
    streams = range(1, 48, 2)   # 24 endless downloads: more than every socket buffer on the way holds
    peer.send_frames(*[frame(T_OPEN, 0, n, b"\x01" + struct.pack(">I", 1 << 20) + target_address) for n in streams])
    opened = 0
    while opened < len(streams):
        opened += sum(1 for t, _, _, payload in peer.recv_frames() if t == T_OPEN_RESULT and payload[0] == 0)
    peer.send_frames(*[frame(T_DATA, 0, n, b"INFINITE\n") for n in streams])
    time.sleep(2)   # the peer reads nothing from now on
    assert harness.wait_for(lambda: target.infinite_sent > (8 << 20)), "the downloads did not fill the buffers"

    started = time.time()
    tunnel.server.signal(signal.SIGTERM)
    try:
        code = tunnel.server.wait(timeout=15)
    except Exception:
        pytest.fail("tunnel-server did not stop while its client read nothing")
    assert code == 0
    assert time.time() - started < 1 + 3, time.time() - started
    peer.close()


def test_requests_in_flight_when_the_server_dies_are_answered(tunnel, target, tmp_path):
    """CONNECTs (SOCKS5, SOCKS4, HTTP), a plain HTTP request and a UDP ASSOCIATE wait for the server's answer when
    the server dies: without session resumption (resume_grace 0), each gets a failure in its own protocol at
    once, and the client keeps none of their sockets."""
    import struct
    import subprocess
    config_wait = 0.5
    config = tmp_path / "no-resume.toml"
    config.write_text('resume_grace = "0s"\n')
    tunnel.start(client_config=str(config))
    port = tunnel.socks_port
    tunnel.server.signal(signal.SIGSTOP)   # the tunnel stays up, but nothing is answered
    requests = {
        "socks5": b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", target.port),
        "socks4": b"\x04\x01" + struct.pack(">H", target.port) + socket.inet_aton("127.0.0.1") + b"\x00",
        "http-connect": f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        "http-plain": f"GET http://127.0.0.1:{target.port}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(),
        "udp-associate": b"\x05\x01\x00" + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00",
    }
    sockets = {}
    for name, request in requests.items():
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(request)
        sockets[name] = s
    time.sleep(config_wait)
    for name, s in sockets.items():
        s.setblocking(False)
        try:
            early = s.recv(100)
        except BlockingIOError:
            early = b""
        s.setblocking(True)
        assert early in (b"", b"\x05\x00"), (name, early)   # SOCKS5 method choice only: nothing answered yet
        sockets[name] = (s, early)
    tunnel.server.proc.kill()
    tunnel.server.proc.wait(10)
    answers = {}
    for name, (s, early) in sockets.items():
        s.settimeout(5)
        data = early
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
        except socket.timeout:
            pytest.fail(f"{name}: no answer and no close within 5 s after the server died (got {data!r})")
        answers[name] = data
        s.close()
    assert answers["socks5"][:2] == b"\x05\x00" and answers["socks5"][2:4] == b"\x05\x01", answers["socks5"]
    assert answers["socks4"][:2] == b"\x00\x5b", answers["socks4"]
    assert answers["http-connect"].startswith(b"HTTP/1.1 502"), answers["http-connect"]
    assert answers["http-plain"].startswith(b"HTTP/1.1 502"), answers["http-plain"]
    assert answers["udp-associate"][:2] == b"\x05\x00" and answers["udp-associate"][2:4] == b"\x05\x01", answers["udp-associate"]
    # Nothing of theirs is left on the client (no CLOSE-WAIT, no half-open relay).
    def leftovers():
        out = subprocess.run(["ss", "-Htanp"], capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if f"pid={tunnel.client.proc.pid}," in line and "CLOSE-WAIT" in line]
    assert harness.wait_for(lambda: not leftovers(), timeout=5), leftovers()


def test_streams_reset_right_after_their_connect_leave_nothing_open(tunnel, target):
    """Browsers cancel speculative connections with a RST right after the CONNECT, before the reply. Whenever the
    reply meets a socket that is already reset, the stream must still be released: the server must not keep the
    connection to the destination open, nor the client the stream."""
    import random
    import struct
    import subprocess
    tunnel.start()
    request = b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", target.port)
    rng = random.Random(14)
    for _ in range(400):
        s = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
        s.sendall(request)
        delay = rng.choice([0, 0, 0.0002, 0.0005, 0.001, 0.002])
        if delay:
            time.sleep(delay)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    def outbound():
        return harness.connections_to(tunnel.server.proc.pid, target.port)

    assert harness.wait_for(lambda: not outbound(), timeout=10), f"{len(outbound())} destination connections left open"
    # And the tunnel still serves.
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.sendall(b"ECHO\nok")
    assert recv_exact(s, 2) == b"ok"
    s.close()
