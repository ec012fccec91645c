import os
import shutil
import subprocess

import pytest

import harness
from harness import CLIENT_BIN, SERVER_BIN, Process, TargetServer, keygen

# Arguments every test's client gets, e.g. TUNNEL_TEST_CLIENT_ARGS='--event-loop nio' runs the suite on that loop.
# They come before a test's own arguments, so a test that names a setting (test_event_loop.py) keeps it: the
# last occurrence of a flag wins.
CLIENT_EXTRA = os.environ.get("TUNNEL_TEST_CLIENT_ARGS", "").split()
# The same for every test's server, e.g. TUNNEL_TEST_SERVER_ARGS='--event-loop nio'.
SERVER_EXTRA = os.environ.get("TUNNEL_TEST_SERVER_ARGS", "").split()


def pytest_sessionstart(session):
    for binary in (SERVER_BIN, CLIENT_BIN):
        if not os.access(binary, os.X_OK):
            raise pytest.UsageError(f"{binary} is missing: run `swift build -c release` first (or set TUNNEL_BIN_DIR)")


LOOPBACK = ("127.0.0.0/8", "::1/128")


class Tunnel:
    """Keys, a tunnel-server and a tunnel-client on loopback, started on demand."""

    def __init__(self, directory):
        self.dir = directory
        self.server_key = os.path.join(directory, "server.key")
        self.client_key = os.path.join(directory, "client.key")
        self.server_pub = keygen(SERVER_BIN, self.server_key)
        self.client_pub = keygen(CLIENT_BIN, self.client_key)
        # A key of its own for raw test peers (noise_peer.py): a peer that used the client's key would replace
        # the running client's session (the server keeps one session per key).
        self.peer_key = os.path.join(directory, "peer.key")
        self.peer_pub = keygen(CLIENT_BIN, self.peer_key)
        self.authorized = os.path.join(directory, "authorized_keys")
        with open(self.authorized, "w") as f:
            f.write(f"# test clients\n{self.client_pub} test-client\n{self.peer_pub} test-peer\n")
        self.server = None
        self.client = None
        self.processes = []

    def start_server(self, listen="127.0.0.1:0", extra=(), config=None, netns=None, log="server.log", allow=LOOPBACK):
        """The test targets listen on loopback, which the server denies by default: `allow` opens it."""
        allow_args = [a for cidr in allow for a in ("--allow", cidr)]
        args = [SERVER_BIN, "--listen", listen, "--key", self.server_key, "--authorized-keys", self.authorized,
                "--log-level", "debug", *allow_args, *SERVER_EXTRA, *extra]
        if config:
            args += ["--config", config]
        self.server = Process(args, r"tunnel-server listening on (\S+)", os.path.join(self.dir, log), netns=netns)
        self.processes.append(self.server)
        return self.server

    def start_client(self, server_address=None, key=None, server_pub=None, extra=(), config=None, log="client.log"):
        address = server_address or self.server.address
        args = [CLIENT_BIN, "--server", address, "--server-key", server_pub or self.server_pub,
                "--key", key or self.client_key, "--socks", "127.0.0.1:0", "--log-level", "debug", *CLIENT_EXTRA,
                *extra]
        if config:
            args += ["--config", config]
        self.client = Process(args, r"SOCKS5 listening on (\S+)", os.path.join(self.dir, log))
        self.processes.append(self.client)
        return self.client

    def start(self, server_extra=(), client_extra=(), server_config=None, client_config=None, allow=LOOPBACK):
        self.start_server(extra=server_extra, config=server_config, allow=allow)
        self.start_client(extra=client_extra, config=client_config)
        self.wait_until_connected()
        return self

    def wait_until_connected(self, client=None, timeout=10):
        client = client or self.client
        ok = harness.wait_for(lambda: "tunnel up" in client.stderr_text(), timeout=timeout)
        assert ok, "tunnel did not come up:\n" + client.stderr_text()

    @property
    def socks_port(self):
        return self.client.port

    def proxy_url(self):
        return f"socks5://127.0.0.1:{self.socks_port}"

    def stop(self):
        for p in self.processes:
            p.kill()

    def logs(self):
        return "\n".join(f"--- {p.args[0]} ---\n{p.stderr_text()[-4000:]}" for p in self.processes)


@pytest.fixture
def tunnel(tmp_path, request):
    t = Tunnel(str(tmp_path))
    yield t
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(t.logs())
    t.stop()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def origin():
    """An HTTP/1.1 origin on 127.0.0.1 (webserver.py); a test file may define its own with another tag."""
    from webserver import Origin
    server = Origin("origin")
    yield server
    server.stop()


@pytest.fixture
def target():
    server = TargetServer()
    yield server
    server.stop()


def have_root_netns():
    return os.geteuid() == 0 and shutil.which("ip") is not None and subprocess.run(
        ["ip", "netns", "list"], capture_output=True).returncode == 0
