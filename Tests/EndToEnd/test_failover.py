"""Several servers (issue 21, README *Several servers*): a client with a server list skips dead entries, moves
off a draining server without a failed request, and after a server is killed serves new requests at once from
another. On loopback; the balancer tests are in test_ha.py."""

import signal
import socket
import threading
import time

import harness
from harness import CLIENT_BIN, Process, recv_exact, socks5_request


def start_pool(tunnel, count, extra=()):
    """`count` servers sharing one static key (a pool), each on its own port."""
    return [tunnel.start_server(extra=["--control-socket", "none", *extra], log=f"server{i}.log") for i in range(count)]


def start_client(tunnel, servers, tmp_path, config_text=""):
    config = tmp_path / "client.toml"
    config.write_text('control_socket = "none"\nreconnect_max = "1s"\n' + config_text)
    args = [CLIENT_BIN, *[a for s in servers for a in ("--server", s)], "--server-key", tunnel.server_pub,
            "--key", tunnel.client_key, "--socks", "127.0.0.1:0", "--config", str(config)]
    client = Process(args, r"SOCKS5 listening on (\S+)", str(tmp_path / "client.log"))
    tunnel.processes.append(client)
    tunnel.client = client
    return client


def echo(port, target, word=b"hello", timeout=5):
    s = socks5_request(port, "127.0.0.1", target.port, timeout=timeout)
    try:
        if s[1] != 0:
            return False
        s[0].sendall(b"ECHO\n" + word + b"\n")
        return recv_exact(s[0], len(word) + 1) == word + b"\n"
    except OSError:
        return False
    finally:
        s[0].close()


def test_dead_entries_at_the_head_of_the_list_are_skipped_within_one_timeout(tunnel, target, tmp_path):
    """First a port where nothing listens (refused at once), then one that accepts TCP and never answers (the
    handshake times out, 1 s here), then the real server: the tunnel is up in about that one timeout."""
    [server] = start_pool(tunnel, 1)
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    refused_address = "127.0.0.1:%d" % refused.getsockname()[1]
    refused.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent_address = "127.0.0.1:%d" % silent.getsockname()[1]
    try:
        started = time.monotonic()
        client = start_client(tunnel, [refused_address, silent_address, server.address], tmp_path,
                              'handshake_timeout = "1s"\n')
        tunnel.wait_until_connected(client)
        took = time.monotonic() - started
        print(f"tunnel up {took:.2f} s after start, past two dead servers")
        assert f"tunnel up to {server.address}" in client.stderr_text()
        assert f"trying {silent_address}" in client.stderr_text()
        assert took < 2.5, f"took {took:.1f} s"
        assert echo(client.port, target)
    finally:
        silent.close()


class Requests(threading.Thread):
    """A new SOCKS connection with an echo every 20 ms; counts what failed."""

    def __init__(self, port, target):
        super().__init__(daemon=True)
        self.port, self.target = port, target
        self.ok, self.failed, self.stop = 0, [], False
        self.first_ok_after = None
        self.mark = None

    def run(self):
        while not self.stop:
            began = time.monotonic()
            good = echo(self.port, self.target)
            now = time.monotonic()
            if good:
                self.ok += 1
                # Only a request begun after the mark counts (one in flight may have finished on the old path).
                if self.mark is not None and began >= self.mark and self.first_ok_after is None:
                    self.first_ok_after = now - self.mark
            else:
                self.failed.append(now)
            time.sleep(0.02)


def test_a_draining_servers_clients_move_without_a_failed_request(tunnel, target, tmp_path):
    """SIGTERM on the client's server: it stops accepting, tells its clients to go (GOAWAY) and lets open
    streams finish. The client opens its next tunnel on the next server of its list: requests made meanwhile
    all succeed, and a stream that was open on the draining server finishes there."""
    a, b = start_pool(tunnel, 2, extra=["--config", str(_drain_config(tmp_path))])
    client = start_client(tunnel, [a.address, b.address], tmp_path)
    tunnel.wait_until_connected(client)
    assert f"tunnel up to {a.address}" in client.stderr_text()
    open_stream = socks5_request(client.port, "127.0.0.1", target.port)[0]
    open_stream.sendall(b"ECHO\n")
    requests = Requests(client.port, target)
    requests.start()
    assert harness.wait_for(lambda: requests.ok >= 5)
    a.signal(signal.SIGTERM)
    assert harness.wait_for(lambda: f"tunnel up to {b.address}" in client.stderr_text(), timeout=5), \
        client.stderr_text()
    ok_at_move = requests.ok
    assert harness.wait_for(lambda: requests.ok >= ok_at_move + 20, timeout=10)
    # The stream opened before the drain still works on the old tunnel until it ends.
    open_stream.sendall(b"still here\n")
    assert recv_exact(open_stream, 11) == b"still here\n"
    open_stream.close()
    requests.stop = True
    requests.join(timeout=10)
    assert requests.failed == [], f"{len(requests.failed)} requests failed during the drain"
    assert a.wait(timeout=15) == 0


def _drain_config(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text('drain_timeout = "10s"\n')
    return path


def test_after_a_server_is_killed_new_requests_work_at_once_on_another(tunnel, target, tmp_path):
    """SIGKILL on the client's server (no GOAWAY, no CLOSE): the client cannot resume there, moves to the next
    server, and new requests work again within a fraction of a second."""
    a, b = start_pool(tunnel, 2)
    client = start_client(tunnel, [a.address, b.address], tmp_path)
    tunnel.wait_until_connected(client)
    requests = Requests(client.port, target)
    requests.start()
    assert harness.wait_for(lambda: requests.ok >= 5)
    a.proc.kill()
    requests.mark = time.monotonic()
    assert harness.wait_for(lambda: requests.first_ok_after is not None and
                            f"tunnel up to {b.address}" in client.stderr_text(), timeout=10), client.stderr_text()
    print(f"first good request {requests.first_ok_after * 1000:.0f} ms after the kill")
    assert requests.first_ok_after < 2.0
    # The new session's handshake waits out the server's flood spacing after the refused resume, instead of
    # being refused as "too fast" and backing off.
    assert "the server no longer knows this session" in client.stderr_text()
    assert "refused the handshake" not in client.stderr_text(), client.stderr_text()
    requests.stop = True
    requests.join(timeout=10)
