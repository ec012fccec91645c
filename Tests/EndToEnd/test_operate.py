"""Operating it (issue 20, README *Operating it*): `status` of both ends over their control sockets, with real
traffic; the control socket's mode, owner and peer check."""

import json
import os
import re
import signal
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time

import pytest

import harness
from harness import CLIENT_BIN, SERVER_BIN, pattern_digest, recv_exact, socks5_request

MIB = 1 << 20


def status(binary, sock, *extra):
    out = subprocess.run([binary, "status", "--control-socket", sock, *extra], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def status_json(binary, sock, *extra):
    return json.loads(status(binary, sock, "--json", *extra))


@pytest.fixture
def operated(tunnel, tmp_path):
    """A tunnel whose two ends have control sockets in the test's directory."""
    client_sock, server_sock = str(tmp_path / "client.sock"), str(tmp_path / "server.sock")
    tunnel.start(server_extra=["--control-socket", server_sock], client_extra=["--control-socket", client_sock])
    assert harness.wait_for(lambda: os.path.exists(client_sock) and os.path.exists(server_sock))
    return tunnel, client_sock, server_sock


def test_status_of_both_ends_shows_the_traffic_sent(operated, target):
    """8 MiB down, 3 MiB up and an echo stream left open: both ends' status (JSON and table) count them."""
    tunnel, client_sock, server_sock = operated
    down = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)[0]
    down.sendall(f"SOURCE {8 * MIB}\n".encode())
    digest = harness.hashlib.sha256(recv_exact(down, 8 * MIB)).hexdigest()
    assert digest == pattern_digest(8 * MIB)
    down.close()
    up = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)[0]
    up.sendall(f"SINK {3 * MIB}\n".encode())
    up.sendall(os.urandom(3 * MIB))
    assert harness.recv_all(up).split()[0] == str(3 * MIB).encode()
    up.close()
    echo = socks5_request(tunnel.socks_port, "localhost", target.port)[0]
    echo.sendall(b"ECHO\nhello\n")
    assert recv_exact(echo, 6) == b"hello\n"
    try:
        client = status_json(CLIENT_BIN, client_sock)
        assert client["state"] == "connected"
        assert client["server"] == tunnel.server.address
        assert client["serverKey"] == tunnel.server_pub
        traffic = client["traffic"]
        assert 8 * MIB <= traffic["payloadReceived"] < 8 * MIB + 4096
        assert 3 * MIB <= traffic["payloadSent"] < 3 * MIB + 4096
        assert traffic["wireReceived"] >= traffic["payloadReceived"]
        assert traffic["wireSent"] >= traffic["payloadSent"]
        assert traffic["streamsOpen"] == 1 and traffic["streamsTotal"] == 3
        assert client["rttMilliseconds"] is not None and client["reconnects"] == 0

        server = status_json(SERVER_BIN, server_sock, "--streams")
        [session] = server["sessions"]
        assert session["name"] == "test-client" and session["key"] == tunnel.client_pub
        assert session["state"] == "connected"
        assert 8 * MIB <= session["traffic"]["payloadSent"] < 8 * MIB + 4096
        assert 3 * MIB <= session["traffic"]["payloadReceived"] < 3 * MIB + 4096
        [stream] = session["streams"]
        assert stream["destination"] == f"localhost:{target.port}" and stream["kind"] == "tcp"
        assert stream["bytesReceived"] == len(b"ECHO\nhello\n") and stream["bytesSent"] == 6
        assert server["totals"]["streamsTotal"] == 3

        table = status(CLIENT_BIN, client_sock, "--streams")
        assert f"connected to {tunnel.server.address}" in table
        assert "8.0 MiB of streams" in table and "3.0 MiB of streams" in table
        assert f"localhost:{target.port}" in table
        table = status(SERVER_BIN, server_sock)
        assert "test-client" in table and "1 session," in table
    finally:
        echo.close()


def test_status_says_when_the_program_is_not_running(tmp_path):
    out = subprocess.run([CLIENT_BIN, "status", "--control-socket", str(tmp_path / "none.sock")],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 1
    assert "is the program running?" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to try the socket as another user)")
def test_the_control_socket_is_its_owners_only(tunnel):
    """Mode 0600 and owned by the program's user: another user cannot connect. Even with the mode opened up
    (a careless chmod), the program checks the peer's credentials and answers nothing to another user."""
    # A directory every user may enter (pytest's own is its owner's only), so the socket's mode is what counts.
    directory = tempfile.mkdtemp(prefix="tunnel-control-", dir="/tmp")
    try:
        os.chmod(directory, 0o755)
        client_sock = os.path.join(directory, "client.sock")
        tunnel.start(client_extra=["--control-socket", client_sock])
        assert harness.wait_for(lambda: os.path.exists(client_sock))
        info = os.stat(client_sock)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
        probe = ("import socket,sys\n"
                 "s=socket.socket(socket.AF_UNIX)\n"
                 "try:\n s.connect(sys.argv[1])\n"
                 "except PermissionError: print('refused'); sys.exit(0)\n"
                 "try:\n s.sendall(b'status\\n'); print('answer:', s.recv(65536))\n"
                 "except OSError: print('answer: closed')\n")
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", probe,
                     client_sock]
        out = subprocess.run(as_nobody, capture_output=True, text=True, timeout=20)
        assert out.stdout.strip() == "refused", out.stdout + out.stderr
        os.chmod(client_sock, 0o666)
        out = subprocess.run(as_nobody, capture_output=True, text=True, timeout=20)
        # Closed without a word (before or after the request was sent).
        assert out.stdout.strip() in ("answer: b''", "answer: closed"), out.stdout + out.stderr
        # Its owner is still answered.
        assert status_json(CLIENT_BIN, client_sock)["state"] == "connected"
    finally:
        tunnel.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_an_unknown_request_gets_an_error_and_the_socket_goes_with_the_program(operated):
    tunnel, client_sock, server_sock = operated
    s = socket.socket(socket.AF_UNIX)
    s.connect(server_sock)
    s.sendall(b"make coffee\n")
    answer = json.loads(harness.recv_all(s))
    assert "unknown request" in answer["error"]
    # A request that never ends its line is answered with an error once it is too long, not held open.
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(server_sock)
    s.sendall(b"status" * 400)
    answer = json.loads(harness.recv_all(s))
    assert "request longer than 1024 bytes" in answer["error"]
    assert tunnel.client.terminate() == 0
    assert not os.path.exists(client_sock)


def reload(server_sock):
    return subprocess.run([SERVER_BIN, "reload", "--control-socket", server_sock], capture_output=True, text=True,
                          timeout=20)


class SlowDownload(threading.Thread):
    """Reads a SOURCE stream through the proxy at about 2 MiB/s, checking every byte."""

    def __init__(self, port, target, n):
        super().__init__(daemon=True)
        self.sock = socks5_request(port, "127.0.0.1", target.port)[0]
        self.sock.sendall(f"SOURCE {n}\n".encode())
        self.n, self.got, self.digest, self.error = n, 0, None, None

    def run(self):
        h = harness.hashlib.sha256()
        try:
            while self.got < self.n:
                chunk = self.sock.recv(min(1 << 16, self.n - self.got))
                if not chunk:
                    break
                h.update(chunk)
                self.got += len(chunk)
                time.sleep(len(chunk) / (2 * MIB))
        except OSError as e:
            self.error = e
        self.digest = h.hexdigest()
        self.sock.close()


def test_a_reload_that_removes_a_key_closes_only_that_clients_session(tunnel, target, tmp_path):
    """Two clients stream; the operator removes one's key and reloads (`tunnel-server reload`, then SIGHUP for
    the next change): that client's session closes, the other's download goes on to its last byte."""
    client_sock, server_sock = str(tmp_path / "client.sock"), str(tmp_path / "server.sock")
    tunnel.start(server_extra=["--control-socket", server_sock], client_extra=["--control-socket", client_sock])
    staying = tunnel.client
    leaving = tunnel.start_client(key=tunnel.peer_key, extra=["--control-socket", "none"], log="leaving.log")
    tunnel.wait_until_connected(leaving)
    n = 12 * MIB
    download = SlowDownload(staying.port, target, n)
    download.start()
    doomed = socks5_request(leaving.port, "127.0.0.1", target.port)[0]
    doomed.sendall(b"ECHO\n")
    assert harness.wait_for(lambda: download.got > MIB)
    assert len(status_json(SERVER_BIN, server_sock)["sessions"]) == 2

    with open(tunnel.authorized, "w") as f:
        f.write(f"# test clients\n{tunnel.client_pub} test-client\n")
    out = reload(server_sock)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reloaded: 1 keys (0 added, 1 removed), 1 sessions of removed keys closed"
    assert harness.wait_for(lambda: "no longer authorized" in leaving.stderr_text()), leaving.stderr_text()
    doomed.settimeout(10)
    # Its streams end with a reset (the application never mistakes the cut for a clean end).
    with pytest.raises(ConnectionResetError):
        doomed.recv(1)
    [session] = status_json(SERVER_BIN, server_sock)["sessions"]
    assert session["name"] == "test-client"
    # Its reconnects are refused now.
    assert harness.wait_for(lambda: "the server refused the handshake" in leaving.stderr_text(), timeout=15)

    # The key comes back with SIGHUP: the client's next attempt gets in.
    with open(tunnel.authorized, "a") as f:
        f.write(f"{tunnel.peer_pub} test-peer\n")
    tunnel.server.signal(signal.SIGHUP)
    assert harness.wait_for(lambda: "1 added, 0 removed" in tunnel.server.stderr_text())
    assert harness.wait_for(lambda: leaving.stderr_text().count("tunnel up to") == 2, timeout=40)

    download.join(timeout=60)
    assert download.got == n and download.error is None
    assert download.digest == pattern_digest(n)
    assert staying.stderr_text().count("tunnel up to") == 1, "the staying client's tunnel was disturbed"


def test_a_reload_with_a_broken_file_keeps_everything_as_it_was(operated, target, tmp_path):
    tunnel, client_sock, server_sock = operated
    echo = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)[0]
    echo.sendall(b"ECHO\nbefore\n")
    assert recv_exact(echo, 7) == b"before\n"
    with open(tunnel.authorized, "w") as f:
        f.write("# half-edited\nnot-a-key laptop\n")
    out = reload(server_sock)
    assert out.returncode == 1
    assert "line 2: 'not-a-key' is not a base64 X25519 public key; the keys in use stay" in out.stderr
    tunnel.server.signal(signal.SIGHUP)
    assert harness.wait_for(lambda: tunnel.server.stderr_text().count("reload failed") == 2)
    lines = [l for l in tunnel.server.stderr_text().splitlines() if "reload failed" in l]
    assert all("keeping the 2 keys in use" in l for l in lines), lines
    # The client takes SIGHUP too (a service manager's reload): it stays up.
    tunnel.client.signal(signal.SIGHUP)
    assert harness.wait_for(lambda: "reloaded: log level debug, fast open auto" in tunnel.client.stderr_text())
    echo.sendall(b"after\n")
    assert recv_exact(echo, 6) == b"after\n"
    assert status_json(SERVER_BIN, server_sock)["sessions"][0]["name"] == "test-client"
    # A new connection of the listed client still gets in.
    assert tunnel.client.terminate() == 0
    again = tunnel.start_client(extra=["--control-socket", "none"], log="again.log")
    tunnel.wait_until_connected(again)
    echo.close()


def scrape(port):
    """The metrics endpoint, fetched with curl and parsed by prometheus_client's text parser."""
    from prometheus_client.parser import text_string_to_metric_families
    out = subprocess.run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/metrics"], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    values = {}
    for family in text_string_to_metric_families(out.stdout):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(values, name, **labels):
    return values[(name, tuple(sorted(labels.items())))]


def test_metrics_of_both_ends_rise_with_the_traffic(tunnel, target, tmp_path):
    """Both ends serve Prometheus text on --metrics; counters rise with what the test sends, stream opens are
    counted by reply code, handshakes by outcome (a stranger's key shows as unknown_key), RTT as a histogram."""
    server_port, client_port = harness.free_port(), harness.free_port()
    tunnel.start(server_extra=["--metrics", f"127.0.0.1:{server_port}", "--control-socket", "none"],
                 client_extra=["--metrics", f"127.0.0.1:{client_port}", "--control-socket", "none"])
    client0, server0 = scrape(client_port), scrape(server_port)
    assert value(client0, "tunnel_connected") == 1
    assert value(server0, "tunnel_sessions", state="connected") == 1
    assert value(server0, "tunnel_handshakes_total", outcome="ok") == 1

    down = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)[0]
    down.sendall(f"SOURCE {6 * MIB}\n".encode())
    assert harness.hashlib.sha256(recv_exact(down, 6 * MIB)).hexdigest() == pattern_digest(6 * MIB)
    down.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    refused = socks5_request(tunnel.socks_port, "127.0.0.1", dead_port)
    assert refused[1] == 5
    refused[0].close()
    # A stranger (a key the server does not list) tries to connect.
    stranger_key = str(tmp_path / "stranger.key")
    harness.keygen(CLIENT_BIN, stranger_key)
    stranger = tunnel.start_client(key=stranger_key, extra=["--control-socket", "none"], log="stranger.log")
    assert harness.wait_for(lambda: "the server refused the handshake" in stranger.stderr_text())
    stranger.kill()

    client1 = scrape(client_port)
    assert harness.wait_for(lambda: value(scrape(server_port), "tunnel_handshakes_total", outcome="unknown_key") >= 1)
    server1 = scrape(server_port)
    for values, sent, received in ((client1, "sent", "received"), (server1, "received", "sent")):
        got = value(values, "tunnel_payload_bytes_total", direction=received)
        assert 6 * MIB <= got < 6 * MIB + 4096
        assert value(values, "tunnel_wire_bytes_total", direction=received) >= got
        assert value(values, "tunnel_stream_opens_total", reply="succeeded") == 1
        assert value(values, "tunnel_stream_opens_total", reply="connection_refused") == 1
        assert value(values, "tunnel_streams_opened_total") == 2
    assert value(client1, "tunnel_payload_bytes_total", direction="received") > \
        value(client0, "tunnel_payload_bytes_total", direction="received")
    assert value(client1, "tunnel_rtt_seconds_count") >= 1
    assert value(client1, "tunnel_rtt_seconds_bucket", le="+Inf") == value(client1, "tunnel_rtt_seconds_count")
    assert value(client1, "tunnel_handshake_duration_seconds_count") == 1
    assert value(server1, "tunnel_authorized_keys") == 2
    # Labels never name a destination or a client: only these label names exist.
    for values in (client1, server1):
        names = {name for (_, labels) in values for (name, _) in labels}
        assert names <= {"direction", "event", "outcome", "reply", "state", "le"}, names
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{server_port}/"],
                         capture_output=True, text=True)
    assert out.stdout == "404"


def test_json_logs_are_one_object_per_line(tunnel, target):
    """--log-format json: every line of the server's log is a JSON object with time, level, label, source and
    message, and the logger's metadata as fields (the client's key prefix on a session's lines)."""
    tunnel.start(server_extra=["--log-format", "json", "--control-socket", "none"],
                 client_extra=["--log-format", "json", "--control-socket", "none"])
    s = socks5_request(tunnel.socks_port, "127.0.0.1", target.port)[0]
    s.sendall(b"ECHO\nping\n")
    assert recv_exact(s, 5) == b"ping\n"
    s.close()
    assert tunnel.client.terminate() == 0
    assert tunnel.server.terminate() == 0
    for process in (tunnel.server, tunnel.client):
        lines = [line for line in process.stderr_text().splitlines() if line.strip()]
        assert lines
        records = [json.loads(line) for line in lines]
        for record in records:
            assert {"time", "level", "label", "source", "message"} <= set(record), record
            assert record["time"].endswith("Z") and record["level"] in ("trace", "debug", "info", "notice",
                                                                       "warning", "error", "critical")
    server = [json.loads(l) for l in tunnel.server.stderr_text().splitlines() if l.strip()]
    connected = [r for r in server if "connected from" in r["message"]]
    assert connected and connected[0]["client"] == tunnel.client_pub[:8] and connected[0]["label"] == "tunnel-server"


def invite(tunnel, *extra):
    out = subprocess.run([SERVER_BIN, "invite", "--key", tunnel.server_key, *extra], capture_output=True,
                         timeout=20)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode()


def test_an_invite_link_round_trips_into_a_working_client(tunnel, target, tmp_path):
    """`tunnel-server invite` prints tunnel://KEY@HOST:PORT; a client given only that link (and its own key)
    reaches the server and serves a request. A link whose key is not the server's, or that disagrees with
    --server-key, is refused before anything connects."""
    tunnel.start_server(extra=["--control-socket", "none"])
    link = invite(tunnel, "--host", tunnel.server.address, "--no-qr").strip()
    key = tunnel.server_pub.rstrip("=").replace("+", "-").replace("/", "_")
    assert link == f"tunnel://{key}@{tunnel.server.address}"
    client = harness.Process([CLIENT_BIN, "--server", link, "--key", tunnel.client_key, "--socks", "127.0.0.1:0",
                              "--control-socket", "none"], r"SOCKS5 listening on (\S+)", str(tmp_path / "c.log"))
    tunnel.processes.append(client)
    tunnel.wait_until_connected(client)
    s = socks5_request(client.port, "127.0.0.1", target.port)[0]
    s.sendall(b"ECHO\ninvited\n")
    assert recv_exact(s, 8) == b"invited\n"
    s.close()

    other = harness.keygen(SERVER_BIN, str(tmp_path / "other.key"))
    out = subprocess.run([CLIENT_BIN, "--server", link, "--server-key", other, "--key", tunnel.client_key],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2 and "differs from the key in the tunnel:// link" in out.stderr
    out = subprocess.run([CLIENT_BIN, "--server", "tunnel://not-a-key@127.0.0.1:1", "--key", tunnel.client_key],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2 and "is not a base64 X25519 public key" in out.stderr


@pytest.mark.skipif(shutil.which("zbarimg") is None, reason="needs zbarimg (apt-get install zbar-tools)")
def test_the_invite_qr_code_decodes_to_the_link(tunnel, tmp_path):
    """The QR code (libqrencode, drawn with half blocks) read back by a real decoder (zbar) gives the link."""
    printed = invite(tunnel, "--host", "vpn.example.org:7443", "--qr").splitlines()
    link = printed[0]
    rows = []
    for line in printed[1:]:
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        rows.append([1 if c in "\u2588\u2580" else 0 for c in line])
        rows.append([1 if c in "\u2588\u2584" else 0 for c in line])
    scale = 6
    pbm = tmp_path / "qr.pbm"
    with open(pbm, "w") as f:
        f.write(f"P1\n{len(rows[0]) * scale} {len(rows) * scale}\n")
        for row in rows:
            text = " ".join(str(v) for v in row for _ in range(scale))
            for _ in range(scale):
                f.write(text + "\n")
    out = subprocess.run(["zbarimg", "--raw", "-q", str(pbm)], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == link, out.stdout + out.stderr


def test_the_client_reloads_its_log_level_and_fast_open_on_sighup(tunnel, target, tmp_path):
    """The client's config goes from info/never to debug/always: after SIGHUP a CONNECT is logged at debug and
    answered before the server's result (fast open); a broken config afterwards changes nothing."""
    config = tmp_path / "client.toml"
    config.write_text('log_level = "info"\nfast_open = "never"\ncontrol_socket = "none"\nsocks = "127.0.0.1:0"\n')
    tunnel.start_server(extra=["--control-socket", "none"])
    client = harness.Process([CLIENT_BIN, "--server", tunnel.server.address, "--server-key", tunnel.server_pub,
                              "--key", tunnel.client_key, "--config", str(config)],
                             r"SOCKS5 listening on (\S+)", str(tmp_path / "client.log"))
    tunnel.processes.append(client)
    tunnel.wait_until_connected(client)

    def echo(word):
        s = socks5_request(client.port, "127.0.0.1", target.port)[0]
        s.sendall(b"ECHO\n" + word + b"\n")
        assert recv_exact(s, len(word) + 1) == word + b"\n"
        s.close()

    echo(b"before")
    assert "CONNECT" not in client.stderr_text()
    config.write_text('log_level = "debug"\nfast_open = "always"\ncontrol_socket = "none"\n'
                      'socks = "127.0.0.1:1"\n')
    client.signal(signal.SIGHUP)
    assert harness.wait_for(lambda: "reloaded: log level debug, fast open always; socks changed, which takes a restart"
                            in client.stderr_text()), client.stderr_text()
    echo(b"after")
    assert harness.wait_for(lambda: "CONNECT 127.0.0.1" in client.stderr_text())
    # Fast open "always": the client answered before the server did (its exit summary counts it).
    config.write_text('log_level = "loud"\n')
    client.signal(signal.SIGHUP)
    assert harness.wait_for(lambda: "reload failed" in client.stderr_text())
    echo(b"still")
    assert client.terminate() == 0
    assert "fast open: 2 streams opened before the server's answer" in client.stderr_text()
