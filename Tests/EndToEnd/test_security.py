"""Authentication, handshake robustness and interop with an independent Noise implementation."""

import os
import socket
import struct
import subprocess
import time

import pytest

import harness
from harness import CLIENT_BIN, SERVER_BIN, keygen, recv_all, recv_exact, recv_until_closed, socks5_request
from noise_peer import (F_ACK, F_FIN, T_DATA, T_OPEN, T_OPEN_RESULT, T_PING, NoisePeer, frame, read_private_key,
                        recv_msg, send_msg, tai64n)


def fast_client_config(tmp_path):
    path = tmp_path / "fast-client.toml"
    path.write_text('connect_wait = "1s"\nreconnect_max = "1s"\n')
    return str(path)


def assert_socks_fails_quickly(socks_port, target_port):
    start = time.time()
    s, rep, _, _ = socks5_request(socks_port, "127.0.0.1", target_port, timeout=15)
    s.close()
    assert rep not in (None, 0), "a stream opened without an authenticated server"
    assert time.time() - start < 10


def test_python_noise_initiator_interoperates(tunnel, target):
    """PyPI noiseprotocol completes Noise_IK_25519_ChaChaPoly_BLAKE2b with the real server, then PING/ACK and a
    whole stream (OPEN, DATA, FIN) through the mux."""
    tunnel.start_server()
    peer = NoisePeer("127.0.0.1", tunnel.server.port, read_private_key(tunnel.peer_key), tunnel.server_pub)
    params = peer.handshake()
    assert len(params) > 0  # the server's TLVs
    peer.send_frames(frame(T_PING, 0, 0, b"12345678"))
    frames = peer.recv_frames()
    assert (T_PING, F_ACK, 0, b"12345678") in frames
    target_addr = b"\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", target.port)
    peer.send_frames(frame(T_OPEN, 0, 1, b"\x01" + struct.pack(">I", 1 << 20) + target_addr))
    result = None
    while result is None:
        for t, f, sid, payload in peer.recv_frames():
            if t == T_OPEN_RESULT and sid == 1:
                result = payload
    assert result[0] == 0, f"OPEN_RESULT reply {result[0]}"
    peer.send_frames(frame(T_DATA, F_FIN, 1, b"ECHO\nnoise interop"))
    echoed = b""
    fin = False
    while not fin:
        for t, f, sid, payload in peer.recv_frames():
            if t == T_DATA and sid == 1:
                echoed += payload
                fin = fin or bool(f & F_FIN)
    assert echoed == b"noise interop"
    peer.close()
    assert "connected from" in tunnel.server.stderr_text()


def test_aesgcm_variant_interoperates(tunnel):
    tunnel.start_server()
    peer = NoisePeer("127.0.0.1", tunnel.server.port, read_private_key(tunnel.peer_key), tunnel.server_pub,
                     cipher="AESGCM")
    peer.handshake()
    peer.send_frames(frame(T_PING, 0, 0, b"aesgcm!!"))
    assert (T_PING, F_ACK, 0, b"aesgcm!!") in peer.recv_frames()
    peer.close()


def test_replayed_first_message_is_rejected_and_live_session_survives(tunnel):
    tunnel.start_server()
    priv = read_private_key(tunnel.peer_key)
    live = NoisePeer("127.0.0.1", tunnel.server.port, priv, tunnel.server_pub)
    live.handshake()
    live.send_frames(frame(T_PING, 0, 0, b"first!!!"))
    assert (T_PING, F_ACK, 0, b"first!!!") in live.recv_frames()
    # An attacker replays the recorded first message on a new connection.
    attacker = socket.create_connection(("127.0.0.1", tunnel.server.port), timeout=10)
    send_msg(attacker, live.message1)
    assert recv_until_closed(attacker) == b""  # silent close, no response
    attacker.close()
    assert harness.wait_for(lambda: "not newer" in tunnel.server.stderr_text())
    # The live session is untouched.
    live.send_frames(frame(T_PING, 0, 0, b"second!!"))
    assert (T_PING, F_ACK, 0, b"second!!") in live.recv_frames()
    live.close()


def test_stale_timestamp_is_rejected(tunnel):
    tunnel.start_server()
    priv = read_private_key(tunnel.peer_key)
    fresh = NoisePeer("127.0.0.1", tunnel.server.port, priv, tunnel.server_pub)
    fresh.handshake()
    old = NoisePeer("127.0.0.1", tunnel.server.port, priv, tunnel.server_pub)
    with pytest.raises(Exception):
        old.handshake(payload=tai64n(time.time_ns() - 3600 * 10**9))
    fresh.close()


def test_wrong_server_key_client_refuses(tunnel, target, tmp_path):
    tunnel.start_server()
    impostor_pub = keygen(SERVER_BIN, str(tmp_path / "other.key"))
    client = tunnel.start_client(server_pub=impostor_pub, config=fast_client_config(tmp_path))
    assert harness.wait_for(lambda: "--server-key" in client.stderr_text(), timeout=10), client.stderr_text()
    assert_socks_fails_quickly(client.port, target.port)
    assert "tunnel up" not in client.stderr_text()
    assert "connected from" not in tunnel.server.stderr_text()


def test_server_impersonator_cannot_complete_handshake(tunnel, target, tmp_path):
    """A fake server that answers with its own key and random bytes: the client never accepts it."""
    fake = socket.socket()
    fake.bind(("127.0.0.1", 0))
    fake.listen(8)
    fake_port = fake.getsockname()[1]
    import threading

    def serve():
        while True:
            try:
                conn, _ = fake.accept()
            except OSError:
                return
            try:
                recv_msg(conn)
                send_msg(conn, os.urandom(48 + 20))
                time.sleep(0.5)
                conn.close()
            except Exception:
                pass
    threading.Thread(target=serve, daemon=True).start()
    client = tunnel.start_client(server_address=f"127.0.0.1:{fake_port}", server_pub=tunnel.server_pub,
                                 config=fast_client_config(tmp_path))
    assert harness.wait_for(lambda: "did not authenticate" in client.stderr_text(), timeout=10), client.stderr_text()
    assert_socks_fails_quickly(client.port, target.port)
    fake.close()


def test_unknown_client_key_gets_no_service(tunnel, target, tmp_path):
    tunnel.start_server()
    stranger_key = str(tmp_path / "stranger.key")
    stranger_pub = keygen(CLIENT_BIN, stranger_key)
    client = tunnel.start_client(key=stranger_key, config=fast_client_config(tmp_path))
    assert harness.wait_for(lambda: "is not in the authorized keys" in tunnel.server.stderr_text()), tunnel.server.stderr_text()
    assert stranger_pub in tunnel.server.stderr_text()
    assert_socks_fails_quickly(client.port, target.port)
    # And by hand: the server says nothing at all to an unknown key.
    peer = NoisePeer("127.0.0.1", tunnel.server.port, read_private_key(stranger_key), tunnel.server_pub)
    with pytest.raises((EOFError, ConnectionResetError)):
        peer.handshake()


GARBAGE = [
    b"",                                         # connect and close
    b"\x00",                                     # one byte
    b"\x00\x05hello",                            # length below the minimum
    b"\xff\xff" + os.urandom(100),               # huge length, truncated
    b"\x00\x80" + os.urandom(128),               # plausible length, random body
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.2\r\n",
    os.urandom(4096),
]


@pytest.mark.parametrize("junk", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_on_tunnel_port_is_closed_silently_and_server_keeps_serving(tunnel, target, junk):
    tunnel.start()
    s = socket.create_connection(("127.0.0.1", tunnel.server.port), timeout=15)
    try:
        s.sendall(junk)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the server may have reset the connection already
    reply = recv_until_closed(s)
    assert reply == b""  # never a byte back to an unauthenticated peer
    s.close()
    check = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert check[1] == 0
    check[0].sendall(b"ECHO\nok")
    assert recv_exact(check[0], 2) == b"ok"
    check[0].close()
    assert tunnel.server.proc.poll() is None


def test_truncated_handshake_times_out(tunnel, tmp_path):
    config = tmp_path / "server.toml"
    config.write_text('handshake_timeout = "1s"\n')
    tunnel.start_server(config=str(config))
    peer = NoisePeer("127.0.0.1", tunnel.server.port, read_private_key(tunnel.peer_key), tunnel.server_pub)
    message = peer.noise.write_message(tai64n())
    peer.sock.sendall(struct.pack(">H", len(message)) + message[:40])  # then stall
    start = time.time()
    try:
        assert peer.sock.recv(1) == b""
    except ConnectionResetError:
        pass
    assert time.time() - start < 5
    peer.close()
    assert harness.wait_for(lambda: "timed out" in tunnel.server.stderr_text())


def test_many_stalled_handshakes_do_not_block_clients(tunnel, target):
    tunnel.start_server()
    stalled = [socket.create_connection(("127.0.0.1", tunnel.server.port)) for _ in range(50)]
    for s in stalled:
        s.sendall(b"\x00\xa0")
    tunnel.start_client()
    tunnel.wait_until_connected()
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.close()
    for s in stalled:
        s.close()


def test_pending_handshakes_from_one_source_cannot_lock_out_another(tunnel, tmp_path):
    """One address holding more idle, half-sent handshakes than the server has slots gives up its own oldest
    ones; a client from another address still gets in at once (and so does a new one from the same address)."""
    config = tmp_path / "server.toml"
    config.write_text("max_pending_handshakes = 8\n")
    tunnel.start_server(config=str(config))
    stalled = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", tunnel.server.port), source_address=("127.0.0.1", 0))
        s.sendall(b"\x00\xa0")   # a length prefix, then nothing
        stalled.append(s)
    time.sleep(0.5)
    for source in ("127.0.0.2", "127.0.0.1"):
        peer = NoisePeer("127.0.0.1", tunnel.server.port, read_private_key(tunnel.peer_key), tunnel.server_pub,
                         source=source)
        peer.handshake()
        peer.send_frames(frame(T_PING, 0, 0, b"arrived!"))
        assert (T_PING, F_ACK, 0, b"arrived!") in peer.recv_frames()
        peer.close()
        time.sleep(0.05)
    for s in stalled:
        s.close()


def test_a_stranger_cannot_flood_the_log_and_another_source_is_still_logged(tunnel):
    """Every failed handshake used to log a line, unthrottled: a scanner could fill the disk. Now each source
    (an IPv4 address, an IPv6 /64) gets a few lines a minute, then a summary; another source is logged as
    before."""
    tunnel.start_server()
    for _ in range(60):
        s = socket.create_connection(("127.0.0.1", tunnel.server.port), source_address=("127.0.0.3", 0))
        s.sendall(b"\x00\x10" + b"\x00" * 16)   # a message 1 that is too short: a failed handshake
        try:
            s.recv(10)
        except ConnectionResetError:
            pass
        s.close()
    s = socket.create_connection(("127.0.0.1", tunnel.server.port), source_address=("127.0.0.4", 0))
    s.sendall(b"\x00\x10" + b"\x00" * 16)
    try:
        s.recv(10)
    except ConnectionResetError:
        pass
    s.close()
    assert harness.wait_for(lambda: "handshake with 127.0.0.4:" in tunnel.server.stderr_text(), timeout=5), \
        tunnel.server.stderr_text()[-3000:]
    lines = [line for line in tunnel.server.stderr_text().splitlines() if "handshake with 127.0.0.3:" in line]
    assert 1 <= len(lines) <= 5, f"{len(lines)} lines logged for one source's 60 failed handshakes"


def test_tampered_record_ends_only_that_connection(tunnel, target):
    tunnel.start()
    peer = NoisePeer("127.0.0.1", tunnel.server.port, read_private_key(tunnel.peer_key), tunnel.server_pub)
    peer.handshake()
    record = bytearray(peer.noise.encrypt(frame(T_PING, 0, 0, b"tampered")))
    record[3] ^= 0x40
    send_msg(peer.sock, bytes(record))
    try:
        assert peer.sock.recv(100) == b""
    except ConnectionResetError:
        pass
    peer.close()
    assert harness.wait_for(lambda: "failed authentication" in tunnel.server.stderr_text())
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.close()


@pytest.mark.parametrize("bad_plaintext", [
    b"\x00\x00\x00\x00",                               # truncated frame header
    frame(T_DATA, 0, 1, b"x")[:-1] + b"",              # data for a stream never opened (cut short)
    frame(0x30, 0, 0, b""),                             # unknown frame type below the extension range
    frame(T_DATA, 0, 7, b"never opened"),               # data on a stream that was never opened
    frame(T_OPEN, 0, 2, b"\x01\x00\x01\x00\x00\x01\x7f\x00\x00\x01\x00\x50"),  # OPEN with a server-side id
])
def test_malformed_frames_end_only_that_connection(tunnel, target, bad_plaintext):
    tunnel.start()
    peer = NoisePeer("127.0.0.1", tunnel.server.port, read_private_key(tunnel.peer_key), tunnel.server_pub)
    peer.handshake()
    peer.send_frames(bad_plaintext)
    peer.wait_closed(timeout=10)
    peer.close()
    s, rep, _, _ = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)
    assert rep == 0
    s.close()
    assert tunnel.server.proc.poll() is None


def test_two_machines_sharing_one_key_are_told_so_on_both_ends(tunnel, tmp_path):
    """Two clients with the same key used to replace each other several times a second while each logged
    "check --server-key". The server now names both addresses, the clients say their key is in use elsewhere,
    and they back off instead of taking the session back at once."""
    tunnel.start_server(listen="[::]:0")
    port = tunnel.server.port
    first = tunnel.start_client(server_address=f"127.0.0.1:{port}", log="first.log")
    tunnel.wait_until_connected(first)
    second = tunnel.start_client(server_address=f"[::1]:{port}", log="second.log")
    assert harness.wait_for(lambda: "is in use on more than one machine" in tunnel.server.stderr_text(), timeout=20), \
        tunnel.server.stderr_text()[-3000:]
    warning = next(line for line in tunnel.server.stderr_text().splitlines() if "is in use on more than one machine" in line)
    assert "::1" in warning and "127.0.0.1" in warning, warning
    assert harness.wait_for(lambda: any("is in use on another machine" in c.stderr_text() for c in (first, second)),
                            timeout=30), first.stderr_text()[-2000:] + second.stderr_text()[-2000:]
    # They take turns ever more slowly: far fewer sessions than the several a second it used to be.
    time.sleep(3)
    before = tunnel.server.stderr_text().count("closing its previous session")
    time.sleep(5)
    after = tunnel.server.stderr_text().count("closing its previous session")
    assert after - before <= 4, f"{after - before} replacements in 5 s"


def test_a_private_key_in_the_authorized_keys_is_named(tunnel, tmp_path):
    """A private key pasted where a public key goes: the server's own key refuses to start; a client's is
    named when that client connects."""
    out = subprocess.run([SERVER_BIN, "--listen", "127.0.0.1:0", "--key", tunnel.server_key, "--authorized-keys",
                          tunnel.server_key], capture_output=True, text=True, timeout=10)
    assert out.returncode == 2, out.stderr
    assert "line 1 is the server's own PRIVATE key" in out.stderr and "tunnel-client pubkey" in out.stderr, out.stderr
    authorized = tmp_path / "authorized_keys"
    authorized.write_text("# a client's private key, by mistake\n" + open(tunnel.client_key).read())
    tunnel.authorized = str(authorized)
    tunnel.start_server()
    client = tunnel.start_client(config=fast_client_config(tmp_path))
    assert harness.wait_for(lambda: "holds its PRIVATE key" in tunnel.server.stderr_text(), timeout=10), \
        tunnel.server.stderr_text()[-2000:]
    assert "line 2 of the authorized keys" in tunnel.server.stderr_text()
